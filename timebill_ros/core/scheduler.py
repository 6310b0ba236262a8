"""Earliest-deadline-first queue for one model, and admission control (ROS-free).

One model serves one job at a time (non-preemptive). Jobs wait in an EDF queue: when the
model frees up, the waiting job with the earliest absolute deadline runs next. Time spent
queued counts against each job's own budget (its deadline was fixed at acceptance).

Admission control refuses, at once, a job that cannot finish in time *whatever α is chosen*:
the work certainly ahead of it (jobs with earlier deadlines that still have to run their
prefill, plus the job running now) plus its own minimum work (its prefill and one decode
step at α_max) already exceeds its deadline. The bound is a lower bound on time, so a job is
only refused when the time model says it is hopeless; the reason carries the numbers, so a
planner can retry with a bigger budget or a shorter prompt.

Skip-Next (the paper's second overrun policy): a late job runs on to the end; every job that
was waiting while it overran is skipped.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from .time_estimator import ExecutionTimeModel

# Overrun policies a goal may ask for: the engine's two, plus the paper's Skip-Next, which is a
# queue policy (the late job runs on without a deadline; the jobs that waited meanwhile are skipped).
GOAL_OVERRUN_POLICIES = ("kill", "truncate", "skip-next")

# Goals the server holds at once (queued + running); more are rejected ("queue full"). Each held
# goal keeps one executor thread busy in the server and the generator, so this also sizes them.
MAX_PENDING = 128
EXECUTOR_THREADS = MAX_PENDING + 16


@dataclass(frozen=True)
class Pending:
    """A job the model still owes: its absolute deadline, prompt size, and whether it started."""

    job_id: str
    deadline: float
    n_prompt: int
    started: bool = False


@dataclass(frozen=True)
class Admission:
    admit: bool
    reason: str
    ahead: int  # jobs that will run before this one
    ahead_s: float  # lower bound on their remaining work (seconds)
    own_s: float  # lower bound on this job's own work (prefill + one step at α_max)
    left_s: float  # seconds from now to this job's deadline


def min_job_s(model: ExecutionTimeModel, n_prompt: int, alpha_max: float) -> float:
    """The least time a job can take: its prefill and one decode step with α_max evicted."""
    return model.prefill_s(n_prompt) + model.decode_step_s(max(n_prompt * (1.0 - alpha_max), 1.0))


def admission(model: ExecutionTimeModel, now: float, deadline: float, n_prompt: int,
              pending: Iterable[Pending], alpha_max: float = 0.95) -> Admission:
    """Can a new job (``n_prompt`` tokens, absolute ``deadline``) still finish, given ``pending``?

    Ahead of it under EDF: the running job(s) (counted as zero further work: unknown, maybe
    nearly done) and every not-started job with a deadline at or before its own.
    """
    ahead = [p for p in pending if p.started or p.deadline <= deadline]
    ahead_s = 0.0 + sum(0.0 if p.started else min_job_s(model, p.n_prompt, alpha_max) for p in ahead)
    own = min_job_s(model, n_prompt, alpha_max)
    left = deadline - now
    if ahead_s + own <= left:
        return Admission(True, "", len(ahead), ahead_s, own, left)
    why = (f"cannot finish even at α_max={alpha_max:g}: {left:.3f} s left before the deadline, but this goal "
           f"needs at least {own:.3f} s (prefill of {n_prompt} tokens + 1 step)")
    if ahead:
        why += f" and {len(ahead)} goal(s) ahead in the EDF queue need at least {ahead_s:.3f} s"
    why += "; retry with a bigger budget or a shorter prompt"
    return Admission(False, why, len(ahead), ahead_s, own, left)


@dataclass(order=True)
class _Entry:
    deadline: float
    seq: int
    job_id: str = field(compare=False)


class EdfQueue:
    """Hands one model to one job at a time, earliest deadline first.

    ``acquire(job_id, deadline, cancelled)`` blocks until the job's turn (True) or until
    ``cancelled()`` / the job was skipped (False); ``release(job_id, overran=...)`` frees the
    model. With ``overran=True`` (a Skip-Next job finished late) every job waiting at that
    moment is skipped: its ``acquire`` returns False and ``skipped(job_id)`` says why.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._cv = threading.Condition()
        self._heap: List[_Entry] = []
        self._seq = itertools.count()
        self._running: Optional[str] = None
        self._skipped: Dict[str, str] = {}
        self.clock = clock

    def acquire(self, job_id: str, deadline: float, cancelled: Callable[[], bool] = lambda: False,
                poll_s: float = 0.05) -> bool:
        entry = _Entry(deadline, next(self._seq), job_id)
        with self._cv:
            heapq.heappush(self._heap, entry)
            try:
                while True:
                    if job_id in self._skipped:
                        return False
                    if cancelled():
                        return False
                    if self._running is None and self._heap[0] is entry:
                        heapq.heappop(self._heap)
                        self._running = job_id
                        return True
                    self._cv.wait(poll_s)
            finally:
                if self._running != job_id and entry in self._heap:
                    self._heap.remove(entry)
                    heapq.heapify(self._heap)
                    self._cv.notify_all()

    def release(self, job_id: str, overran: bool = False, reason: str = "") -> List[str]:
        """Free the model; returns the ids skipped because ``job_id`` overran (Skip-Next)."""
        with self._cv:
            if self._running == job_id:
                self._running = None
            skipped = []
            if overran:
                for e in self._heap:
                    self._skipped[e.job_id] = reason or f"skipped: job {job_id[:8]} overran its deadline (Skip-Next)"
                    skipped.append(e.job_id)
                while len(self._skipped) > 1024:  # bounded memory over long runs
                    self._skipped.pop(next(iter(self._skipped)))
            self._cv.notify_all()
            return skipped

    def skipped(self, job_id: str) -> Optional[str]:
        with self._cv:
            return self._skipped.pop(job_id, None)

    @property
    def running(self) -> Optional[str]:
        return self._running

    def __len__(self) -> int:
        """Jobs waiting (not counting the running one)."""
        with self._cv:
            return len(self._heap)

    def order(self) -> Sequence[str]:
        with self._cv:
            return [e.job_id for e in sorted(self._heap)]
