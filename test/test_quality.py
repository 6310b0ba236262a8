"""
Quality the planner can see and bound (core, no ROS).

The press's measured accuracy-vs-α curve turns a goal's quality floor into the most eviction it
allows; a budget that needs more is refused once prefill tells what it needs, with the numbers,
and EstimateBudget predicts that before the goal is sent.
"""

import time

import pytest
from timebill_ros.core.config import TimeBillConfig
from timebill_ros.core.engine import Engine
from timebill_ros.core.job import Job
from timebill_ros.core.lengths import FixedLength
from timebill_ros.core.pipeline import Pipeline
from timebill_ros.core.quality import curve_for, default_profile_path, limit_for, QualityCurve
from timebill_ros.core.time_estimator import ExecutionTimeModel

CURVE = QualityCurve('snapkv', (0.0, 0.25, 0.5, 0.75, 0.9, 0.95), (1.0, 0.9, 0.9, 0.6, 0.3, 0.1))
# decode 5 ms per cached entry, nothing else: what α buys is exact
MODEL = ExecutionTimeModel(a=0.0, b=0.0, c=0.0, p=5e-3, q=0.0)
CFG = TimeBillConfig(max_new_tokens=10, prefill_chunk=64, window_size=8, estimate_slack_s=0.0)


def test_curve_interpolates_and_finds_the_first_crossing():
    assert CURVE.at(0.0) == 1.0 and CURVE.at(0.375) == pytest.approx(0.9)
    assert CURVE.at(0.625) == pytest.approx(0.75) and CURVE.at(0.99) == pytest.approx(0.1)
    assert CURVE.max_alpha(0.9, 0.95) == pytest.approx(0.5)  # flat at 0.9 until 0.5
    assert CURVE.max_alpha(0.75, 0.95) == pytest.approx(0.625)
    assert CURVE.max_alpha(0.05, 0.95) == 0.95 and CURVE.max_alpha(0.05, 0.6) == 0.6
    assert CURVE.max_alpha(1.0, 0.95) == pytest.approx(0.0)  # any eviction costs something
    noisy = QualityCurve('x', (0.0, 0.5, 0.9), (1.0, 0.4, 0.8))
    assert noisy.max_alpha(0.7, 0.95) == pytest.approx(0.25)  # a later recovery does not count
    with pytest.raises(ValueError):
        QualityCurve('x', (0.1, 0.5), (1.0, 0.5))
    with pytest.raises(ValueError):
        QualityCurve('x', (0.0, 0.5), (1.0, 1.5))


def test_limit_follows_the_goal_then_the_default_floor():
    default = limit_for(CURVE, 0.95, 0.5)
    assert default.floor == pytest.approx(0.9) and default.alpha_limit == pytest.approx(0.5)
    assert 'default quality floor 0.90' in default.why
    assert limit_for(CURVE, 0.95, 0.5, min_quality=0.0).alpha_limit == 0.95  # no floor
    assert limit_for(CURVE, 0.95, 0.5, min_quality=0.6).alpha_limit == pytest.approx(0.75)
    assert limit_for(CURVE, 0.95, 0.5, min_quality=0.0, max_alpha=0.3).alpha_limit == 0.3
    assert limit_for(CURVE, 0.95, 0.95).alpha_limit == 0.95  # floor switched off
    # no measured curve: the default floor is its definition, an explicit one cannot be judged
    assert limit_for(None, 0.95, 0.5).alpha_limit == 0.5
    assert 'cannot be judged' in limit_for(None, 0.95, 0.5, min_quality=0.8).problem


def test_the_packaged_profile_has_the_default_press_for_the_default_model():
    assert default_profile_path().is_file()
    cfg = TimeBillConfig()
    curve = curve_for(cfg)
    assert curve is not None and curve.press == cfg.press and curve.n_tasks > 0
    assert curve.at(0.0) == 1.0  # tasks are kept only when answered right at α = 0
    assert curve_for(cfg.replace(model='Qwen/Qwen2.5-7B-Instruct')) is None  # not measured


@pytest.fixture(scope='module')
def engine(tiny):
    return Engine(tiny, None, press='snapkv', window_size=8)


def _pipeline(engine):
    return Pipeline(engine, MODEL, CFG, FixedLength(10), learn=False, quality=CURVE)


def _job(name, budget_s, **kw):
    now = time.monotonic()
    ids = [3 + (i * 31) % 200 for i in range(200)]
    return Job(name, ids, deadline=now + budget_s, accepted_at=now, max_new_tokens=10, k=1.0, **kw)


def test_a_budget_that_needs_eviction_beyond_the_floor_is_refused_with_the_numbers(engine):
    # 10 tokens at 5 ms per entry of a 200-token prompt: 10.25 s at α = 0, 5.25 s at the floor's
    # α = 0.5; 3 s needs α ≈ 0.73, where the curve expects 0.63 of the answers to survive
    p = _pipeline(engine)
    est = p.estimate(200, budget_s=3.0, n_hat=10)
    assert est.quality_refusal and not est.guaranteed
    assert est.limit.alpha_limit == pytest.approx(0.5) and est.verdict.alpha == pytest.approx(0.5)

    out = p.run(_job('floor', 3.0))
    assert out.status == 'rejected' and out.tokens_generated == 0 and not out.text
    assert 'quality floor' in out.reason and 'it would need α=0.' in out.reason, out.reason
    assert 'expected accuracy 0.6' in out.reason, out.reason
    assert out.prefill_end_s >= 0 and out.decode_start_s == -1  # decided right after prefill
    assert out.alpha == 0.0 and out.kv_after == out.kv_before  # nothing was evicted

    # no floor: the paper's TimeBill evicts what it takes, and says what it expects to cost
    free = p.run(_job('free', 3.0, min_quality=0.0))
    assert free.status == 'succeeded', free.reason
    assert 0.6 < free.alpha < 0.8  # more than the floor's 0.5 allowed
    assert free.expected_quality == pytest.approx(CURVE.at(free.alpha))
    assert free.alpha_limit == pytest.approx(0.95)
    p.close()


def test_the_goal_cap_and_roomy_budgets(engine):
    p = _pipeline(engine)
    capped = p.run(_job('cap', 3.0, min_quality=0.0, max_alpha=0.3))
    assert capped.status == 'rejected' and 'the goal allows α ≤ 0.3' in capped.reason
    roomy = p.run(_job('roomy', 60.0))
    assert roomy.status == 'succeeded' and roomy.alpha == 0.0 and roomy.expected_quality == 1.0
    assert roomy.alpha_limit == pytest.approx(0.5)
    # a budget no α can meet is not the floor's doing: it is not refused for quality
    assert not p.estimate(200, budget_s=0.2, n_hat=10).quality_refusal
    p.close()
