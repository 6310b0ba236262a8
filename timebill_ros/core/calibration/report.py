"""
A calibration's report: the profile as JSON, a Markdown table and a plot of measured vs fitted.

Fit points and held-out points are shown apart: only the held-out error says how well the ETE
interpolates.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from .fit import decode_slopes
from .store import Measurement, Profile, save_profile


def _errors(ms: Sequence[Measurement], predict, statistic: str):
    return [(m.n, m.value(statistic), predict(m.n), m.held_out) for m in ms]


def write_plot(profile: Profile, path: Path) -> Path:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    m = profile.model
    cols = 3 if profile.warm else 2
    fig, axes = plt.subplots(
        2, cols, figsize=(5.5 * cols, 7), sharex='col', gridspec_kw={'height_ratios': [3, 1.3]}
    )
    for col, (name, ms, predict, xlabel, unit, scale) in enumerate(
        (
            ('prefill', profile.prefill, m.prefill_s, 'prompt length N (tokens)', 's', 1.0),
            ('decode step', profile.decode, m.decode_step_s, 'KV-cache length N_kv', 'ms', 1e3),
        )
    ):
        rows = _errors(ms, predict, profile.statistic)
        xs = np.linspace(0, max(r[0] for r in rows) * 1.02, 300)
        top, bot = axes[0, col], axes[1, col]
        top.plot(xs, [predict(x) * scale for x in xs], '-', color='tab:blue', lw=1.2, label='fit')
        for held, style, label in (
            (False, {'marker': 'o', 'color': 'tab:blue', 'ls': ''}, 'fit points'),
            (True, {'marker': 'x', 'color': 'tab:red', 'ls': '', 'ms': 9, 'mew': 2}, 'held out'),
        ):
            sel = [r for r in rows if r[3] == held]
            if sel:
                top.plot([r[0] for r in sel], [r[1] * scale for r in sel], label=label, **style)
                bot.plot([r[0] for r in sel], [(r[2] - r[1]) / r[1] * 100 for r in sel], **style)
        key = 'prefill' if col == 0 else 'decode'
        top.set_title(f'{name}: held-out MAPE {profile.mape[key]:.2f}%')
        top.set_ylabel(f'{profile.statistic} time ({unit})')
        top.legend()
        top.grid(alpha=0.3)
        bot.axhline(0, color='gray', lw=0.8)
        bot.set_ylabel('fit error (%)')
        bot.set_xlabel(xlabel)
        bot.grid(alpha=0.3)
    if profile.warm:
        _plot_warm(profile, axes[0, 2], axes[1, 2])
    k = profile.key
    fig.suptitle(
        f'ETE calibration: {k.get("model")} {k.get("dtype")} '
        f'{k.get("device")} threads={k.get("threads")}'
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _warm_errors(profile: Profile):
    m = profile.model
    return [
        (w.n, w.cached, w.value(profile.statistic), m.prefill_s(w.n, w.cached), w.held_out)
        for w in profile.warm
    ]


def _plot_warm(profile: Profile, top, bot) -> None:
    """Warm prefill panel: measured points, the fit along m = N/2 and m = N − 128, cold."""
    from matplotlib.ticker import FormatStrFormatter

    m = profile.model
    rows = _warm_errors(profile)
    xs = np.linspace(256, max(r[0] for r in rows) * 1.02, 200)
    top.plot(xs, [m.prefill_s(x) for x in xs], '--', color='gray', lw=1, label='cold fit')
    for frac, style, label in (
        (lambda x: x / 2, '-', 'fit, m = N/2'),
        (lambda x: x - 128, ':', 'fit, m = N − 128'),
    ):
        top.plot(xs, [m.prefill_s(x, frac(x)) for x in xs], style, color='tab:blue', lw=1.2,
                 label=label)
    for held, style, label in (
        (False, {'marker': 'o', 'color': 'tab:blue', 'ls': ''}, 'fit points'),
        (True, {'marker': 'x', 'color': 'tab:red', 'ls': '', 'ms': 9, 'mew': 2}, 'held out'),
    ):
        sel = [r for r in rows if r[4] == held]
        if sel:
            top.plot([r[0] for r in sel], [r[2] for r in sel], label=label, **style)
            bot.plot([r[0] for r in sel], [(r[3] - r[2]) / r[2] * 100 for r in sel], **style)
    top.set_yscale('log')
    top.yaxis.set_major_formatter(FormatStrFormatter('%g'))
    top.yaxis.set_minor_formatter(FormatStrFormatter('%g'))
    top.set_title(
        f'warm prefill (prefix cache): held-out MAPE {profile.mape.get("warm", math.nan):.2f}%'
    )
    top.set_ylabel(f'{profile.statistic} time (s, log)')
    top.legend(fontsize=8)
    top.grid(alpha=0.3, which='both')
    bot.axhline(0, color='gray', lw=0.8)
    bot.set_ylabel('fit error (%)')
    bot.set_xlabel('prompt length N (m of it cached)')
    bot.grid(alpha=0.3)


def report_markdown(profile: Profile) -> str:
    m, k = profile.model, profile.key
    lines = [
        '# ETE calibration',
        '',
        'Key: ' + ', '.join(f'`{f}={v}`' for f, v in k.items()),
        '',
        f'Statistic per length: **{profile.statistic}** of '
        f'{profile.repeats} prefill / {profile.decode_repeats} decode '
        + (f'/ {min(len(w.samples) for w in profile.warm)} warm prefill ' if profile.warm else '')
        + f'samples after {profile.warmup} warm-up; '
        f'{profile.duration_s:.0f} s in all; 1-min load average '
        f'{" -> ".join(f"{x:.2f}" for x in profile.load_avg) or "n/a"} on {os.cpu_count()} CPUs.',
        '',
        '| model | coefficients |',
        '|---|---|',
        f'| prefill t = a·N² + b·N + c | a = {m.a:.4e} s, b = {m.b:.4e} s, c = {m.c:.4e} s |',
        f'| decode step t = p·N_kv + q | p = {m.p:.4e} s, q = {m.q:.4e} s |',
    ]
    if profile.warm:
        lines.append(
            f'| warm prefill, m of N cached, n = N − m: a·n² + b·n + c + d·n·m + e·m '
            f'| d = {m.d:.4e} s ({m.d / (2 * m.a) if m.a else math.nan:.2f} × 2a), '
            f'e = {m.e:.4e} s |'
        )
    else:
        lines.append(f'| warm prefill (not measured) | d = 2a = {m.d:.4e} s, e = {m.e:.4e} s |')
    lines += [
        '',
        '| MAPE (%) | held-out | fit points |',
        '|---|---|---|',
        f'| prefill | {profile.mape["prefill"]:.3f} | {profile.fit_mape["prefill"]:.3f} |',
        f'| decode step | {profile.mape["decode"]:.3f} | {profile.fit_mape["decode"]:.3f} |',
    ]
    if profile.warm:
        lines.append(
            f'| warm prefill | {profile.mape.get("warm", math.nan):.3f} '
            f'| {profile.fit_mape.get("warm", math.nan):.3f} |'
        )
    lines.append('')
    if profile.warm_note:
        lines += [f'Warm fit: {profile.warm_note}.', '']
    if profile.flops_ratios:
        lines += ['| ratio (1/token) | FLOPs | fitted | fitted / FLOPs |', '|---|---|---|---|']
        for r in ('prefill_a_over_b', 'decode_p_over_q'):
            f, g = profile.flops_ratios[r], profile.fitted_ratios[r]
            lines.append(f'| {r} | {f:.3e} | {g:.3e} | {g / f:.2f} |')
        lines += [
            '',
            'FLOPs ratios assume every FLOP costs the same; on CPU attention and small GEMMs run '
            'less efficiently than the big projections, '
            'so a factor of a few is normal, a sign flip '
            'or orders of magnitude is a bad fit.',
            '',
        ]
    slopes = decode_slopes(profile)
    if slopes:
        lines += [
            f'Decode linearity: p = {slopes[0]:.3e} s below '
            f'N_kv = {slopes[2]}, {slopes[1]:.3e} s above '
            f'(ratio {slopes[1] / slopes[0]:.2f}; 1 for a linear step).',
            '',
        ]
    for name, ms, predict in (
        ('prefill', profile.prefill, m.prefill_s),
        ('decode step', profile.decode, m.decode_step_s),
    ):
        lines += [
            f'## {name}',
            '',
            '| N | measured (ms) | fitted (ms) | error (%) | held out |',
            '|---|---|---|---|---|',
        ]
        for n, meas, pred, held in _errors(ms, predict, profile.statistic):
            lines.append(
                f'| {n} | {meas * 1e3:.2f} | {pred * 1e3:.2f} '
                f'| {(pred - meas) / meas * 100:+.2f} | '
                f'{"yes" if held else ""} |'
            )
        lines.append('')
    if profile.warm:
        lines += [
            '## warm prefill (prefix cache)',
            '',
            '| N | cached m | computed N − m | measured (ms) | fitted (ms) | error (%) '
            '| held out |',
            '|---|---|---|---|---|---|---|',
        ]
        for n, cached, meas, pred, held in _warm_errors(profile):
            lines.append(
                f'| {n} | {cached} | {n - cached} | {meas * 1e3:.2f} | {pred * 1e3:.2f} '
                f'| {(pred - meas) / meas * 100:+.2f} | {"yes" if held else ""} |'
            )
        lines.append('')
    return '\n'.join(lines)


def write_report(
    profile: Profile, out_dir: Path | str, stem: str = 'calibration'
) -> Dict[str, Path]:
    """``<stem>.json`` (the profile), ``<stem>.md`` and ``<stem>.png`` (measured vs fitted)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        'json': save_profile(profile, out / f'{stem}.json'),
        'md': out / f'{stem}.md',
        'png': out / f'{stem}.png',
    }
    paths['md'].write_text(report_markdown(profile))
    write_plot(profile, paths['png'])
    return paths
