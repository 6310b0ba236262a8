"""
N̂ for the generator's pipeline from the predictor's ``Estimate`` messages.

The server publishes each request to the predictor when it dispatches the goal; the estimate
comes back on ``timebill/estimates`` while the generator queues and prefills, and α waits for it
(or decoding starts and α follows, since a late estimate still arrives: ``deferrable``).
"""

from __future__ import annotations

from collections import OrderedDict
import threading
import time

from timebill_ros.core.job import Job
from timebill_ros.core.lengths import LengthEstimate
from timebill_ros.msg import Estimate

KEEP_ESTIMATES = 256  # estimates of goals the generator never got (lost, refused) age out


class TopicLengths:
    """N̂ from the predictor's ``Estimate`` messages, as a pipeline length source."""

    deferrable = True  # a late estimate still arrives: α may wait for it while decoding starts

    def __init__(self):
        self._cv = threading.Condition()
        self._got: 'OrderedDict[str, LengthEstimate]' = OrderedDict()

    def put(self, msg: Estimate) -> None:
        with self._cv:
            self._got[msg.request_id] = LengthEstimate(
                int(msg.predicted_length),
                bool(msg.fallback),
                time.monotonic(),
                float(msg.prediction_s),
            )
            while len(self._got) > KEEP_ESTIMATES:
                self._got.popitem(last=False)
            self._cv.notify_all()

    def start(self, job: Job) -> None:
        pass  # the server published the request to the predictor when it dispatched the goal

    def wait(self, job: Job, until: float):
        with self._cv:
            self._cv.wait_for(
                lambda: job.request_id in self._got, max(until - time.monotonic(), 0.0)
            )
            return self._got.pop(job.request_id, None)
