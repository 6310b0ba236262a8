"""
``timebill eval``: the budget × policy benchmark (the paper's Fig. 7 and 8) on this machine.

Two workloads, built from text that ships in packages (or taken from a request bag):
- **robot** (``robot_tasks.py``): a standing scene per size, primed once into the prefix
  cache, and questions answered in JSON under a schema (object lists, plans, log summaries);
- **retrieval** (``tasks.py``): the long-context groups of earlier runs, for continuity.
Every policy is measured with one prefill per prompt; writes results.json, report.md and PNGs.
``--quick`` (``make eval-quick``): scenes of ~1k and 2k tokens (3 questions each) and 4
retrieval prompts of ~1k — under 10 min on 2 cores. ``make eval``: scenes of ~1k–7.7k tokens.

Budgets are per group and stated in seconds in the report. Robot groups: over the window where
decoding decides, as the answerable pass measured it (from the slowest warm prefill plus four
steps to 1.1 × the slowest vanilla run; without that pass, predicted by the profile).
Retrieval groups: from the calibrated profile, 90 % of the shortest predicted prefill to 150 %
of the slowest predicted vanilla run of max_new_tokens.
Without a profile for this setup, a short calibration covering the task lengths runs first
and is kept with the report (the real profile in the cache is left alone).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import platform
import sys
import time

from .options import add_config_arguments, float_list, int_list, load_config

QUICK = {
    'lengths': (1024,), 'per_kind': 1, 'budgets': 5, 'max_new_tokens': 48,
    'scenes': (1024, 2048), 'robot_per_kind': 2,
}
FULL = {
    'lengths': (1024, 2048), 'per_kind': 2, 'budgets': 5, 'max_new_tokens': 0,
    'scenes': (1024, 2048, 4096, 7168), 'robot_per_kind': 4,
}
KEEP_MIN_SCORE = 0.2  # robot candidates the model answers this well at α = 0 are kept
BUDGET_RULE = (
    'per group, evenly spaced; robot groups over the decode window as measured on the kept '
    'tasks (α = 0, warm): from the slowest prefill + 4 decode steps to 1.1 × the slowest '
    'vanilla run; '
    'retrieval groups from 0.9 × the shortest predicted prefill to 1.5 × the slowest predicted '
    'vanilla run of max_new_tokens (calibrated profile)'
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        '--quick', action='store_true', help='8 short prompts (~1k-2k tokens), 5 budgets: minutes'
    )
    p.add_argument('--out', help='report directory (default results/eval or results/eval-quick)')
    add_config_arguments(p)
    p.add_argument(
        '--lengths', type=int_list, metavar='N,N,...', help='prompt length groups (tokens)'
    )
    p.add_argument('--kinds', help='comma-separated task kinds (passkey,needle,qa,multihop)')
    p.add_argument(
        '--workload',
        choices=('both', 'robot', 'retrieval'),
        default='both',
        help='robot JSON tasks over standing scenes, the retrieval groups, or both (default)',
    )
    p.add_argument(
        '--scenes', type=int_list, metavar='N,N,...', help='robot scene sizes (tokens)'
    )
    p.add_argument(
        '--keep-min-score',
        type=float,
        default=KEEP_MIN_SCORE,
        help='keep the robot candidates scoring at least this at α = 0 (0: keep all)',
    )
    p.add_argument('--per-kind', type=int, help='prompts per kind and length')
    p.add_argument('--seed', type=int, default=0, help='task seed (default 0)')
    p.add_argument(
        '--tasks-bag', help='take the tasks from a request bag written by `timebill make-tasks`'
    )
    p.add_argument('--budgets', type=int, help='budgets per length group')
    p.add_argument(
        '--budget-values',
        type=float_list,
        metavar='S,S,...',
        help='explicit budgets in seconds, for every group (overrides the profile rule)',
    )
    p.add_argument(
        '--ks',
        type=float_list,
        default=[1, 2, 3, 4, 5, 6, 7, 8],
        metavar='K,K,...',
        help='pessimism factors for the k sweep (default 1..8)',
    )
    p.add_argument(
        '--k-budget',
        type=float,
        help="budget (s) for the k sweep (default: each group's middle budget)",
    )
    p.add_argument(
        '--max-new-tokens', type=int, help="cap every task's max_new_tokens (quick: 48)"
    )
    p.add_argument('--no-plots', action='store_true', help='JSON and Markdown only')
    p.add_argument(
        '--quick-profile',
        action='store_true',
        help='without a cached profile, calibrate on the quick grid (minutes) in a full run too',
    )


def ensure_profile(engine, cfg, lengths, out_dir: Path, log=print, quick: bool = False):
    """(time model, description): the cached profile for this setup, else a short calibration."""
    from timebill_ros.core.calibration import store, timing

    key = store.profile_key(engine)
    try:
        prof = store.load_profile_for(key, cfg.profile_path or None)
        path = cfg.profile_path or store.default_profile_path(key)
        held = ', '.join(f'{k} {v:.1f}%' for k, v in prof.mape.items())
        return prof.model, f'`{path}` (held-out MAPE: {held})'
    except FileNotFoundError:
        pass
    top = min(int(engine.max_context) - 2, max(lengths) + 256)
    if quick:  # about half a minute on an idle 2-core machine
        pre, pre_held, dec, dec_held, repeats = (
            (256, 512, 1024, 1536),
            (768,),
            (256, 1024),
            (1536,),
            1,
        )
    else:
        pre, pre_held = (
            (128, 256, 512, 1024, 1536, 2048, 3072, 4096, 6144),
            (384, 768, 1792, 3584, 5120, 7168),
        )
        dec, dec_held, repeats = (
            (128, 512, 1024, 2048, 4096, 6144),
            (256, 1536, 3072, 5120, 7000),
            2,
        )
    pre = sorted({n for n in pre if n < top} | {top})
    pre_held = sorted({n for n in pre_held if n < top} - set(pre))
    dec = sorted({n for n in dec if n < top} | {top})
    dec_held = sorted({n for n in dec_held if n < top} - set(dec))
    log(
        f'[eval] no timing profile for this setup: calibrating '
        f'prompt lengths {pre} (held out {pre_held})'
    )
    prof = timing.calibrate(
        engine,
        prefill_grid=pre,
        prefill_held_out=pre_held,
        decode_grid=dec,
        decode_held_out=dec_held,
        repeats=repeats,
        decode_repeats=3,
        progress=False,
    )
    path = store.save_profile(prof, out_dir / 'profile.json')
    held = ', '.join(f'{k} {v:.1f}%' for k, v in prof.mape.items())
    return prof.model, (
        f'none cached for this setup; calibrated for this run in {prof.duration_s:.0f} s, '
        f'saved to `{path}` (held-out MAPE: {held}); run `timebill calibrate` for a thorough one'
    )


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as fh:
            for line in fh:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tasks_from_bag(path: str):
    from timebill_ros.core.evaluation.bags import read_requests
    from timebill_ros.core.evaluation.tasks import Task

    tasks = []
    for r in read_requests(path):
        if not r.task:
            continue
        t = dict(r.task)
        t.update(
            prompt=r.prompt,
            system_prompt=r.system_prompt,
            max_new_tokens=r.max_new_tokens or t.get('max_new_tokens', 64),
        )
        tasks.append(Task.from_dict(t))
    if not tasks:
        raise SystemExit(
            f'{path} holds no benchmark tasks (no '
            f'/timebill/tasks metadata): use `timebill make-tasks`'
        )
    return tasks


def run(args) -> int:
    from timebill_ros.core.engine import Engine
    from timebill_ros.core.evaluation import report
    from timebill_ros.core.evaluation.budgets import choose_budgets, measured_budgets
    from timebill_ros.core.evaluation.policies import standard_policies
    from timebill_ros.core.evaluation.runs import group_of, schema_of, SweepConfig
    from timebill_ros.core.evaluation.sweep import run_sweep, Sweeper
    from timebill_ros.core.evaluation.tasks import cap_answers, counter_for, retrieval_tasks
    from timebill_ros.core.length_predictor import load_length_predictor

    t_start = time.monotonic()
    preset = QUICK if args.quick else FULL
    out_dir = Path(args.out or ('results/eval-quick' if args.quick else 'results/eval'))
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    engine = Engine.from_config(cfg)
    robot: list = []
    # the retrieval answers are capped; a structured answer keeps its own length
    cap = args.max_new_tokens if args.max_new_tokens is not None else preset['max_new_tokens']
    if args.tasks_bag:
        tasks = cap_answers(tasks_from_bag(args.tasks_bag), cap)
    elif args.workload in ('both', 'retrieval'):
        tasks = retrieval_tasks(
            counter_for(engine), args.lengths or preset['lengths'], args.kinds,
            args.per_kind or preset['per_kind'], args.seed, cap,
        )
    else:
        tasks = []
    if not args.tasks_bag and args.workload in ('both', 'robot'):
        from timebill_ros.core.evaluation.robot_tasks import build_robot_tasks

        robot = build_robot_tasks(
            counter_for(engine),
            sizes=tuple(args.scenes or preset['scenes']),
            per_kind=preset['robot_per_kind'],
            seed=args.seed,
        )
        tasks = robot + tasks
    log(
        f'[eval] {len(tasks)} tasks, prompts of '
        f'{min(t.n_tokens for t in tasks)}–{max(t.n_tokens for t in tasks)} tokens'
    )

    time_model, profile_desc = ensure_profile(
        engine, cfg, [t.n_tokens for t in tasks], out_dir, log, args.quick or args.quick_profile
    )
    predictor = load_length_predictor(cfg, logger=log)
    pred_desc = (
        f'trained ({predictor.meta.backbone}, {predictor.meta.head} head)'
        if getattr(predictor, 'meta', None)
        else f'none: N̂ = max_new_tokens fallback ({getattr(predictor, "reason", "")})'
    )

    scfg = SweepConfig(
        budgets={},
        policies=standard_policies(cfg.pessimism_k, cfg.alpha_max),
        ks=tuple(args.ks),
        alpha_max=cfg.alpha_max,
        n_max=cfg.n_max,
    )
    sweeper = Sweeper(engine, time_model, predictor, scfg, log, config=cfg)
    sweeper.prime(tasks)  # the standing scenes, once: their questions prefill warm
    kept_info = None
    if robot and args.keep_min_score > 0:
        kept, kept_info = sweeper.answerable(robot, args.keep_min_score)
        log(f'[eval] kept {len(kept)} of {len(robot)} robot candidates '
            f'(score >= {args.keep_min_score:g} at α = 0): {kept_info["by_kind"]}')
        tasks = kept + [t for t in tasks if t not in robot]
        robot = kept
    if args.budget_values:
        budgets = {group_of(t): list(args.budget_values) for t in tasks}
        rule = 'given on the command line'
    else:
        count = args.budgets or preset['budgets']
        others = [t for t in tasks if not schema_of(t)]
        structured = [t for t in tasks if schema_of(t)]
        budgets = choose_budgets(time_model, others, count) if others else {}
        if structured and kept_info is not None:  # the window as the kept tasks measured it
            budgets.update(measured_budgets(structured, kept_info['rows'], count))
        elif structured:
            budgets.update(
                choose_budgets(
                    time_model,
                    structured,
                    count,
                    cached=sweeper.cached_of,
                    answer_tokens=lambda t: len(engine.tokenizer.encode(t.references[0])),
                )
            )
        rule = BUDGET_RULE
    for g, bs in budgets.items():
        log(f'[eval] group ~{g} tokens: budgets {", ".join(f"{b:g}" for b in bs)} s')
    scfg.budgets = budgets
    scfg.k_budget = dict.fromkeys(budgets, args.k_budget) if args.k_budget else {}
    _, _, results = run_sweep(
        engine, time_model, predictor, tasks, scfg, log, config=cfg, sweeper=sweeper
    )
    results['meta'] = {
        'mode': 'quick' if args.quick else 'full',
        'wall_s': time.monotonic() - t_start,
        'machine': (
            f'{platform.machine()}, {os.cpu_count()} CPUs, '
            f'load avg {os.getloadavg()[0]:.1f} at the end'
        ),
        'model': cfg.model,
        'dtype': cfg.dtype,
        'threads': cfg.threads,
        'press': cfg.press,
        'profile': profile_desc,
        'predictor': pred_desc,
        'n_tasks': len(tasks),
        'robot_tasks': len(robot),
        # what rebuilds the same tasks (benchmarks/structured_lengths.py --mae)
        'workload': {
            'scenes': list(args.scenes or preset['scenes'])
            if args.workload != 'retrieval' and not args.tasks_bag else [],
            'robot_per_kind': preset['robot_per_kind'],
            'lengths': list(args.lengths or preset['lengths'])
            if args.workload != 'robot' and not args.tasks_bag else [],
            'kinds': [k.strip() for k in args.kinds.split(',')] if args.kinds else None,
            'per_kind': args.per_kind or preset['per_kind'],
            'max_new_tokens': cap,
        },
        'answerable': kept_info,
        'cpu': _cpu_name(),
        'decode_step': engine.decode_step,
        'date': time.strftime('%Y-%m-%d'),
        'kinds': ', '.join(sorted({t.kind for t in tasks})),
        'seed': args.seed,
        'budget_rule': rule,
        'budgets_s': budgets,
        'ks': list(args.ks),
        'pessimism_k': cfg.pessimism_k,
        'alpha_max': cfg.alpha_max,
    }
    paths = report.write_report(results, out_dir, plots=not args.no_plots)
    log(
        f'[eval] done in {(time.monotonic() - t_start) / 60:.1f} '
        f'min: {paths["markdown"]}, {paths["json"]}'
    )
    print(paths['markdown'].read_text())
    return 0
