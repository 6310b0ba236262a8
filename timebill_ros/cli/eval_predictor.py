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
import sys

from .predictor_report import latency_table, write_report
from .predictor_suite import frozen_suite, log, Split, Table


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


def _cache(name: str) -> Path:
    """Where a fine-tuned predictor of this comparison is kept between runs."""
    from timebill_ros.core.config import cache_dir

    return cache_dir() / 'predictor' / 'eval' / name


def constant_baselines(split: Split, table: Table) -> None:
    """Add what the budget would use without a predictor: train mean / median, or the cap."""
    import statistics

    n = len(split.y['test'])
    table.add('constant (train mean)', None, [statistics.fmean(split.y['train'])] * n)
    table.add('constant (train median)', None, [statistics.median(split.y['train'])] * n)
    table.add(f'N_max fallback (label cap {split.cap})', None, [split.cap] * n)


def finetuned_rlp(args, split: Split, table: Table, sel) -> None:
    """Add RLP with the whole encoder fine-tuned, at the σ and decoding the frozen suite chose."""
    from timebill_ros.core.length_predictor import PredictorMeta

    meta = PredictorMeta(
        backbone=args.backbone,
        label_sigma=sel.label_sigma,
        bucket_decode=sel.bucket_decode,
        **split.base,
    )
    ft = _finetuned(
        args,
        split,
        f'{args.backbone.replace("/", "--")}-finetune-e{args.finetune_epochs}'
        f'-s{sel.label_sigma:g}-{sel.bucket_decode}',
        meta,
    )
    table.add(
        f'RLP-{args.num_buckets} classifier, fine-tuned MiniLM ({args.finetune_epochs} ep, '
        f'σ={sel.label_sigma:g} '
        f'{sel.bucket_decode})',
        'rlp',
        ft.predict_many(split.prompts('test')),
        {'train_s': ft.meta.trained.get('train_s')},
    )


def finetuned_baselines(args, split: Split, table: Table) -> None:
    """Add the coarse baselines as their papers train them: the whole encoder fine-tuned."""
    from timebill_ros.cli.train_predictor import set_head
    from timebill_ros.core.length_predictor import PredictorMeta

    for head, label in (
        ('proxy5', 'ProxyModel-style 5 classes'),
        ('s3-10', 'S3-style 10 classes'),
    ):
        meta = PredictorMeta(backbone=args.backbone, **split.base)
        set_head(meta, head, split.by['train'])
        ft = _finetuned(
            args,
            split,
            f'{args.backbone.replace("/", "--")}-finetune-e{args.finetune_epochs}-{head}',
            meta,
            same={'edges': meta.edges},
        )
        table.add(
            f'{label}, fine-tuned MiniLM ({args.finetune_epochs} ep, N̂ = class upper edge)',
            head,
            ft.predict_many(split.prompts('test')),
            {'train_s': ft.meta.trained.get('train_s')},
        )


def lm_suite(args, split: Split, table: Table):
    """
    Run the frozen suite on a causal LM (the paper's backbone kind), then fine-tune its top.

    Returns its selected frozen predictor, for the latency column.
    """
    from timebill_ros.core.length_predictor import PredictorMeta

    lm = frozen_suite(
        args, split, table, args.lm_backbone, f'LM {args.lm_backbone}', args.lm_feature_layer
    )
    if args.finetune_epochs > 0 and args.lm_finetune_layers > 0:
        # the paper fine-tunes its small LM; here its top layers under the chosen feature layer
        auto = args.lm_feature_layer == 'auto'
        meta = PredictorMeta(
            backbone=args.lm_backbone,
            feature_layer=0 if auto else int(args.lm_feature_layer),
            **split.base,
        )
        ft = _finetuned(
            args,
            split,
            f'{args.lm_backbone.replace("/", "--")}-top{args.lm_finetune_layers}'
            f'-e{args.finetune_epochs}-layer{args.lm_feature_layer}',
            meta,
            select=True,
            select_layer=auto,
            finetune_layers=args.lm_finetune_layers,
        )
        m = ft.meta
        table.add(
            f'RLP-{args.num_buckets} classifier, LM {args.lm_backbone} layer '
            f'{m.feature_layer or "last"}, top '
            f'{m.finetune_layers} layers fine-tuned ({args.finetune_epochs} ep, '
            f'σ={m.label_sigma:g} {m.bucket_decode})',
            'rlp',
            ft.predict_many(split.prompts('test')),
            {'train_s': m.trained.get('train_s')},
        )
    return lm['selected']


def run(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = Split.load(args)
    table = Table(split.y['test'])
    constant_baselines(split, table)
    tag = 'MiniLM' if args.backbone == 'minilm' else args.backbone
    default_pred = frozen_suite(args, split, table, args.backbone, tag)['selected']
    if args.finetune_epochs > 0:
        finetuned_rlp(args, split, table, default_pred.meta)
        if args.finetune_baselines:
            finetuned_baselines(args, split, table)
    timed = {args.backbone: default_pred}
    if args.lm_backbone:
        timed[args.lm_backbone] = lm_suite(args, split, table)
    # latency vs prompt length, beside the target's prefill
    lat = latency_table(timed, args, log)
    md = write_report(out, split, table, lat, args.folds)
    print(md)
    print(f'wrote {out}/table.md, metrics.json, pred_vs_actual.png')
    return 0


def _finetuned(args, split: Split, name: str, meta, same=None, **train_kw):
    """Fine-tune a predictor of ``meta`` on the split, once per label file (cached as ``name``)."""
    from timebill_ros.core.length_predictor import train_predictor

    return _trained_once(
        _cache(name),
        split.labels,
        len(split.y['train']),
        args.threads,
        lambda: train_predictor(
            split.recs,
            meta,
            mode='finetune',
            epochs=args.finetune_epochs,
            threads=args.threads,
            seed=args.seed,
            log=log,
            **train_kw,
        )[0],
        **(same or {}),
    )


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
            log(f'[eval] reusing fine-tuned predictor {d}')
            return LengthPredictor.load(d, threads=threads)
    pred = train()
    pred.save(d)
    return pred


if __name__ == '__main__':
    import argparse

    ap = argparse.ArgumentParser(prog='timebill eval-predictor')
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
