"""
What the pipeline would do with a budget: admission and the EstimateBudget answer.

Methods of ``core.pipeline.Pipeline`` (a mixin, to keep the queue's file to the queue): they read
its time model, quality curve, configuration and queue, and change nothing.
"""

from __future__ import annotations

from typing import Callable, Optional

from .budget import BudgetVerdict, solve_alpha
from .goal_rules import quality_problem
from .job import BudgetEstimate
from .quality import limit_for, QualityLimit
from .scheduler import Admission, admission, ahead_text, Running


class Estimates:
    """Admission and the budget estimate of ``Pipeline``."""

    def admission(
        self,
        n_prompt: int,
        deadline: float,
        now: Optional[float] = None,
        cached: int = 0,
        limit: Optional[QualityLimit] = None,
    ) -> Admission:
        """
        Tell whether a job can still finish behind the work ahead (``scheduler.admission``).

        ``limit``: the most eviction the job allows (``Pipeline.limit``); its own least work is
        counted at that α, as the queue's expiry counts it, and a refusal quotes it.
        """
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
            alpha_limit=None if limit is None else limit.alpha_limit,
            limit_why='' if limit is None else limit.why,
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
        limit = limit_for(
            self.quality, self.cfg.alpha_max, self.cfg.quality_floor_alpha, min_quality, max_alpha
        )
        adm = self.admission(n_prompt, now + budget_s, now, cached, limit)
        with self._cv:
            running = self._running
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
        refusal = (
            quality_problem(min_quality, max_alpha)
            or limit.problem
            or self._quality_refusal(limit, verdict, min(n_hat, cap), solve)
        )
        guaranteed = adm.admit and worst is not None and worst.guaranteed and not refusal
        reason = refusal or verdict.reason
        if verdict.guaranteed and not guaranteed and not refusal:
            reason += '; not guaranteed: ' + self._why_not_guaranteed(
                now, budget_s, adm, running, amax, left, solve
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

    def _why_not_guaranteed(
        self,
        now: float,
        budget_s: float,
        adm: Admission,
        running: Optional[Running],
        amax: float,
        left: float,
        solve: Callable[..., BudgetVerdict],
    ) -> str:
        """
        Say what keeps a met budget from being guaranteed: the work ahead, timings or the margin.

        The work ahead is blamed only when it is what breaks the guarantee: the same worst case,
        started now instead of after it, would be guaranteed.
        """
        margin = self.cfg.guarantee_margin_s
        alone = budget_s - margin  # the time left if the worst case started now
        started_now = solve(amax, self.online.worst_model(), alone) if alone > 0 else None
        wait = adm.worst_start - now
        if adm.ahead and wait > 0 and started_now is not None and started_now.guaranteed:
            queued = adm.ahead - (running is not None)
            held = f'{wait:.3f}' if wait >= 0.001 else f'{wait:.1e}'
            return (
                f'{ahead_text(running, queued)} may hold the model until {held} s from now, '
                f'leaving {max(left, 0.0):.3f} s for a worst case of {started_now.total_s:.3f} s'
            )
        if started_now is not None:
            return (
                f'on the slowest timings recent goals were served at, the worst case takes '
                f'{started_now.total_s:.3f} s, over the {alone:.3f} s left once '
                f'{margin:g} s are kept for the way back'
            )
        return f'the {margin:g} s kept for the way back leave no time'

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
