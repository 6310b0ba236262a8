"""bench_models.py's report: the markdown table, the figure and the ``--quick`` summary line."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

GIB = 2 ** 30


def _gib(kib: Optional[int]) -> float:
    return kib * 1024 / GIB if kib else math.nan


def runs_by_path(row: dict) -> dict:
    """Return {'dense': run, 'quantised': run} (a run with no dense copy is the quantised one)."""
    out = {}
    for pw, run in row.get('runs', {}).items():
        if 'skipped' in run or 'error' in run:
            continue
        out['quantised' if run.get('dense') is None else 'dense'] = {**run, 'setting': pw}
    return out


def default_run(row: dict) -> dict:
    """Return the run of the default config (the first measured), or {}."""
    runs = row.get('runs', {})
    return next(iter(runs.values()), {}) if runs else {}


def _tok(run: dict, n: int) -> float:
    return run.get('prefill_tok_s', {}).get(str(n), math.nan)


def quick_line(row: dict) -> str:
    """Return ``params_m=... rss_gib=... gguf_plus_kv_gib=... prefill_tok_s=... dense_...``."""
    by = runs_by_path(row)
    rss = _gib(default_run(row).get('after', {}).get('VmRSS'))
    gguf_kv = (row.get('gguf_bytes', math.nan) + row.get('kv_bytes', math.nan)) / GIB
    return (
        f'params_m={row.get("params", math.nan) / 1e6:.0f} rss_gib={rss:.2f} '
        f'gguf_plus_kv_gib={gguf_kv:.2f} '
        f'prefill_tok_s={_tok(by.get("quantised", {}), 1024):.1f} '
        f'dense_prefill_tok_s={_tok(by.get("dense", {}), 1024):.1f}'
    )


def markdown(rows: list, meta: dict) -> str:
    """Return the results as a markdown table, with skipped runs and their reasons below."""
    cpu = meta['cpu']
    lines = [
        f'# bench_models ({meta["started"]}, {cpu["model_name"]}, {meta["threads"]} threads)',
        '',
        f'load: {meta["uptime_start"]} -> {meta["uptime_end"]}',
        '',
        '| size | params M | GGUF GiB | KV GiB (context) | prefill_weights | RSS held GiB '
        '| peak GiB (from) | load s | prefill tok/s 1k | 4k | decode ms @1k | @4k |',
        '|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    notes = []
    for row in rows:
        if 'error' in row:
            notes.append(f'- {row["size"]}: {row["error"]}')
            continue
        head = (f'| {row["size"]} ({row["arch"]}) | {row["params"] / 1e6:.0f} '
                f'| {row["gguf_bytes"] / GIB:.2f} '
                f'| {row["kv_bytes"] / GIB:.2f} ({row["context"]}) ')
        for pw, run in row['runs'].items():
            if 'skipped' in run or 'error' in run:
                notes.append(f'- {row["size"]} prefill_weights={pw}: '
                             f'{run.get("skipped") or run.get("error")}')
                continue
            dec = run.get('decode_ms', {})
            path = f'{pw} ({run["dense"] or "quantised"})'
            lines.append(
                head + f'| {path} | {_gib(run["after"]["VmRSS"]):.2f} '
                f'| {_gib(run["after"]["VmHWM"]):.2f} ({_gib(run["before"]["VmRSS"]):.2f}) '
                f'| {run["load_s"]:.1f} | {_tok(run, 1024):.1f} | {_tok(run, 4096):.1f} '
                f'| {dec.get("1024", math.nan):.1f} | {dec.get("4096", math.nan):.1f} |')
            notes += [f'- {row["size"]} {pw}: {k} skipped, {v}'
                      for k, v in run['skipped_lengths'].items()]
            head = '| | | | '
        cpp = row.get('llama_cpp', {})
        if 'prefill_tok_s' in cpp:
            dec = cpp['decode_ms']
            lines.append(f'| {row["size"]} | | | | llama.cpp {cpp["version"]} | | | '
                         f'| {_tok(cpp, 1024):.1f} | {_tok(cpp, 4096):.1f} '
                         f'| {dec.get("1024", math.nan):.1f} | {dec.get("4096", math.nan):.1f} |')
        elif cpp:
            notes.append(f'- {row["size"]} llama.cpp: {cpp.get("skipped") or cpp.get("error")}')
    lines += ['', 'RSS held: VmRSS after `Engine.from_config`; peak: VmHWM during it (reset '
              'before), from: the RSS before the load (interpreter, torch, transformers). KV: '
              f'{rows[0].get("kv_dtype", "float32") if rows else "float32"} keys and values for '
              'the whole context.']
    return '\n'.join(lines + ([''] + sorted(set(notes)) if notes else []) + [''])


def plot(rows: list, path: Path) -> Optional[Path]:
    """Draw memory (held, peak, GGUF + KV) and prefill speed per size; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if 'runs' in r and default_run(r).get('after')]
    if not rows:
        return None
    names = [r['size'] for r in rows]
    x = range(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {
        'RSS held': [_gib(default_run(r)['after']['VmRSS']) for r in rows],
        'peak during load': [_gib(default_run(r)['after']['VmHWM']) for r in rows],
        'GGUF + KV (context)': [(r['gguf_bytes'] + r['kv_bytes']) / GIB for r in rows],
    }
    for i, (label, vals) in enumerate(series.items()):
        a.bar([v + 0.27 * (i - 1) for v in x], vals, 0.27, label=label)
    a.set(xticks=list(x), xticklabels=names, ylabel='GiB', title='memory (default config)')
    a.legend()
    for i, kind in enumerate(('quantised', 'dense')):
        vals = [_tok(runs_by_path(r).get(kind, {}), 1024) for r in rows]
        b.bar([v + 0.4 * (i - 0.5) for v in x], vals, 0.4, label=f'{kind} layers')
    b.set(xticks=list(x), xticklabels=names, ylabel='tok/s', title='prefill at 1k tokens')
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis='x', rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
