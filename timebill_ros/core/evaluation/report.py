"""
Benchmark reports: JSON for machines, Markdown for people, PNGs like the paper's figures.

Fig. 7 style: completion rate and average score against the time budget, one line per policy,
one column per overrun strategy. Fig. 8 style: the same two numbers against TimeBill's
pessimism factor k at one budget. Plus lateness of the late jobs and the estimator's error on
the requests actually served. Every rate and score carries a 95 % percentile-bootstrap CI over
the prompts, so a reader can tell a real gap from prompt-to-prompt noise.

Re-render a saved run (new CIs, tables and PNGs; results.json is left as measured)::

    python -m timebill_ros.core.evaluation.report results/eval/results.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
import sys
from typing import Any, Dict, List, Optional, Sequence

from .policies import CI_LEVEL, CI_RESAMPLES, outcome_cis

OVERRUN_TITLES = {'kill': 'Kill', 'skip-next': 'Skip-Next'}
OWN_DEADLINE = ('truncate', 'close')  # policies that act at the deadline (no Kill/Skip-Next)
CI_NOTE = (
    f'Brackets: {100 * CI_LEVEL:.0f} % confidence intervals, a percentile bootstrap over the '
    f'prompts ({CI_RESAMPLES} resamples of the jobs in a row, fixed seed). Jobs in one row are '
    'not fully independent (under Skip-Next a late job skips the next ones), so the intervals '
    'are the usual approximation, not exact.'
)


def _clean(x: Any) -> Any:
    """JSON without NaN/inf (not valid JSON): those become null."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(data: dict, path: Path) -> Path:
    path.write_text(json.dumps(_clean(data), indent=1))
    return path


def _rows(table: List[dict], overrun: str) -> Dict[str, Dict[float, dict]]:
    """Policy -> budget -> row, for one overrun strategy (truncate and close show under both)."""
    out: Dict[str, Dict[float, dict]] = {}
    for row in table:
        if row['overrun'] in (overrun, 'truncate', 'close'):
            out.setdefault(row['policy'], {})[row['budget_s']] = row
    return out


def _pct(x: Optional[float]) -> str:
    return '–' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{100 * x:.0f}%'


def _num(x: Optional[float], fmt: str = '.2f') -> str:
    return '–' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


# ------------------------------------------------------------------------ confidence intervals
def add_cis(results: dict) -> dict:
    """
    Fill in ``completion_ci`` / ``score_ci`` from stored outcomes where a row lacks them.

    Results written before the CIs existed hold only the per-job outcomes; rows without
    outcomes (old k sweeps) stay without CIs and are shown as point values.
    """
    for d in results.get('groups', {}).values():
        for row in list(d.get('table', [])) + list(d.get('k_sweep', [])):
            if 'completion_ci' in row and 'score_ci' in row:
                continue
            outs = row.get('outcomes')
            if outs is None:
                continue
            row.update(
                outcome_cis(
                    [float(bool(o['completed'])) for o in outs],
                    [math.nan if o['score'] is None else o['score'] for o in outs],
                )
            )
    return results


def _ci(row: dict, key: str) -> Optional[Sequence[float]]:
    """Return the row's ``key`` interval, or None when absent or undefined (no jobs)."""
    ci = row.get(key)
    if not ci or any(_missing(c) for c in ci):
        return None
    return ci


def _pct_ci(x: Optional[float], ci: Optional[Sequence[float]]) -> str:
    if _missing(x) or ci is None:
        return _pct(x)
    return f'{100 * x:.0f}% [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]'


def _num_ci(x: Optional[float], ci: Optional[Sequence[float]]) -> str:
    if _missing(x) or ci is None:
        return _num(x)
    return f'{x:.2f} [{ci[0]:.2f}–{ci[1]:.2f}]'


def _cell(row: dict) -> str:
    """One table cell: ``83% [67–96] / 0.71 [0.55–0.86]`` (completion / score, with CIs)."""
    return (
        f'{_pct_ci(row.get("completion_rate"), _ci(row, "completion_ci"))} / '
        f'{_num_ci(row.get("avg_score"), _ci(row, "score_ci"))}'
    )


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
    if ci is None or other_ci is None or _missing(mean) or _missing(other_mean):
        return 'n/a'
    if mean > other_mean and ci[0] > other_ci[1]:
        return 'win'
    if mean < other_mean and ci[1] < other_ci[0]:
        return 'loss'
    return 'tie'


def _verdict_lines(d: dict) -> List[str]:
    """Per budget under Kill: each TimeBill variant against the best baseline by average score."""
    rows = _rows(d['table'], 'kill')
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
            if b in rows[p] and not _missing(rows[p][b]['avg_score'])
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
                r['avg_score'], _ci(r, 'score_ci'), base['avg_score'], _ci(base, 'score_ci')
            )
            tally[p][v] = tally[p].get(v, 0) + 1
            cells.append(f'{v}: {_num_ci(r["avg_score"], _ci(r, "score_ci"))}')
        lines.append(
            f'| T={b:g}s | {name}: {_num_ci(base["avg_score"], _ci(base, "score_ci"))} | '
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
    rows = _rows(d['table'], 'kill')
    if not any(r.get('answered') for by_b in rows.values() for r in by_b.values()):
        return []
    lines = [
        '### Schema-valid answers (Kill; truncate and close at the deadline)',
        '',
        'Of the answers a planner received (succeeded or truncated), the share that parses as '
        'JSON matching the schema; in brackets how many answers there were.',
        '',
        '| policy | ' + ' | '.join(f'T={b:g}s' for b in d['budgets_s']) + ' |',
        '|---|' + '---|' * len(d['budgets_s']),
    ]
    for pol, by_b in rows.items():
        cells = []
        for b in d['budgets_s']:
            r = by_b.get(b)
            n = r.get('answered', 0) if r else 0
            cells.append(f'{_pct(r["valid_rate"])} ({n})' if n else '– (0)')
        lines.append(f'| {pol} | ' + ' | '.join(cells) + ' |')
    return lines + ['']


# ------------------------------------------------------------------------------------ markdown
def markdown(results: dict) -> str:
    add_cis(results)
    meta = results.get('meta', {})
    lines = ['# TimeBill offline benchmark', '']
    if meta:
        lines += [
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
        lines.append('')
    spread = results.get('timing_spread', {})
    if spread:
        lines += [
            f'Measurements: {spread.get("prefills")} prefills (one per prompt) and '
            f'{spread.get("decode_runs")} decode runs (one per prompt and kept-KV length; every '
            f'budget is judged on these runs). Decode step times within a run varied with a '
            f'median coefficient of variation of {_num(spread.get("step_time_cv_median"))} (max '
            f'{_num(spread.get("step_time_cv_max"))}): the '
            f'machine is shared, so single timings are noisy.',
            '',
        ]
    lines += [
        'Completion = finished (EOS or max_new_tokens) by the deadline. Jobs are released every T '
        's in a fixed order; Kill stops a late job (score 0), Skip-Next lets it finish (its '
        'answer is scored, not completed) and skips the jobs released meanwhile; truncate '
        'keeps the text ready at the deadline; close (structured answers) closes the open '
        'structure before the deadline and keeps a valid, shorter answer. Statuses are the '
        "generator pipeline's own. Cells: completion rate / average score.",
        '',
        CI_NOTE,
        '',
    ]
    for g, d in results.get('groups', {}).items():
        budgets = d['budgets_s']
        toks = d.get('prompt_tokens', [])
        lines += [
            f'## Prompts of ~{g} tokens ({d["n_prompts"]} '
            f'prompts, {min(toks)}–{max(toks)} tokens)',
            '',
        ]
        for ov in ('kill', 'skip-next'):
            rows = _rows(d['table'], ov)
            lines += [
                f'### {OVERRUN_TITLES[ov]}',
                '',
                '| policy | ' + ' | '.join(f'T={b:g}s' for b in budgets) + ' |',
                '|---|' + '---|' * len(budgets),
            ]
            for pol, by_b in rows.items():
                cells = [_cell(by_b[b]) if b in by_b else '–' for b in budgets]
                lines.append(f'| {pol} | ' + ' | '.join(cells) + ' |')
            lines.append('')
        lines += _valid_lines(d)
        lines += _verdict_lines(d)
        tb = [
            r for r in d['table'] if r['policy'].startswith('timebill') and r['overrun'] == 'kill'
        ]
        if tb:
            lines += [
                "TimeBill's α per budget (mean over prompts): "
                + ', '.join(
                    f'T={r["budget_s"]:g}s: {sum(r["alphas"]) / len(r["alphas"]):.2f}' for r in tb
                ),
                '',
            ]
        lines += [
            '### How late were the late jobs (seconds past the '
            'deadline; Kill: how long they would have run on)',
            '',
            '| policy | ' + ' | '.join(f'T={b:g}s' for b in budgets) + ' |',
            '|---|' + '---|' * len(budgets),
        ]
        for ov in ('kill', 'skip-next'):
            for pol, by_b in _rows(d['table'], ov).items():
                if pol in OWN_DEADLINE and ov != 'kill':
                    continue
                cells = []
                for b in budgets:
                    r = by_b.get(b)
                    cells.append(
                        '–'
                        if not r or not r['late_count']
                        else f'{r["late_count"]}: med {r["late_s_median"]:.1f}, '
                        f'max {r["late_s_max"]:.1f}'
                    )
                label = pol if pol in OWN_DEADLINE else f'{pol} / {OVERRUN_TITLES[ov]}'
                lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
        lines.append('')
        if d.get('k_sweep'):
            lines += [
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
            lines.append('')
    est = results.get('estimator')
    if est:
        lines += [
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
        lines.append('')
    figs = results.get('figures', [])
    if figs:
        lines += (
            ['## Figures', '', 'Error bars and bands: the 95 % bootstrap CIs of the tables.', '']
            + [f'![{Path(f).stem}]({Path(f).name})' for f in figs]
            + ['']
        )
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------ figures
def _style(policy: str):
    if policy == 'vanilla':
        return {'color': 'black', 'marker': 'o'}
    if policy == 'truncate':
        return {'color': 'grey', 'marker': 'x', 'linestyle': '--'}
    if policy == 'close':
        return {'color': 'tab:brown', 'marker': 'P', 'linestyle': '--'}
    if policy.startswith('timebill'):
        return {'color': 'tab:red', 'marker': '*', 'markersize': 10, 'linewidth': 2.2}
    palette = {
        'alpha=0.25': ('tab:blue', 'v'),
        'alpha=0.5': ('tab:green', 's'),
        'alpha=0.75': ('tab:purple', 'D'),
        'alpha=0.95': ('tab:orange', '^'),
    }
    color, marker = palette.get(policy, (None, '.'))
    return {'color': color, 'marker': marker, 'alpha': 0.85, 'markersize': 5}


def _band(rows: Sequence[dict], key: str, ci_key: str, scale: float = 1.0):
    """Points and their CI bounds (NaN where unknown), scaled for plotting."""
    ys, lo, hi = [], [], []
    for r in rows:
        y = math.nan if _missing(r.get(key)) else scale * r[key]
        ci = _ci(r, ci_key)
        ys.append(y)
        lo.append(math.nan if ci is None else scale * ci[0])
        hi.append(math.nan if ci is None else scale * ci[1])
    return ys, lo, hi


def _yerr(ys: List[float], lo: List[float], hi: List[float]) -> List[List[float]]:
    """Errorbar lengths below / above each point (a percentile CI may miss its point slightly)."""
    return [
        [max(y - a, 0.0) if not math.isnan(a) else 0.0 for y, a in zip(ys, lo)],
        [max(b - y, 0.0) if not math.isnan(b) else 0.0 for y, b in zip(ys, hi)],
    ]


def figures(results: dict, out_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    add_cis(results)
    paths: List[Path] = []
    for g, d in results.get('groups', {}).items():
        fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
        budgets = d.get('budgets_s') or [0.0]
        span = (max(budgets) - min(budgets)) or 1.0
        for col, ov in enumerate(('kill', 'skip-next')):
            rows = _rows(d['table'], ov)
            for i, (pol, by_b) in enumerate(rows.items()):
                bs = sorted(by_b)
                # dodge the policies sideways a little so their error bars stay readable
                xs = [b + (i - (len(rows) - 1) / 2) * 0.006 * span for b in bs]
                for ax, key, ci_key, scale in (
                    (axes[0, col], 'completion_rate', 'completion_ci', 100.0),
                    (axes[1, col], 'avg_score', 'score_ci', 1.0),
                ):
                    ys, lo, hi = _band([by_b[b] for b in bs], key, ci_key, scale)
                    ax.errorbar(
                        xs,
                        ys,
                        yerr=_yerr(ys, lo, hi),
                        capsize=2,
                        elinewidth=0.8,
                        label=pol,
                        **_style(pol),
                    )
            axes[0, col].set_title(f'{OVERRUN_TITLES[ov]} — prompts ~{g} tokens')
            axes[0, col].set_ylabel('completion rate (%)')
            axes[1, col].set_ylabel('average score')
            axes[1, col].set_xlabel('time budget (s)')
            for ax in axes[:, col]:
                ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f'fig7_completion_score_{g}.png'
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

        if d.get('k_sweep'):
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
            for ov in ('kill', 'skip-next'):
                rs = sorted((r for r in d['k_sweep'] if r['overrun'] == ov), key=lambda r: r['k'])
                ks = [r['k'] for r in rs]
                for ax, key, ci_key, scale in (
                    (axes[0], 'completion_rate', 'completion_ci', 100.0),
                    (axes[1], 'avg_score', 'score_ci', 1.0),
                ):
                    ys, lo, hi = _band(rs, key, ci_key, scale)
                    (line,) = ax.plot(ks, ys, marker='o', label=OVERRUN_TITLES[ov])
                    ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
            axes[0].set_ylabel('completion rate (%)')
            axes[1].set_ylabel('average score')
            for ax in axes:
                ax.set_xlabel('pessimism factor k')
                ax.grid(alpha=0.3)
            axes[0].legend()
            fig.suptitle(f'TimeBill vs k at T = {d["k_budget_s"]:g} s (prompts ~{g} tokens)')
            fig.tight_layout()
            p = out_dir / f'fig8_k_sweep_{g}.png'
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
        for col, ov in enumerate(('kill', 'skip-next')):
            for pol, by_b in _rows(d['table'], ov).items():
                if pol in OWN_DEADLINE:
                    continue
                bs = sorted(by_b)
                axes[col].plot(
                    bs, [by_b[b]['late_s_median'] for b in bs], label=pol, **_style(pol)
                )
            axes[col].set_title(f'{OVERRUN_TITLES[ov]}: median lateness of late jobs')
            axes[col].set_xlabel('time budget (s)')
            axes[col].grid(alpha=0.3)
        axes[0].set_ylabel('seconds past the deadline')
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f'lateness_{g}.png'
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    est = results.get('estimator')
    if est and est.get('times'):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        ls = est['lengths']
        axes[0].scatter(
            [x['actual'] for x in ls], [min(x['n_hat'], x['max_new_tokens']) for x in ls]
        )
        m = max([x['actual'] for x in ls] + [x['max_new_tokens'] for x in ls] + [1])
        axes[0].plot([0, m], [0, m], color='grey', linestyle=':')
        axes[0].set_xlabel('actual response length (tokens, α=0)')
        axes[0].set_ylabel('predicted N̂ (capped at max_new_tokens)')
        ts = est['times']
        axes[1].scatter(
            [t['actual_total_s'] for t in ts], [t['pred_total_s'] for t in ts], s=12, label='ETE'
        )
        axes[1].scatter(
            [t['actual_total_s'] for t in ts],
            [t['wcet_k5_s'] for t in ts],
            s=12,
            marker='^',
            label='WCET (k=5)',
            alpha=0.6,
        )
        m = max([t['actual_total_s'] for t in ts] + [t['pred_total_s'] for t in ts] + [1e-3])
        axes[1].plot([0, m], [0, m], color='grey', linestyle=':')
        axes[1].set_xlabel('actual time (s)')
        axes[1].set_ylabel('predicted time (s)')
        axes[1].legend(fontsize=8)
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out_dir / 'estimator_error.png'
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def write_report(results: dict, out_dir: Path | str, plots: bool = True) -> Dict[str, Path]:
    """results.json, report.md and the PNGs in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    add_cis(results)
    paths: Dict[str, Path] = {}
    if plots:
        figs = figures(results, out_dir)
        results['figures'] = [str(p) for p in figs]
        paths.update({p.stem: p for p in figs})
    paths['json'] = write_json(results, out_dir / 'results.json')
    md = out_dir / 'report.md'
    md.write_text(markdown(results))
    paths['markdown'] = md
    return paths


def rerender(json_path: Path | str, plots: bool = True) -> Dict[str, Path]:
    """
    Write report.md and the PNGs again next to a saved results.json, without rerunning the sweep.

    CIs missing from old files are recomputed from the stored outcomes; the JSON itself is not
    rewritten, so the measured data stays as it was saved.
    """
    json_path = Path(json_path)
    results = json.loads(json_path.read_text())
    out_dir = json_path.parent
    add_cis(results)
    paths: Dict[str, Path] = {}
    if plots:
        figs = figures(results, out_dir)
        results['figures'] = [str(p) for p in figs]
        paths.update({p.stem: p for p in figs})
    else:  # keep links only to figures still there from an earlier render
        results['figures'] = [
            f for f in results.get('figures', []) if (out_dir / Path(f).name).is_file()
        ]
    md = out_dir / 'report.md'
    md.write_text(markdown(results))
    paths['markdown'] = md
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog='python -m timebill_ros.core.evaluation.report',
        description='Re-render report.md and the PNGs from a saved results.json.',
    )
    p.add_argument('results_json', help='results.json written by `timebill eval`')
    p.add_argument('--no-plots', action='store_true', help='report.md only')
    args = p.parse_args(argv)
    if not Path(args.results_json).is_file():
        p.error(f'no such file: {args.results_json}')
    for name, path in rerender(args.results_json, plots=not args.no_plots).items():
        print(f'{name}: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
