"""
The benchmark report as Markdown: one section per prompt group, cells with their CIs.

Every rate and score carries a 95 % percentile-bootstrap CI over the prompts, so a reader can
tell a real gap from prompt-to-prompt noise; the win / tie / loss table says which gaps are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .policies import CI_LEVEL, CI_RESAMPLES
from .report_rows import add_cis, ci_of, is_missing, OVERRUN_TITLES, OWN_DEADLINE, rows_by_policy

CI_NOTE = (
    f'Brackets: {100 * CI_LEVEL:.0f} % confidence intervals, a percentile bootstrap over the '
    f'prompts ({CI_RESAMPLES} resamples of the jobs in a row, fixed seed). Jobs in one row are '
    'not fully independent (under Skip-Next a late job skips the next ones), so the intervals '
    'are the usual approximation, not exact.'
)
HOW_TO_READ = (
    'Completion = finished (EOS or max_new_tokens) by the deadline. Jobs are released every T '
    's in a fixed order; Kill stops a late job (score 0), Skip-Next lets it finish (its '
    'answer is scored, not completed) and skips the jobs released meanwhile; truncate '
    'keeps the text ready at the deadline; close (structured answers) closes the open '
    'structure before the deadline and keeps a valid, shorter answer. Statuses are the '
    "generator pipeline's own. Cells: completion rate / average score."
)


def _pct(x: Optional[float]) -> str:
    return '–' if is_missing(x) else f'{100 * x:.0f}%'


def _num(x: Optional[float], fmt: str = '.2f') -> str:
    return '–' if is_missing(x) else format(x, fmt)


def _pct_ci(x: Optional[float], ci: Optional[Sequence[float]]) -> str:
    if is_missing(x) or ci is None:
        return _pct(x)
    return f'{100 * x:.0f}% [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]'


def _num_ci(x: Optional[float], ci: Optional[Sequence[float]]) -> str:
    if is_missing(x) or ci is None:
        return _num(x)
    return f'{x:.2f} [{ci[0]:.2f}–{ci[1]:.2f}]'


def _cell(row: dict) -> str:
    """One table cell: ``83% [67–96] / 0.71 [0.55–0.86]`` (completion / score, with CIs)."""
    return (
        f'{_pct_ci(row.get("completion_rate"), ci_of(row, "completion_ci"))} / '
        f'{_num_ci(row.get("avg_score"), ci_of(row, "score_ci"))}'
    )


def _budget_header(budgets: Sequence[float], first: str = 'policy') -> List[str]:
    return [
        f'| {first} | ' + ' | '.join(f'T={b:g}s' for b in budgets) + ' |',
        '|---|' + '---|' * len(budgets),
    ]


def verdict(
    mean: Optional[float],
    ci: Optional[Sequence[float]],
    other_mean: Optional[float],
    other_ci: Optional[Sequence[float]],
) -> str:
    """
    Return win / loss only when the means differ and the CIs do not overlap, else tie.

    Non-overlap is a conservative test: a tie means "not shown apart", not "equal".
    """
    if ci is None or other_ci is None or is_missing(mean) or is_missing(other_mean):
        return 'n/a'
    if mean > other_mean and ci[0] > other_ci[1]:
        return 'win'
    if mean < other_mean and ci[1] < other_ci[0]:
        return 'loss'
    return 'tie'


def _verdict_lines(d: dict) -> List[str]:
    """Per budget under Kill: each TimeBill variant against the best baseline by average score."""
    rows = rows_by_policy(d['table'], 'kill')
    tbs = [p for p in rows if p.startswith('timebill')]
    bases = [p for p in rows if not p.startswith('timebill')]
    if not tbs or not bases:
        return []
    lines = [
        '### Where TimeBill wins, ties or loses (Kill, average score)',
        '',
        'Against the best baseline at each budget (highest average score among the other '
        'policies, truncate included): win / loss when the means differ and the 95 % CIs do not '
        'overlap, tie otherwise. Non-overlap is a conservative test and the best of several '
        'baselines is picked after the fact, so both lean towards "tie".',
        '',
        '| budget | best baseline | ' + ' | '.join(tbs) + ' |',
        '|---|---|' + '---|' * len(tbs),
    ]
    tally: Dict[str, Dict[str, int]] = {p: {} for p in tbs}
    for b in d['budgets_s']:
        cands = [
            (rows[p][b], p)
            for p in bases
            if b in rows[p] and not is_missing(rows[p][b]['avg_score'])
        ]
        if not cands:
            continue
        base, name = max(cands, key=lambda c: c[0]['avg_score'])
        cells = []
        for p in tbs:
            r = rows[p].get(b)
            if r is None:
                cells.append('–')
                continue
            v = verdict(
                r['avg_score'], ci_of(r, 'score_ci'), base['avg_score'], ci_of(base, 'score_ci')
            )
            tally[p][v] = tally[p].get(v, 0) + 1
            cells.append(f'{v}: {_num_ci(r["avg_score"], ci_of(r, "score_ci"))}')
        lines.append(
            f'| T={b:g}s | {name}: {_num_ci(base["avg_score"], ci_of(base, "score_ci"))} | '
            + ' | '.join(cells)
            + ' |'
        )
    lines += [
        '',
        'Tally: '
        + '; '.join(
            f'{p} {", ".join(f"{t.get(v, 0)} {v}" for v in ("win", "tie", "loss"))}'
            + (f', {t["n/a"]} n/a' if t.get('n/a') else '')
            for p, t in tally.items()
        )
        + '.',
        '',
    ]
    return lines


def _valid_lines(d: dict) -> List[str]:
    """Schema-valid share of the answers delivered, per policy and budget (structured tasks)."""
    rows = rows_by_policy(d['table'], 'kill')
    if not any(r.get('answered') for by_b in rows.values() for r in by_b.values()):
        return []
    lines = [
        '### Schema-valid answers (Kill; truncate and close at the deadline)',
        '',
        'Of the answers a planner received (succeeded or truncated), the share that parses as '
        'JSON matching the schema; in brackets how many answers there were.',
        '',
        *_budget_header(d['budgets_s']),
    ]
    for pol, by_b in rows.items():
        cells = []
        for b in d['budgets_s']:
            r = by_b.get(b)
            n = r.get('answered', 0) if r else 0
            cells.append(f'{_pct(r["valid_rate"])} ({n})' if n else '– (0)')
        lines.append(f'| {pol} | ' + ' | '.join(cells) + ' |')
    return lines + ['']


def _alpha_lines(d: dict) -> List[str]:
    """
    List the α TimeBill plans per budget, once.

    The re-planning variant starts from the same plan as TimeBill, so variants whose α are the
    same share one line instead of repeating every budget.
    """
    by_pol: Dict[str, List[str]] = {}
    for r in d['table']:
        if r['policy'].startswith('timebill') and r['overrun'] == 'kill' and r.get('alphas'):
            mean = sum(r['alphas']) / len(r['alphas'])
            by_pol.setdefault(r['policy'], []).append(f'T={r["budget_s"]:g}s: {mean:.2f}')
    same: Dict[str, List[str]] = {}
    for pol, cells in by_pol.items():
        same.setdefault(', '.join(cells), []).append(pol)
    if not same:
        return []
    parts = [f'{" and ".join(pols)}: {text}' for text, pols in same.items()]
    return ["TimeBill's α per budget (mean over prompts; planned before decoding): "
            + '; '.join(parts), '']


def _lateness_lines(d: dict) -> List[str]:
    lines = [
        '### How late were the late jobs (seconds past the '
        'deadline; Kill: how long they would have run on)',
        '',
        *_budget_header(d['budgets_s']),
    ]
    for ov in ('kill', 'skip-next'):
        for pol, by_b in rows_by_policy(d['table'], ov).items():
            if pol in OWN_DEADLINE and ov != 'kill':
                continue
            cells = []
            for b in d['budgets_s']:
                r = by_b.get(b)
                cells.append(
                    '–'
                    if not r or not r['late_count']
                    else f'{r["late_count"]}: med {r["late_s_median"]:.1f}, '
                    f'max {r["late_s_max"]:.1f}'
                )
            label = pol if pol in OWN_DEADLINE else f'{pol} / {OVERRUN_TITLES[ov]}'
            lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return lines + ['']


def _k_lines(d: dict) -> List[str]:
    if not d.get('k_sweep'):
        return []
    lines = [
        f'### Pessimism factor k (TimeBill, T={d["k_budget_s"]:g}s)',
        '',
        '| k | mean α | Kill | Skip-Next |',
        '|---|---|---|---|',
    ]
    by_k: Dict[float, Dict[str, dict]] = {}
    for r in d['k_sweep']:
        by_k.setdefault(r['k'], {})[r['overrun']] = r
    for k, rs in by_k.items():
        a = rs['kill']['alphas']
        lines.append(
            f'| {k:g} | {sum(a) / len(a):.2f} | '
            + ' | '.join(_cell(rs[o]) if o in rs else '–' for o in ('kill', 'skip-next'))
            + ' |'
        )
    if len({tuple(rs['kill']['alphas']) for rs in by_k.values()}) == 1:
        lines += [
            '',
            'α did not change with k here: the pessimistic length min(k·N̂, '
            'max_new_tokens) was already max_new_tokens at the smallest k (N̂ close to, '
            'or equal to, the cap — as with the N_max fallback), '
            'so every k planned for the same worst case.',
        ]
    return lines + ['']


def _group_lines(g: str, d: dict) -> List[str]:
    toks = d.get('prompt_tokens', [])
    lines = [
        f'## Prompts of ~{g} tokens ({d["n_prompts"]} '
        f'prompts, {min(toks)}–{max(toks)} tokens)',
        '',
    ]
    for ov in ('kill', 'skip-next'):
        lines += [f'### {OVERRUN_TITLES[ov]}', '', *_budget_header(d['budgets_s'])]
        for pol, by_b in rows_by_policy(d['table'], ov).items():
            cells = [_cell(by_b[b]) if b in by_b else '–' for b in d['budgets_s']]
            lines.append(f'| {pol} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    return (lines + _valid_lines(d) + _verdict_lines(d) + _alpha_lines(d)
            + _lateness_lines(d) + _k_lines(d))


def _meta_lines(results: dict) -> List[str]:
    meta = results.get('meta', {})
    if not meta:
        return []
    lines = [
        f'- mode: **{meta.get("mode", "")}**, wall time {meta.get("wall_s", 0) / 60:.1f} min, '
        f'machine: {meta.get("machine", "")}',
        f'- model: `{meta.get("model", "")}` ({meta.get("dtype", "")}, '
        f'{meta.get("threads", "")} threads), '
        f'press `{meta.get("press", "")}`, greedy decoding',
        f'- timing profile: {meta.get("profile", "")}',
        f'- length predictor: {meta.get("predictor", "")}',
        f'- tasks: {meta.get("n_tasks", 0)} ({meta.get("kinds", "")}), seed '
        f'{meta.get("seed", 0)}',
        f'- budgets: {meta.get("budget_rule", "")}',
    ]
    kept = meta.get('answerable')
    if kept:
        lines.append(
            f'- robot tasks: kept {kept["kept"]} of {kept["candidates"]} candidates the model '
            f'answers with score ≥ {kept["min_score"]:g} at α = 0 and no deadline ('
            + ', '.join(f'{k} {v[0]}/{v[1]}' for k, v in kept['by_kind'].items())
            + f'); schema-valid candidate answers: {_pct(kept["candidates_valid_rate"])}'
        )
    return lines + ['']


def _spread_lines(results: dict) -> List[str]:
    spread = results.get('timing_spread', {})
    if not spread:
        return []
    return [
        f'Measurements: {spread.get("prefills")} prefills (one per prompt) and '
        f'{spread.get("decode_runs")} decode runs (one per prompt and kept-KV length; every '
        f'budget is judged on these runs). Decode step times within a run varied with a '
        f'median coefficient of variation of {_num(spread.get("step_time_cv_median"))} (max '
        f'{_num(spread.get("step_time_cv_max"))}): the '
        f'machine is shared, so single timings are noisy.',
        '',
    ]


def _estimator_lines(results: dict) -> List[str]:
    est = results.get('estimator')
    if not est:
        return []
    lines = [
        '## Estimator error on the served requests',
        '',
        f'- response length: MAE {_num(est["length_mae"], ".1f")} tokens '
        f'(N̂ capped at max_new_tokens: {_num(est["length_mae_capped"], ".1f")}); '
        f'structured answers {_num(est.get("length_mae_structured"), ".1f")}, '
        f'free text {_num(est.get("length_mae_free"), ".1f")}',
        f'- prefill time MAPE {_num(est["prefill_mape"], ".1f")}%, decode time MAPE '
        f'{_num(est["decode_mape"], ".1f")}%, end-to-end MAPE '
        f'{_num(est["total_mape"], ".1f")}% '
        '(predicted for the length actually generated)',
        f'- actual end-to-end time within the k=5 '
        f'WCET: {_pct(est["within_wcet_rate"])} of runs',
        '',
        '| task | prompt tokens | N̂ | tokens (α=0) | prefill pred / actual (s) |',
        '|---|---|---|---|---|',
    ]
    pre = {p['task_id']: p for p in results.get('prompts', [])}
    for x in est['lengths']:
        p = pre.get(x['task_id'], {})
        lines.append(
            f'| {x["task_id"]} | {p.get("n_prompt", "")} | {x["n_hat"]:g} | {x["actual"]} | '
            f'{_num(p.get("prefill_pred_s"))} / {_num(p.get("prefill_s"))} |'
        )
    return lines + ['']


def markdown(results: dict) -> str:
    """Render the whole report (CIs filled in from the outcomes where the rows lack them)."""
    add_cis(results)
    lines = ['# TimeBill offline benchmark', '']
    lines += _meta_lines(results) + _spread_lines(results)
    lines += [HOW_TO_READ, '', CI_NOTE, '']
    for g, d in results.get('groups', {}).items():
        lines += _group_lines(g, d)
    lines += _estimator_lines(results)
    figs = results.get('figures', [])
    if figs:
        lines += (
            ['## Figures', '', 'Error bars and bands: the 95 % bootstrap CIs of the tables.', '']
            + [f'![{Path(f).stem}]({Path(f).name})' for f in figs]
            + ['']
        )
    return '\n'.join(lines)
