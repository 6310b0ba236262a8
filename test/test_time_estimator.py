"""ETE: closed forms against brute-force sums, fits against known coefficients, MAPE, FLOPs."""

import math
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest
from timebill_ros.core.time_estimator import (
    decode_sum_s,
    ExecutionTimeModel,
    fit_decode,
    fit_model,
    fit_prefill,
    fitted_ratios,
    flops_coefficients,
    flops_ratios,
    mape,
    served_errors,
    wcet_length,
)

pos = st.floats(1e-7, 1e-2)


@given(p=st.floats(0, 1e-3), q=st.floats(0, 0.5), kv0=st.floats(0, 8192), n=st.integers(0, 600))
def test_decode_sum_matches_loop(p, q, kv0, n):
    brute = sum(p * (kv0 + i - 1) + q for i in range(1, n + 1))
    assert decode_sum_s(p, q, kv0, n) == pytest.approx(brute, rel=1e-9, abs=1e-12)


@given(n=st.integers(1, 8192), alpha=st.floats(0, 0.99), n_out=st.integers(0, 400))
def test_decode_s_uses_evicted_length_and_one_step_fewer_than_tokens(n, alpha, n_out):
    m = ExecutionTimeModel(a=0, b=0, c=0, p=2e-6, q=0.05)
    brute = sum(m.decode_step_s((1 - alpha) * n + i - 1) for i in range(1, n_out))
    assert m.decode_s(n, alpha, n_out) == pytest.approx(brute, rel=1e-9, abs=1e-12)


def test_wcet_length_examples():
    assert wcet_length(100, 5, 8192) == 500
    assert wcet_length(100, 5, 300) == 300
    assert wcet_length(3, 1.5, 8192) == 5  # ⌈4.5⌉: never shorter than k·N̂
    assert wcet_length(0, 5, 8192) == 0
    with pytest.raises(ValueError):
        wcet_length(-1, 5, 10)


@given(n_hat=st.integers(0, 5000), k=st.floats(1, 10), n_max=st.integers(0, 8192))
def test_wcet_length_bounds(n_hat, k, n_max):
    w = wcet_length(n_hat, k, n_max)
    assert w <= n_max
    assert w == n_max or k * n_hat - 1e-6 <= w < k * n_hat + 1


def test_wcet_counts_predictor_only_when_slower_than_prefill():
    m = ExecutionTimeModel(a=1e-7, b=1e-3, c=0.1, p=1e-6, q=0.05)
    n = 500
    pre = m.prefill_s(n)
    dec = m.decode_s(n, 0.3, 250)
    assert m.wcet_s(n, 0.3, 50, k=5, n_max=8192, predict_s=0.0) == pytest.approx(pre + dec)
    assert m.wcet_s(n, 0.3, 50, k=5, n_max=8192, predict_s=pre + 1.0) == pytest.approx(
        pre + 1.0 + dec
    )


def test_model_dict_roundtrip():
    m = ExecutionTimeModel(a=1.5e-7, b=1e-3, c=0.2, p=3e-6, q=0.06)
    assert ExecutionTimeModel.from_dict(m.to_dict()) == m


@settings(max_examples=50, deadline=None)
@given(
    a=st.floats(1e-9, 1e-6),
    b=st.floats(1e-5, 1e-2),
    c=st.floats(1e-3, 0.5),
    relative=st.booleans(),
)
def test_prefill_fit_exact_data_recovers_coefficients(a, b, c, relative):
    n = np.array([32, 64, 128, 256, 512, 1024, 2048, 4096], dtype=float)
    fa, fb, fc = fit_prefill(n, a * n * n + b * n + c, relative=relative)
    assert (fa, fb, fc) == (
        pytest.approx(a, rel=1e-5),
        pytest.approx(b, rel=1e-5),
        pytest.approx(c, rel=1e-5),
    )


@settings(max_examples=50, deadline=None)
@given(p=st.floats(1e-8, 1e-4), q=st.floats(1e-3, 0.5))
def test_decode_fit_exact_data_recovers_coefficients(p, q):
    n = np.array([64, 512, 1024, 2048, 4096, 8192], dtype=float)
    fp, fq = fit_decode(n, p * n + q)
    assert (fp, fq) == (pytest.approx(p, rel=1e-6), pytest.approx(q, rel=1e-6))


def test_fit_recovers_known_coefficients_from_noisy_timings():
    """Realistic CPU magnitudes with 0.5% multiplicative noise, 5 repeats a point, median taken."""
    rng = np.random.default_rng(7)
    true = ExecutionTimeModel(a=2.5e-7, b=1.2e-3, c=0.30, p=1.0e-5, q=0.060)
    n_pre = np.array([32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096], dtype=float)
    n_dec = np.array([32, 128, 512, 1024, 2048, 3072, 4096, 6144, 8192], dtype=float)

    def noisy(t):
        return np.median(t[:, None] * (1 + 0.005 * rng.standard_normal((t.size, 5))), axis=1)

    fit = fit_model(
        n_pre,
        noisy(np.array([true.prefill_s(x) for x in n_pre])),
        n_dec,
        noisy(np.array([true.decode_step_s(x) for x in n_dec])),
    )
    assert fit.a == pytest.approx(true.a, rel=0.05)
    assert fit.b == pytest.approx(true.b, rel=0.05)
    assert fit.c == pytest.approx(true.c, rel=0.05)
    assert fit.p == pytest.approx(true.p, rel=0.05)
    assert fit.q == pytest.approx(true.q, rel=0.02)
    # and predicts unseen lengths to well under the noise level
    held = np.array([96, 640, 2560])
    assert mape([true.prefill_s(x) for x in held], [fit.prefill_s(x) for x in held]) < 0.5


def test_relative_fit_keeps_short_prompts_accurate():
    """
    Fit relative, not absolute, errors: the short lengths must not be sacrificed.

    With a mismatched shape, absolute least squares sacrifices the short lengths; relative does
    not.
    """
    n = np.array([16, 32, 64, 128, 256, 512, 1024, 2048, 4096], dtype=float)
    t = 1e-7 * n**2.2 + 1e-3 * n + 0.02  # not exactly quadratic
    rel = fit_prefill(n, t, relative=True)
    ab = fit_prefill(n, t, relative=False)
    err = lambda f: mape(t[:4], f[0] * n[:4] ** 2 + f[1] * n[:4] + f[2])  # noqa: E731
    assert err(rel) < err(ab)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match='distinct'):
        fit_prefill([10, 10, 20], [1.0, 1.1, 2.0])
    with pytest.raises(ValueError, match='positive'):
        fit_decode([10, 20, 30], [0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match='equally long'):
        fit_decode([10, 20], [0.1, 0.2, 0.3])


def test_mape_values():
    assert mape([100, 200], [101, 190]) == pytest.approx(3.0)
    assert mape([2.0], [2.0]) == 0.0
    with pytest.raises(ValueError):
        mape([0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError):
        mape([], [])


SMOLLM2_LIKE = SimpleNamespace(
    model_type='llama',
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
)


def test_flops_counts_by_hand():
    f = flops_coefficients(SMOLLM2_LIKE)
    d, L, h, kv, hd, ff, V = 576, 30, 9, 3, 64, 1536, 49152
    per_token = L * (2 * d * h * hd * 2 + 2 * d * kv * hd * 2 + 3 * 2 * d * ff)
    assert f['prefill_linear'] == per_token
    assert f['prefill_quadratic'] == L * h * hd * 4 / 2
    assert f['decode_per_kv'] == L * h * hd * 4
    assert f['decode_const'] == per_token + 2 * d * V
    r = flops_ratios(SMOLLM2_LIKE)
    assert r['prefill_a_over_b'] == pytest.approx(f['prefill_quadratic'] / per_token)
    gpt2_like = SimpleNamespace(**{**vars(SMOLLM2_LIKE), 'model_type': 'gpt2'})
    # two MLP matrices, not three
    assert flops_coefficients(gpt2_like)['prefill_linear'] < per_token


def test_fitted_ratios():
    r = fitted_ratios(ExecutionTimeModel(a=2e-7, b=1e-3, c=0.1, p=1e-6, q=0.05))
    assert r == {'prefill_a_over_b': pytest.approx(2e-4), 'decode_p_over_q': pytest.approx(2e-5)}


def test_served_errors():
    m = ExecutionTimeModel(a=1e-7, b=1e-3, c=0.1, p=1e-5, q=0.05)
    steps = [m.decode_step_s(300 + j) for j in range(20)]
    exact = served_errors(
        m, n_prompt=1000, kv_after=300, prefill_s=m.prefill_s(1000), decode_step_s=steps
    )
    assert exact['prefill_ape'] == pytest.approx(0, abs=1e-9)
    assert exact['decode_step_mape'] == pytest.approx(0, abs=1e-9)
    slow = served_errors(m, 1000, 300, m.prefill_s(1000) * 1.25, [s * 1.25 for s in steps])
    assert slow['prefill_ape'] == pytest.approx(20.0)  # predicted 0.8 of measured
    assert slow['decode_ape'] == pytest.approx(20.0)
    assert slow['decode_step_mape'] == pytest.approx(20.0)
    assert math.isnan(served_errors(m, 10, 10, 0.1, [])['decode_step_mape'])
