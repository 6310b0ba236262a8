"""
The predictor's label space and records: bucket maths, prompt compression, meta, prediction.

Everything here is plain Python (no torch), because the budget, the CLIs and the tests reason
about buckets and checkpoints without loading a model. The paper predicts N̂ as a class over
``num_buckets`` buckets of ``bucket_size`` tokens: label ⌈N/B⌉, N̂ = the bucket's upper edge
(pessimistic inside the bucket, as a WCET wants), capped at N_max = B·K. ``PredictorMeta`` is
what a checkpoint directory stores to rebuild a predictor; ``Prediction`` is what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Sequence

MINILM = 'minilm'
# fine buckets (RLP), scalar regression, coarse classes
HEADS = ('buckets', 'regression', 'edges')


# --------------------------------------------------------------------------- bucket maths
def length_to_bucket(n: int, bucket_size: int, num_buckets: int) -> int:
    """
    Map a length N to its 1-based label ⌈N/B⌉, clamped to [1, K].

    N = 0 shares bucket 1, N > N_max lands in bucket K.
    """
    if n < 0:
        raise ValueError(f'length must be >= 0, got {n}')
    return min(max(1, math.ceil(n / bucket_size)), num_buckets)


def bucket_upper_edge(label: int, bucket_size: int, num_buckets: int) -> int:
    """N̂ for a 1-based label: the bucket's upper edge, capped at N_max = B·K."""
    if label < 1:
        raise ValueError(f'bucket labels start at 1, got {label}')
    return min(label, num_buckets) * bucket_size


def edges_to_class(n: int, edges: Sequence[int]) -> int:
    """
    Map a length to its 0-based class among coarse buckets with ascending upper ``edges``.

    The last class takes the rest.
    """
    for i, e in enumerate(edges):
        if n <= e:
            return i
    return len(edges) - 1


def equal_width_edges(n_classes: int, max_len: int) -> list[int]:
    """
    Return the upper edges of ``n_classes`` equal-width buckets over [0, max_len].

    As S3 and ProxyModel bucket lengths.
    """
    return [int(round(max_len * (i + 1) / n_classes)) for i in range(n_classes)]


# --------------------------------------------------------------------------- prompt compression
def compress_ids(ids: Sequence[int], max_tokens: int, head_frac: float = 0.5) -> list[int]:
    """
    Keep at most ``max_tokens`` ids: the head and the tail.

    The instruction usually comes first and the question or the ask last; the middle of a long
    context says least about length.
    """
    ids = list(ids)
    if max_tokens <= 0:
        raise ValueError(f'max_tokens must be >= 1, got {max_tokens}')
    if len(ids) <= max_tokens:
        return ids
    head = int(round(max_tokens * head_frac))
    tail = max_tokens - head
    return ids[:head] + (ids[-tail:] if tail else [])


# --------------------------------------------------------------------------- records
@dataclass
class Prediction:
    n_hat: int  # predicted response length in target tokens (upper edge of the bucket)
    bucket: int  # 1-based fine bucket (or coarse class + 1); 0 for the fallback
    latency_s: float  # wall time of this prediction
    source: str = 'model'  # "model" or "fallback"
    prompt_tokens: int = 0  # backbone tokens before compression
    censored: bool = False  # predicted "runs to the label cap": n_hat was raised to N_max


@dataclass
class PredictorMeta:
    """Everything needed to rebuild a predictor from its directory."""

    backbone: str = MINILM
    head: str = 'buckets'  # one of HEADS
    bucket_size: int = 16
    num_buckets: int = 512
    edges: list = field(default_factory=list)  # coarse upper edges for head == "edges"
    edge_values: list = field(default_factory=list)  # N̂ per coarse class (default: upper edge)
    reg_scale: float = 100.0  # regression target = length / reg_scale
    max_prompt_tokens: int = 256
    label_cap: int = 0  # labels were cut here (capped = censored); 0 = unknown
    # "argmax" (paper) or "median" of the predicted bucket distribution
    bucket_decode: str = 'argmax'
    # >0: Gaussian soft targets over neighbouring buckets (ordinal smoothing)
    label_sigma: float = 0.0
    # causal LM: state after this decoder layer (0 = last); chosen on validation
    feature_layer: int = 0
    # causal LM fine-tuned: only the top n layers under the feature were trained (and saved)
    finetune_layers: int = 0
    finetuned: bool = False
    hidden: int = 256
    label_file: str = ''
    trained: dict = field(default_factory=dict)  # provenance: epochs, seconds, val metrics

    @property
    def n_max(self) -> int:
        return self.bucket_size * self.num_buckets

    @property
    def out_dim(self) -> int:
        return {'buckets': self.num_buckets, 'regression': 1, 'edges': len(self.edges)}[self.head]
