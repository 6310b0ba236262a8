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
from dataclasses import dataclass, field
import math
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional

from .budget import BudgetVerdict, solve_alpha, solve_alpha_after_prefill
from .config import OVERRUN_POLICIES, TimeBillConfig
from .errors import PrefillStopped
from .lengths import FixedLength, LengthEstimate, PredictorLength
from .online_estimator import OnlineTimeModel
from .outcome import Outcome
from .quality import curve_for, limit_for, QualityCurve, QualityLimit
from .scheduler import Admission, admission, EdfQueue, min_job_s, Running
from .structured import GrammarError
from .time_estimator import ExecutionTimeModel

MAX_PENDING = 128  # jobs held at once (queued + running); more are refused ("queue full")


def answer_cap(n_max: int, max_new_tokens: int, n_prompt: int, max_context: int) -> int:
    """Longest answer possible: N_max, the request's max_new_tokens and the context all cap it."""
    return max(1, min(int(n_max), int(max_new_tokens), max(int(max_context) - int(n_prompt), 1)))


@dataclass(eq=False)
class Job:
    """One request. ``deadline`` and ``accepted_at`` are on the pipeline's clock."""

    request_id: str
    input_ids: List[int]
    deadline: float = math.inf
    max_new_tokens: int = 0  # 0: the config's default
    overrun: str = ''  # '' = config default; kill | truncate | close | skip-next
    prompt: str = ''
    system_prompt: str = ''
    accepted_at: Optional[float] = None
    alpha: Optional[float] = None  # a fixed eviction ratio; None: the solver's (TimeBill)
    k: Optional[float] = None  # pessimism; None: the config's
    replan: bool = True  # re-plan during decode when behind (never under skip-next)
    min_quality: float = -1.0  # expected-accuracy floor: -1 the config's default, 0 none
    max_alpha: float = -1.0  # most eviction the goal allows: -1 no cap beyond the floor
    cancel: threading.Event = field(default_factory=threading.Event)
    on_stage: Optional[Callable[['Job', str], None]] = None  # queued | prefill | decoding
    on_token: Optional[Callable[[int, int, str], None]] = None  # (step, token id, text so far)
    tokens: int = 0  # tokens so far (feedback)
    tokens_at_cancel: Optional[int] = None
    alpha_used: float = 0.0
    n_hat: int = 0
    cached: int = 0  # prompt tokens the prefix cache holds for it (pinned from submit on)
    lease: Optional[Any] = None  # the pin (core.prefix_cache.Lease)
    json_schema: str = ''  # the answer must validate against this JSON schema (text)
    grammar: str = ''  # or match this Lark grammar
    compiled: Optional[Any] = None  # either, compiled at submit (core.structured.Compiled)

    @property
    def n_prompt(self) -> int:
        return len(self.input_ids)

    @property
    def close_tokens(self) -> int:
        """Return the steps a close may need; the α plan and the WCET count them (0: no close)."""
        if self.overrun != 'close' or self.compiled is None:
            return 0
        return self.compiled.close_tokens


@dataclass
class BudgetEstimate:
    """What the pipeline would do with a budget, asked before sending the goal."""

    verdict: BudgetVerdict
    admission: Admission
    guaranteed: bool  # the worst case fits even if every job ahead runs to its deadline
    n_cap: int
    reason: str
    limit: Optional[QualityLimit] = None  # the eviction the goal's quality floor allows
    expected_quality: float = -1.0  # measured accuracy at the verdict's α (-1: no curve)
    quality_refusal: str = ''  # non-empty: the goal would be refused for its quality floor
    cached_tokens: int = 0  # prompt tokens the prefix cache holds now
    prefill_saved_s: float = 0.0  # the prefill seconds that saves, by the time model


@dataclass
class PrimeResult:
    """What priming a standing context did."""

    prime_id: str
    ok: bool
    reason: str
    context_tokens: int = 0  # tokens of the context (chat template's head included)
    cached_tokens: int = 0  # of them, held in the prefix cache now (whole blocks)
    seconds: float = 0.0  # model time spent priming (0: it was cached already)
    fit: bool = False  # every whole block fits the memory bound


@dataclass(eq=False)
class _Prime:
    prime_id: str
    input_ids: List[int]
    future: Future
    seconds: float = 0.0


class Pipeline:
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

    # -------------------------------------------------------------- admission
    def admission(
        self, n_prompt: int, deadline: float, now: Optional[float] = None, cached: int = 0
    ) -> Admission:
        now = self.clock() if now is None else now
        with self._cv:
            queued, running = self._queue.pending(), self._running
        return admission(
            self.time_model(),
            now,
            deadline,
            n_prompt,
            queued,
            running,
            self.cfg.alpha_max,
            cached,
        )

    def estimate(
        self,
        n_prompt: int,
        budget_s: float,
        n_hat: int,
        max_new_tokens: int = 0,
        predict_s: float = 0.0,
        now: Optional[float] = None,
        min_quality: float = -1.0,
        max_alpha: float = -1.0,
        cached: int = 0,
        close_tokens: int = 0,
    ) -> BudgetEstimate:
        """
        EstimateBudget: the α a goal would get now, and whether its worst case is guaranteed.

        ``cached``: prompt tokens the prefix cache holds for it (``cached_for``);
        ``close_tokens``: the steps a close may add (``Job.close_tokens``), counted in N̂.
        """
        n_hat = int(n_hat) + int(close_tokens)
        now = self.clock() if now is None else now
        model, cap = self.time_model(), self.n_cap(n_prompt, max_new_tokens)
        adm = self.admission(n_prompt, now + budget_s, now, cached)
        limit = limit_for(
            self.quality, self.cfg.alpha_max, self.cfg.quality_floor_alpha, min_quality, max_alpha
        )
        k, amax = self.cfg.pessimism_k, limit.alpha_limit
        # the α a goal would get: the generator plans on the slowest recent timings (``plan``)
        worst_model = self.online.worst_model()

        def solve(alpha_max: float, timing=worst_model, budget=budget_s) -> BudgetVerdict:
            return solve_alpha(
                timing,
                budget,
                n_prompt,
                min(n_hat, cap),
                k=k,
                n_max=cap,
                alpha_max=alpha_max,
                predict_s=predict_s,
                cached=cached,
            )

        verdict = solve(amax)
        # the worst case again, starting when every job ahead has run to its end, on the
        # slowest timings recent requests were served at, ending a margin before the deadline
        # (the result still has to travel to the planner)
        left = now + budget_s - adm.worst_start - self.cfg.guarantee_margin_s
        worst = solve(amax, worst_model, left) if left > 0 else None
        refusal = limit.problem or self._quality_refusal(limit, verdict, min(n_hat, cap), solve)
        guaranteed = adm.admit and worst is not None and worst.guaranteed and not refusal
        reason = refusal or verdict.reason
        if verdict.guaranteed and not guaranteed and not refusal:
            if adm.ahead and adm.worst_start > now:
                reason += (
                    f'; not guaranteed: {adm.ahead} goal(s) ahead may hold the model until '
                    f'{adm.worst_start - now:.3f} s from now'
                )
            elif worst is not None:
                reason += (
                    f'; not guaranteed: on the slowest timings recent goals were served at, the '
                    f'worst case takes {worst.total_s:.3f} s, over the {left:.3f} s left once '
                    f'{self.cfg.guarantee_margin_s:g} s are kept for the way back'
                )
            else:
                reason += (
                    f'; not guaranteed: the {self.cfg.guarantee_margin_s:g} s kept for the '
                    f'way back leave no time'
                )
        if cached:
            reason += f'; {cached} of {n_prompt} prompt tokens are cached'
        return BudgetEstimate(
            verdict,
            adm,
            guaranteed,
            cap,
            reason,
            limit,
            self.expected_quality(verdict.alpha),
            refusal,
            cached,
            max(model.prefill_s(n_prompt) - model.prefill_s(n_prompt, cached), 0.0),
        )

    def _quality_refusal(
        self,
        limit: QualityLimit,
        verdict: BudgetVerdict,
        n_hat: int,
        solve: Callable[[float], BudgetVerdict],
    ) -> str:
        """
        Explain why a budget needs more eviction than the quality floor allows ('' if it doesn't).

        ``verdict`` is the solver's at the floor's limit, ``solve(alpha_max)`` the same solve with
        another ceiling. Only when the floor is what stops it: at the limit even the predicted
        length overruns, while more eviction (up to α_max) would fit. A budget that no α can meet
        is not the floor's doing: it takes the usual way (refused, or killed at the deadline).
        """
        if verdict.feasible or limit.alpha_limit >= self.cfg.alpha_max:
            return ''
        wide = solve(self.cfg.alpha_max)
        if not wide.feasible:
            return ''
        need = wide.alpha
        text = (
            f'the budget needs more eviction than the quality floor allows: {limit.why}; '
            f'at α={limit.alpha_limit:.2f} even the predicted {n_hat} tokens take '
            f'{verdict.expected_total_s:.3f} s > {verdict.budget_s:.3f} s'
        )
        text += f'; it would need α={need:.2f}'
        if self.quality is not None:
            text += f' (expected accuracy {self.quality.at(need):.2f})'
        return text + '; raise the budget, shorten the prompt, or lower min_quality'

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
        adm = None if problem else self.admission(job.n_prompt, job.deadline, now, job.cached)
        if problem or not adm.admit:
            fut.set_result(self._end(job, 'rejected', problem or adm.reason))
            return fut
        with self._cv:
            if len(self._futures) >= MAX_PENDING:
                fut.set_result(
                    self._end(
                        job,
                        'rejected',
                        f'queue full: {len(self._futures)} goals '
                        f'are queued or running (limit {MAX_PENDING}); retry later',
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

    # ---------------------------------------------------------------- priming
    def prime(self, input_ids: List[int], prime_id: str) -> Future:
        """
        Cache a standing context between goals; the future's result is a ``PrimeResult``.

        Priming runs only while no goal is queued, one prefill chunk at a time: a goal that
        arrives waits at most for the chunk in progress (admission counts it), then priming
        goes on where it stopped. The cached blocks are held until ``release(prime_id)``.
        """
        fut: Future = Future()
        ids = [int(t) for t in input_ids]
        pc = self.prefix_cache
        why = ''
        if pc is None:
            why = 'the prefix cache is off (prefix_cache: false or prefix_cache_mb: 0)'
        elif not ids:
            why = 'the context has no tokens: nothing to prime'
        elif len(ids) >= self.engine.max_context:
            why = (
                f"the context has {len(ids)} tokens; the model's context is "
                f'{self.engine.max_context} (no room for a question)'
            )
        elif len(ids) < pc.block_tokens:
            why = (
                f'the context has {len(ids)} tokens, less than one cached block '
                f'({pc.block_tokens}): nothing to keep'
            )
        if why:
            fut.set_result(PrimeResult(prime_id, False, why, context_tokens=len(ids)))
            return fut
        whole = len(ids) - len(ids) % pc.block_tokens
        need = self._kv_bytes(whole - pc.peek(ids))
        free = pc.capacity_bytes - pc.pinned_bytes()
        if need > free:
            fut.set_result(
                PrimeResult(
                    prime_id,
                    False,
                    (
                        f'does not fit the prefix cache: {whole} tokens need '
                        f'{need / 2**20:.0f} MB more, {max(free, 0) / 2**20:.0f} MB of '
                        f'prefix_cache_mb={pc.capacity_bytes / 2**20:.0f} are not held by other '
                        f'primes or goals; goals with this context are served cold'
                    ),
                    context_tokens=len(ids),
                    cached_tokens=pc.peek(ids),
                )
            )
            return fut
        with self._cv:
            if self._closed:
                fut.set_result(PrimeResult(prime_id, False, 'the pipeline is shutting down'))
                return fut
            self._primes.append(_Prime(prime_id, ids[:whole], fut))
            self._start_threads()
            self._cv.notify_all()
        return fut

    def release(self, prime_id: str) -> int:
        """Stop holding a primed context (a queued prime is dropped); returns blocks released."""
        with self._cv:
            running = self._running is not None and self._running.job_id == f'prime:{prime_id}'
            if running:  # its last chunk would hold the blocks again: released when it stops
                self._released.add(prime_id)
            for p in list(self._primes):
                if p.prime_id == prime_id:
                    self._primes.remove(p)
                    p.future.set_result(
                        PrimeResult(prime_id, False, 'released before it was primed')
                    )
        pc = self.prefix_cache
        return pc.release(prime_id) if pc is not None else 0

    def _kv_bytes(self, tokens: int) -> int:
        per = getattr(self.engine, 'kv_bytes_per_token', None)
        return int(tokens * per()) if per is not None else 0

    def _prime_step(self, p: _Prime) -> None:
        """Prime ``p`` on the model thread until done or a goal is queued (a chunk boundary)."""
        pc, model, clock = self.prefix_cache, self.time_model(), self.clock
        chunk = self.cfg.prefill_chunk or len(p.input_ids)
        first: List[int] = []

        def should_stop(done: int, elapsed: float) -> Optional[str]:
            if not first:
                first.append(done)
            with self._cv:
                if self._closed:
                    return 'closed'
                if done > first[0] and len(self._queue):
                    return 'yield'  # a goal is waiting: it goes first
                if self._running is not None:  # admission counts the chunk about to run
                    end = min(done + chunk, len(p.input_ids))
                    now = clock()
                    self._running.expected_end = now + model.prefill_s(end, done)
                    self._running.worst_end = now + 2.0 * self.online.worst_model().prefill_s(
                        end, done
                    )
            return None

        t0 = time.monotonic()
        try:
            self.engine.prefill(
                p.input_ids,
                capacity=len(p.input_ids),
                chunk_tokens=self.cfg.prefill_chunk,
                should_stop=should_stop,
                prime=p.prime_id,
            )
            stopped = ''
        except PrefillStopped as stop:
            stopped = stop.reason
        except Exception as exc:  # noqa: BLE001 - a failed prime must not stop the worker
            stopped = f'generator error while priming: {exc or type(exc).__name__}'
        p.seconds += time.monotonic() - t0
        with self._cv:
            released = p.prime_id in self._released
            self._released.discard(p.prime_id)
            if stopped == 'yield' and not released:
                self._primes.appendleft(p)  # goes on once the queue is empty again
                return
        if released:
            pc.release(p.prime_id)
            stopped = 'released while it was being primed'
            if p.future.done():
                return
        held = pc.holds().get(p.prime_id, 0)
        whole = len(p.input_ids)
        if stopped:
            result = PrimeResult(p.prime_id, False, stopped, whole, held, p.seconds, False)
        elif held < whole:
            result = PrimeResult(
                p.prime_id,
                False,
                (pc.last_refusal or 'the memory bound was reached')
                + f'; {held} of {whole} tokens are cached, the rest is served cold',
                whole,
                held,
                p.seconds,
                False,
            )
        else:
            result = PrimeResult(
                p.prime_id, True, f'{held} tokens cached', whole, held, p.seconds, True
            )
        p.future.set_result(result)

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
                amax = self.limit(job).alpha_limit
                need = min_job_s(self.time_model(), job.n_prompt, amax, job.cached)
                fut.set_result(
                    self._end(
                        job,
                        'killed',
                        (
                            f'not started: still queued with '
                            f'{max(left, 0):.3f} s left, but even at '
                            f'α={amax:.2f} it needs {need:.3f} s (prefill of '
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

    # ----------------------------------------------------------------- stages
    def serve(self, job: Job) -> Outcome:
        """Run one job now, on this thread: the stages after the queue."""
        clock, cfg = self.clock, self.cfg
        if job.accepted_at is None:
            job.accepted_at = clock()
        job.overrun = job.overrun or cfg.overrun_policy
        model = self.time_model()
        left = job.deadline - clock()
        limit = self.limit(job)
        need = min_job_s(model, job.n_prompt, limit.alpha_limit, job.cached)
        out = self._blank(job)
        out.alpha_limit = limit.alpha_limit if job.alpha is None else float(job.alpha)
        if job.cancel.is_set():
            return self._end(job, 'canceled', 'canceled while queued')
        if job.overrun != 'skip-next' and need > left:
            return self._end(
                job,
                'killed',
                (
                    f'not started: predicted prefill and one step take {need:.3f} s > '
                    f'{max(left, 0):.3f} s left before the deadline; no eviction ratio can help'
                ),
                out,
            )
        if job.on_stage:
            job.on_stage(job, 'prefill')
        self.lengths.start(job)
        try:
            state = self.prefill(job, out)
        except PrefillStopped as stop:
            status = 'canceled' if job.cancel.is_set() else 'killed'
            return self._end(job, status, stop.reason, out)
        est = self.lengths.wait(job, clock() + cfg.estimate_slack_s)
        cap = self.n_cap(job)
        if est is None and self._can_defer(job):
            return self._decode_deferred(job, state, out, cap)
        if est is not None:  # a fallback predictor's estimate is the cap itself
            n_hat = cap if est.fallback else min(int(est.n_hat), cap)
            out.estimate_received_s = est.received_at - job.accepted_at
        else:
            n_hat = cap
        out.estimate_fallback = est is None  # no estimate in time: N̂ = the cap
        elapsed = clock() - job.accepted_at
        alpha, verdict = self.plan(job, state.prefill_s, n_hat, elapsed)
        refusal = (
            self._quality_refusal(
                limit,
                verdict,
                min(n_hat, cap),
                lambda amax: self.plan(job, state.prefill_s, n_hat, elapsed, amax)[1],
            )
            if verdict is not None
            else ''
        )
        if refusal:
            out.predicted_length, out.verdict = n_hat, verdict
            return self._end(job, 'rejected', refusal, out)
        if alpha > 0:
            self.engine.evict(state, alpha)
        job.alpha_used, job.n_hat = alpha, n_hat
        out.alpha, out.predicted_length, out.verdict = alpha, n_hat, verdict
        out.expected_quality = self.expected_quality(alpha)
        out.wcet_s = verdict.total_s if verdict is not None else 0.0
        with self._cv:
            if self._running is not None:
                # admission's lower bound: prefill is done, and the answer may end at any step
                self._running.expected_end = clock() + self.time_model().decode_step_s(
                    state.kv_after
                )
                if verdict is not None and verdict.guaranteed:  # the planned worst case bounds it
                    self._running.worst_end = min(
                        self._running.worst_end, job.accepted_at + verdict.total_s
                    )
        return self.decode(job, state, out, n_hat, cap)

    def _can_defer(self, job: Job) -> bool:
        """Whether α may wait for a late length estimate while decoding starts (TimeBill plan)."""
        return (
            self.cfg.estimate_defer_s > 0
            and job.alpha is None
            and job.overrun != 'skip-next'
            and not math.isinf(job.deadline)
            and getattr(self.lengths, 'deferrable', False)
        )

    def _decode_deferred(self, job: Job, state, out: Outcome, cap: int) -> Outcome:
        """
        Decode at once while the length estimate is late; choose α when it arrives.

        A warm prefill can end before the length predictor answers. Waiting for it would put the
        prediction on the critical path, and planning with N̂ = the cap evicts more than needed.
        Instead decoding starts with nothing evicted (the press's prefill scores are kept), and
        the first step after the estimate arrives solves α for the time left and evicts prompt
        entries with the press (every generated token stays). Without an estimate within
        ``estimate_defer_s`` (at most a quarter of the time left) α is solved for the cap, as an
        on-time fallback would have. Decoding stops before the deadline meanwhile, as always;
        the re-planner watches the steps from the start.
        """
        clock, cfg = self.clock, self.cfg
        now = clock()
        decide_by = now + min(cfg.estimate_defer_s, 0.25 * max(job.deadline - now, 0.0))
        out.estimate_fallback = True
        out.predicted_length, out.alpha_limit = cap, self.limit(job).alpha_limit
        job.n_hat = cap
        pending = [True]

        def decide(step: int, replan) -> None:
            est = self.lengths.wait(job, clock())  # never blocks
            if est is None and clock() < decide_by:
                return
            pending[0] = False
            n_hat = cap if est is None or est.fallback else min(int(est.n_hat), cap)
            if est is not None:
                out.estimate_received_s = est.received_at - job.accepted_at
                out.estimate_fallback = False
            alpha, verdict = self.plan(job, state.prefill_s, n_hat, clock() - job.accepted_at)
            if alpha > 0:
                self.engine.evict(state, alpha)  # keeps the tokens generated so far
            job.alpha_used, job.n_hat = alpha, n_hat
            out.alpha, out.predicted_length, out.verdict = alpha, n_hat, verdict
            out.expected_quality = self.expected_quality(alpha)
            out.wcet_s = verdict.total_s if verdict is not None else 0.0
            if replan is not None:
                replan.n_hat = max(n_hat, 1)

        def late(step: int, token_id: int, text: str, then, replan) -> None:
            if pending[0]:
                decide(step, replan)
            then(step, token_id, text)

        out.expected_quality = self.expected_quality(0.0)
        return self.decode(job, state, out, cap, cap, late=late)

    def prefill(self, job: Job, out: Outcome):
        """
        Chunked prefill; stops between chunks on cancel or when the rest cannot finish.

        A kill needs evidence: the rest is timed at the time model's pace, or at the fastest
        pace a chunk of this prefill showed if that was faster; a neighbour's burst in the first
        chunks does not kill a goal that can still make it (a slow machine shows by the
        deadline, which every chunk checks). The prefix cache's tokens (the first ``done`` seen)
        are not computed and not timed.
        """
        model, cfg, clock, n = self.time_model(), self.cfg, self.clock, job.n_prompt
        amax = self.limit(job).alpha_limit
        step_min = model.decode_step_s(max(n * (1.0 - amax), 1.0))
        seen: List[tuple] = []  # (done, elapsed) at each chunk boundary

        def should_stop(done: int, elapsed: float) -> Optional[str]:
            if job.cancel.is_set():
                return f'canceled during prefill ({done} of {n} prompt tokens done)'
            seen.append((done, elapsed))
            start = seen[0][0]
            left = job.deadline - clock()
            if job.overrun == 'skip-next':
                return None
            rest = model.prefill_s(n, done)  # the rest, with what is done as if cached
            paces = []
            for (d0, e0), (d1, e1) in zip(seen, seen[1:]):
                nominal = model.prefill_s(d1, d0) - model.c
                if nominal > 0 and e1 > e0:
                    paces.append((e1 - e0) / nominal)
            if paces:
                rest *= min(1.0, min(paces))
            if done > start and rest + step_min > left:
                return (
                    f'stopped prefill after {done} of {n} prompt tokens'
                    + (f' ({start} cached)' if start else '')
                    + f': the rest needs at least {rest:.3f} s + one step {step_min:.3f} s, '
                    f'{max(left, 0):.3f} s left before the deadline; no eviction ratio can help'
                )
            if left <= 0:
                return (
                    f'stopped prefill at the deadline after {done} of {n} prompt tokens; '
                    f'no eviction ratio can help'
                )
            return None

        out.prefill_start_s = clock() - job.accepted_at
        cap = min(self.engine.max_context, n + (job.max_new_tokens or cfg.max_new_tokens) + 1)
        state = self.engine.prefill(
            job.input_ids,
            capacity=cap,
            started_at=job.accepted_at,
            chunk_tokens=cfg.prefill_chunk,
            should_stop=should_stop,
            prefix=job.lease if job.lease is not None else True,
        )
        job.cached = getattr(state, 'cached_tokens', 0)
        out.prefill_end_s = clock() - job.accepted_at
        out.prefill_s = state.prefill_s
        out.cached_tokens = job.cached
        out.prefill_saved_s = max(model.prefill_s(n) - model.prefill_s(n, job.cached), 0.0)
        if self.learn:
            self.online.observe_prefill(n, state.prefill_s, job.cached)
        return state

    def plan(
        self,
        job: Job,
        prefill_s: float,
        n_hat: int,
        elapsed_s: float,
        alpha_max: Optional[float] = None,
    ):
        """
        Choose (α, verdict) for what is left of the budget.

        A fixed ratio, or the least eviction whose worst case fits what is left, up to
        ``alpha_max`` (default: what the job's quality floor allows).
        """
        if job.alpha is not None:
            return float(job.alpha), None
        if math.isinf(job.deadline):
            return 0.0, None
        cap = self.n_cap(job)
        # the worst case on the slowest timings recent goals were served at: the WCET a result
        # reports must cover the steps the generator measures under load, not their mean
        verdict = solve_alpha_after_prefill(
            self.online.worst_model(),
            budget_s=job.deadline - job.accepted_at,
            elapsed_s=max(elapsed_s, 0.0),
            n_prompt=job.n_prompt,
            n_hat=min(n_hat + job.close_tokens, cap),  # a close's steps are part of the answer
            prefill_s=prefill_s,
            k=job.k if job.k is not None else self.cfg.pessimism_k,
            n_max=cap,
            alpha_max=self.limit(job).alpha_limit if alpha_max is None else alpha_max,
        )
        return verdict.alpha, verdict

    def decode(
        self,
        job: Job,
        state,
        out: Outcome,
        n_hat: int,
        cap: int,
        stop_at_deadline: bool = True,
        late: Optional[Callable] = None,
    ) -> Outcome:
        """
        Decode to EOS, max_new_tokens, the deadline or a cancel.

        ``stop_at_deadline=False`` (the sweep, which judges every budget from one run's token
        times) runs on to the end, still re-planning toward the deadline. ``late(step, token,
        text, then, replanner)``: the deferred α decision, called before every token's hooks.
        """
        from .engine import GenerationRequest
        from .replan import Replanner

        clock, cfg = self.clock, self.cfg
        skip_next = job.overrun == 'skip-next'
        deadline = None if skip_next or math.isinf(job.deadline) else job.deadline

        def on_token(step: int, token_id: int, text: str) -> None:
            job.tokens = step + 1
            if job.on_token:
                job.on_token(step, token_id, text)

        replan = None
        if job.replan and deadline is not None and job.alpha is None:
            replan = Replanner(
                state.cache,
                self.time_model(),
                deadline,
                n_hat=max(n_hat, 1),
                n_cap=cap,
                n_prompt=job.n_prompt,
                alpha_max=self.limit(job).alpha_limit,
                n_sink=cfg.n_sink,
                then=on_token,
                clock=clock,
            )
        hook = replan or on_token
        if late is not None:
            inner = hook
            hook = lambda step, tok, text: late(step, tok, text, inner, replan)  # noqa: E731
        out.decode_start_s = clock() - job.accepted_at
        if job.on_stage:
            job.on_stage(job, 'decoding')
        res = self.engine.decode(
            state,
            GenerationRequest(
                input_ids=job.input_ids,
                max_new_tokens=job.max_new_tokens or cfg.max_new_tokens,
                deadline=deadline if stop_at_deadline else None,
                overrun='truncate' if skip_next else job.overrun,
                on_token=hook,
                cancel=job.cancel,
                compiled=job.compiled,
            ),
        )
        if self.learn:
            self.online.observe_decode(res.kv_after, list(res.decode_step_s))
        out.replans = list(replan.events) if replan is not None else []
        out.result = res
        out.text, out.completed = res.text, res.completed
        out.tokens_generated, out.kv_before, out.kv_after = (
            res.tokens_generated,
            res.kv_before,
            res.kv_after,
        )
        out.decode_s = res.decode_s
        out.valid = bool(res.valid) if res.valid is not None else res.completed
        out.structured = res.valid is not None
        finished = clock()
        out.deadline_met = res.completed and finished <= job.deadline
        status, reason = classify(
            res.stop_reason,
            res.completed,
            finished,
            job.deadline,
            job.overrun,
            res.tokens_generated,
        )
        if status == 'truncated' and job.overrun == 'close' and out.structured and not out.valid:
            # a planner gets a valid answer or none: a close that could not finish is a kill
            status, out.text = 'killed', ''
            reason = (
                f'killed at the deadline after {res.tokens_generated} tokens: the structured '
                f'answer could not be closed in time (overrun policy close)'
            )
        if out.verdict is not None and out.verdict.status != 'met' and status != 'succeeded':
            reason += f'; solver: {out.verdict.status}: {out.verdict.reason}'
        if out.replans:
            ev = out.replans
            reason += (
                f'; re-planned {len(ev)} time(s) during decode '
                f'(KV {ev[0].kv_before} -> {ev[-1].kv_after})'
            )
        if status == 'canceled':
            out.text = ''
            at = job.tokens_at_cancel if job.tokens_at_cancel is not None else res.tokens_generated
            reason = (
                f'canceled: stopped {max(res.tokens_generated - at, 0)} '
                f'decode step(s) after the cancel request'
            )
        return self._end(job, status, reason, out, finished)

    # ---------------------------------------------------------------- outcomes
    def _check(self, job: Job) -> str:
        if not job.input_ids:
            return 'the prompt has no tokens: nothing to answer'
        if job.n_prompt >= self.engine.max_context:
            return (
                f"prompt has {job.n_prompt} tokens; the model's context is "
                f'{self.engine.max_context} (no room to answer)'
            )
        if job.overrun not in OVERRUN_POLICIES:
            return (
                f'unknown overrun policy {job.overrun!r}; use one of {", ".join(OVERRUN_POLICIES)}'
            )
        if job.compiled is None and (job.json_schema or job.grammar):
            compile_ = getattr(self.engine, 'compile_grammar', None)
            if compile_ is None:
                return 'this engine does not take a JSON schema or grammar'
            try:
                job.compiled = compile_(job.json_schema, job.grammar)
            except GrammarError as exc:
                return f'invalid {"JSON schema" if job.json_schema else "grammar"}: {exc}'
        if math.isnan(job.deadline):
            return 'the deadline is NaN'
        if not job.min_quality <= 1.0:
            return f'min_quality {job.min_quality:g} is above 1 (it is an expected accuracy)'
        if not job.max_alpha < 1.0:
            return f'max_alpha {job.max_alpha:g} must be below 1 (1 would evict every entry)'
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


def classify(
    stop_reason: str, completed: bool, finished: float, deadline: float, overrun: str, tokens: int
) -> tuple:
    """(status, reason) of a decode that ended: the one table of how runs end."""
    slack = deadline - finished
    if stop_reason == 'cancelled':
        return 'canceled', f'canceled: stopped after {tokens} token(s)'
    if completed and slack >= 0:
        when = '' if math.isinf(deadline) else f' {slack:.3f} s before the deadline'
        return 'succeeded', f'finished ({stop_reason}){when}'
    if completed:
        return 'deadline_missed', f'finished ({stop_reason}) {-slack:.3f} s after the deadline'
    if stop_reason == 'closed':
        return 'truncated', (
            f'closed early before the deadline: a valid, shorter answer of {tokens} tokens '
            f'(overrun policy close)'
        )
    if stop_reason == 'max_new_tokens':
        return ('truncated' if overrun in ('truncate', 'close') else 'killed'), (
            f'the answer reached max_new_tokens ({tokens}) before its schema was complete'
        )
    if overrun in ('truncate', 'close'):
        return 'truncated', f'truncated at the deadline after {tokens} tokens'
    return 'killed', f'killed at the deadline after {tokens} tokens (overrun policy kill)'


__all__ = [
    'Pipeline',
    'Job',
    'Outcome',
    'LengthEstimate',
    'FixedLength',
    'PredictorLength',
    'BudgetEstimate',
    'answer_cap',
    'classify',
    'MAX_PENDING',
]
