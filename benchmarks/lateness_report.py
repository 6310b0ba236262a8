"""
The lateness table ``load_lateness.py`` prints: per status, when answers reached the planner.

Lateness = arrival - deadline, measured at the client; plus the prefix-cache, false-kill,
WCET and estimate-timing lines of a run with shared scenes.
"""

from __future__ import annotations

import math

OK = ('succeeded', 'truncated')


def pct(xs: list, q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else math.nan


def report(records: list, mem: dict) -> str:
    rows = [
        '| status | n | lateness min | median | p95 | max | after deadline |',
        '|---|---:|---:|---:|---:|---:|---:|',
    ]
    for st in sorted({r['status'] for r in records}):
        rs = [r for r in records if r['status'] == st]
        lat = [r['lateness_s'] for r in rs if 'lateness_s' in r]
        late = sum(x > 0 for x in lat)
        rows.append(
            f'| {st} | {len(rs)} | {pct(lat, 0):.3f} | {pct(lat, 0.5):.3f} | '
            f'{pct(lat, 0.95):.3f} | {pct(lat, 1):.3f} | {late} |'
        )
    lat = [r['lateness_s'] for r in records if 'lateness_s' in r]
    rows.append(
        f'| **all** | {len(records)} | {pct(lat, 0):.3f} | {pct(lat, 0.5):.3f} | '
        f'{pct(lat, 0.95):.3f} | {pct(lat, 1):.3f} | {sum(x > 0 for x in lat)} |'
    )
    g = [r for r in records if not r['cancel'] and (r.get('estimate') or {}).get('guaranteed')]
    on_time = [r for r in g if r['status'] in OK and r.get('lateness_s', 1) <= 0]
    lines = ['', *rows, '', f'guaranteed answers served on time: {len(on_time)}/{len(g)}']
    for key, label in (('feasible', 'feasible'), ('admissible', 'admissible')):
        f = [r for r in records if not r['cancel'] and (r.get('estimate') or {}).get(key)]
        ok = [r for r in f if r['status'] in OK and r.get('lateness_s', 1) <= 0]
        lines.append(f'{label} (estimate) answers served on time: {len(ok)}/{len(f)}')
    met_late = [r for r in records if r.get('deadline_met') and r.get('lateness_s', 0) > 0]
    lines.append(f'deadline_met=true but arrived late at client: {len(met_late)}')
    lines += cache_lines(records)
    c = [r for r in records if 'cancel_sent_s' in r and 'arrival_s' in r]
    d = [r['arrival_s'] - r['cancel_sent_s'] for r in c]
    lines.append(
        f'cancels sent {len(c)} (accepted {sum(r["cancel_accepted"] for r in c)}), '
        f'result after cancel: median {pct(d, 0.5):.2f} s, max {pct(d, 1):.2f} s, '
        f'statuses {sorted(r["status"] for r in c)}'
    )
    lines += [
        '',
        '| node | threads idle | threads max (load) | RSS idle MiB | RSS max MiB |',
        '|---|---:|---:|---:|---:|',
    ]
    for name, m in mem.items():
        lines.append(
            f'| {name} | {m["idle_threads"]} | {m["max_threads"]} | '
            f'{m["idle_rss"] / 1024:.0f} | {m["max_rss"] / 1024:.0f} |'
        )
    return '\n'.join(lines)


def cache_lines(records: list) -> list:
    """Prefix-cache hits, false kills, measured time over wcet_s, estimates after prefill."""
    served = [r for r in records if r['status'] in OK and not r['cancel']]
    out = []
    for kind in sorted({r['kind'] for r in records}):
        rs = [r for r in records if r['kind'] == kind and 'prompt_tokens' in r]
        hit = [r for r in rs if r.get('cached_tokens', 0) > 0]
        pre = [r['prefill_s'] for r in rs if r.get('prefill_s', 0) > 0]
        g = [r for r in rs if not r['cancel'] and (r.get('estimate') or {}).get('guaranteed')]
        ok = [r for r in g if r['status'] in OK and r.get('lateness_s', 1) <= 0]
        out.append(
            f'{kind}: {len(rs)} goals, prefix-cache hits {len(hit)}, prefill median '
            f'{pct(pre, 0.5):.2f} s (max {pct(pre, 1):.2f}), guaranteed on time '
            f'{len(ok)}/{len(g)}'
        )
    false_kills = [
        r
        for r in records
        if r['status'] == 'killed'
        and 'stopped prefill' in r.get('reason', '')
        and (r.get('estimate') or {}).get('feasible')
    ]
    out.append(f'kills in prefill of goals EstimateBudget called feasible: {len(false_kills)}')
    for r in false_kills[:5]:
        out.append(f'  - budget {r["budget_s"]} s: {r["reason"][:160]}')
    over = [
        r['server_total_s'] / r['wcet_s']
        for r in served
        if r.get('wcet_s', 0) > 0 and r['server_total_s'] > r['wcet_s']
    ]
    out.append(
        f"measured total > the result's wcet_s: {len(over)}/{len(served)} served"
        + (f', worst {max(over):.2f}x' if over else '')
    )
    t = [r.get('timeline') or {} for r in served]
    after = [x for x in t if not 0 <= x.get('estimate_received', -1) <= x.get('prefill_end', -1)]
    out.append(f'length estimate after prefill (or never): {len(after)}/{len(t)} served')
    return out
