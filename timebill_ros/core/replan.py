"""
Re-planning during decode (issue 7): evict more, mid-answer, when the plan goes wrong.

TimeBill evicts once, after prefill, for the predicted length N̂ and the estimated step time.
When the answer outgrows N̂, or steps run slower than the estimate (a hotter machine, a
neighbour on the cores), that one-shot plan misses the deadline. ``Replanner`` watches the
decode (it is an ``on_token`` callback, so the engine is unchanged): every ``every`` steps it
re-estimates the tokens still to come and the real seconds per step, and when they no longer
fit before the deadline it solves for the KV length that makes them fit and shrinks the cache
to it with ``re_evict`` (at most to α_max of the prompt).

Mid-decode there are no prefill attention scores any more, so ``re_evict`` keeps entries by a
score-free rule on the current cache: the attention sinks and the most recent entries
(StreamingLLM's rule), which always keeps every generated token of the recent window.

The pipeline's decode stage (``core/stages.py``) runs one for every goal with a deadline and
a solved α (``Job.replan``, never under skip-next), so the node, replay and the sweep re-plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
import time
from typing import Callable, List, Optional

import torch

from . import kv_cache
from .time_estimator import ExecutionTimeModel


@torch.inference_mode()
def re_evict(cache, keep: int, n_sink: int = 4) -> int:
    """Shrink every layer of ``cache`` to ``keep`` entries (sinks + most recent); return it."""
    layers = list(cache.layers)
    length = int(layers[0].keys.shape[-2])
    keep = max(min(int(keep), length), n_sink + 1)
    if keep >= length:
        return length
    per_layer = []
    for layer in layers:
        b, h = layer.keys.shape[:2]
        idx = torch.cat([torch.arange(n_sink), torch.arange(length - (keep - n_sink), length)])
        per_layer.append(idx.to(layer.keys.device).expand(b, h, keep))
    kv_cache.keep_entries(cache, per_layer)
    return keep


def target_kv(
    model: ExecutionTimeModel, seconds_left: float, steps_left: int, slowdown: float
) -> float:
    """
    Find the largest KV length at which the remaining steps fit in ``seconds_left``.

    ``steps_left`` steps (each adding one entry), ``slowdown`` times slower than the model says;
    -inf when even an empty cache cannot.
    """
    if steps_left <= 0:
        return math.inf
    per_step = seconds_left / (steps_left * max(slowdown, 1e-6))
    if model.p <= 0:
        return math.inf if per_step >= model.q else -math.inf
    return (per_step - model.q) / model.p - steps_left / 2.0


@dataclass
class ReplanEvent:
    step: int
    reason: str
    kv_before: int
    kv_after: int


@dataclass
class Replanner:
    """
    Re-solve every ``every`` steps and evict more if needed.

    This is the ``on_token`` hook of ``Engine.decode``.
    """

    cache: object
    model: ExecutionTimeModel
    deadline: float  # absolute time.monotonic()
    n_hat: int  # predicted answer length
    n_cap: int  # the answer cannot be longer (max_new_tokens, context)
    n_prompt: int
    alpha_max: float = 0.95
    every: int = 8
    n_sink: int = 4
    growth: float = 1.5  # when the answer outgrows N̂, expect this much more
    clock: Callable[[], float] = time.monotonic
    then: Optional[Callable] = None  # the caller's own on_token, called after re-planning
    events: List[ReplanEvent] = field(default_factory=list)
    _last_t: Optional[float] = None
    _step_times: List[float] = field(default_factory=list)

    def kv_len(self) -> int:
        return int(next(iter(self.cache.layers)).keys.shape[-2])

    def __call__(self, step: int, token_id: int, text: str) -> None:
        now = self.clock()
        if self._last_t is not None:
            self._step_times.append(now - self._last_t)
        self._last_t = now
        if step > 0 and step % self.every == 0 and self._step_times:
            self.check(step + 1, now)
        if self.then is not None:
            self.then(step, token_id, text)

    def check(self, tokens: int, now: float) -> Optional[ReplanEvent]:
        kv = self.kv_len()
        recent = self._step_times[-self.every:]
        measured = sum(recent) / len(recent)
        predicted = self.model.decode_step_s(kv)
        slowdown = max(measured / predicted, 1.0) if predicted > 0 else 1.0
        expected_total = (
            self.n_hat if tokens < self.n_hat else min(math.ceil(tokens * self.growth), self.n_cap)
        )
        steps_left = max(min(expected_total, self.n_cap) - tokens, 0)
        left = self.deadline - now
        need = steps_left * slowdown * (self.model.p * (kv + steps_left / 2.0) + self.model.q)
        if steps_left == 0 or need <= left:
            return None
        floor = max(
            int(math.ceil(self.n_prompt * (1.0 - self.alpha_max))) + tokens, self.n_sink + 1
        )
        target = target_kv(self.model, left, steps_left, slowdown)
        keep = int(max(min(target, kv - 1), floor)) if math.isfinite(target) else floor
        if keep >= kv:
            return None
        why = (
            f'{"answer outgrew N̂" if tokens >= self.n_hat else "steps slower than estimated"}: '
            f'{steps_left} steps need {need:.3f} s at '
            f'{slowdown:.2f}x the estimate, {left:.3f} s left'
        )
        new = re_evict(self.cache, keep, self.n_sink)
        ev = ReplanEvent(tokens, why, kv, new)
        self.events.append(ev)
        return ev
