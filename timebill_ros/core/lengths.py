"""
Where a request's predicted answer length N̂ comes from, as the pipeline sees it.

The pipeline calls ``start(job)`` when prefill begins and ``wait(job, until)`` after it; a
source that has no estimate by ``until`` returns None and the pipeline plans with the cap.
The generator node's source is the predictor's topic (``nodes/generator.TopicLengths``).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
import time
from typing import Dict, Optional, TYPE_CHECKING

if TYPE_CHECKING:
    from .job import Job


@dataclass
class LengthEstimate:
    n_hat: int
    fallback: bool  # no prediction: N̂ = the answer cap
    received_at: float = -1.0  # pipeline clock, when the estimate reached the pipeline
    prediction_s: float = 0.0


class FixedLength:
    """A known N̂ (tests, the sweep's shared prediction)."""

    deferrable = False  # known at once or never

    def __init__(self, n_hat: Optional[int], prediction_s: float = 0.0, clock=time.monotonic):
        self.n_hat, self.prediction_s, self.clock = n_hat, prediction_s, clock

    def start(self, job: 'Job') -> None:
        pass

    def wait(self, job: 'Job', until: float) -> Optional[LengthEstimate]:
        if self.n_hat is None:
            return None
        return LengthEstimate(int(self.n_hat), False, self.clock(), self.prediction_s)


class PredictorLength:
    """The response-length predictor run beside prefill on its own thread (offline use)."""

    deferrable = True  # a late prediction still arrives: α may wait for it while decoding

    def __init__(self, predictor, clock=time.monotonic):
        from concurrent.futures import ThreadPoolExecutor

        self.predictor, self.clock = predictor, clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix='timebill_length')
        self._futures: Dict[str, Future] = {}

    def _predict(self, prompt: str) -> LengthEstimate:
        t0 = time.monotonic()
        p = self.predictor.predict(prompt)
        fallback = getattr(p, 'source', 'model') == 'fallback'
        return LengthEstimate(int(p.n_hat), fallback, -1.0, time.monotonic() - t0)

    def start(self, job: 'Job') -> None:
        self._futures[job.request_id] = self._pool.submit(self._predict, job.prompt)
        while len(self._futures) > 256:  # jobs that ended before asking for theirs
            self._futures.pop(next(iter(self._futures)))

    def wait(self, job: 'Job', until: float) -> Optional[LengthEstimate]:
        fut = self._futures.get(job.request_id)
        if fut is None:
            return None
        try:
            est = fut.result(timeout=max(until - self.clock(), 0.0))
        except TimeoutError:  # late: asked again later (the caller may defer α)
            return None
        except Exception:  # noqa: BLE001 - failed: the caller plans with the cap
            self._futures.pop(job.request_id, None)
            return None
        self._futures.pop(job.request_id, None)
        est.received_at = self.clock()
        return est
