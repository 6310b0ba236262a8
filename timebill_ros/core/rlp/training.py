"""
Optimisation loops for the length predictor: loss, targets, metrics and the three trainers.

Separate from inference (``predictor``) because only ``timebill train-predictor`` and
``eval-predictor`` train, and separate from the orchestration (``train``) because these loops
take ready features or token ids and know nothing of label files or caches. Three ways to train:
the head alone on frozen features (``train_head``), backbone and head together
(``fine_tune``), and a causal LM's top layers with the layers below frozen and computed once
(``fine_tune_top``). Each keeps the epoch with the best validation MAE of the decoded N̂, the
quantity the budget uses.
"""

from __future__ import annotations

import math
import time
from typing import Sequence, TYPE_CHECKING

from .backbones import left_pad, stack_view
from .buckets import edges_to_class, length_to_bucket, PredictorMeta

if TYPE_CHECKING:
    from .predictor import LengthPredictor


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict:
    """MAE, RMSE and R² (1 − SS_res/SS_tot; 0 = as good as predicting the mean, < 0 worse)."""
    import numpy as np

    y, p = np.asarray(y_true, float), np.asarray(y_pred, float)
    err = p - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {
        'mae': float(np.abs(err).mean()),
        'rmse': float(np.sqrt((err**2).mean())),
        'r2': float(1 - (err**2).sum() / ss_tot) if ss_tot > 0 else float('nan'),
        'n': int(len(y)),
    }


def decoded_mae(pred: 'LengthPredictor', out, y: Sequence[int]) -> float:
    """MAE of the N̂ that ``pred`` decodes from head outputs ``out`` against lengths ``y``."""
    return regression_metrics(y, pred.decode(out)[0])['mae']


def targets_for(meta: PredictorMeta, lengths: Sequence[int]):
    import torch

    if meta.head == 'buckets':
        return torch.tensor(
            [length_to_bucket(int(n), meta.bucket_size, meta.num_buckets) - 1 for n in lengths]
        )
    if meta.head == 'regression':
        return torch.tensor([float(n) / meta.reg_scale for n in lengths]).unsqueeze(-1)
    return torch.tensor([edges_to_class(int(n), meta.edges) for n in lengths])


def _loss(meta: PredictorMeta, out, target):
    import torch
    import torch.nn.functional as F

    if meta.head == 'regression':
        return F.smooth_l1_loss(out, target)
    if meta.head == 'buckets' and meta.label_sigma > 0:
        k = torch.arange(out.shape[-1], dtype=out.dtype)
        z = (k[None, :] - target[:, None].to(out.dtype)) / meta.label_sigma
        soft = torch.exp(-0.5 * z**2)
        soft = soft / soft.sum(-1, keepdim=True)
        return -(soft * out.log_softmax(-1)).sum(-1).mean()
    return F.cross_entropy(out, target)


def _warmup_linear(opt, steps: int):
    """Linear warm-up over the first tenth of ``steps``, then linear decay to 0."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps)
    )


def train_head(
    pred: 'LengthPredictor',
    feats_tr,
    y_tr: Sequence[int],
    feats_va,
    y_va: Sequence[int],
    epochs: int = 300,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    patience: int = 40,
    seed: int = 0,
    log=print,
) -> dict:
    """
    Train only the head on precomputed (frozen-backbone) features.

    Keep the epoch with the best validation MAE of the decoded N̂ (the quantity the budget uses).
    """
    import copy

    import torch

    torch.manual_seed(seed)
    head, meta = pred.head, pred.meta
    tgt = targets_for(meta, y_tr)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best = (float('inf'), None, -1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for ep in range(epochs):
        head.train()
        perm = torch.randperm(len(tgt), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = _loss(meta, head(feats_tr[idx]), tgt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            mae = decoded_mae(pred, head(feats_va), y_va)
        if mae < best[0]:
            best = (mae, copy.deepcopy(head.state_dict()), ep)
        elif ep - best[2] >= patience:
            break
    head.load_state_dict(best[1])
    head.eval()
    info = {
        'mode': 'frozen',
        'epochs_run': ep + 1,
        'best_epoch': best[2] + 1,
        'val_mae': best[0],
        'train_s': round(time.perf_counter() - t0, 2),
    }
    log(f'[train] head={meta.head} {info}')
    return info


def fine_tune(
    pred: 'LengthPredictor',
    ids_tr: Sequence[Sequence[int]],
    y_tr: Sequence[int],
    ids_va: Sequence[Sequence[int]],
    y_va: Sequence[int],
    epochs: int = 3,
    lr_backbone: float = 5e-5,
    lr_head: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    log=print,
) -> dict:
    """
    Train backbone and head together.

    A few epochs; the best epoch by validation MAE is kept.
    """
    import copy

    import torch

    torch.manual_seed(seed)
    meta, head, bb = pred.meta, pred.head, pred.backbone
    tgt = targets_for(meta, y_tr)
    opt = torch.optim.AdamW(
        [
            {'params': bb.model.parameters(), 'lr': lr_backbone},
            {'params': head.parameters(), 'lr': lr_head},
        ],
        weight_decay=0.01,
    )
    sched = _warmup_linear(opt, epochs * math.ceil(len(tgt) / batch_size))
    g = torch.Generator().manual_seed(seed)
    best = (float('inf'), None, -1)
    t0 = time.perf_counter()
    for ep in range(epochs):
        bb.model.train()
        head.train()
        perm = torch.randperm(len(tgt), generator=g).tolist()
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            out = head(bb.forward([ids_tr[j] for j in idx]).float())
            loss = _loss(meta, out, tgt[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                list(bb.model.parameters()) + list(head.parameters()), 1.0
            )
            opt.step()
            sched.step()
        bb.model.eval()
        head.eval()
        with torch.no_grad():
            mae = decoded_mae(pred, head(pred.features(ids_va)), y_va)
        log(
            f'[finetune] epoch {ep + 1}/{epochs} val MAE {mae:.1f} '
            f'({time.perf_counter() - t0:.0f}s)'
        )
        if mae < best[0]:
            best = (
                mae,
                (copy.deepcopy(bb.model.state_dict()), copy.deepcopy(head.state_dict())),
                ep,
            )
    bb.model.load_state_dict(best[1][0])
    head.load_state_dict(best[1][1])
    meta.finetuned = True
    return {
        'mode': 'finetune',
        'epochs_run': epochs,
        'best_epoch': best[2] + 1,
        'val_mae': best[0],
        'train_s': round(time.perf_counter() - t0, 2),
    }


def fine_tune_top(
    pred: 'LengthPredictor',
    ids_tr: Sequence[Sequence[int]],
    y_tr: Sequence[int],
    ids_va: Sequence[Sequence[int]],
    y_va: Sequence[int],
    n_layers: int = 4,
    epochs: int = 4,
    lr_backbone: float = 3e-5,
    lr_head: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    log=print,
) -> dict:
    """
    Fine-tune a causal-LM predictor the affordable way.

    The layers below the top ``n_layers`` stay frozen, so their per-token states are computed
    once and only the top layers and the head train (on CPU ~2 min an epoch for SmolLM2 instead
    of a full backward pass).
    """
    import copy

    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    meta, head, bb = pred.meta, pred.head, pred.backbone
    stack = bb.model
    k = len(stack.layers)
    if not 1 <= n_layers <= k:
        raise ValueError(f'n_layers must be in [1, {k}], got {n_layers}')
    lower = stack_view(stack, 0, k - n_layers, nn.Identity())
    upper = stack_view(stack, k - n_layers, k, stack.norm)

    def lower_states(id_lists):
        out = [None] * len(id_lists)
        order = sorted(range(len(id_lists)), key=lambda i: len(id_lists[i]))
        with torch.inference_mode():
            for i in range(0, len(order), 32):
                b = order[i:i + 32]
                inp, mask, pos = left_pad([id_lists[j] for j in b])
                h = lower(
                    input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=False
                ).last_hidden_state
                for r, j in enumerate(b):
                    out[j] = h[r, h.shape[1] - len(id_lists[j]):].clone()
        return out

    def top(states):
        _, mask, pos = left_pad([[0] * h.shape[0] for h in states])
        x = torch.zeros(len(states), mask.shape[1], states[0].shape[-1])
        for i, h in enumerate(states):
            x[i, mask.shape[1] - h.shape[0]:] = h
        return upper(
            inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False
        ).last_hidden_state[:, -1]

    def outputs(states):
        order = sorted(range(len(states)), key=lambda i: states[i].shape[0])
        res = [None] * len(states)
        with torch.no_grad():
            for i in range(0, len(order), 32):
                b = order[i:i + 32]
                o = head(top([states[j] for j in b]).float())
                for r, j in enumerate(b):
                    res[j] = o[r]
        return torch.stack(res)

    t0 = time.perf_counter()
    s_tr, s_va = lower_states(ids_tr), lower_states(ids_va)
    log(
        f'[finetune] states below the top {n_layers} layers for {len(s_tr) + len(s_va)} '
        f'prompts in {time.perf_counter() - t0:.0f}s'
    )
    params = [p for layer in upper.layers for p in layer.parameters()]
    for p in stack.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    tgt = targets_for(meta, y_tr)
    opt = torch.optim.AdamW(
        [{'params': params, 'lr': lr_backbone}, {'params': head.parameters(), 'lr': lr_head}],
        weight_decay=0.01,
    )
    sched = _warmup_linear(opt, epochs * math.ceil(len(tgt) / batch_size))
    g = torch.Generator().manual_seed(seed)
    best = (float('inf'), None, -1)
    for ep in range(epochs):
        upper.train()
        head.train()
        perm = torch.randperm(len(tgt), generator=g).tolist()
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = _loss(meta, head(top([s_tr[j] for j in idx]).float()), tgt[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params + list(head.parameters()), 1.0)
            opt.step()
            sched.step()
        upper.eval()
        head.eval()
        mae = decoded_mae(pred, outputs(s_va), y_va)
        log(
            f'[finetune] epoch {ep + 1}/{epochs} val MAE {mae:.1f} '
            f'({time.perf_counter() - t0:.0f}s)'
        )
        if mae < best[0]:
            best = (
                mae,
                ([p.detach().clone() for p in params], copy.deepcopy(head.state_dict())),
                ep,
            )
    with torch.no_grad():
        for p, v in zip(params, best[1][0]):
            p.copy_(v)
    head.load_state_dict(best[1][1])
    for p in params:
        p.requires_grad_(False)
    meta.finetuned, meta.finetune_layers = True, n_layers
    return {
        'mode': 'finetune',
        'finetune_layers': n_layers,
        'epochs_run': epochs,
        'best_epoch': best[2] + 1,
        'val_mae': best[0],
        'train_s': round(time.perf_counter() - t0, 2),
    }
