"""
One request's whole life, written once.

Admission → EDF queue → prefill ∥ length estimate → α → eviction → decode (with re-planning)
→ outcome.

The generator node, ``timebill generate --budget``, offline ``timebill replay`` and the
evaluation sweep all run requests through this class, so the α, the status and the reason a
planner sees are the ones the benchmark measures. The pipeline owns the queue and the
(online-recalibrated) time model, and so it alone answers "can this budget be met?".

Every stage is bounded by the request's deadline: a queued job leaves the queue the moment it
can no longer finish even at α_max; prefill runs in chunks and stops between two of them when
the rest cannot finish in time or the job is canceled; decoding never starts a step it expects
to end past the deadline. So every outcome — served, killed, canceled — is known by the
deadline plus at most one prefill chunk or one decode step.

Queued jobs hold no thread: one model worker runs jobs, one watcher ends queued jobs whose
latest start has passed. ``submit`` returns a ``concurrent.futures.Future`` of the ``Outcome``.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
import math
import threading
import time
from typing import Callable, Deque, Dict, List, Optional

from .config import TimeBillConfig
from .estimate import Estimates
from .goal_rules import (
    length_problem,
    overrun_problem,
    prompt_problem,
    quality_problem,
    structure_problem,
    tokens_problem,
)
from .job import answer_cap, Job, PrimeResult
from .lengths import FixedLength
from .online_estimator import OnlineTimeModel
from .outcome import Outcome
from .priming import _Prime, Priming
from .quality import curve_for, limit_for, QualityCurve, QualityLimit
from .scheduler import EdfQueue, min_job_s, Running
from .stages import Stages
from .structured import GrammarError
from .time_estimator import ExecutionTimeModel


class Pipeline(Estimates, Priming, Stages):
    """Owns the model, the queue and the time model; runs jobs one at a time."""

    def __init__(
        self,
        engine,
        time_model: ExecutionTimeModel,
        cfg: TimeBillConfig,
        lengths=None,
        *,
        learn: bool = True,
        clock: Callable[[], float] = time.monotonic,
        quality: Optional[QualityCurve] | str = 'config',
    ):
        self.engine, self.cfg, self.clock = engine, cfg, clock
        # the configured press's accuracy-vs-α curve (None: not measured for this setup)
        self.quality = curve_for(cfg) if quality == 'config' else quality
        self.lengths = lengths or FixedLength(None, clock=clock)
        self.online = OnlineTimeModel(time_model)
        self.learn = learn
        self._cv = threading.Condition()
        self._queue = EdfQueue()
        self._futures: Dict[str, Future] = {}
        self._running: Optional[Running] = None
        self._running_job: Optional[Job] = None
        self._primes: Deque[_Prime] = deque()
        self._released: set = set()  # primes released while their chunks ran
        self._threads: List[threading.Thread] = []
        self._closed = False
        self.on_observed: Optional[Callable[[Outcome], None]] = None

    # ------------------------------------------------------------------ the model
    def time_model(self) -> ExecutionTimeModel:
        return self.online.model()

    def n_cap(self, job_or_n_prompt, max_new_tokens: int = 0) -> int:
        if isinstance(job_or_n_prompt, Job):
            n_prompt, max_new_tokens = job_or_n_prompt.n_prompt, job_or_n_prompt.max_new_tokens
        else:
            n_prompt = int(job_or_n_prompt)
        return answer_cap(
            self.cfg.n_max,
            max_new_tokens or self.cfg.max_new_tokens,
            n_prompt,
            self.engine.max_context,
        )

    def limit(self, job: Job) -> QualityLimit:
        """Return the most eviction ``job`` allows: α_max, its quality floor, its own cap."""
        return limit_for(
            self.quality,
            self.cfg.alpha_max,
            self.cfg.quality_floor_alpha,
            job.min_quality,
            job.max_alpha,
        )

    def expected_quality(self, alpha: float) -> float:
        return self.quality.at(alpha) if self.quality is not None else -1.0

    def latest_start(self, job: Job) -> float:
        if job.overrun == 'skip-next':
            return math.inf  # it runs on past its deadline by choice
        return job.deadline - min_job_s(
            self.time_model(), job.n_prompt, self.limit(job).alpha_limit, job.cached
        )

    @property
    def prefix_cache(self):
        """Return the engine's prefix KV cache (None: off)."""
        return getattr(self.engine, 'prefix_cache', None)

    def cached_for(self, input_ids: List[int]) -> int:
        """Prompt tokens of ``input_ids`` a prefill would take from the prefix cache now."""
        reusable = getattr(self.engine, 'reusable', None)
        return int(reusable(input_ids)) if reusable is not None else 0

    # ------------------------------------------------------------------ queue
    def submit(self, job: Job) -> Future:
        """Admit ``job`` and queue it; the future's result is its ``Outcome`` (never an error)."""
        now = self.clock()
        if job.accepted_at is None:
            job.accepted_at = now
        job.overrun = job.overrun or self.cfg.overrun_policy
        fut: Future = Future()
        problem = self._check(job)
        if not problem:
            self._pin(job)
        adm = (
            None
            if problem
            else self.admission(job.n_prompt, job.deadline, now, job.cached, self.limit(job))
        )
        if problem or not adm.admit:
            fut.set_result(self._end(job, 'rejected', problem or adm.reason))
            return fut
        with self._cv:
            if len(self._futures) >= self.cfg.max_goals:
                fut.set_result(
                    self._end(
                        job,
                        'rejected',
                        f'queue full: {len(self._futures)} goals '
                        f'are queued or running (max_goals {self.cfg.max_goals}); retry later',
                    )
                )
                return fut
            self._futures[job.request_id] = fut
            self._queue.push(job)
            self._start_threads()
            self._cv.notify_all()
        if job.on_stage:
            job.on_stage(job, 'queued')
        return fut

    def _pin(self, job: Job) -> None:
        """Pin the cached prefix ``job`` will reuse, so the memory bound cannot drop it."""
        acquire = getattr(self.engine, 'acquire_prefix', None)
        if acquire is not None and job.lease is None:
            job.lease = acquire(job.input_ids)
            job.cached = job.lease.tokens

    def run(self, job: Job) -> Outcome:
        """Submit and wait (the CLI and offline replay)."""
        return self.submit(job).result()

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued job at once, or stop a running one at its next chunk or step."""
        with self._cv:
            job = self._queue.remove(request_id)
            running = (
                self._running_job
                if self._running_job is not None and self._running_job.request_id == request_id
                else None
            )
            if running is not None:
                running.tokens_at_cancel = running.tokens
                running.cancel.set()
                return True
            if job is None:
                return False
            fut = self._futures.pop(request_id)
            self._cv.notify_all()
        job.cancel.set()
        fut.set_result(self._end(job, 'canceled', 'canceled while queued'))
        return True

    def snapshot(self) -> dict:
        with self._cv:
            return {
                'queued': len(self._queue),
                'running': self._running.job_id if self._running else '',
                'order': self._queue.order(),
            }

    def close(self, reason: str = 'the pipeline is shutting down') -> None:
        """End every queued job with ``reason``, stop the running one, and the threads."""
        with self._cv:
            self._closed = True
            queued = self._queue.drain()
            primes = list(self._primes)
            self._primes.clear()
            if self._running_job is not None:
                self._running_job.cancel.set()
            self._cv.notify_all()
        for p in primes:
            p.future.set_result(PrimeResult(p.prime_id, False, reason))
        for job in queued:
            fut = self._futures.pop(job.request_id, None)
            if fut is not None:
                fut.set_result(self._end(job, 'aborted', reason))
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5.0)
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def _start_threads(self) -> None:
        if not self._threads:
            for name, target in (
                ('timebill_model', self._work),
                ('timebill_expiry', self._expire),
            ):
                t = threading.Thread(target=target, name=name, daemon=True)
                t.start()
                self._threads.append(t)

    def _expire(self) -> None:
        """End queued jobs the moment they can no longer finish even at α_max."""
        while True:
            with self._cv:
                if self._closed:
                    return
                now = self.clock()
                gone = self._queue.expire(now, self.latest_start)
                futs = [self._futures.pop(j.request_id) for j in gone]
                if not gone:
                    wait = self._queue.next_expiry(self.latest_start) - now
                    self._cv.wait(None if math.isinf(wait) else max(wait, 0.001))
                    continue
            for job, fut in zip(gone, futs):
                left = job.deadline - self.clock()
                limit = self.limit(job)
                amax = limit.alpha_limit
                need = min_job_s(self.time_model(), job.n_prompt, amax, job.cached)
                fut.set_result(
                    self._end(
                        job,
                        'killed',
                        (
                            f'not started: still queued with '
                            f'{max(left, 0):.3f} s left, but even at '
                            f'α={amax:.2f} ({limit.why}) it needs {need:.3f} s (prefill of '
                            f'{job.n_prompt - job.cached} tokens + 1 step); no eviction ratio '
                            f'can help'
                        ),
                    )
                )

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not len(self._queue) and not self._primes:
                    self._cv.wait()
                if self._closed:
                    return
                if not len(self._queue):  # nothing waits: prime, lowest priority
                    prime = self._primes.popleft()
                    self._running = Running(
                        f'prime:{prime.prime_id}', math.inf, self.clock(), self.clock()
                    )
                else:
                    prime = None
            if prime is not None:
                try:
                    self._prime_step(prime)
                finally:
                    with self._cv:
                        self._running = None
                        self._cv.notify_all()
                continue
            with self._cv:
                if not len(self._queue):
                    continue
                job = self._queue.pop()
                model = self.time_model()
                now = self.clock()
                self._running_job = job
                self._running = Running(
                    job.request_id,
                    job.deadline,
                    now + min_job_s(model, job.n_prompt, self.limit(job).alpha_limit, job.cached),
                    job.deadline if job.overrun != 'skip-next' else math.inf,
                )
            try:
                out = self.serve(job)
            except Exception as exc:  # noqa: BLE001 - a job's failure must not stop the worker
                out = self._end(job, 'aborted', f'generator error: {exc or type(exc).__name__}')
            with self._cv:
                self._running = self._running_job = None
                fut = self._futures.pop(job.request_id, None)
                if job.overrun == 'skip-next' and out.completed and not out.deadline_met:
                    skipped = self._queue.drain()
                else:
                    skipped = []
                self._cv.notify_all()
            for other in skipped:
                f = self._futures.pop(other.request_id, None)
                if f is not None:
                    f.set_result(
                        self._end(
                            other,
                            'rejected',
                            (
                                f'skipped: goal {job.request_id[:8]} '
                                f'overran its deadline (overrun '
                                f'policy skip-next) while this goal waited'
                            ),
                        )
                    )
            if fut is not None:
                fut.set_result(out)

    # ---------------------------------------------------------------- outcomes
    def _check(self, job: Job) -> str:
        """Return why ``job`` cannot be served ('' if it can): the goal rules, then its grammar."""
        max_context = self.engine.max_context
        problem = (
            (prompt_problem(job.prompt, job.system_prompt) if job.prompt else '')
            or tokens_problem(job.n_prompt, max_context)
            or overrun_problem(job.overrun)
            or structure_problem(job.json_schema, job.grammar)
            or quality_problem(job.min_quality, job.max_alpha)
            or length_problem(job.max_new_tokens, max_context)
            or ('the deadline is NaN' if math.isnan(job.deadline) else '')
        )
        if problem:
            return problem
        if job.compiled is None and (job.json_schema or job.grammar):
            compile_ = getattr(self.engine, 'compile_grammar', None)
            if compile_ is None:
                return 'this engine does not take a JSON schema or grammar'
            try:
                job.compiled = compile_(job.json_schema, job.grammar)
            except GrammarError as exc:
                return f'invalid {"JSON schema" if job.json_schema else "grammar"}: {exc}'
        return self.limit(job).problem

    def _blank(self, job: Job) -> Outcome:
        return Outcome(
            status='', prompt_tokens=job.n_prompt, kv_before=job.n_prompt, kv_after=job.n_prompt
        )

    def _end(
        self,
        job: Job,
        status: str,
        reason: str,
        out: Optional[Outcome] = None,
        finished: Optional[float] = None,
    ) -> Outcome:
        out = out or self._blank(job)
        out.status, out.reason = status, reason
        if job.lease is not None:
            job.lease.release()
        if status in ('rejected', 'killed', 'canceled', 'aborted') and out.result is None:
            out.alpha, out.kv_after = 0.0, out.kv_before  # nothing was evicted
        accepted = job.accepted_at if job.accepted_at is not None else self.clock()
        out.finished_at_s = out.total_s = (
            finished if finished is not None else self.clock()
        ) - accepted
        if self.on_observed is not None:
            self.on_observed(out)
        return out
