"""
Least squares from measurements to an ETE, scored on held-out lengths only.

Prefill is fitted as ``a·N² + b·N + c``, a decode step as ``p·N_kv + q``; the fit points say
nothing about interpolation, so accuracy is the MAPE on lengths the fit never saw. With a prefix
cache a goal copies its cached prefix and computes only the rest: the warm prefill of N tokens
whose first m are cached is fitted as ``a·n² + b·n + c + d·n·m + e·m`` (n = N − m) with the
cold (a, b, c) held fixed. Pure: nothing here runs the model.
"""

from __future__ import annotations

from dataclasses import replace
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .store import Measurement, Profile
from ..time_estimator import (
    ExecutionTimeModel,
    fit_decode,
    fit_prefill,
    fit_prefill_cached,
    fitted_ratios,
    flops_ratios,
    mape,
)


def _split(ms: Sequence[Measurement], statistic: str):
    fit = [(m.n, m.value(statistic)) for m in ms if not m.held_out]
    held = [(m.n, m.value(statistic)) for m in ms if m.held_out]
    return (np.array(fit, dtype=float).reshape(-1, 2), np.array(held, dtype=float).reshape(-1, 2))


def _warm_split(ms: Sequence[Measurement], statistic: str):
    def rows(held: bool):
        pts = [(m.n, m.cached, m.value(statistic)) for m in ms if m.held_out == held]
        return np.array(pts, dtype=float).reshape(-1, 3)

    return rows(False), rows(True)


def fit_warm(base: ExecutionTimeModel, points: np.ndarray) -> Tuple[float, float, str]:
    """
    Return (d, e, note): the warm terms on top of ``base``, both >= 0.

    ``points`` rows are (N, m, seconds). The least squares of ``fit_prefill_cached`` is kept
    when both terms come out >= 0; a negative one means its effect is below the noise (the
    copy-in, e·m, is a few percent of a warm prefill), so it is set to 0 and the other refitted
    alone (relative residuals, as everywhere), and ``note`` says so.
    """
    big_n, m, t = points[:, 0], points[:, 1], points[:, 2]
    d0, e0 = fit_prefill_cached(base, big_n, m, t)
    if d0 >= 0 and e0 >= 0:
        return d0, e0, ''
    n = big_n - m
    resid = (t - (base.a * n * n + base.b * n + base.c)) / t
    best = None
    for name, column in (('d', n * m / t), ('e', m / t)):
        coef = max(float(column @ resid / (column @ column)), 0.0)
        err = float(np.sum((resid - coef * column) ** 2))
        if best is None or err < best[2]:
            best = (name, coef, err)
    name, coef, _ = best
    d, e = (coef, 0.0) if name == 'd' else (0.0, coef)
    other = 'e' if name == 'd' else 'd'
    return d, e, (
        f'least squares gave d = {d0:.3e}, e = {e0:.3e}: {other} = 0 (below the noise), '
        f'{name} fitted alone'
    )


def fit_profile(
    key: Mapping[str, str],
    prefill: Sequence[Measurement],
    decode: Sequence[Measurement],
    statistic: str = 'min',
    config: Any = None,
    warm: Sequence[Measurement] = (),
    **extra,
) -> Profile:
    """
    Fit on the grid points, score on the held-out points (NaN when there are none).

    ``warm`` (measurements with ``cached`` > 0): the warm prefill's (d, e) on top of the cold
    (a, b, c), scored the same way; without them d = 2a, e = 0 (``ExecutionTimeModel``).
    """
    pf, ph = _split(prefill, statistic)
    df, dh = _split(decode, statistic)
    a, b, c = fit_prefill(pf[:, 0], pf[:, 1])
    p, q = fit_decode(df[:, 0], df[:, 1])
    model = ExecutionTimeModel(a, b, c, p, q)

    def score(points: np.ndarray, predict) -> float:
        return mape(points[:, 1], [predict(n) for n in points[:, 0]]) if len(points) else math.nan

    scores = {'prefill': score(ph, model.prefill_s), 'decode': score(dh, model.decode_step_s)}
    fit_scores = {
        'prefill': score(pf, model.prefill_s), 'decode': score(df, model.decode_step_s)
    }
    note = ''
    if warm:
        wf, wh = _warm_split(warm, statistic)
        d, e, note = fit_warm(model, wf)
        model = replace(model, d=d, e=e)

        def warm_score(points: np.ndarray) -> float:
            if not len(points):
                return math.nan
            return mape(points[:, 2], [model.prefill_s(n, m) for n, m, _ in points])

        scores['warm'], fit_scores['warm'] = warm_score(wh), warm_score(wf)
    return Profile(
        key={k: str(v) for k, v in key.items()},
        model=model,
        statistic=statistic,
        prefill=list(prefill),
        decode=list(decode),
        mape=scores,
        fit_mape=fit_scores,
        flops_ratios=flops_ratios(config) if config is not None else {},
        fitted_ratios=fitted_ratios(model),
        created=time.strftime('%Y-%m-%dT%H:%M:%S%z'),
        warm=list(warm),
        warm_note=note,
        **extra,
    )


def profile_problems(profile: Profile, max_mape: float = 10.0) -> List[str]:
    """
    Why this fit should not drive deadlines (empty: none found).

    A calibration run on a busy machine produces a wrong-shaped curve; the engine would then
    plan with it for every request, so such a profile is held back instead of saved.
    """
    m, out = profile.model, []
    for name, value, ok in (
        ('a', m.a, m.a >= 0),
        ('b', m.b, m.b > 0),
        ('p', m.p, m.p >= 0),
        ('q', m.q, m.q > 0),
    ):
        if not ok:
            out.append(
                f'coefficient {name} = {value:.3e} has the '
                f'wrong sign (timings cannot shrink with length)'
            )
    parts = ('prefill', 'decode') + (('warm',) if profile.warm else ())
    for part in parts:
        value = profile.mape.get(part, math.nan)
        if not value <= max_mape:  # NaN too: no held-out points, no evidence
            out.append(f'{part} held-out MAPE {value:.2f}% exceeds {max_mape}%')
    return out


def chunk_features(n: int, chunk: Optional[int], window: int = 64) -> List[float]:
    """
    Return [model calls, tokens, attention pairs] of an ``n``-token prefill in ``chunk``s.

    Splits as ``Engine._chunk_bounds`` does (a tail shorter than ``window`` joins the chunk
    before). Each call pays a fixed cost (the weights streamed once), each token the GEMMs, and
    each (query, key) pair attention: chunk·(keys before it) + chunk²/2.
    """
    bounds = [0, n] if not chunk else list(range(0, n, chunk)) + [n]
    while len(bounds) > 2 and bounds[-1] - bounds[-2] < max(window, 1):
        del bounds[-2]
    pairs = sum((e - s) * s + (e - s) ** 2 / 2 for s, e in zip(bounds, bounds[1:]))
    return [float(len(bounds) - 1), float(n), float(pairs)]


def chunked_prefill_fit(
    profile: Profile, chunk: Optional[int], window: int = 64
) -> Dict[str, Any]:
    """
    Fit prefill as c·calls + b·tokens + a·pairs (+ a constant) and score it on held-out points.

    The quadratic a·N² + b·N + c ignores how the prompt is cut into model calls; this
    shape-aware form follows the chunking requests run with. Reported beside the quadratic.
    """
    def rows(held: bool):
        pts = [(m.n, m.value(profile.statistic)) for m in profile.prefill if m.held_out == held]
        x = np.array([[1.0] + chunk_features(n, chunk, window) for n, _ in pts]).reshape(-1, 4)
        return x, np.array([t for _, t in pts])

    xf, yf = rows(False)
    xh, yh = rows(True)
    w = 1.0 / np.maximum(yf, 1e-9)  # relative error, as MAPE counts it
    coef = np.linalg.lstsq(xf * w[:, None], yf * w, rcond=None)[0]
    return {
        'chunk': chunk,
        'coefficients': dict(zip(('const', 'per_call', 'per_token', 'per_pair'), coef.tolist())),
        'mape_held_out': mape(yh, xh @ coef) if len(yh) else math.nan,
        'mape_fit': mape(yf, xf @ coef),
    }


def decode_slopes(profile: Profile) -> Optional[tuple]:
    """
    Slope p on the lower and the upper half of the decode grid: equal if the step is linear.

    The ETE assumes linearity; a ratio far from 1 says where the linear fit will err.
    """
    pts = sorted((m.n, m.value(profile.statistic)) for m in profile.decode if not m.held_out)
    if len(pts) < 4:
        return None
    half = len(pts) // 2
    lo, hi = pts[: half + 1], pts[half:]
    return fit_decode(*zip(*lo))[0], fit_decode(*zip(*hi))[0], pts[half][0]
