"""
KV-cache eviction presses, applied once after prefill (TimeBill picks α only then).

Each press is a small dataclass (as in NVIDIA kvpress): it says which prompt entries to keep
per layer and KV head, given the keys and, if it asks for them, attention scores gathered
during prefill. The engine does not know which press runs. Every press keeps the same count
for every head of a layer, so each layer's cache stays rectangular; most keep round((1 − α)·L)
in every layer, the layer-budget presses (PyramidKV, AdaKV across layers) move entries between
layers and keep the same total.

Presses compared on quality (``benchmarks/press_quality.py``, docs/QUALITY.md):

- ``snapkv`` (avg or max pooling), ``streaming_llm``, ``none`` (the most recent entries);
- ``pyramidkv``: SnapKV scores, budgets falling linearly from the bottom layer to the top;
- ``chunkkv``: SnapKV votes summed over chunks of consecutive tokens, whole chunks kept;
- ``question_window``: SnapKV whose observation window is the prompt's last line (the question
  and the chat template's tail) instead of the last ``window_size`` tokens;
- ``ada_layers``: AdaKV's allocation rule (budget goes where the score mass is, from one top-k
  over all heads) applied across layers, since heads of a layer must keep equal counts here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import math
from typing import ClassVar, Dict, List, Optional, Sequence, Type

import torch
import torch.nn.functional as F

from .errors import InvalidAlphaError, UnknownPressError


def check_alpha(alpha: float) -> float:
    if (
        alpha is None
        or not isinstance(alpha, (int, float))
        or math.isnan(alpha)
        or not 0.0 <= alpha < 1.0
    ):
        raise InvalidAlphaError(f'eviction ratio alpha must be a number in [0, 1), got {alpha!r}')
    return float(alpha)


def n_keep(length: int, alpha: float) -> int:
    """Count entries kept out of ``length`` at ratio α; at least one, so a context remains."""
    return max(1, min(length, int(round((1.0 - check_alpha(alpha)) * length))))


@dataclass
class Press:
    """Base class: subclasses set ``name`` and implement ``keep_indices``."""

    name: ClassVar[str] = ''
    needs_scores: ClassVar[bool] = False

    def score(self, module, query: torch.Tensor, key: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-KV-head importance of every prompt key, computed inside prefill attention."""
        return None

    def keep_indices(
        self, keys: torch.Tensor, scores: Optional[torch.Tensor], keep: int
    ) -> torch.Tensor:
        """Sorted indices ``[batch, kv_heads, keep]`` of the entries to keep."""
        raise NotImplementedError

    def select(
        self, keys: Sequence[torch.Tensor], scores: Dict[int, torch.Tensor], keep: int
    ) -> List[torch.Tensor]:
        """
        Choose the indices to keep in every layer (``keys[i]`` is layer i's keys).

        ``keep`` is the mean count per layer; the default keeps exactly ``keep`` in each layer.
        Layer-budget presses override this and keep ``keep · layers`` in all.
        """
        return [self.keep_indices(k, scores.get(i), keep) for i, k in enumerate(keys)]

    def for_prompt(self, input_ids: Sequence[int], tokenizer=None) -> 'Press':
        """Return the press that scores this prompt's prefill (the same one unless it adapts)."""
        return self


@dataclass
class NonePress(Press):
    name: ClassVar[str] = 'none'

    def keep_indices(self, keys, scores, keep):
        b, h, length, _ = keys.shape
        return torch.arange(length - keep, length, device=keys.device).expand(b, h, keep)


@dataclass
class StreamingLLMPress(Press):
    """Attention sinks plus the most recent entries (Xiao et al., 2023)."""

    name: ClassVar[str] = 'streaming_llm'
    n_sink: int = 4

    def keep_indices(self, keys, scores, keep):
        b, h, length, _ = keys.shape
        sink = min(self.n_sink, keep)
        idx = torch.cat([torch.arange(sink), torch.arange(length - (keep - sink), length)])
        return idx.to(keys.device).expand(b, h, keep)


@dataclass
class SnapKVPress(Press):
    """
    SnapKV (Li et al., 2024) as NVIDIA kvpress runs it.

    The last ``window_size`` queries vote for prompt keys; votes are pooled over ``kernel_size``
    neighbours and averaged over the query heads sharing a KV head (GQA). The window itself is
    always kept.
    """

    name: ClassVar[str] = 'snapkv'
    needs_scores: ClassVar[bool] = True
    window_size: int = 64
    kernel_size: int = 5
    pooling: str = 'avg'  # "avg" as kvpress; "max" keeps whole spans around any strong vote

    def score(self, module, query, key):
        # query [B, Hq, L, D], key [B, Hkv, L, D] (after RoPE). Only w×L scores, never L×L.
        b, hq, length, d = query.shape
        hkv = key.shape[1]
        w = min(self.window_size, length)
        q = query[:, :, -w:, :].float()
        k = key.float()
        if hq != hkv:  # score each query head against its KV head, then average in the group
            k = k.repeat_interleave(hq // hkv, dim=1)
        scaling = getattr(module, 'scaling', 1.0 / math.sqrt(d))
        attn = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, Hq, w, L]
        qpos = torch.arange(length - w, length, device=q.device)[:, None]
        kpos = torch.arange(length, device=q.device)[None, :]
        attn = attn.masked_fill(kpos > qpos, float('-inf')).softmax(dim=-1)
        votes = attn[..., : length - w].mean(dim=-2)  # [B, Hq, L - w]
        if votes.shape[-1] > 0 and self.kernel_size > 1:
            k, pad = self.kernel_size, self.kernel_size // 2
            if self.pooling == 'max':
                votes = F.max_pool1d(votes, kernel_size=k, padding=pad, stride=1)[
                    ..., : length - w
                ]
            else:
                votes = F.avg_pool1d(
                    votes, kernel_size=k, padding=pad, stride=1, count_include_pad=False
                )[..., : length - w]
        votes = votes.view(b, hkv, hq // hkv, -1).mean(dim=2)
        # Window entries outrank everything; among themselves, the most recent first.
        window = 2.0 + torch.arange(w, device=q.device, dtype=votes.dtype) / max(w, 1)
        return torch.cat([votes, window.expand(b, hkv, w)], dim=-1)

    def keep_indices(self, keys, scores, keep):
        if scores is None:
            raise RuntimeError(
                'snapkv needs the scores collected during prefill; prefill ran without them'
            )
        return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


def layer_budgets(weights: Sequence[float], total: int, length: int, floor: int = 1) -> List[int]:
    """
    Split ``total`` entries over layers in proportion to ``weights``, each in [floor, length].

    Largest remainders round; what the clipping takes or leaves goes to the layers with room.
    """
    n = len(weights)
    total = max(min(total, n * length), n * min(floor, length))
    floor = min(floor, length)
    w = [max(float(x), 0.0) for x in weights]
    if sum(w) <= 0:
        w = [1.0] * n
    budgets = [floor] * n
    free = [True] * n
    left = total - floor * n
    while left > 0 and any(free):
        mass = sum(w[i] for i in range(n) if free[i]) or float(sum(free))
        share = [
            (w[i] / mass if mass > 0 else 1.0 / sum(free)) * left if free[i] else 0.0
            for i in range(n)
        ]
        add = [min(int(share[i]), length - budgets[i]) for i in range(n)]
        if sum(add) == 0:  # hand out the remainder one by one, largest share first
            for i in sorted(range(n), key=lambda j: -share[j]):
                if left and free[i] and budgets[i] < length:
                    budgets[i] += 1
                    left -= 1
            if all(b >= length for b in budgets):
                break
            continue
        for i in range(n):
            budgets[i] += add[i]
            left -= add[i]
            if budgets[i] >= length:
                free[i] = False
    return budgets


@dataclass
class PyramidKVPress(SnapKVPress):
    """
    PyramidKV (Cai et al., 2024): SnapKV per layer, more entries in lower layers.

    Budgets fall linearly from the bottom layer to the top, the top one getting 1/``beta`` of
    the mean non-window budget (as the paper and kvpress); the total equals SnapKV's.
    """

    name: ClassVar[str] = 'pyramidkv'
    beta: float = 20.0

    def select(self, keys, scores, keep):
        n_layers, length = len(keys), keys[0].shape[-2]
        w = min(self.window_size, length)
        mean = max(keep - w, 0)
        low = mean / self.beta
        high = 2 * mean - low
        step = (high - low) / max(n_layers - 1, 1)
        weights = [w + high - i * step for i in range(n_layers)]
        budgets = layer_budgets(weights, keep * n_layers, length, floor=min(w, keep))
        return [
            self.keep_indices(k, scores.get(i), b) for i, (k, b) in enumerate(zip(keys, budgets))
        ]


@dataclass
class ChunkKVPress(SnapKVPress):
    """
    ChunkKV (Liu et al., 2025): SnapKV votes summed over chunks of ``chunk_size`` tokens.

    Whole chunks are kept, best first, so a fact is kept or dropped as a span; the last chunk to
    fit keeps its best tokens. The observation window is always kept.
    """

    name: ClassVar[str] = 'chunkkv'
    chunk_size: int = 10

    def score(self, module, query, key):
        scores = super().score(module, query, key)
        length = scores.shape[-1]
        w = min(self.window_size, length)
        ctx = scores[..., : length - w]
        n = ctx.shape[-1]
        if n == 0:
            return scores
        c = max(1, int(self.chunk_size))
        n_chunks = -(-n // c)
        padded = F.pad(ctx, (0, n_chunks * c - n))
        sums = padded.view(*ctx.shape[:-1], n_chunks, c).sum(dim=-1)
        rank = sums.argsort(dim=-1).argsort(dim=-1).to(ctx.dtype)  # 0 = the weakest chunk
        # chunk rank dominates (votes are < 1), the token's own vote breaks ties inside a chunk
        per_token = rank.repeat_interleave(c, dim=-1)[..., :n] * 2.0 + ctx.clamp(0, 1)
        window = scores[..., length - w:] + 2.0 * n_chunks
        return torch.cat([per_token, window], dim=-1)


_NEWLINE_IDS: Dict[int, frozenset] = {}


def _newline_ids(tokenizer) -> frozenset:
    """Ids of the tokenizer's tokens whose text holds a line break (cached per tokenizer)."""
    key = id(tokenizer)
    if key not in _NEWLINE_IDS:
        vocab = tokenizer.get_vocab()
        ids = [i for i in vocab.values() if '\n' in tokenizer.decode([i])]
        _NEWLINE_IDS[key] = frozenset(ids)
    return _NEWLINE_IDS[key]


@dataclass
class QuestionWindowPress(SnapKVPress):
    """
    SnapKV whose observation window is the question: the prompt's last line.

    The window starts after the last line break that lies at least ``min_window`` tokens
    before the end (so the chat template's closing lines stay inside it), and holds at most
    ``max_window`` tokens. Only that window votes, and only it is always kept, so the end of
    the context text competes with the rest on its votes. Without a tokenizer (or a line
    break) the window is the last ``window_size`` tokens, as SnapKV.
    """

    name: ClassVar[str] = 'question_window'
    min_window: int = 8
    max_window: int = 256

    def for_prompt(self, input_ids, tokenizer=None):
        if tokenizer is None:
            return self
        breaks = _newline_ids(tokenizer)
        ids = list(input_ids)
        n = len(ids)
        start = None
        for i in range(n - self.min_window - 1, max(-1, n - self.max_window - 2), -1):
            if ids[i] in breaks:
                start = i + 1
                break
        if start is None:
            return self
        return dataclasses.replace(self, window_size=max(1, n - start))

    def score(self, module, query, key):
        # chunked prefill pads earlier chunks' queries with zeros: vote with real rows only
        real = query[0, 0].abs().sum(dim=-1) != 0
        first = int(real.float().argmax()) if bool(real.any()) else 0
        if query.shape[2] - first < self.window_size:
            return dataclasses.replace(self, window_size=query.shape[2] - first).score(
                module, query, key
            )
        return super().score(module, query, key)


@dataclass
class AdaLayersPress(SnapKVPress):
    """
    AdaKV's budget rule (Feng et al., 2024) where this cache allows it: across layers.

    AdaKV takes one top-k over the scores of all heads of a layer, so heads with spread-out
    attention keep more entries. Here heads of one layer must keep equal counts (a rectangular
    cache), so the top-k runs over all layers and heads; each layer then keeps the mean of its
    heads' shares (each head its own best), at least ``safeguard`` × the uniform count.
    """

    name: ClassVar[str] = 'ada_layers'
    safeguard: float = 0.2

    def select(self, keys, scores, keep):
        if any(scores.get(i) is None for i in range(len(keys))):
            raise RuntimeError(
                'ada_layers needs the scores collected during prefill; prefill ran without them'
            )
        n_layers, length = len(keys), keys[0].shape[-2]
        heads = keys[0].shape[1]
        flat = torch.cat([scores[i].reshape(-1) for i in range(n_layers)])
        total = keep * n_layers * heads
        if total >= flat.numel():
            budgets = [length] * n_layers
        else:
            top = flat.topk(total).indices
            per_layer = torch.bincount(top // (flat.numel() // n_layers), minlength=n_layers)
            budgets = layer_budgets(
                per_layer.tolist(),
                keep * n_layers,
                length,
                floor=max(1, int(self.safeguard * keep)),
            )
        return [
            self.keep_indices(k, scores[i], b) for i, (k, b) in enumerate(zip(keys, budgets))
        ]


PRESSES: Dict[str, Type[Press]] = {
    p.name: p
    for p in (
        NonePress,
        SnapKVPress,
        StreamingLLMPress,
        PyramidKVPress,
        ChunkKVPress,
        QuestionWindowPress,
        AdaLayersPress,
    )
}


def get_press(name: str, **options) -> Press:
    """Build a press by registry name, passing only the options it declares."""
    try:
        cls = PRESSES[name]
    except KeyError:
        raise UnknownPressError(
            f'unknown eviction press {name!r}; known: {", ".join(sorted(PRESSES))}'
        ) from None
    fields = getattr(cls, '__dataclass_fields__', {})
    return cls(**{k: v for k, v in options.items() if k in fields})
