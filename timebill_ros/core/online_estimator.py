"""
Online recalibration of the execution-time model from served requests (ROS-free).

Machines heat up, share their cores and slow down; the offline fit (``timebill calibrate``)
does not see it. ``OnlineTimeModel`` keeps the fitted model's *shape* (prefill quadratic in
N, decode step linear in the KV length) and learns two scale factors, one for prefill and one
for decode, by recursive least squares with a forgetting factor λ on y = s·x, where x is the
fitted model's prediction and y the measured time of a served request. With λ < 1 old
requests fade (effective memory 1/(1-λ) requests), so the model follows a slowdown and
recovers when it ends. A scalar per stage keeps the update well-conditioned whatever prompt
lengths are served (a full refit from same-length prompts would extrapolate wildly).

Drift check: the fitted model has a residual band (relative, ±``band``); when the median
measured/predicted ratio of the last ``window`` requests leaves it, ``drift()`` says so with the
numbers (the node logs a warning and reports it on /diagnostics).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
import statistics
from typing import Deque, List, Sequence

from .time_estimator import ExecutionTimeModel


@dataclass
class ScalarRls:
    """RLS for y = s·x with forgetting factor ``lam``; ``s`` starts at 1 (the fitted model)."""

    lam: float = 0.95
    s: float = 1.0
    p: float = 10.0  # covariance of s (large: trust the data quickly)
    n: int = 0
    lo: float = 0.1
    hi: float = 50.0

    def update(self, x: float, y: float) -> float:
        if not (x > 0 and y > 0):
            return self.s
        k = self.p * x / (self.lam + x * self.p * x)
        self.s = min(max(self.s + k * (y - x * self.s), self.lo), self.hi)
        # bounded: no wind-up between requests
        self.p = min((self.p - k * x * self.p) / self.lam, 1e6)
        self.n += 1
        return self.s


class OnlineTimeModel:
    def __init__(
        self,
        base: ExecutionTimeModel,
        forgetting: float = 0.95,
        band: float = 0.3,
        window: int = 10,
        min_samples: int = 3,
    ):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f'forgetting factor must be in (0, 1], got {forgetting}')
        self.base = base
        self.prefill = ScalarRls(lam=forgetting)
        self.decode = ScalarRls(lam=forgetting)
        self.warm = ScalarRls(lam=forgetting)  # warm prefills (prefix cache) on top of ``prefill``
        self.band = band
        self.min_samples = min_samples
        self._ratios: dict[str, Deque[float]] = {
            'prefill': deque(maxlen=window),
            'decode': deque(maxlen=window),
            'warm': deque(maxlen=window),
        }

    # ----------------------------------------------------------------- updates
    def _scale(self, rls: ScalarRls) -> float:
        return rls.s if rls.n >= self.min_samples else 1.0

    def observe_prefill(self, n_prompt: int, seconds: float, cached: int = 0) -> None:
        """
        One served prefill; a warm one (``cached`` > 0) teaches the warm scale only.

        Warm prefills are timed against the cold-scaled model, so the warm scale says how far
        the warm form is off on this machine, and cold predictions keep their own scale.
        """
        if cached > 0:
            x = self.base.scaled(self._scale(self.prefill)).prefill_s(n_prompt, cached)
            if x > 0 and seconds > 0:
                self._ratios['warm'].append(seconds / x)
                self.warm.update(x, seconds)
            return
        x = self.base.prefill_s(n_prompt)
        if x > 0 and seconds > 0:
            self._ratios['prefill'].append(seconds / x)
            self.prefill.update(x, seconds)

    def observe_decode(self, kv_first: int, step_s: Sequence[float]) -> None:
        """One served decode: step j read ``kv_first + j`` cached entries."""
        if not step_s:
            return
        x = sum(self.base.decode_step_s(kv_first + j) for j in range(len(step_s)))
        y = float(sum(step_s))
        if x > 0 and y > 0:
            self._ratios['decode'].append(y / x)
            self.decode.update(x, y)

    # ------------------------------------------------------------------ output
    def model(self) -> ExecutionTimeModel:
        """
        Return the fitted model rescaled by what served requests measured.

        The fit itself until ``min_samples`` requests per stage have been seen.
        """
        return self.base.scaled(
            self._scale(self.prefill), self._scale(self.decode), self._scale(self.warm)
        )

    def worst_model(self) -> ExecutionTimeModel:
        """
        Return the fitted model at the slowest scale recent requests were served at.

        A guarantee must hold on the machine as it has been, not on average: a CPU hog beside
        the node makes single requests several times slower than the running mean says.
        """
        scales = []
        for stage in ('prefill', 'decode', 'warm'):
            scales.append(max([self._scale(getattr(self, stage)), *self._ratios[stage]]))
        return self.base.scaled(*scales)

    def drift(self) -> List[str]:
        """List stages whose recent measured/predicted ratio left the band (empty: none)."""
        out = []
        lo, hi = 1.0 / (1.0 + self.band), 1.0 + self.band
        for stage, ratios in self._ratios.items():
            if len(ratios) < self.min_samples:
                continue
            med = statistics.median(ratios)
            if not lo <= med <= hi:
                out.append(
                    f'{stage} drift: measured times are {med:.2f}x the fitted model over the last '
                    f'{len(ratios)} requests (band {lo:.2f}-{hi:.2f}x); online scale now '
                    f'{getattr(self, stage).s:.2f}x'
                )
        return out

    def summary(self) -> dict:
        med = lambda r: statistics.median(r) if r else float('nan')  # noqa: E731
        return {
            'prefill_scale': self.prefill.s,
            'decode_scale': self.decode.s,
            'prefill_samples': self.prefill.n,
            'warm_prefill_scale': self.warm.s,
            'warm_prefill_samples': self.warm.n,
            'decode_samples': self.decode.n,
            'prefill_ratio_median': med(self._ratios['prefill']),
            'decode_ratio_median': med(self._ratios['decode']),
        }
