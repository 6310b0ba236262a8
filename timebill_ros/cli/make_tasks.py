"""
``timebill make-tasks BAG``: write the benchmark tasks as a request bag to replay.

Each task becomes a TimedInference goal (in ros2's action-recording form) plus its references
and metric on ``/timebill/tasks``, so ``timebill replay BAG`` can score the answers. Budgets:
``--budget S`` for every goal, or (default) ``--budget-factor F`` × the calibrated profile's
predicted vanilla time for that prompt (prefill + max_new_tokens decode steps).
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys

from .options import add_config_arguments, int_list, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('bag', help='output bag directory (must not exist)')
    p.add_argument(
        '--quick', action='store_true', help='the eval-quick task set (~1k-2k tokens, 8 tasks)'
    )
    p.add_argument(
        '--lengths', type=int_list, metavar='N,N,...', help='prompt length groups (tokens)'
    )
    p.add_argument('--kinds', help='comma-separated task kinds (passkey,needle,qa,multihop)')
    p.add_argument('--per-kind', type=int, help='prompts per kind and length')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--budget', type=float, help='time budget (s) for every goal')
    p.add_argument(
        '--budget-factor',
        type=float,
        default=1.0,
        help="budget = F × the profile's predicted vanilla time (default 1.0)",
    )
    p.add_argument(
        '--period',
        type=float,
        default=0.0,
        help='seconds between goal timestamps (replay --pace recorded releases them so)',
    )
    p.add_argument('--max-new-tokens', type=int, help="cap every task's max_new_tokens")
    p.add_argument('--jsonl', help='also write the tasks as JSON lines here')
    add_config_arguments(p, 'ROS 2 params YAML (model, profile_path)')


def run(args) -> int:
    from timebill_ros.core.calibration.store import load_profile_for, profile_key
    from timebill_ros.core.engine import Engine
    from timebill_ros.core.evaluation.bags import write_request_bag
    from timebill_ros.core.evaluation.tasks import counter_for, retrieval_tasks, save_tasks

    from .evaluate import FULL, QUICK

    if Path(args.bag).exists():
        print(f'{args.bag} exists already; choose a new bag path', file=sys.stderr)
        return 2
    preset = QUICK if args.quick else FULL
    cfg = load_config(args)
    engine = Engine.from_config(cfg)
    tasks = retrieval_tasks(
        counter_for(engine), args.lengths or preset['lengths'], args.kinds,
        args.per_kind or preset['per_kind'], args.seed,
        args.max_new_tokens or preset['max_new_tokens'],
    )
    model = None
    if args.budget is None:
        try:
            model = load_profile_for(profile_key(engine), cfg.profile_path or None).model
        except FileNotFoundError as exc:
            print(f'{exc}\n(or give --budget SECONDS)', file=sys.stderr)
            return 2
    requests = []
    for t in tasks:
        budget = (
            args.budget
            if model is None
            else args.budget_factor
            * (model.prefill_s(t.n_tokens) + model.decode_s(t.n_tokens, 0.0, t.max_new_tokens))
        )
        requests.append(
            {
                'prompt': t.prompt,
                'system_prompt': t.system_prompt,
                'time_budget': round(budget, 3),
                'max_new_tokens': t.max_new_tokens,
                'overrun_policy': '',
                'task': {
                    k: v for k, v in t.to_dict().items() if k not in ('prompt', 'system_prompt')
                },
            }
        )
    write_request_bag(args.bag, requests, period_s=args.period)
    if args.jsonl:
        save_tasks(tasks, args.jsonl)
    for t, r in zip(tasks, requests):
        print(f'{t.id}: {t.n_tokens} tokens, budget {r["time_budget"]:g} s, metric {t.metric}')
    print(f'wrote {len(tasks)} goals to {args.bag}')
    return 0
