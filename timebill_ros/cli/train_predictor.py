"""
``timebill train-predictor``: train the response length predictor from the committed label file.

``--if-missing`` makes it a cheap no-op when a checkpoint exists (``make demo`` calls it that way).
Checkpoints go to ``<cache>/predictor/<backbone>`` (ignored by git), or ``--out``.
"""

from __future__ import annotations

from pathlib import Path
import sys
import time

COARSE = {'proxy5': 5, 's3-10': 10}


def add_arguments(p) -> None:
    p.add_argument(
        '--config',
        default='',
        help='ROS-style params YAML (default: the packaged config/timebill.yaml)',
    )
    p.add_argument(
        '--labels',
        default='',
        help='label JSONL file(s), comma-separated (default: the committed SmolLM2 free-text '
        'and structured-answer files)',
    )
    p.add_argument(
        '--backbone', default=None, help='minilm (default) or a causal LM spec for load_model'
    )
    p.add_argument(
        '--mode',
        choices=('frozen', 'finetune'),
        default=None,
        help='fine-tune the backbone too (MiniLM: all of it; a causal LM: its top '
        '--finetune-layers under the feature layer), or train '
        'a head on a frozen backbone (default: finetune)',
    )
    p.add_argument('--head', choices=('buckets', 'regression', *COARSE), default='buckets')
    p.add_argument(
        '--finetune-layers',
        type=int,
        default=4,
        help='causal-LM backbones in finetune mode: how many layers under the feature layer train',
    )
    p.add_argument(
        '--feature-layer',
        default='auto',
        help='causal-LM backbones: decoder layer whose last-token state is the feature (0 = '
        'last), or '
        "'auto' to choose it on the validation split",
    )
    p.add_argument(
        '--epochs', type=int, default=None, help='default: 300 (frozen, early stop) / 4 (finetune)'
    )
    p.add_argument('--threads', type=int, default=1)
    p.add_argument(
        '--out', default='', help="checkpoint directory (default: config's predictor checkpoint)"
    )
    p.add_argument(
        '--if-missing', action='store_true', help='do nothing if the checkpoint already exists'
    )
    p.add_argument('--seed', type=int, default=0)


def set_head(meta, head: str, records) -> None:
    """
    Set the head: ``buckets``/``regression`` as named, or a coarse baseline.

    A coarse baseline (``proxy5``, ``s3-10``) becomes equal-width classes over the observed label
    range [0, max length] of ``records``.
    """
    from timebill_ros.core.length_predictor import equal_width_edges

    if head not in COARSE:
        meta.head = head
        return
    meta.head = 'edges'
    meta.edges = equal_width_edges(COARSE[head], max(int(r['length']) for r in records))
    meta.edge_values = list(meta.edges)


def run(args) -> int:
    from timebill_ros.core.config import default_config_path, TimeBillConfig
    from timebill_ros.core.length_data import (
        DEFAULT_LABEL_FILE,
        load_labels,
        read_meta,
        STRUCTURED_LABEL_FILE,
    )
    from timebill_ros.core.length_predictor import checkpoint_dir, PredictorMeta, train_predictor

    path = args.config or (default_config_path() if default_config_path().is_file() else None)
    # the nodes read the same file
    cfg = (TimeBillConfig.from_yaml(path) if path else TimeBillConfig())
    if args.backbone:
        cfg = cfg.replace(predictor_backbone=args.backbone)
    out = Path(args.out) if args.out else checkpoint_dir(cfg)
    if args.if_missing and (out / 'meta.json').is_file():
        print(f'length predictor already trained: {out}')
        return 0
    files = (
        [Path(x) for x in args.labels.split(',') if x]
        if args.labels
        else [f for f in (DEFAULT_LABEL_FILE, STRUCTURED_LABEL_FILE) if f.is_file()]
    )
    labels = files[0]
    records = [r for f in files for r in load_labels(f)]
    if not records:
        print(f'no labels in {labels}; run `timebill dataset` first', file=sys.stderr)
        return 2
    meta = PredictorMeta(
        backbone=cfg.predictor_backbone,
        bucket_size=cfg.bucket_size,
        num_buckets=cfg.num_buckets,
        max_prompt_tokens=cfg.predictor_max_prompt_tokens,
        label_file=','.join(str(f) for f in files),
        label_cap=int(read_meta(labels).get('max_new_tokens', 0)),
    )
    set_head(meta, args.head, records)
    mode = args.mode or 'finetune'
    epochs = args.epochs or (4 if mode == 'finetune' else None)
    t0 = time.perf_counter()
    causal = cfg.predictor_backbone != 'minilm'
    auto_layer = causal and args.feature_layer == 'auto'
    if causal and args.feature_layer != 'auto':
        meta.feature_layer = int(args.feature_layer)
    pred, info = train_predictor(
        records,
        meta,
        mode=mode,
        epochs=epochs,
        threads=args.threads,
        seed=args.seed,
        select=True,
        select_layer=auto_layer,
        finetune_layers=args.finetune_layers,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    info['label_meta'] = read_meta(labels)
    info['wall_s'] = round(time.perf_counter() - t0, 1)
    pred.meta.trained = info
    pred.save(out)
    print(
        f'trained {meta.head} predictor ({mode}, {cfg.predictor_backbone}) in {info["wall_s"]}s '
        f'-> {out}; val MAE {info["val_mae"]:.1f}'
    )
    return 0


if __name__ == '__main__':
    import argparse

    ap = argparse.ArgumentParser(prog='timebill train-predictor')
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
