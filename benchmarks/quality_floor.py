#!/usr/bin/env python
"""
The quality floor on the real model: what EstimateBudget predicts, and what a goal gets.

For one long-context task (a planted fact in licence text), it asks the pipeline what a range
of budgets would get under the default quality floor and without one, then serves two real
requests at a budget where they differ: with the default floor (REJECTED right after prefill,
with the numbers) and with ``min_quality = 0`` (the paper's TimeBill: served at the α it
needs; its answer is scored). Prints a table and writes ``results/quality_floor.json``.

    nice -n 10 .venv/bin/python benchmarks/quality_floor.py [--tokens 4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import time

from timebill_ros.cli.options import add_config_arguments, load_config
from timebill_ros.core.calibration.store import load_profile_for, profile_key
from timebill_ros.core.engine import Engine
from timebill_ros.core.evaluation import longctx_tasks as lt
from timebill_ros.core.evaluation.tasks import counter_for
from timebill_ros.core.job import Job
from timebill_ros.core.length_predictor import load_length_predictor
from timebill_ros.core.lengths import FixedLength
from timebill_ros.core.pipeline import Pipeline


def _plan(pipe, n, budget, n_hat, cap, min_quality):
    e = pipe.estimate(n, budget, n_hat, cap, min_quality=min_quality)
    verdict = 'exceeds_quality_floor' if e.quality_refusal else e.verdict.status
    return {
        'verdict': verdict,
        'alpha': e.verdict.alpha,
        'alpha_limit': e.limit.alpha_limit,
        'expected_quality': e.expected_quality,
        'feasible': e.verdict.feasible and not e.quality_refusal,
        'reason': e.reason,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_config_arguments(ap)
    ap.add_argument('--tokens', type=int, default=4096, help='prompt length of the task')
    ap.add_argument('--kind', default='passkey', choices=lt.KINDS)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--max-new-tokens', type=int, default=128,
                    help="answer cap (the task's own is 16; a longer one widens the window where "
                         'eviction decides)')
    ap.add_argument('--out', default='results/quality_floor.json')
    args = ap.parse_args()
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    cfg = load_config(args)
    engine = Engine.from_config(cfg)
    model = load_profile_for(profile_key(engine), cfg.profile_path or None).model
    task = lt.make_task(args.kind, args.tokens, counter_for(engine), args.seed, 0)
    ids = engine.encode(task.prompt, task.system_prompt or None)
    n, cap = len(ids), args.max_new_tokens
    n_hat = min(int(load_length_predictor(cfg).predict(task.prompt).n_hat), cap)
    pipe = Pipeline(engine, model, cfg, FixedLength(n_hat))
    # one roomy run first: the online time model learns how fast the machine is right now, so
    # the budgets below sit where eviction decides, not inside prefill noise
    now = time.monotonic()
    warm = pipe.run(Job('warm-up', ids, deadline=now + 3600, accepted_at=now, max_new_tokens=cap))
    print(f'warm-up: prefill {warm.prefill_s:.2f} s, {warm.tokens_generated} tokens in '
          f'{warm.decode_s:.2f} s ({warm.status}); text {warm.text[:60]!r}')
    model = pipe.time_model()
    print(f'{task.id}: {n} prompt tokens, N̂ = {n_hat}, press {cfg.press}, '
          f'curve {pipe.quality.source if pipe.quality else "none"}')

    pre = model.prefill_s(n)
    full = pre + model.decode_s(n, 0.0, n_hat)
    budgets = [round(pre + (full - pre) * i / 10, 2) for i in range(1, 13)]
    rows = []
    print(f'\n{"budget s":>9} | {"default floor":<40} | {"min_quality 0":<32}')
    for b in budgets:
        d = _plan(pipe, n, b, n_hat, cap, -1.0)
        f = _plan(pipe, n, b, n_hat, cap, 0.0)
        rows.append({'budget_s': b, 'default': d, 'no_floor': f})
        print(f'{b:9.2f} | {d["verdict"]:<22} α={d["alpha"]:.2f} q={d["expected_quality"]:.2f}'
              f'    | {f["verdict"]:<16} α={f["alpha"]:.2f} q={f["expected_quality"]:.2f}')
    window = [r['budget_s'] for r in rows
              if r['default']['verdict'] == 'exceeds_quality_floor' and r['no_floor']['feasible']]
    served = {}
    if window:
        budget = window[len(window) // 2]
        for label, floor in (('default floor', -1.0), ('min_quality 0', 0.0)):
            now = time.monotonic()
            out = pipe.run(Job(label, ids, deadline=now + budget, accepted_at=now,
                               max_new_tokens=cap, min_quality=floor, prompt=task.prompt))
            served[label] = {
                'status': out.status, 'reason': out.reason, 'alpha': out.alpha,
                'alpha_limit': out.alpha_limit, 'expected_quality': out.expected_quality,
                'text': out.text, 'correct': lt.exact_match(task.kind, out.text,
                                                            task.references[0]),
                'prefill_s': out.prefill_s, 'total_s': out.total_s,
                'decode_started': out.decode_start_s >= 0,
            }
            print(f'\nserved at {budget:g} s with {label}: {out.status} α={out.alpha:.2f} '
                  f'(limit {out.alpha_limit:.2f}, expected quality {out.expected_quality:.2f}) '
                  f'in {out.total_s:.2f} s; text {out.text!r}; reference '
                  f'{task.references[0]}\n  reason: {out.reason}')
    pipe.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        'task': task.id, 'prompt_tokens': n, 'n_hat': n_hat, 'press': cfg.press,
        'plans': rows, 'served': served, 'loadavg': os.getloadavg(),
    }, indent=1))
    print(f'\nwrote {args.out}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
