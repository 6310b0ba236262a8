"""
The length predictors' report: Table-1-style Markdown, metrics.json, a predicted-vs-actual plot.

Also the latency column: how long each predictor takes beside the target's prefill, per prompt
length (it runs beside prefill in the server, so it must not be slower).
"""

from __future__ import annotations

import json
from pathlib import Path
import statistics
import time

# TimeBill paper, Table 1 (Qwen2.5-7B target, 0.5B predictor): MAE, RMSE, R².
PAPER = {
    'rlp': (42.71, 78.13, 0.723),
    'regression': (64.21, None, None),
    'proxy5': (105.72, None, 0.152),
    's3-10': (108.96, None, -0.004),
}


def latency_table(preds: dict, args, log):
    """
    Measure predictor latency per backbone against the target's prefill time, per prompt length.

    Medians; the predictor compresses to N_p tokens.
    """
    from timebill_ros.core.length_data import fanoutqa_questions
    from timebill_ros.core.model import load_model
    import torch

    lengths = [int(x) for x in args.latency_lengths.split(',') if x.strip()]
    model, tok = load_model(args.target, threads=args.threads)
    qs = fanoutqa_questions()[0]
    filler = tok(' '.join(qs), add_special_tokens=False)['input_ids']
    rows = []
    for pred in preds.values():
        pred.predict('warm up')
    for n in lengths:
        ids = (filler * (n // max(1, len(filler)) + 1))[:n]
        text = tok.decode(ids)
        row = {'prompt_tokens': n, 'threads': args.threads}
        for name, pred in preds.items():
            times = [pred.predict(text).latency_s for _ in range(max(1, args.latency_repeats))]
            row[f'predict_s[{name}]'] = statistics.median(times)
            row[f'predictor_tokens[{name}]'] = min(
                pred.prepare(text)[1], pred.meta.max_prompt_tokens
            )
        f_times = []
        with torch.inference_mode():
            x = torch.tensor([ids])
            for _ in range(max(1, args.latency_repeats)):
                t0 = time.perf_counter()
                model(input_ids=x, use_cache=True)
                f_times.append(time.perf_counter() - t0)
        row['prefill_s'] = statistics.median(f_times)
        rows.append(row)
        log(f'[latency] {row}')
    return rows


def table_markdown(rows, lmeta, sizes, lat, cv_rows=(), folds=0) -> str:
    """Render the comparison, the cross-validation and the latency tables as Markdown."""
    def f(v, nd=2):
        return '–' if v is None else f'{v:.{nd}f}'

    lines = [
        '# Response length predictors (TimeBill Table 1 style)',
        '',
        f'Target {lmeta.get("model")} (labels: {lmeta.get("decoding")}, cap '
        f'{lmeta.get("max_new_tokens")} tokens). '
        f'Split by hash of the underlying question/topic: train {sizes["train"]}, val '
        f'{sizes["val"]}, test {sizes["test"]}. '
        'Metrics on test; '
        "N̂ for bucket methods is the predicted bucket's upper edge unless noted.",
        '',
        '| method | MAE | RMSE | R² | paper MAE | paper RMSE | paper R² |',
        '|---|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        p = PAPER.get(r['paper_key'] or '', (None, None, None))
        lines.append(
            f'| {r["method"]} | {f(r["mae"])} | {f(r["rmse"])} | {f(r["r2"], 3)} | {f(p[0])} | '
            f'{f(p[1])} | {f(p[2], 3)} |'
        )
    lines += [
        '',
        'Paper: Qwen2.5-7B-Instruct target, Qwen2.5-0.5B predictor, 512 buckets of 16 (Table 1).',
    ]
    if cv_rows:
        lines += [
            '',
            f'## Grouped {folds}-fold cross-validation, frozen backbones (mean ± sd over folds)',
            '',
            'Every prompt is tested once; folds by hash of '
            'the question/topic. Same features for every head.',
            '',
            '| backbone | method | MAE | RMSE | R² |',
            '|---|---|---:|---:|---:|',
        ]
        for r in cv_rows:
            lines.append(
                f'| {r["backbone"]} | {r["method"]} | {r["mae"]:.1f} ± {r["mae_sd"]:.1f} | '
                f'{r["rmse"]:.1f} ± {r["rmse_sd"]:.1f} | {r["r2"]:.3f} ± {r["r2_sd"]:.3f} |'
            )
    lines += ['', '## Prediction latency vs prompt length (median; CPU, threads as listed)', '']
    names = [
        k[len('predict_s['):-1] for k in (lat[0] if lat else {}) if k.startswith('predict_s[')
    ]
    lines.append(
        '| prompt tokens (target) | '
        + ' | '.join(f'{n}: tokens after N_p | {n}: predict (s)' for n in names)
        + ' | target prefill (s) | threads |'
    )
    lines.append('|---:|' + '---:|---:|' * len(names) + '---:|---:|')
    for r in lat:
        cells = ' | '.join(
            f'{r[f"predictor_tokens[{n}]"]} | {r[f"predict_s[{n}]"]:.3f}' for n in names
        )
        lines.append(f'| {r["prompt_tokens"]} | {cells} | {r["prefill_s"]:.3f} | {r["threads"]} |')
    return '\n'.join(lines) + '\n'


def plot(preds, y_true, path, cap):
    """Scatter predicted N̂ against actual length for up to six methods (RLP first)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    keys = (
        [k for k in preds if k.startswith('RLP')]
        + [k for k in preds if 'upper edge' in k]
        + [k for k in preds if k.startswith('regression')]
    )
    keys = keys[:6] or list(preds)[:6]
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        ax.scatter(y_true, preds[k], s=6, alpha=0.4)
        ax.plot([0, cap], [0, cap], 'k--', lw=0.8)
        ax.set_title(k, fontsize=8)
        ax.set_xlabel('actual length (tokens)')
        ax.set_ylabel('predicted N̂')
        ax.set_xlim(0, cap * 1.05)
        ax.set_ylim(0, cap * 1.05)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, split, table, lat, folds: int) -> str:
    """Write metrics.json, table.md and pred_vs_actual.png into ``out``; return the Markdown."""
    sizes = {k: len(v) for k, v in split.y.items()}
    (out / 'metrics.json').write_text(
        json.dumps(
            {
                'label_meta': split.lmeta,
                'split_sizes': sizes,
                'rows': table.rows,
                'cross_validation': table.cv_rows,
                'latency': lat,
                'paper': PAPER,
            },
            indent=1,
        )
    )
    md = table_markdown(table.rows, split.lmeta, sizes, lat, table.cv_rows, folds)
    (out / 'table.md').write_text(md)
    plot(table.preds, split.y['test'], out / 'pred_vs_actual.png', split.cap)
    return md
