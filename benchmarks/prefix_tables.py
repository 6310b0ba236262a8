"""The prefix benchmark's output: its Markdown tables and its plot (``bench_prefix.py``)."""

from __future__ import annotations

from pathlib import Path

from prefix_scene import ALPHAS


def table(rows: list) -> str:
    out = [
        '| context | prompt | mode | TTFT (s) | ×cold | end to end (s) | cached | computed | '
        'copy-in (s) | model calls (s) | cache insert (s) | prefix MB held | identical α=0/0.5 |',
        '|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|',
    ]
    for r in rows:
        for name in ('cold', 'warm', 'primed'):
            m = r[name]
            ident = (
                '–'
                if name == 'cold'
                else '/'.join('yes' if r['identical'][f'{name}@{a}'] else 'NO' for a in ALPHAS)
            )
            mb = '–' if m['prefix_mb_held'] is None else f'{m["prefix_mb_held"]:.0f}'
            out.append(
                f'| {r["context_tokens"]} | {min(r["prompt_tokens"])}–{max(r["prompt_tokens"])} '
                f'| {name} | {m["ttft_s"]:.3f} | {r["cold"]["ttft_s"] / m["ttft_s"]:.1f} '
                f'| {m["e2e_s"]:.2f} | {m["cached_tokens"]} | {m["computed_tokens"]} '
                f'| {m["copy_in_s"]:.3f} | {m["model_s"]:.3f} | {m["insert_s"]:.3f} | {mb} '
                f'| {ident} |'
            )
    return '\n'.join(out)


def breakdown_table(rows: list) -> str:
    """Where a warm goal's time goes (one profiled warm prefill per context)."""
    out = [
        '| context | warm prefill (s) | computed: after context + recomputed context tail | '
        'copy-in | attention | press scores | linear layers | cache insert | other |',
        '|---:|---:|---|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        b = r['warm_breakdown']
        after = r['after_context_tokens_profiled']
        parts = ('copy_in_s', 'attention_s', 'press_scores_s', 'linear_s', 'insert_s', 'other_s')
        out.append(
            f'| {r["context_tokens"]} | {b["total_s"]:.3f} | {b["computed_tokens"]} = {after} + '
            f'{b["computed_tokens"] - after} | '
            + ' | '.join(f'{b[k]:.3f} ({100 * b[k] / b["total_s"]:.0f} %)' for k in parts)
            + ' |'
        )
    return '\n'.join(out)


def write_plot(rows: list, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.26
    for k, (name, colour) in enumerate(
        (('cold', 'tab:gray'), ('warm', 'tab:blue'), ('primed', 'tab:green'))
    ):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ys = [r[name]['ttft_s'] for r in rows]
        ax.bar(xs, ys, width, label=name, color=colour)
        for x, y in zip(xs, ys):
            ax.annotate(f'{y:.2f}', (x, y), ha='center', va='bottom', fontsize=8)
    ax.set_yscale('log')
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(
        [f'{r["context_tokens"]} ctx\n(warm {r["speedup_warm"]:.0f}× faster)' for r in rows]
    )
    ax.set_ylabel('time to first token (s, log)')
    ax.set_title('Prefix KV cache: TTFT of a question after a standing context')
    ax.legend()
    ax.grid(axis='y', alpha=0.3, which='both')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
