"""
The benchmark's PNGs, like the paper's figures.

Fig. 7 style: completion rate and average score against the time budget, one line per policy,
one column per overrun strategy. Fig. 8 style: the same two numbers against TimeBill's
pessimism factor k at one budget. Plus lateness of the late jobs and the estimator's error on
the requests actually served. Error bars and bands are the tables' bootstrap CIs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence

from .report_rows import add_cis, ci_of, is_missing, OVERRUN_TITLES, OWN_DEADLINE, rows_by_policy


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
        y = math.nan if is_missing(r.get(key)) else scale * r[key]
        ci = ci_of(r, ci_key)
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


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fig7(plt, g: str, d: dict, out_dir: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    budgets = d.get('budgets_s') or [0.0]
    span = (max(budgets) - min(budgets)) or 1.0
    for col, ov in enumerate(('kill', 'skip-next')):
        rows = rows_by_policy(d['table'], ov)
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
    return _save(plt, fig, out_dir / f'fig7_completion_score_{g}.png')


def _fig8(plt, g: str, d: dict, out_dir: Path) -> Path:
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
    return _save(plt, fig, out_dir / f'fig8_k_sweep_{g}.png')


def _lateness(plt, g: str, d: dict, out_dir: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for col, ov in enumerate(('kill', 'skip-next')):
        for pol, by_b in rows_by_policy(d['table'], ov).items():
            if pol in OWN_DEADLINE:
                continue
            bs = sorted(by_b)
            axes[col].plot(bs, [by_b[b]['late_s_median'] for b in bs], label=pol, **_style(pol))
        axes[col].set_title(f'{OVERRUN_TITLES[ov]}: median lateness of late jobs')
        axes[col].set_xlabel('time budget (s)')
        axes[col].grid(alpha=0.3)
    axes[0].set_ylabel('seconds past the deadline')
    axes[0].legend(fontsize=8)
    return _save(plt, fig, out_dir / f'lateness_{g}.png')


def _estimator(plt, est: dict, out_dir: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ls = est['lengths']
    axes[0].scatter([x['actual'] for x in ls], [min(x['n_hat'], x['max_new_tokens']) for x in ls])
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
    return _save(plt, fig, out_dir / 'estimator_error.png')


def figures(results: dict, out_dir: Path) -> List[Path]:
    """Draw every figure of ``results`` into ``out_dir``; return their paths in report order."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    add_cis(results)
    paths: List[Path] = []
    for g, d in results.get('groups', {}).items():
        paths.append(_fig7(plt, g, d, out_dir))
        if d.get('k_sweep'):
            paths.append(_fig8(plt, g, d, out_dir))
        paths.append(_lateness(plt, g, d, out_dir))
    est = results.get('estimator')
    if est and est.get('times'):
        paths.append(_estimator(plt, est, out_dir))
    return paths
