"""α solver: monotonicity, the budget inequality, brute force agreement, infeasibility."""

from hypothesis import assume, given, settings
from hypothesis import strategies as st
import numpy as np
import pytest
from timebill_ros.core.budget import solve_alpha, solve_alpha_after_prefill, STATUSES
from timebill_ros.core.time_estimator import ExecutionTimeModel, wcet_length

models = st.builds(
    ExecutionTimeModel,
    a=st.floats(0, 1e-6),
    b=st.floats(1e-5, 1e-2),
    c=st.floats(0, 0.5),
    p=st.floats(1e-8, 1e-4),
    q=st.floats(1e-3, 0.2),
)
n_prompts = st.integers(1, 8192)
n_hats = st.integers(0, 1500)
ks = st.floats(1, 10)
alpha_maxes = st.floats(0, 0.99)
budgets = st.floats(0.01, 300)
REL = 1e-9


def wcet(m, n, alpha, n_hat, k, n_max=8192):
    return m.prefill_s(n) + m.decode_s(n, alpha, wcet_length(n_hat, k, n_max))


@given(m=models, n=n_prompts, n_hat=n_hats, k=ks, amax=alpha_maxes, b1=budgets, b2=budgets)
def test_alpha_non_increasing_in_budget(m, n, n_hat, k, amax, b1, b2):
    lo, hi = sorted((b1, b2))
    assert (
        solve_alpha(m, hi, n, n_hat, k=k, alpha_max=amax).alpha
        <= solve_alpha(m, lo, n, n_hat, k=k, alpha_max=amax).alpha
    )


@given(m=models, n=n_prompts, h1=n_hats, h2=n_hats, k=ks, amax=alpha_maxes, budget=budgets)
def test_alpha_non_decreasing_in_n_hat(m, n, h1, h2, k, amax, budget):
    lo, hi = sorted((h1, h2))
    assert (
        solve_alpha(m, budget, n, lo, k=k, alpha_max=amax).alpha
        <= solve_alpha(m, budget, n, hi, k=k, alpha_max=amax).alpha + 1e-12
    )


@given(m=models, n=n_prompts, n_hat=n_hats, k1=ks, k2=ks, amax=alpha_maxes, budget=budgets)
def test_alpha_non_decreasing_in_k(m, n, n_hat, k1, k2, amax, budget):
    lo, hi = sorted((k1, k2))
    assert (
        solve_alpha(m, budget, n, n_hat, k=lo, alpha_max=amax).alpha
        <= solve_alpha(m, budget, n, n_hat, k=hi, alpha_max=amax).alpha + 1e-12
    )


@given(m=models, n=n_prompts, n_hat=n_hats, k=ks, amax=alpha_maxes, budget=budgets)
def test_verdict_numbers_and_budget_inequality(m, n, n_hat, k, amax, budget):
    v = solve_alpha(m, budget, n, n_hat, k=k, alpha_max=amax)
    assert v.status in STATUSES
    assert 0.0 <= v.alpha <= amax
    assert v.total_s == pytest.approx(wcet(m, n, v.alpha, n_hat, k), rel=1e-12)
    assert v.slack_s == pytest.approx(budget - v.total_s)
    assert v.n_wcet == wcet_length(n_hat, k, 8192)
    if v.status == 'met':
        assert v.total_s <= budget * (1 + REL)
        if v.alpha > 0:  # not clipped: the budget is used exactly
            assert v.total_s == pytest.approx(budget, rel=1e-9)
    else:
        assert v.alpha == amax
        assert v.total_s > budget * (1 - REL)
        assert v.reason


@given(
    m=models,
    n=n_prompts,
    n_hat=st.integers(1, 1500),
    k=ks,
    amax=alpha_maxes,
    target=st.floats(0, 0.999),
)
def test_budget_made_for_an_alpha_gives_that_alpha_back(m, n, n_hat, k, amax, target):
    """Budgets drawn in the interesting region: exactly the WCET at some α."""
    # not a rounding coin toss
    assume(wcet_length(n_hat, k, 8192) >= 2 and abs(target - amax) > 1e-6)
    v = solve_alpha(m, wcet(m, n, target, n_hat, k), n, n_hat, k=k, alpha_max=amax)
    if target <= amax:
        assert v.status == 'met'
        assert v.alpha == pytest.approx(target, abs=1e-6)
        assert v.total_s == pytest.approx(v.budget_s, rel=1e-9)
    else:
        assert v.alpha == amax and v.status != 'met'


@settings(max_examples=200, deadline=None)  # a 20k-point grid: slow on a busy machine
@given(m=models, n=n_prompts, n_hat=n_hats, k=ks, amax=alpha_maxes, budget=budgets)
def test_matches_brute_force_grid(m, n, n_hat, k, amax, budget):
    v = solve_alpha(m, budget, n, n_hat, k=k, alpha_max=amax)
    grid = np.linspace(0.0, amax, 20001)
    step = amax / 20000
    n_w = wcet_length(n_hat, k, 8192)
    totals = (
        np.array([wcet(m, n, a, n_hat, k) for a in grid])
        if n_w < 2
        else (
            m.prefill_s(n)
            + (n_w - 1) * (m.p * (1 - grid) * n + m.q)
            + m.p * (n_w - 1) * (n_w - 2) / 2
        )
    )
    ok = totals <= budget
    if v.status == 'met':
        assume(ok.any() or v.alpha > amax - 1e-9)  # α* on the grid's last point, lost to rounding
        if ok.any():
            first = grid[np.argmax(ok)]
            assert v.alpha <= first + 1e-12
            assert first - v.alpha <= step + 1e-12
    else:
        assert not (totals <= budget * (1 - 1e-9)).any()


@given(m=models, n=n_prompts, n_hat=n_hats, k=ks, amax=alpha_maxes, budget=budgets)
def test_statuses_are_the_right_ones(m, n, n_hat, k, amax, budget):
    v = solve_alpha(m, budget, n, n_hat, k=k, alpha_max=amax)
    pre = m.prefill_s(n)
    at_max = wcet(m, n, amax, n_hat, k)
    expected_at_max = pre + m.decode_s(n, amax, wcet_length(n_hat, 1, 8192))
    tol = budget * 1e-9
    if pre > budget + tol:
        assert v.status == 'infeasible_prefill'
    elif at_max <= budget - tol:
        assert v.status == 'met'
    elif at_max > budget + tol and expected_at_max <= budget - tol:
        assert v.status == 'met_at_alpha_max'
    elif expected_at_max > budget + tol and pre < budget - tol:
        assert v.status == 'infeasible_alpha_max'


M = ExecutionTimeModel(a=2.5e-7, b=1.2e-3, c=0.3, p=1e-5, q=0.06)


def test_worked_example():
    # N = 2000: prefill = 1 + 2.4 + 0.3 = 3.7 s; N̂ = 40, k = 5 → 200 tokens, 199 steps
    n, n_hat = 2000, 40
    v0 = solve_alpha(M, 100.0, n, n_hat)
    assert v0.status == 'met' and v0.alpha == 0.0
    full = M.prefill_s(n) + M.decode_s(n, 0.0, 200)
    budget = full - 0.5 * 199 * M.p * n  # exactly what α = 0.5 saves
    v = solve_alpha(M, budget, n, n_hat)
    assert v.status == 'met' and v.alpha == pytest.approx(0.5)
    assert v.prefill_s == pytest.approx(3.7) and v.n_wcet == 200


def test_infeasible_prefill_is_reported_with_numbers():
    v = solve_alpha(M, 1.0, 2000, 40)
    assert v.status == 'infeasible_prefill' and not v.feasible
    assert '3.700' in v.reason and '1.000' in v.reason


def test_met_at_alpha_max_and_infeasible_alpha_max():
    n, n_hat, amax = 2000, 40, 0.95
    pre = M.prefill_s(n)
    wcet_max = pre + M.decode_s(n, amax, 200)
    exp_max = pre + M.decode_s(n, amax, 40)
    v = solve_alpha(M, (wcet_max + exp_max) / 2, n, n_hat, alpha_max=amax)
    assert v.status == 'met_at_alpha_max' and v.feasible and not v.guaranteed and v.alpha == amax
    assert v.slack_s < 0 and v.expected_total_s <= v.budget_s
    v = solve_alpha(M, (pre + exp_max) / 2, n, n_hat, alpha_max=amax)
    assert v.status == 'infeasible_alpha_max' and v.alpha == amax
    assert 'even the predicted length' in v.reason


def test_degenerate_cases():
    # one token (prefill makes it) or none: nothing to decode, nothing to evict
    for n_hat in (0, 0.2):
        v = solve_alpha(M, M.prefill_s(500) + 1e-6, 500, n_hat)
        assert v.status == 'met' and v.alpha == 0.0 and v.decode_s == 0.0
    # p = 0: eviction saves nothing, so it cannot rescue an overrun
    flat = ExecutionTimeModel(a=0, b=1e-3, c=0.1, p=0.0, q=0.05)
    tight = flat.prefill_s(500) + flat.decode_s(500, 0, 100) - 0.01
    assert solve_alpha(flat, tight, 500, 20).status == 'met_at_alpha_max'
    assert solve_alpha(flat, tight + 0.02, 500, 20).alpha == 0.0
    # p < 0 (a bad fit): the solver does not divide by it
    neg = ExecutionTimeModel(a=0, b=1e-3, c=0.1, p=-1e-6, q=0.05)
    tight_neg = neg.prefill_s(500) + neg.decode_s(500, 0, 100) - 0.01
    assert solve_alpha(neg, tight_neg, 500, 20).status in (
        'met_at_alpha_max',
        'infeasible_alpha_max',
    )
    # an infinite budget never evicts
    assert solve_alpha(M, float('inf'), 8000, 1000).alpha == 0.0


def test_bad_arguments():
    for kw in ({'alpha_max': 1.0}, {'k': 0.5}):
        with pytest.raises(ValueError):
            solve_alpha(M, 5.0, 100, 10, **kw)
    with pytest.raises(ValueError):
        solve_alpha(M, float('nan'), 100, 10)
    with pytest.raises(ValueError):
        solve_alpha(M, 5.0, 0, 10)
    with pytest.raises(ValueError):
        solve_alpha_after_prefill(M, 5.0, -1.0, 100, 10)


def test_after_prefill_uses_measured_time_not_the_prediction():
    n, n_hat = 2000, 40
    dec0 = M.decode_s(n, 0.0, 200)
    # predicted prefill is 3.7 s; suppose it took 1.0 s and 1.2 s passed in all
    v = solve_alpha_after_prefill(M, 1.2 + dec0, 1.2, n, n_hat, prefill_s=1.0)
    assert v.status == 'met' and v.alpha == 0.0 and v.prefill_s == 1.0 and v.fixed_s == 1.2
    v = solve_alpha_after_prefill(M, 1.2 + dec0 - 0.25 * 199 * M.p * n, 1.2, n, n_hat)
    assert v.alpha == pytest.approx(0.25)
    v = solve_alpha_after_prefill(M, 1.0, 1.2, n, n_hat, prefill_s=1.0)
    assert v.status == 'infeasible_prefill'
    # overhead (eviction, margin) counts before the first step
    assert solve_alpha_after_prefill(M, 1.2 + dec0, 1.2, n, n_hat, overhead_s=0.1).alpha > 0


@given(
    m=models, n=n_prompts, n_hat=n_hats, k=ks, elapsed=st.floats(0, 10), extra=st.floats(0, 100)
)
def test_after_prefill_inequality(m, n, n_hat, k, elapsed, extra):
    budget = elapsed + extra
    v = solve_alpha_after_prefill(m, budget, elapsed, n, n_hat, k=k)
    if v.status == 'met':
        assert (
            elapsed + m.decode_s(n, v.alpha, wcet_length(n_hat, k, 8192))
            <= budget * (1 + REL) + 1e-12
        )


def test_pipeline_plan_budget_from_acceptance_and_elapsed_time(tiny):
    """
    Check the one α chooser (``Pipeline.plan``).

    Budget from acceptance, elapsed time measured, N̂ capped by max_new_tokens and by the context.
    """
    from timebill_ros.core.config import TimeBillConfig
    from timebill_ros.core.engine import Engine
    from timebill_ros.core.job import Job
    from timebill_ros.core.pipeline import Pipeline

    p = Pipeline(
        Engine(tiny, None, press='snapkv', window_size=8),
        M,
        TimeBillConfig(max_new_tokens=8192),
        learn=False,
    )
    dec0 = M.decode_s(2000, 0.0, 200)
    saved = 0.25 * 199 * M.p * 2000
    job = Job(
        'j', [5] * 2000, deadline=1.2 + dec0 - saved, accepted_at=0.0, max_new_tokens=8192, k=5
    )
    p.engine.max_context = 100000
    alpha, v = p.plan(job, prefill_s=1.0, n_hat=40, elapsed_s=1.2)
    assert alpha == pytest.approx(0.25) and v.status == 'met' and v.fixed_s == pytest.approx(1.2)
    job.max_new_tokens = 100
    alpha, v = p.plan(job, prefill_s=1.0, n_hat=40, elapsed_s=1.2)
    assert alpha < 0.25 and v.n_wcet == 100
    p.engine.max_context = 2050
    job.max_new_tokens, job.deadline = 8192, 1e9
    assert p.plan(job, prefill_s=1.0, n_hat=40, elapsed_s=1.2)[1].n_wcet == 50
