"""The engine benchmark's output: its Markdown tables and its plot (``bench_engine.py``)."""

from __future__ import annotations

from pathlib import Path

from timebill_ros.core.config import TimeBillConfig

CHUNK = TimeBillConfig().prefill_chunk


def markdown(report) -> str:
    rows = report['formats'] + ([report['llama_cpp']] if report.get('llama_cpp') else [])
    threads = report['threads']
    kv = report['decode_kv']
    pre = report['prefill_n']
    lines = [
        '| format | threads | '
        + ' | '.join(f'decode KV {n}' for n in kv)
        + ' | '
        + ' | '.join(f'prefill {n}' for n in pre)
        + ' | 8k ÷ α=0.95 | load |',
        '|---|---:|' + '---:|' * (len(kv) + len(pre) + 2),
    ]
    for row in rows:
        for t in threads:
            r = row['threads'].get(t) or row['threads'].get(str(t))
            if r is None:
                continue
            gain = f'{r["eviction_gain"]:.2f}×' if 'eviction_gain' in r else '–'
            lines.append(
                f'| {row["format"]} | {t} | '
                + ' | '.join(f'{r["decode_ms"][n]:.1f}' for n in kv)
                + ' | '
                + ' | '.join(f'{r["prefill_s"][n]:.2f}' for n in pre)
                + f' | {gain} | {r["load_start"]}–{r["load_end"]} |'
            )
    head = ' | '.join(f'KV {n}: measured / roofline ms' for n in kv)
    lines += ['', f'| format | MB read per step | MB held | {head} |']
    lines.append('|---|---:|---:|' + '---|' * len(kv))
    t = max(threads)
    for row in report['formats']:
        r = row['threads'][t]
        lines.append(
            f'| {row["format"]} | {row["weight_bytes_per_step"] / 1e6:.0f} | '
            f'{row["weight_bytes_held"] / 1e6:.0f} | '
            + ' | '.join(
                f'{r["decode_ms"][n]:.1f} / {r["roofline_ms"][n]:.1f}' for n in kv
            )
            + ' |'
        )
    return '\n'.join(lines)


def plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    t = max(report['threads'])
    rows = report['formats'] + ([report['llama_cpp']] if report.get('llama_cpp') else [])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        r = row['threads'][t]
        a.plot(list(r['decode_ms']), list(r['decode_ms'].values()), 'o-', label=row['format'])
        b.plot(list(r['prefill_s']), list(r['prefill_s'].values()), 'o-', label=row['format'])
    a.set(xlabel='KV length', ylabel='ms per decode step', title=f'decode, {t} threads')
    b.set(xlabel='prompt tokens', ylabel='s', title=f'prefill (chunks of {CHUNK}), {t} threads')
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
