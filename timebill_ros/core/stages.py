"""
The stages of one job after the queue: prefill, the length estimate, α, eviction, decode.

Methods of ``core.pipeline.Pipeline`` (a mixin), run on its model worker (or the caller's thread
through ``serve``). Every stage is bounded by the job's deadline: prefill stops between chunks,
decode never starts a step it expects to end past the deadline, and α is chosen for the time
left once prefill is done (or, when the length estimate is late, at the first step after it).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

from .budget import solve_alpha_after_prefill
from .errors import PrefillStopped
from .job import Job
from .outcome import classify, Outcome
from .scheduler import min_job_s


class Stages:
    """The stages of ``Pipeline`` after the queue."""

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
        from .generation import GenerationRequest
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
