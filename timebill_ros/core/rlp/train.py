"""
Training a predictor from label records: features, validation-set choices, the entry point.

``train_predictor`` is what ``timebill train-predictor`` calls; this module wires the pieces
together and owns the choices made on the validation split: which causal-LM layer to read
(``select_feature_layer``) and which label smoothing and decoding a fine-bucket head uses
(``_select_bucket_head``). Backbone features of a frozen backbone are cached on disk under
``<cache>/predictor/features`` keyed by the prompts' ids, so a rerun or a second head does not
embed the prompts again.
"""

from __future__ import annotations

from dataclasses import replace
import json
from pathlib import Path
import time
from typing import Optional, Sequence

from .backbones import make_backbone, make_head
from .buckets import PredictorMeta
from .predictor import LengthPredictor
from .training import decoded_mae, fine_tune, fine_tune_top, train_head
from ..config import cache_dir


def _feature_cache_path(
    backbone: str, max_prompt_tokens: int, ids: Sequence[Sequence[int]]
) -> Path:
    import hashlib

    h = hashlib.sha1(json.dumps([list(map(int, x)) for x in ids]).encode()).hexdigest()[:16]
    name = f'{backbone.replace("/", "--")}-np{max_prompt_tokens}-{h}.pt'
    return cache_dir() / 'predictor' / 'features' / name


def _cached(path: Path, use_cache: bool, compute):
    """``torch.load(path)`` when cached, else ``compute()``, saved to ``path`` when caching."""
    import torch

    if use_cache and path.is_file():
        return torch.load(path)
    out = compute()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def frozen_features(
    pred: LengthPredictor, ids: Sequence[Sequence[int]], use_cache: bool = True, log=print
):
    """
    Compute backbone features for many prompts, cached on disk.

    A frozen backbone embeds each prompt once.
    """
    import torch

    m = pred.meta
    tag = m.backbone + (f'-layer{m.feature_layer}' if m.feature_layer else '')

    def compute():
        t0 = time.perf_counter()
        # similar lengths share a batch: less padding
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        feats = pred.features([ids[i] for i in order] or [], batch_size=32)
        out = torch.empty_like(feats)
        out[torch.tensor(order, dtype=torch.long)] = feats
        log(
            f'[train] embedded {len(ids)} prompts with {m.backbone} in '
            f'{time.perf_counter() - t0:.1f}s'
        )
        return out

    return _cached(_feature_cache_path(tag, m.max_prompt_tokens, ids), use_cache, compute)


def layer_features(
    backbone,
    ids: Sequence[Sequence[int]],
    max_prompt_tokens: int,
    use_cache: bool = True,
    log=print,
):
    """
    Compute the last-token states after every layer of a causal LM, [N, layers + 1, dim].

    Cached on disk: one pass serves the choice of the feature layer.
    """
    import torch

    def compute():
        t0 = time.perf_counter()
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), backbone.num_layers + 1, backbone.dim)
        with torch.inference_mode():
            for i in range(0, len(order), 32):
                idx = order[i:i + 32]
                out[torch.tensor(idx)] = backbone.all_layers([ids[j] for j in idx]).float()
        log(
            f'[train] embedded {len(ids)} prompts at every layer of {backbone.name} in '
            f'{time.perf_counter() - t0:.1f}s'
        )
        return out

    path = _feature_cache_path(backbone.name + '-all-layers', max_prompt_tokens, ids)
    return _cached(path, use_cache, compute)


def candidate_layers(num_layers: int) -> list[int]:
    """Every second layer from a third of the depth to the last (0 = the last, normalised)."""
    return sorted(set(range(max(1, num_layers // 3), num_layers, 2))) + [0]


def select_feature_layer(
    pred: LengthPredictor,
    ids_tr,
    y_tr,
    ids_va,
    y_va,
    use_cache: bool = True,
    seed: int = 0,
    log=print,
) -> dict:
    """
    Pick the causal-LM layer whose last-token state gives the best validation MAE.

    With the predictor's head; then re-point ``pred`` at that layer (a truncated, cheaper
    backbone).
    """
    import torch

    bb = pred.backbone
    if not hasattr(bb, 'all_layers'):
        raise ValueError('layer selection needs a causal-LM backbone')
    full = bb if bb.layer == 0 else bb.at_layer(0)
    n = pred.meta.max_prompt_tokens
    H_tr = layer_features(full, ids_tr, n, use_cache, log)
    H_va = layer_features(full, ids_va, n, use_cache, log)
    scores = {}
    for k in candidate_layers(full.num_layers):
        col = full.num_layers if k == 0 else k
        torch.manual_seed(seed)
        probe = LengthPredictor(replace(pred.meta, feature_layer=0), backbone=full)
        train_head(probe, H_tr[:, col], y_tr, H_va[:, col], y_va, seed=seed, log=lambda m: None)
        with torch.no_grad():
            scores[k] = decoded_mae(probe, probe.head(H_va[:, col]), y_va)
    best = min(scores, key=lambda k: (scores[k], k if k else full.num_layers))
    log(
        '[train] feature layer by validation MAE: '
        + ', '.join(f'{k or full.num_layers}:{v:.1f}' for k, v in scores.items())
        + f' -> {best or full.num_layers}'
    )
    pred.meta.feature_layer = best
    pred.backbone = full.at_layer(best)
    return {
        'feature_layer': best,
        'layer_val_mae': {str(k or full.num_layers): round(v, 2) for k, v in scores.items()},
    }


def _fresh_head(pred: LengthPredictor, seed: Optional[int] = None) -> None:
    """Give ``pred`` a newly initialised head (seeded first when ``seed`` is given)."""
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    pred.head = make_head(pred.backbone.dim, pred.meta.out_dim, pred.meta.hidden)


def _select_bucket_head(pred, f_tr, y_tr, f_va, y_va, epochs, seed, log) -> dict:
    """
    Choose label smoothing and decoding of the fine-bucket head on a small validation grid.

    Ordinal label smoothing σ, and decoding by argmax as in the paper or by the distribution's
    median, which minimises absolute error.
    """
    import copy

    import torch

    meta = pred.meta
    best = None
    for sigma in (0.0, 1.0, 2.0):
        meta.label_sigma, meta.bucket_decode = sigma, 'argmax'
        _fresh_head(pred)
        info = train_head(pred, f_tr, y_tr, f_va, y_va, epochs=epochs, seed=seed, log=log)
        for decode in ('argmax', 'median'):
            meta.bucket_decode = decode
            with torch.no_grad():
                mae = decoded_mae(pred, pred.head(f_va), y_va)
            if best is None or mae < best[0]:
                best = (mae, sigma, decode, copy.deepcopy(pred.head), dict(info))
    mae, meta.label_sigma, meta.bucket_decode, pred.head, info = best
    info.update(val_mae=mae, label_sigma=meta.label_sigma, bucket_decode=meta.bucket_decode)
    log(
        f'[train] selected sigma={meta.label_sigma} '
        f'decode={meta.bucket_decode} (val MAE {mae:.1f})'
    )
    return info


def train_predictor(
    records: Sequence[dict],
    meta: PredictorMeta,
    mode: str = 'frozen',
    epochs: Optional[int] = None,
    threads: int = 1,
    backbone=None,
    feature_cache: bool = True,
    seed: int = 0,
    select: bool = False,
    select_layer: bool = False,
    finetune_layers: int = 4,
    log=print,
):
    """
    Train a predictor on label records (``prompt``, ``length``, ``split``).

    Fit on ``train``, pick the epoch on ``val``. ``mode``: ``frozen`` (head on cached features)
    or ``finetune``; ``select`` also picks label smoothing and decoding of a fine-bucket head on
    ``val``; ``select_layer`` picks a causal LM's feature layer on ``val``; a causal LM
    fine-tunes only its top ``finetune_layers`` layers under that feature.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    tr = [r for r in records if r['split'] == 'train']
    va = [r for r in records if r['split'] == 'val'] or tr
    if not tr:
        raise ValueError('no training records')
    bb = backbone or make_backbone(meta.backbone, threads=threads, layer=meta.feature_layer)
    torch.manual_seed(seed)  # the head's initialisation must not depend on what ran before
    pred = LengthPredictor(meta, backbone=bb)
    ids_tr = [pred.prepare(r['prompt'])[0] or [0] for r in tr]
    ids_va = [pred.prepare(r['prompt'])[0] or [0] for r in va]
    y_tr, y_va = [int(r['length']) for r in tr], [int(r['length']) for r in va]
    select_buckets = select and meta.head == 'buckets'

    def features():
        return (
            frozen_features(pred, ids_tr, feature_cache, log),
            frozen_features(pred, ids_va, feature_cache, log),
        )

    layer_info = {}
    if select_layer:
        layer_info = select_feature_layer(
            pred, ids_tr, y_tr, ids_va, y_va, feature_cache, seed, log
        )
        _fresh_head(pred, seed)
    if mode == 'frozen':
        f_tr, f_va = features()
        if select_buckets:
            info = _select_bucket_head(pred, f_tr, y_tr, f_va, y_va, epochs or 300, seed, log)
        else:
            info = train_head(
                pred, f_tr, y_tr, f_va, y_va, epochs=epochs or 300, seed=seed, log=log
            )
    elif mode == 'finetune':
        if select_buckets:  # σ and decoding from a cheap frozen probe, then fine-tune with them
            f_tr, f_va = features()
            _select_bucket_head(pred, f_tr, y_tr, f_va, y_va, 300, seed, log)
            _fresh_head(pred, seed)
        if hasattr(pred.backbone, 'all_layers'):
            info = fine_tune_top(
                pred,
                ids_tr,
                y_tr,
                ids_va,
                y_va,
                n_layers=finetune_layers,
                epochs=epochs or 4,
                seed=seed,
                log=log,
            )
        else:
            info = fine_tune(
                pred, ids_tr, y_tr, ids_va, y_va, epochs=epochs or 3, seed=seed, log=log
            )
        if select_buckets:  # the fine-tuned distribution may prefer the other decoding
            with torch.no_grad():
                out_va = pred.head(pred.features(ids_va))
            picked = {}
            for decode in ('argmax', 'median'):
                meta.bucket_decode = decode
                picked[decode] = decoded_mae(pred, out_va, y_va)
            meta.bucket_decode = min(picked, key=picked.get)
            info.update(
                val_mae=picked[meta.bucket_decode],
                label_sigma=meta.label_sigma,
                bucket_decode=meta.bucket_decode,
            )
            log(f'[finetune] decoding by validation MAE: {picked} -> {meta.bucket_decode}')
    else:
        raise ValueError(f"mode must be 'frozen' or 'finetune', got {mode!r}")
    info.update(n_train=len(tr), n_val=len(va), **layer_info)
    meta.trained = info
    return pred, info
