"""
KV-cache eviction presses, applied once after prefill (TimeBill picks α only then).

Each press is a small dataclass (as in NVIDIA kvpress): it says which prompt entries to keep
per layer and KV head, given the keys and, if it asks for them, attention scores gathered
during prefill. The engine does not know which press runs. Every press keeps the same count
per head, round((1 − α)·L), so the cache stays rectangular.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import ClassVar, Dict, Optional, Type

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


PRESSES: Dict[str, Type[Press]] = {p.name: p for p in (NonePress, SnapKVPress, StreamingLLMPress)}


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
