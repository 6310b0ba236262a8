"""
The length predictors ``timebill eval-predictor`` compares, on one split and one backbone.

``Split`` is the label file's fixed train / val / test split; ``Table`` collects each method's
test metrics; ``frozen_suite`` trains every head on one frozen backbone's features (and
cross-validates them), the part of the comparison that is the same for every backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import statistics
import sys
from typing import Dict, List


def log(msg):
    """Progress to stderr, so the report on stdout stays clean."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Split:
    """The label file, its meta and its fixed split; ``base`` is every predictor's common meta."""

    labels: Path
    recs: List[dict]
    lmeta: dict
    by: Dict[str, List[dict]]
    y: Dict[str, List[int]]
    base: dict

    @classmethod
    def load(cls, args) -> 'Split':
        from timebill_ros.core.length_data import DEFAULT_LABEL_FILE, load_labels, read_meta

        labels = Path(args.labels) if args.labels else DEFAULT_LABEL_FILE
        recs = load_labels(labels)
        lmeta = read_meta(labels)
        by = {s: [r for r in recs if r['split'] == s] for s in ('train', 'val', 'test')}
        y = {s: [int(r['length']) for r in v] for s, v in by.items()}
        log(
            f'[eval] {labels}: train {len(y["train"])}, val {len(y["val"])}, '
            f'test {len(y["test"])}; '
            f'cap {lmeta.get("max_new_tokens")}, capped {sum(r["capped"] for r in recs)}'
        )
        base = {
            'bucket_size': args.bucket_size,
            'num_buckets': args.num_buckets,
            'max_prompt_tokens': args.max_prompt_tokens,
            'label_file': str(labels),
            'label_cap': int(lmeta.get('max_new_tokens') or 0),
        }
        return cls(labels, recs, lmeta, by, y, base)

    @property
    def cap(self) -> int:
        """Return the labels' length limit, else the longest train label: the N_max baseline."""
        return int(self.lmeta.get('max_new_tokens') or max(self.y['train']))

    def prompts(self, split: str) -> List[str]:
        return [r['prompt'] for r in self.by[split]]


@dataclass
class Table:
    """Each method's test metrics, its predictions (for the plot) and the CV rows."""

    y_test: List[int]
    rows: List[dict] = field(default_factory=list)
    preds: Dict[str, list] = field(default_factory=dict)
    cv_rows: List[dict] = field(default_factory=list)

    def add(self, name, key, n_hat, extra=None) -> None:
        """Score ``n_hat`` on the test split as ``name`` (``key``: its row in the paper)."""
        from timebill_ros.core.length_predictor import regression_metrics

        m = regression_metrics(self.y_test, n_hat)
        self.rows.append({'method': name, 'paper_key': key, **m, **(extra or {})})
        self.preds[name] = n_hat
        log(f'[eval] {name:40s} MAE {m["mae"]:7.2f} RMSE {m["rmse"]:7.2f} R2 {m["r2"]:6.3f}')


def _coarse_means(pred, feats, y_train) -> List[float]:
    """Each class's train-set mean length: the favourable N̂ for a coarse-class head."""
    meta = pred.meta
    cls_tr = pred.decode(pred.head(feats))[1]
    means = []
    for c in range(len(meta.edges)):
        members = [n for n, k in zip(y_train, cls_tr) if k == c + 1]
        means.append(statistics.fmean(members) if members else meta.edges[c])
    return means


def frozen_suite(args, split: Split, table: Table, backbone_name, tag, layer='0') -> dict:
    """
    Train every head on one frozen backbone's features and add their rows to ``table``.

    ``layer``: the feature layer ('auto': chosen on val). Returns the trained predictors by
    head; ``'selected'`` is the RLP with a validation-selected σ and decoding.
    """
    from timebill_ros.cli.train_predictor import COARSE, set_head
    from timebill_ros.core.length_predictor import (
        _select_bucket_head,
        frozen_features,
        LengthPredictor,
        make_backbone,
        make_head,
        PredictorMeta,
        select_feature_layer,
        train_head,
    )
    import torch

    by, y, base = split.by, split.y, split.base
    bb = make_backbone(backbone_name, threads=args.threads)
    probe = LengthPredictor(PredictorMeta(backbone=backbone_name, **base), backbone=bb)
    ids = {s: [probe.prepare(r['prompt'])[0] or [0] for r in by[s]] for s in by}
    # the paper's backbone kind, read where it predicts length best (chosen on val)
    if layer == 'auto':
        select_feature_layer(
            probe, ids['train'], y['train'], ids['val'], y['val'], seed=args.seed, log=log
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
    feats = {s: frozen_features(probe, ids[s], log=log) for s in by}
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
        head_net = make_head(bb.dim, meta.out_dim, meta.hidden)
        pred = LengthPredictor(meta, backbone=bb, head=head_net)
        info = train_head(
            pred, feats['train'], y['train'], feats['val'], y['val'], seed=args.seed, log=log
        )
        with torch.no_grad():
            n_hat = pred.decode(pred.head(feats['test']))[0]
        extra = {'train_s': info['train_s']}
        if head in COARSE:
            extra['edges'] = meta.edges
            # favourable variant: each class predicts its train-set mean instead of its upper edge
            meta.edge_values = _coarse_means(pred, feats['train'], y['train'])
            with torch.no_grad():
                n_mean = pred.decode(pred.head(feats['test']))[0]
            meta.edge_values = list(meta.edges)
            table.add(name + ' (N̂ = class upper edge)', key, n_hat, extra)
            table.add(name + ' (N̂ = class train mean)', None, n_mean, extra)
        else:
            table.add(name, key, n_hat, extra)
        trained[head] = pred
    # RLP with a validation-selected label smoothing σ and decoding (argmax or median)
    meta = PredictorMeta(backbone=backbone_name, **base_l)
    pred = LengthPredictor(meta, backbone=bb, head=make_head(bb.dim, meta.out_dim, meta.hidden))
    info = _select_bucket_head(
        pred, feats['train'], y['train'], feats['val'], y['val'], 300, args.seed, log
    )
    with torch.no_grad():
        n_hat = pred.decode(pred.head(feats['test']))[0]
    table.add(
        f'RLP-{args.num_buckets} classifier, frozen {tag}, σ={meta.label_sigma:g} '
        f'{meta.bucket_decode} (val-selected)',
        'rlp',
        n_hat,
        {'train_s': info['train_s']},
    )
    trained['selected'] = pred
    if args.folds > 1:
        table.cv_rows.extend(
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


def fold_of(group: str, k: int) -> int:
    """Fold of a question group: by hash, so a question's variants never straddle folds."""
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
        log(
            f'[cv] {tag}: {name:45s} MAE {row["mae"]:6.1f} ± {row["mae_sd"]:.1f}  R2 '
            f'{row["r2"]:.3f} ± {row["r2_sd"]:.3f}'
        )
    return rows


class _NoBackbone:
    """Stands in for a backbone when the features are already computed (CV trains heads only)."""

    def __init__(self, dim, layer=0):
        import torch.nn as nn

        self.dim, self.layer, self.model = dim, layer, nn.Identity()
