#!/usr/bin/env python
"""
Figure 7 under Kill on the tasks the model answers without eviction, from a saved sweep.

A task the model gets wrong at α = 0 with all the time in the world scores 0 under every policy
and budget: it tells nothing about time budgets or eviction, only dilutes the differences. This
re-reads ``results.json`` of ``timebill eval`` and keeps the tasks whose α = 0 run scored > 0.
Under Kill every job starts at its release, so dropping tasks leaves the others' outcomes exact
(under Skip-Next a late job changes its successors, so this view is Kill only).

    .venv/bin/python benchmarks/eval_answerable.py results/eval/results.json [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from timebill_ros.core.evaluation.policies import bootstrap_ci

POLICIES = ('vanilla', 'alpha=0.25', 'alpha=0.5', 'alpha=0.75', 'alpha=0.95', 'truncate',
            'timebill', 'timebill+replan')


def _cell(outcomes) -> tuple:
    comp = [float(o['completed']) for o in outcomes]
    score = [float(o['score']) for o in outcomes]
    c_lo, c_hi = bootstrap_ci(comp)
    s_lo, s_hi = bootstrap_ci(score)
    mc, ms = sum(comp) / len(comp), sum(score) / len(score)
    text = f'{mc:.0%} [{c_lo:.0%}–{c_hi:.0%}] / {ms:.2f} [{s_lo:.2f}–{s_hi:.2f}]'
    return mc, ms, (s_lo, s_hi), text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('results')
    ap.add_argument('--out')
    args = ap.parse_args()
    data = json.loads(Path(args.results).read_text())
    keep = {p['task_id'] for p in data['prompts']
            if any(r['alpha'] == 0.0 and r['score'] > 0 for r in p['runs'])}
    lines = [f'Tasks answered at α = 0: {len(keep)} of {len(data["prompts"])}.', '']
    for g, d in data['groups'].items():
        rows = [r for r in d['table'] if r['overrun'] in ('kill', 'truncate')]
        budgets = d['budgets_s']
        n = len({o['task_id'] for o in rows[0]['outcomes'] if o['task_id'] in keep})
        lines += [f'### ~{g} tokens: {n} answerable prompts (Kill)', '',
                  '| policy | ' + ' | '.join(f'T={b:g}s' for b in budgets) + ' |',
                  '|---|' + '---|' * len(budgets)]
        cells = {}
        for pol in POLICIES:
            out = []
            for b in budgets:
                row = next((r for r in rows if r['policy'] == pol and r['budget_s'] == b), None)
                sub = [o for o in row['outcomes'] if o['task_id'] in keep] if row else []
                if not sub:
                    out.append('–')
                    continue
                cells[(pol, b)] = _cell(sub)
                out.append(cells[(pol, b)][3])
            lines.append(f'| {pol} | ' + ' | '.join(out) + ' |')
        lines += ['', '| budget | best baseline | timebill | timebill+replan |',
                  '|---|---|---|---|']
        for b in budgets:
            base = [(cells[(p, b)], p) for p in POLICIES[:6] if (p, b) in cells]
            if not base:
                continue
            (bc, best) = max(base, key=lambda x: x[0][1])
            verdicts = []
            for p in ('timebill', 'timebill+replan'):
                c = cells.get((p, b))
                if c is None:
                    verdicts.append('–')
                    continue
                apart = c[2][0] > bc[2][1] or c[2][1] < bc[2][0]
                word = 'tie' if not apart else ('win' if c[1] > bc[1] else 'loss')
                verdicts.append(f'{word}: {c[1]:.2f}')
            lines.append(f'| T={b:g}s | {best}: {bc[1]:.2f} | ' + ' | '.join(verdicts) + ' |')
        lines.append('')
    text = '\n'.join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + '\n')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
