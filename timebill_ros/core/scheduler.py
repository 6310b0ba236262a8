"""
Admission control and the earliest-deadline-first queue for one model (ROS-free).

One model serves one job at a time (non-preemptive). Jobs wait in an EDF queue: when the
model frees up, the waiting job with the earliest absolute deadline runs next. Time spent
queued counts against each job's own budget (its deadline was fixed at acceptance).

Two questions are answered here, both from the time model the pipeline plans with:

- *admission* (a lower bound): can a new job still finish at all, at α_max, behind the work
  certainly ahead of it — the running job's remaining prefill and one step (its answer may end
  at any step) and the minimum work of every queued job with an earlier deadline? A job is
  refused only when the model says it is hopeless, and the reason carries the numbers.
- *the worst start* (an upper bound): when will a job start at the latest? Every job ahead of
  it ends by its own deadline (plus at most one decode step) under the kill and truncate
  policies, and no later than its planned worst case. A budget is *guaranteed* when the
  worst case still fits after that start.

A queued job also leaves the queue, with a reason, the moment it can no longer finish even at
α_max (its *latest start*), so a queued goal is never answered after its deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import heapq
import itertools
import math
from typing import Any, Iterable, List, Optional

from .time_estimator import ExecutionTimeModel


@dataclass(frozen=True)
class Pending:
    """A queued job as admission sees it: its absolute deadline, prompt size, cached prefix."""

    job_id: str
    deadline: float
    n_prompt: int
    cached: int = 0


@dataclass
class Running:
    """
    The job holding the model, with when it ends at the earliest and at the latest.

    Earliest: ``expected_end``, its remaining prefill and one step. Latest: its deadline, or its
    planned worst case.
    """

    job_id: str
    deadline: float
    expected_end: float
    worst_end: float


@dataclass(frozen=True)
class Admission:
    admit: bool
    reason: str
    ahead: int  # jobs that will run before this one (the running one included)
    ahead_s: (
        float  # expected remaining work of those jobs (seconds, a lower bound for queued ones)
    )
    own_s: float  # lower bound on this job's own work (prefill + one step at α_max)
    left_s: float  # seconds from now to this job's deadline
    worst_start: float  # the latest this job can start (absolute), from the jobs ahead's deadlines


def min_job_s(
    model: ExecutionTimeModel, n_prompt: int, alpha_max: float, cached: int = 0
) -> float:
    """
    Return the least time a job can take: its prefill and one decode step with α_max evicted.

    ``cached``: prompt tokens its prefill takes from the prefix cache.
    """
    return model.prefill_s(n_prompt, cached) + model.decode_step_s(
        max(n_prompt * (1.0 - alpha_max), 1.0)
    )


def answer_grace_s(
    model: Optional[ExecutionTimeModel],
    chunk: int,
    n_prompt: int = 0,
    max_new: int = 0,
    overrun: str = 'kill',
) -> float:
    """
    Return how long past its deadline a job's answer may still come: later, it was lost.

    A job ends by its deadline plus one decode step or one prefill ``chunk`` (kill, truncate),
    at least 0.5 s here for the answer's way; under skip-next a late job runs on to its end, so
    its whole time counts too. Without a time model: 2 s, or 600 s under skip-next.
    """
    if model is None:
        return 600.0 if overrun == 'skip-next' else 2.0
    grace = max(0.5, model.prefill_s(chunk))
    if overrun == 'skip-next':
        grace += model.prefill_s(n_prompt) + max_new * model.decode_step_s(n_prompt + max_new)
    return grace


def worst_start(
    now: float, running: Optional[Running], ahead: Iterable[Pending], step_s: float
) -> float:
    """
    Bound when a job behind ``running`` and ``ahead`` starts, from above.

    Each of them ends by its deadline plus one decode step (kill/truncate) or by its planned worst
    case.
    """
    t = now
    if running is not None:
        t = max(t, min(running.worst_end, running.deadline + step_s))
    for p in ahead:
        t = max(t, p.deadline + step_s)
    return t


def admission(
    model: ExecutionTimeModel,
    now: float,
    deadline: float,
    n_prompt: int,
    queued: Iterable[Pending],
    running: Optional[Running] = None,
    alpha_max: float = 0.95,
    cached: int = 0,
    alpha_limit: Optional[float] = None,
    limit_why: str = '',
) -> Admission:
    """
    Tell whether a new job (``n_prompt`` tokens, absolute ``deadline``) can still finish.

    ``cached``: its prompt tokens the prefix cache holds (pinned for it). ``alpha_limit``: the
    most eviction this job allows (its quality floor or cap; default α_max), and ``limit_why``
    what sets it: a refusal quotes the cap that applies, not α_max. Jobs ahead count at α_max
    (a lower bound on their work).
    """
    ahead = [p for p in queued if p.deadline <= deadline]
    # the running job needs at least one more step, whatever its expected end said
    run_left = max(running.expected_end - now, model.q) if running is not None else 0.0
    ahead_s = run_left + sum(min_job_s(model, p.n_prompt, alpha_max, p.cached) for p in ahead)
    own_alpha = alpha_max if alpha_limit is None else min(float(alpha_limit), alpha_max)
    own = min_job_s(model, n_prompt, own_alpha, cached)
    left = deadline - now
    n_ahead = len(ahead) + (running is not None)
    start = worst_start(now, running, ahead, model.decode_step_s(n_prompt))
    if ahead_s + own <= left:
        return Admission(True, '', n_ahead, ahead_s, own, left, start)
    what = f'{n_prompt} tokens' if not cached else f'{n_prompt - cached} new tokens'
    if own_alpha < alpha_max:
        cap = f'α={own_alpha:.2f}, the most it allows ({limit_why or "its cap"})'
    else:
        cap = f'α_max={alpha_max:g}'
    why = (
        f'cannot finish even at {cap}: {left:.3f} s left before the deadline, '
        f'but this goal needs at least {own:.3f} s (prefill of {what} + 1 step)'
    )
    if n_ahead:
        why += f'; the work ahead ({ahead_text(running, len(ahead))}) needs about {ahead_s:.3f} s'
    why += '; retry with a bigger budget or a shorter prompt'
    return Admission(False, why, n_ahead, ahead_s, own, left, start)


def ahead_text(running: Optional[Running], queued: int) -> str:
    """Name the work ahead of a job as it is: goals (running or queued), or a context priming."""
    primed = running is not None and running.job_id.startswith('prime:')
    goals = queued + (running is not None and not primed)
    text = f'{goals} goal(s) ahead' if goals else ''
    if primed:
        text = 'a standing context being primed' + (f' and {text}' if text else '')
    return text


@dataclass(order=True)
class _Entry:
    deadline: float
    seq: int
    item: Any = field(compare=False)


class EdfQueue:
    """
    Jobs waiting for the model, earliest deadline first (not thread-safe: the pipeline locks).

    Items need ``request_id``, ``deadline`` and ``n_prompt`` attributes.
    """

    def __init__(self):
        self._heap: List[_Entry] = []
        self._seq = itertools.count()

    def push(self, item) -> None:
        heapq.heappush(self._heap, _Entry(item.deadline, next(self._seq), item))

    def pop(self):
        return heapq.heappop(self._heap).item if self._heap else None

    def remove(self, request_id: str):
        """Take the job out of the queue; returns it, or None if it is not queued."""
        for i, e in enumerate(self._heap):
            if e.item.request_id == request_id:
                self._heap.pop(i)
                heapq.heapify(self._heap)
                return e.item
        return None

    def expire(self, now: float, latest_start) -> list:
        """Remove and return every job whose ``latest_start(job)`` has passed."""
        gone = [e for e in self._heap if latest_start(e.item) < now]
        if gone:
            self._heap = [e for e in self._heap if e not in gone]
            heapq.heapify(self._heap)
        return [e.item for e in sorted(gone)]

    def drain(self) -> list:
        items = [e.item for e in sorted(self._heap)]
        self._heap = []
        return items

    def next_expiry(self, latest_start) -> float:
        return min((latest_start(e.item) for e in self._heap), default=math.inf)

    def pending(self) -> List[Pending]:
        return [
            Pending(
                e.item.request_id, e.item.deadline, e.item.n_prompt, getattr(e.item, 'cached', 0)
            )
            for e in self._heap
        ]

    def order(self) -> List[str]:
        return [e.item.request_id for e in sorted(self._heap)]

    def __len__(self) -> int:
        return len(self._heap)
