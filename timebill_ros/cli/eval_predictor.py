"""
``timebill eval-predictor``: Table-1-style comparison of length predictors on the fixed test split.

Methods share one split and one backbone: RLP (fine buckets; frozen backbone + head, and
fine-tuned), a regression head, ProxyModel-style 5 classes, S3-style 10 classes, and a constant.
Also times prediction against the target's prefill for growing prompts and plots predicted vs
actual. Writes ``results/predictor/`` (ignored by git).
"""

from __future__ import annotations

import json
from pathlib import Path
import statistics
import sys
import time

# TimeBill paper, Table 1 (Qwen2.5-7B target, 0.5B predictor): MAE, RMSE, R².
PAPER = {
    'rlp': (42.71, 78.13, 0.723),
    'regression': (64.21, None, None),
    'proxy5': (105.72, None, 0.152),
    's3-10': (108.96, None, -0.004),
}


def add_arguments(p) -> None:
    p.add_argument(
        '--labels', default='', help='label JSONL (default: the committed SmolLM2 file)'
    )
    p.add_argument('--backbone', default='minilm')
    p.add_argument(
        '--lm-backbone',
        default='',
        help='also evaluate a frozen causal-LM backbone (e.g. smollm2-135m-instruct)',
    )
    p.add_argument('--finetune-epochs', type=int, default=4, help='0 skips the fine-tuned RLP')
    p.add_argument(
        '--finetune-baselines',
        action='store_true',
        help=(
            'also fine-tune the encoder for ProxyModel-5 '
            'and S3-10, as their papers do (BERT/DistilBERT)'
        ),
    )
    p.add_argument(
        '--lm-feature-layer',
        default='auto',
        help="causal-LM feature layer (0 = last) or 'auto' (validation)",
    )
    p.add_argument(
        '--lm-finetune-layers',
        type=int,
        default=4,
        help="also fine-tune the causal LM's top N layers under the feature layer (0 = skip)",
    )
    p.add_argument(
        '--folds',
        type=int,
        default=5,
        help='grouped K-fold cross-validation of the frozen heads (0 = off)',
    )
    p.add_argument('--bucket-size', type=int, default=16)
    p.add_argument('--num-buckets', type=int, default=512)
    p.add_argument('--max-prompt-tokens', type=int, default=256)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument(
        '--target',
        default='smollm2-135m-instruct',
        help='target model for the prefill-time column',
    )
    p.add_argument(
        '--latency-lengths', default='16,64,256,1024,2048', help='prompt lengths in target tokens'
    )
    p.add_argument('--latency-repeats', type=int, default=3)
    p.add_argument('--out', default='results/predictor')
    p.add_argument('--seed', type=int, default=0)


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(args) -> int:
    from timebill_ros.cli.train_predictor import COARSE, set_head
    from timebill_ros.core.config import cache_dir
    from timebill_ros.core.length_data import DEFAULT_LABEL_FILE, load_labels, read_meta
    from timebill_ros.core.length_predictor import (
        _select_bucket_head,
        frozen_features,
        LengthPredictor,
        make_backbone,
        make_head,
        PredictorMeta,
        regression_metrics,
        select_feature_layer,
        train_head,
        train_predictor,
    )
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = Path(args.labels) if args.labels else DEFAULT_LABEL_FILE
    recs = load_labels(labels)
    lmeta = read_meta(labels)
    by = {s: [r for r in recs if r['split'] == s] for s in ('train', 'val', 'test')}
    y = {s: [int(r['length']) for r in v] for s, v in by.items()}
    _log(
        f'[eval] {labels}: train {len(y["train"])}, val {len(y["val"])}, test {len(y["test"])}; '
        f'cap {lmeta.get("max_new_tokens")}, capped {sum(r["capped"] for r in recs)}'
    )
    base = {
        'bucket_size': args.bucket_size,
        'num_buckets': args.num_buckets,
        'max_prompt_tokens': args.max_prompt_tokens,
        'label_file': str(labels),
        'label_cap': int(lmeta.get('max_new_tokens') or 0),
    }
    rows, preds_for_plot, cv_rows = [], {}, []

    def add(name, key, n_hat, extra=None):
        m = regression_metrics(y['test'], n_hat)
        rows.append({'method': name, 'paper_key': key, **m, **(extra or {})})
        preds_for_plot[name] = n_hat
        _log(f'[eval] {name:40s} MAE {m["mae"]:7.2f} RMSE {m["rmse"]:7.2f} R2 {m["r2"]:6.3f}')

    # constant baselines: what the budget would use without a predictor (mean / median of train)
    mean_len = statistics.fmean(y['train'])
    add('constant (train mean)', None, [mean_len] * len(y['test']))
    add('constant (train median)', None, [statistics.median(y['train'])] * len(y['test']))
    cap = int(lmeta.get('max_new_tokens') or max(y['train']))
    add(f'N_max fallback (label cap {cap})', None, [cap] * len(y['test']))

    def frozen_suite(backbone_name, tag, layer='0'):
        bb = make_backbone(backbone_name, threads=args.threads)
        probe = LengthPredictor(PredictorMeta(backbone=backbone_name, **base), backbone=bb)
        ids = {s: [probe.prepare(r['prompt'])[0] or [0] for r in by[s]] for s in by}
        # the paper's backbone kind, read where it predicts length best (chosen on val)
        if layer == 'auto':
            select_feature_layer(
                probe, ids['train'], y['train'], ids['val'], y['val'], seed=args.seed, log=_log
            )
        elif int(layer):
            probe = LengthPredictor(
                PredictorMeta(backbone=backbone_name, feature_layer=int(layer), **base),
                backbone=bb.at_layer(int(layer)),
            )
        bb, fl = probe.backbone, probe.meta.feature_layer
        base_l = dict(base, feature_layer=fl)
        if fl:
            tag = f'{tag} layer {fl}/{bb.num_layers}'
        feats = {s: frozen_features(probe, ids[s], log=_log) for s in by}
        variants = [
            ('buckets', f'RLP-{args.num_buckets} classifier, frozen {tag}', 'rlp'),
            ('regression', f'regression head, frozen {tag}', 'regression'),
            ('proxy5', f'ProxyModel-style 5 classes, frozen {tag}', 'proxy5'),
            ('s3-10', f'S3-style 10 classes, frozen {tag}', 's3-10'),
        ]
        trained = {}
        for head, name, key in variants:
            meta = PredictorMeta(backbone=backbone_name, **base_l)
            set_head(meta, head, by['train'])
            pred = LengthPredictor(
                meta, backbone=bb, head=make_head(bb.dim, meta.out_dim, meta.hidden)
            )
            info = train_head(
                pred, feats['train'], y['train'], feats['val'], y['val'], seed=args.seed, log=_log
            )
            with torch.no_grad():
                n_hat = pred.decode(pred.head(feats['test']))[0]
            extra = {'train_s': info['train_s']}
            if head in COARSE:
                extra['edges'] = meta.edges
                # favourable variant: each class predicts its
                # train-set mean instead of its upper edge
                cls_tr = pred.decode(pred.head(feats['train']))[1]
                means = []
                for c in range(len(meta.edges)):
                    members = [n for n, k in zip(y['train'], cls_tr) if k == c + 1]
                    means.append(statistics.fmean(members) if members else meta.edges[c])
                meta.edge_values = means
                with torch.no_grad():
                    n_mean = pred.decode(pred.head(feats['test']))[0]
                meta.edge_values = list(meta.edges)
                add(name + ' (N̂ = class upper edge)', key, n_hat, extra)
                add(name + ' (N̂ = class train mean)', None, n_mean, extra)
            else:
                add(name, key, n_hat, extra)
            trained[head] = pred
        # RLP with a validation-selected label smoothing σ and decoding (argmax or median)
        meta = PredictorMeta(backbone=backbone_name, **base_l)
        pred = LengthPredictor(
            meta, backbone=bb, head=make_head(bb.dim, meta.out_dim, meta.hidden)
        )
        info = _select_bucket_head(
            pred, feats['train'], y['train'], feats['val'], y['val'], 300, args.seed, _log
        )
        with torch.no_grad():
            n_hat = pred.decode(pred.head(feats['test']))[0]
        add(
            f'RLP-{args.num_buckets} classifier, frozen {tag}, σ={meta.label_sigma:g} '
            f'{meta.bucket_decode} (val-selected)',
            'rlp',
            n_hat,
            {'train_s': info['train_s']},
        )
        trained['selected'] = pred
        if args.folds > 1:
            cv_rows.extend(
                cross_validate(
                    tag,
                    torch.cat([feats[s] for s in by]),
                    [n for s in by for n in y[s]],
                    [r['group'] for s in by for r in by[s]],
                    bb.dim,
                    backbone_name,
                    base_l,
                    args.folds,
                    args.seed,
                )
            )
        return trained

    trained = frozen_suite(args.backbone, 'MiniLM' if args.backbone == 'minilm' else args.backbone)
    default_pred = trained['selected']
    sel = default_pred.meta

    if args.finetune_epochs > 0:
        ft_dir = (
            cache_dir()
            / 'predictor'
            / 'eval'
            / (
                f'{args.backbone.replace("/", "--")}-finetune-e{args.finetune_epochs}'
                f'-s{sel.label_sigma:g}-{sel.bucket_decode}'
            )
        )
        ft = _trained_once(
            ft_dir,
            labels,
            len(y['train']),
            args.threads,
            lambda: train_predictor(
                recs,
                PredictorMeta(
                    backbone=args.backbone,
                    label_sigma=sel.label_sigma,
                    bucket_decode=sel.bucket_decode,
                    **base,
                ),
                mode='finetune',
                epochs=args.finetune_epochs,
                threads=args.threads,
                seed=args.seed,
                log=_log,
            )[0],
        )
        n_hat = ft.predict_many([r['prompt'] for r in by['test']])
        add(
            f'RLP-{args.num_buckets} classifier, fine-tuned MiniLM ({args.finetune_epochs} ep, '
            f'σ={sel.label_sigma:g} '
            f'{sel.bucket_decode})',
            'rlp',
            n_hat,
            {'train_s': ft.meta.trained.get('train_s')},
        )

    if args.finetune_baselines and args.finetune_epochs > 0:
        # the coarse baselines as their papers train them:
        # the whole encoder fine-tuned with the classifier
        for head, label in (
            ('proxy5', 'ProxyModel-style 5 classes'),
            ('s3-10', 'S3-style 10 classes'),
        ):
            d = (
                cache_dir()
                / 'predictor'
                / 'eval'
                / f'{args.backbone.replace("/", "--")}-finetune-e{args.finetune_epochs}-{head}'
            )
            meta = PredictorMeta(backbone=args.backbone, **base)
            set_head(meta, head, by['train'])
            ft = _trained_once(
                d,
                labels,
                len(y['train']),
                args.threads,
                lambda: train_predictor(
                    recs,
                    meta,
                    mode='finetune',
                    epochs=args.finetune_epochs,
                    threads=args.threads,
                    seed=args.seed,
                    log=_log,
                )[0],
                edges=meta.edges,
            )
            add(
                f'{label}, fine-tuned MiniLM ({args.finetune_epochs} ep, N̂ = class upper edge)',
                head,
                ft.predict_many([r['prompt'] for r in by['test']]),
                {'train_s': ft.meta.trained.get('train_s')},
            )

    timed = {args.backbone: default_pred}
    if args.lm_backbone:
        lm = frozen_suite(args.lm_backbone, f'LM {args.lm_backbone}', args.lm_feature_layer)
        if args.finetune_epochs > 0 and args.lm_finetune_layers > 0:
            # the paper fine-tunes its small LM; here its top layers under the chosen feature layer
            d = (
                cache_dir()
                / 'predictor'
                / 'eval'
                / (
                    f'{args.lm_backbone.replace("/", "--")}-top{args.lm_finetune_layers}'
                    f'-e{args.finetune_epochs}-layer{args.lm_feature_layer}'
                )
            )
            auto = args.lm_feature_layer == 'auto'
            meta = PredictorMeta(
                backbone=args.lm_backbone,
                feature_layer=0 if auto else int(args.lm_feature_layer),
                **base,
            )
            ft = _trained_once(
                d,
                labels,
                len(y['train']),
                args.threads,
                lambda: train_predictor(
                    recs,
                    meta,
                    mode='finetune',
                    epochs=args.finetune_epochs,
                    threads=args.threads,
                    seed=args.seed,
                    select=True,
                    select_layer=auto,
                    finetune_layers=args.lm_finetune_layers,
                    log=_log,
                )[0],
            )
            m = ft.meta
            add(
                f'RLP-{args.num_buckets} classifier, LM {args.lm_backbone} layer '
                f'{m.feature_layer or "last"}, top '
                f'{m.finetune_layers} layers fine-tuned ({args.finetune_epochs} ep, '
                f'σ={m.label_sigma:g} {m.bucket_decode})',
                'rlp',
                ft.predict_many([r['prompt'] for r in by['test']]),
                {'train_s': m.trained.get('train_s')},
            )
        timed[args.lm_backbone] = lm['selected']

    # --- latency vs prompt length, beside the target's prefill -----------------------------------
    lat = latency_table(timed, args, _log)

    # --- report ---------------------------------------------------------------------------------
    (out / 'metrics.json').write_text(
        json.dumps(
            {
                'label_meta': lmeta,
                'split_sizes': {k: len(v) for k, v in y.items()},
                'rows': rows,
                'cross_validation': cv_rows,
                'latency': lat,
                'paper': PAPER,
            },
            indent=1,
        )
    )
    md = table_markdown(rows, lmeta, {k: len(v) for k, v in y.items()}, lat, cv_rows, args.folds)
    (out / 'table.md').write_text(md)
    plot(preds_for_plot, y['test'], out / 'pred_vs_actual.png', cap)
    print(md)
    print(f'wrote {out}/table.md, metrics.json, pred_vs_actual.png')
    return 0


def _trained_once(d: Path, labels: Path, n_train: int, threads: int, train, **same):
    """
    Train a fine-tuned predictor once per label file, and reuse it from its cache directory.

    The cached one is used when it was trained on this very label file (and matches ``same``,
    e.g. the class edges); else ``train()`` it and cache it there.
    """
    from timebill_ros.core.length_data import read_meta
    from timebill_ros.core.length_predictor import LengthPredictor

    if (d / 'meta.json').is_file():
        m = json.loads((d / 'meta.json').read_text())
        if (
            m.get('label_file') == str(labels)
            and m.get('trained', {}).get('n_train') == n_train
            and m.get('label_cap') == int(read_meta(labels).get('max_new_tokens') or 0)
            and all(m.get(k) == v for k, v in same.items())
        ):
            _log(f'[eval] reusing fine-tuned predictor {d}')
            return LengthPredictor.load(d, threads=threads)
    pred = train()
    pred.save(d)
    return pred


def fold_of(group: str, k: int) -> int:
    from timebill_ros.core.length_data import stable_hash

    return stable_hash('cv:' + group) % k


def cross_validate(tag, feats, y, groups, dim, backbone_name, base, k, seed) -> list[dict]:
    """
    Run grouped K-fold CV of the heads on frozen features.

    Fold i tests, fold i+1 picks the epoch, the rest trains. One split of ~300 prompts moves MAE
    by several tokens; K folds give a spread.
    """
    import numpy as np
    from timebill_ros.cli.train_predictor import set_head
    from timebill_ros.core.length_predictor import (
        LengthPredictor,
        make_head,
        PredictorMeta,
        regression_metrics,
        train_head,
    )
    import torch

    fold = np.array([fold_of(g, k) for g in groups])
    y = np.asarray(y)
    methods = [
        ('RLP-%d, argmax upper edge (paper)' % base['num_buckets'], {'head': 'buckets'}, 'rlp'),
        (
            'RLP-%d, median of the bucket distribution' % base['num_buckets'],
            {'head': 'buckets', 'bucket_decode': 'median'},
            'rlp',
        ),
        ('regression head', {'head': 'regression'}, 'regression'),
        ('ProxyModel-style 5 classes (upper edge)', {'head': 'proxy5'}, 'proxy5'),
        ('S3-style 10 classes (upper edge)', {'head': 's3-10'}, 's3-10'),
    ]
    rows = []
    for name, kw, key in methods:
        per = []
        for i in range(k):
            te, va = fold == i, fold == (i + 1) % k
            tr = ~(te | va)
            meta = PredictorMeta(
                backbone=backbone_name, **{**base, **{a: b for a, b in kw.items() if a != 'head'}}
            )
            set_head(meta, kw['head'], [{'length': int(n)} for n in y[tr]])
            torch.manual_seed(seed)
            pred = LengthPredictor(
                meta,
                backbone=_NoBackbone(dim, meta.feature_layer),
                head=make_head(dim, meta.out_dim, meta.hidden),
            )

            def ix(m):
                return torch.from_numpy(np.where(m)[0])

            train_head(
                pred,
                feats[ix(tr)],
                y[tr].tolist(),
                feats[ix(va)],
                y[va].tolist(),
                seed=seed,
                log=lambda m: None,
            )
            with torch.no_grad():
                per.append(
                    regression_metrics(y[te].tolist(), pred.decode(pred.head(feats[ix(te)]))[0])
                )
        row = {'backbone': tag, 'method': name, 'paper_key': key, 'folds': k}
        for m in ('mae', 'rmse', 'r2'):
            vals = [p[m] for p in per]
            row[m], row[m + '_sd'] = float(np.mean(vals)), float(np.std(vals))
        rows.append(row)
        _log(
            f'[cv] {tag}: {name:45s} MAE {row["mae"]:6.1f} ± {row["mae_sd"]:.1f}  R2 '
            f'{row["r2"]:.3f} ± {row["r2_sd"]:.3f}'
        )
    return rows


class _NoBackbone:
    """Stands in for a backbone when the features are already computed (CV trains heads only)."""

    def __init__(self, dim, layer=0):
        import torch.nn as nn

        self.dim, self.layer, self.model = dim, layer, nn.Identity()


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


if __name__ == '__main__':
    import argparse

    ap = argparse.ArgumentParser(prog='timebill eval-predictor')
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
