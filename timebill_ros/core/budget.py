"""
The eviction-ratio solver: the least KV eviction that makes the worst case fit the budget.

Evicting more costs answer quality, so TimeBill picks the *smallest* α whose WCET fits. The
decode sum is linear in α (see ``time_estimator``), so α* is closed-form; it is clipped to
[0, α_max], and when it cannot be met the verdict says why, with the numbers, so the caller
can choose between serving at α_max, truncating, or refusing.

Statuses:
  ``met``                  — WCET fits at ``alpha`` (= budget exactly, unless α clipped to 0).
  ``met_at_alpha_max``     — WCET (k·N̂ tokens) does not fit even at α_max, but the predicted
                             length N̂ itself does: serve at α_max, on time unless the answer
                             runs long.
  ``infeasible_alpha_max`` — even N̂ tokens at α_max overrun the budget.
  ``infeasible_prefill``   — the time before decoding (prefill, predictor) alone exceeds it.
Every status but ``met`` returns α = α_max: eviction is the only way left to finish sooner.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Optional

from .time_estimator import ExecutionTimeModel, wcet_length

STATUSES = ('met', 'met_at_alpha_max', 'infeasible_prefill', 'infeasible_alpha_max')


@dataclass(frozen=True)
class BudgetVerdict:
    status: str
    alpha: float
    budget_s: float
    prefill_s: float  # predicted (before prefill) or measured (after)
    fixed_s: float  # time spent before the first decode step: prefill/predictor/elapsed + overhead
    decode_s: float  # WCET decode time at ``alpha``
    total_s: float  # fixed_s + decode_s
    slack_s: float  # budget_s - total_s (negative: overrun predicted)
    n_prompt: int
    n_hat: float
    n_wcet: int  # N̂_W
    expected_total_s: float  # fixed_s + decode of N̂ tokens (k = 1) at ``alpha``
    reason: str = ''

    @property
    def feasible(self) -> bool:
        """Tell whether serving should finish on time (for ``met``: even in the worst case)."""
        return self.status in ('met', 'met_at_alpha_max')

    @property
    def guaranteed(self) -> bool:
        return self.status == 'met'


def _validate(
    budget_s: float, n_prompt: int, n_hat: float, k: float, n_max: int, alpha_max: float
) -> None:
    if math.isnan(budget_s):
        raise ValueError('budget is NaN')
    if n_prompt < 1:
        raise ValueError(f'n_prompt must be >= 1, got {n_prompt}')
    if not 0.0 <= alpha_max < 1.0:
        raise ValueError(f'alpha_max must be in [0, 1), got {alpha_max}')
    if k < 1.0:
        raise ValueError(f'pessimism k must be >= 1, got {k}')
    if n_hat < 0 or n_max < 0:
        raise ValueError(f'n_hat and n_max must be >= 0, got {n_hat}, {n_max}')


def _solve(
    model: ExecutionTimeModel,
    budget_s: float,
    fixed_s: float,
    prefill_s: float,
    n_prompt: int,
    n_hat: float,
    k: float,
    n_max: int,
    alpha_max: float,
) -> BudgetVerdict:
    n_w = wcet_length(n_hat, k, n_max)
    n_exp = wcet_length(n_hat, 1.0, n_max)

    def verdict(status: str, alpha: float, reason: str) -> BudgetVerdict:
        dec = model.decode_s(n_prompt, alpha, n_w)
        total = fixed_s + dec
        return BudgetVerdict(
            status=status,
            alpha=float(alpha),
            budget_s=float(budget_s),
            prefill_s=float(prefill_s),
            fixed_s=float(fixed_s),
            decode_s=dec,
            total_s=total,
            slack_s=budget_s - total,
            n_prompt=int(n_prompt),
            n_hat=float(n_hat),
            n_wcet=n_w,
            expected_total_s=fixed_s + model.decode_s(n_prompt, alpha, n_exp),
            reason=reason,
        )

    if fixed_s > budget_s:
        return verdict(
            'infeasible_prefill',
            alpha_max,
            f'{fixed_s:.3f} s are spent before decoding (prefill {prefill_s:.3f} '
            f's) but the budget is {budget_s:.3f} s: no eviction ratio can help',
        )
    total0 = fixed_s + model.decode_s(n_prompt, 0.0, n_w)
    if total0 <= budget_s:
        return verdict(
            'met', 0.0, f'no eviction needed: WCET {total0:.3f} s <= budget {budget_s:.3f} s'
        )
    # seconds the WCET loses per unit of α: (N̂_W − 1)
    # steps, each reading N fewer entries per unit α
    slope = max(n_w - 1, 0) * model.p * n_prompt
    if slope > 0:
        alpha = (total0 - budget_s) / slope
        if alpha <= alpha_max:
            return verdict(
                'met',
                alpha,
                f'α={alpha:.4f} makes WCET ({n_w} tokens) equal the budget {budget_s:.3f} s',
            )
    at_max = fixed_s + model.decode_s(n_prompt, alpha_max, n_w)
    expected = fixed_s + model.decode_s(n_prompt, alpha_max, n_exp)
    detail = (
        f'at α_max={alpha_max:g} the WCET of {n_w} tokens is {at_max:.3f} s > budget '
        f'{budget_s:.3f} s (before decoding {fixed_s:.3f} s); '
        f'the predicted {n_exp} tokens need {expected:.3f} s'
    )
    if expected <= budget_s:
        return verdict(
            'met_at_alpha_max',
            alpha_max,
            detail + ': on time unless the answer runs past the prediction',
        )
    return verdict(
        'infeasible_alpha_max', alpha_max, detail + ': even the predicted length overruns'
    )


def solve_alpha(
    model: ExecutionTimeModel,
    budget_s: float,
    n_prompt: int,
    n_hat: float,
    *,
    k: float = 5.0,
    n_max: int = 8192,
    alpha_max: float = 0.95,
    predict_s: float = 0.0,
    overhead_s: float = 0.0,
    cached: int = 0,
) -> BudgetVerdict:
    """
    Choose α before prefill: the smallest one that fits the budget.

    The smallest α with predicted max(prefill, predictor) + WCET decode ≤ budget; ``cached``
    prompt tokens come from the prefix cache.
    """
    _validate(budget_s, n_prompt, n_hat, k, n_max, alpha_max)
    prefill = model.prefill_s(n_prompt, cached)
    return _solve(
        model,
        budget_s,
        max(prefill, float(predict_s)) + overhead_s,
        prefill,
        n_prompt,
        n_hat,
        k,
        n_max,
        alpha_max,
    )


def solve_alpha_after_prefill(
    model: ExecutionTimeModel,
    budget_s: float,
    elapsed_s: float,
    n_prompt: int,
    n_hat: float,
    *,
    prefill_s: Optional[float] = None,
    k: float = 5.0,
    n_max: int = 8192,
    alpha_max: float = 0.95,
    overhead_s: float = 0.0,
) -> BudgetVerdict:
    """
    After prefill (when α is really chosen): only the decode is predicted; the rest is measured.

    ``elapsed_s`` is the time since the request started (prefill, waiting for the predictor…);
    ``overhead_s`` covers what still comes before the first step (eviction, a safety margin).
    """
    _validate(budget_s, n_prompt, n_hat, k, n_max, alpha_max)
    if elapsed_s < 0 or math.isnan(elapsed_s):
        raise ValueError(f'elapsed_s must be >= 0, got {elapsed_s}')
    return _solve(
        model,
        budget_s,
        float(elapsed_s) + overhead_s,
        float(elapsed_s if prefill_s is None else prefill_s),
        n_prompt,
        n_hat,
        k,
        n_max,
        alpha_max,
    )
