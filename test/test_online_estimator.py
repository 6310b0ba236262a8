"""
Online recalibration: RLS with forgetting follows a synthetic slowdown and its end.

The drift check fires outside the band and stays quiet inside it.
"""

import random

import pytest
from timebill_ros.core.online_estimator import OnlineTimeModel, ScalarRls
from timebill_ros.core.time_estimator import ExecutionTimeModel

BASE = ExecutionTimeModel(a=1e-7, b=1e-3, c=0.02, p=1e-5, q=0.01)


def _serve(online, slow, n, rng):
    for _ in range(n):
        n_prompt = rng.choice([20, 200, 900])
        online.observe_prefill(n_prompt, BASE.prefill_s(n_prompt) * slow * rng.uniform(0.95, 1.05))
        steps = [
            BASE.decode_step_s(n_prompt + j) * slow * rng.uniform(0.9, 1.1) for j in range(20)
        ]
        online.observe_decode(n_prompt, steps)


def test_follows_a_slowdown_then_recovers_with_forgetting():
    rng = random.Random(0)
    online = OnlineTimeModel(BASE, forgetting=0.9)
    _serve(online, 1.0, 20, rng)
    assert online.prefill.s == pytest.approx(1.0, abs=0.05) and online.drift() == []
    _serve(online, 2.5, 40, rng)  # the machine heats up: everything 2.5x slower
    assert online.prefill.s == pytest.approx(2.5, rel=0.08) and online.decode.s == pytest.approx(
        2.5, rel=0.08
    )
    m = online.model()
    assert m.prefill_s(500) == pytest.approx(2.5 * BASE.prefill_s(500), rel=0.08)
    assert m.decode_step_s(700) == pytest.approx(2.5 * BASE.decode_step_s(700), rel=0.08)
    drift = online.drift()
    assert len(drift) == 2 and 'prefill drift' in drift[0] and 'band 0.77-1.30x' in drift[0]
    _serve(online, 1.0, 60, rng)  # cooled down: old requests are forgotten
    assert online.prefill.s == pytest.approx(1.0, rel=0.08) and online.drift() == []


def test_without_forgetting_the_old_regime_lingers():
    rng = random.Random(1)
    forget, keep = OnlineTimeModel(BASE, forgetting=0.9), OnlineTimeModel(BASE, forgetting=1.0)
    for online in (forget, keep):
        _serve(online, 3.0, 50, random.Random(2))
        _serve(online, 1.0, 15, rng)
    assert abs(forget.decode.s - 1.0) < abs(keep.decode.s - 1.0)
    assert keep.decode.s > 1.5  # plain least squares still believes the slow machine


def test_inside_band_noise_is_not_drift_and_model_waits_for_samples():
    online = OnlineTimeModel(BASE, band=0.3, min_samples=3)
    online.observe_prefill(100, BASE.prefill_s(100) * 3)
    # one sample: fit unchanged
    assert online.model().prefill_s(100) == pytest.approx(BASE.prefill_s(100))
    assert online.drift() == []
    rng = random.Random(3)
    quiet = OnlineTimeModel(BASE, band=0.3)
    _serve(quiet, 1.15, 30, rng)
    assert quiet.drift() == []


def test_rls_rejects_bad_samples_and_bad_factor():
    r = ScalarRls()
    assert r.update(0.0, 1.0) == 1.0 and r.update(1.0, -1.0) == 1.0 and r.n == 0
    with pytest.raises(ValueError):
        OnlineTimeModel(BASE, forgetting=0.0)


def test_worst_model_covers_the_slowest_recent_request_the_mean_does_not():
    rng = random.Random(1)
    online = OnlineTimeModel(BASE, forgetting=0.95)
    _serve(online, 1.0, 20, rng)
    _serve(online, 3.0, 1, rng)  # one request served beside a CPU hog
    mean, worst = online.model(), online.worst_model()
    assert mean.decode_step_s(300) < 2.0 * BASE.decode_step_s(300)
    assert worst.decode_step_s(300) >= 2.7 * BASE.decode_step_s(300)
    assert worst.prefill_s(300) >= 2.8 * BASE.prefill_s(300)
    _serve(online, 1.0, 10, rng)  # the hog left ten requests ago: the guarantee relaxes again
    assert online.worst_model().decode_step_s(300) < 1.3 * BASE.decode_step_s(300)
