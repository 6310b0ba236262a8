"""
Execution-time estimator (ETE): how long prefill and decoding take, before they run.

TimeBill models prefill as quadratic in the prompt length (attention is N², the rest is
linear) and one decode step as linear in the KV-cache length. Eviction shrinks the KV cache
the decode steps read, which is the only lever left once the prompt is known — so the decode
sum is written in closed form and stays linear in α, letting ``budget.py`` solve for α exactly.

Conventions: prefill produces the first token; an answer of ``n_out`` tokens then needs
``n_out - 1`` decode steps, step i (1-based) reading ``(1-α)·N + i - 1`` cached entries.
Pure numpy; no torch, no rclpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import math
from typing import Any, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class ExecutionTimeModel:
    """
    Fitted coefficients, in seconds: prefill ``a·N² + b·N + c``, decode step ``p·N_kv + q``.

    With a prefix cache, ``n`` new tokens after ``m`` cached ones cost ``a·n² + b·n + c + d·n·m
    + e·m``: each new query attends to the ``m`` cached keys (``d``; a causal pass counts N²/2
    pairs in ``a``, so in theory d = 2a) and the cached entries are copied into the request's
    cache (``e``). A profile without a warm fit gets d = 2a, e = 0 (``from_dict``). ``w``
    multiplies a warm prefill's time: the online recalibration learns it apart from the cold
    prefill's scale, so a warm form that is off cannot make cold predictions pessimistic.
    """

    a: float
    b: float
    c: float
    p: float
    q: float
    d: float = math.nan  # nan: 2a
    e: float = 0.0
    w: float = 1.0

    def __post_init__(self):
        if math.isnan(self.d):
            object.__setattr__(self, 'd', 2.0 * self.a)

    def prefill_s(self, n_prompt: float, cached: float = 0.0) -> float:
        """Prefill of an ``n_prompt``-token prompt whose first ``cached`` tokens are cached."""
        m = min(max(float(cached), 0.0), float(n_prompt))
        n = float(n_prompt) - m
        cold = self.a * n * n + self.b * n + self.c
        if m <= 0:
            return cold
        return self.w * (cold + self.d * n * m + self.e * m)

    def scaled(
        self, prefill: float = 1.0, decode: float = 1.0, warm: float = 1.0
    ) -> 'ExecutionTimeModel':
        """Return the same shape, prefill and decode times multiplied (online recalibration)."""
        return ExecutionTimeModel(
            a=self.a * prefill,
            b=self.b * prefill,
            c=self.c * prefill,
            p=self.p * decode,
            q=self.q * decode,
            d=self.d * prefill,
            e=self.e * prefill,
            w=self.w * warm,
        )

    def decode_step_s(self, n_kv: float) -> float:
        return self.p * float(n_kv) + self.q

    def decode_s(self, n_prompt: float, alpha: float, n_out: int) -> float:
        """
        Estimate the time of the ``n_out - 1`` decode steps after a prefill of ``n_prompt``.

        The cache was evicted by ``alpha``.
        """
        return decode_sum_s(
            self.p, self.q, (1.0 - alpha) * float(n_prompt), max(int(n_out) - 1, 0)
        )

    def wcet_s(
        self,
        n_prompt: float,
        alpha: float,
        n_hat: float,
        k: float = 5.0,
        n_max: int = 8192,
        predict_s: float = 0.0,
        cached: float = 0.0,
    ) -> float:
        """
        Estimate the worst-case time of a whole request.

        Prefill (or the predictor, if slower) + decode of N̂_W tokens.

        The length predictor runs beside prefill, so it only costs time when it finishes later.
        """
        return max(self.prefill_s(n_prompt, cached), float(predict_s)) + self.decode_s(
            n_prompt, alpha, wcet_length(n_hat, k, n_max)
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'ExecutionTimeModel':
        extra = {k: float(d[k]) for k in ('d', 'e', 'w') if d.get(k) is not None}
        return cls(**{k: float(d[k]) for k in ('a', 'b', 'c', 'p', 'q')}, **extra)


def wcet_length(n_hat: float, k: float = 5.0, n_max: int = 8192) -> int:
    """
    N̂_W = min(⌈k·N̂⌉, N_max): the pessimistic answer length the budget must cover.

    Rounded up so a fractional k never makes the bound shorter than k·N̂.
    """
    if n_hat < 0 or k < 0 or n_max < 0:
        raise ValueError(f'n_hat, k and n_max must be >= 0, got {n_hat}, {k}, {n_max}')
    return int(min(math.ceil(k * n_hat - 1e-9), n_max))


def decode_sum_s(p: float, q: float, kv0: float, n_steps: int) -> float:
    """Σ_{i=1..n_steps} p·(kv0 + i − 1) + q, in closed form (the solver needs it linear in kv0)."""
    m = max(int(n_steps), 0)
    return m * (p * kv0 + q) + p * m * (m - 1) / 2.0


# ------------------------------------------------------------------------------------------
# fitting
def _lstsq(design: np.ndarray, t: np.ndarray, relative: bool) -> np.ndarray:
    if relative:  # minimise relative residuals: the budget cares about % error at every length
        w = 1.0 / t
        design, t = design * w[:, None], t * w
    coef, *_ = np.linalg.lstsq(design, t, rcond=None)
    return coef


def _check_xy(x: Sequence[float], t: Sequence[float], min_points: int, what: str):
    x, t = np.asarray(x, dtype=float), np.asarray(t, dtype=float)
    if x.shape != t.shape or x.ndim != 1:
        raise ValueError(
            f'{what}: lengths and times must be 1-D and equally long, got {x.shape} and {t.shape}'
        )
    if np.unique(x).size < min_points:
        raise ValueError(
            f'{what}: need at least {min_points} distinct lengths, got {np.unique(x).size}'
        )
    if np.any(t <= 0) or not np.all(np.isfinite(t)):
        raise ValueError(f'{what}: times must be positive and finite')
    return x, t


def fit_prefill(
    n: Sequence[float], t: Sequence[float], relative: bool = True
) -> tuple[float, float, float]:
    """Least-squares (a, b, c) of t = a·N² + b·N + c; relative residuals by default."""
    n, t = _check_xy(n, t, 3, 'prefill fit')
    a, b, c = _lstsq(np.stack([n * n, n, np.ones_like(n)], axis=1), t, relative)
    return float(a), float(b), float(c)


def fit_decode(
    n_kv: Sequence[float], t: Sequence[float], relative: bool = True
) -> tuple[float, float]:
    """Least-squares (p, q) of t = p·N_kv + q; relative residuals by default."""
    n, t = _check_xy(n_kv, t, 2, 'decode fit')
    p, q = _lstsq(np.stack([n, np.ones_like(n)], axis=1), t, relative)
    return float(p), float(q)


def fit_prefill_cached(
    base: ExecutionTimeModel,
    n_prompt: Sequence[float],
    cached: Sequence[float],
    t: Sequence[float],
    relative: bool = True,
) -> tuple[float, float]:
    """
    Least-squares (d, e) of the warm prefill, the cold coefficients (a, b, c) held fixed.

    t − (a·n² + b·n + c) = d·n·m + e·m, with n new tokens after m cached ones.
    """
    big_n = np.asarray(n_prompt, dtype=float)
    m = np.asarray(cached, dtype=float)
    t = np.asarray(t, dtype=float)
    if not (big_n.shape == m.shape == t.shape) or big_n.ndim != 1:
        raise ValueError('warm prefill fit: lengths, cached lengths and times must match')
    if np.unique(m).size < 2 or np.any(m <= 0) or np.any(m >= big_n):
        raise ValueError('warm prefill fit: needs >= 2 distinct cached lengths, 0 < m < N')
    if np.any(t <= 0) or not np.all(np.isfinite(t)):
        raise ValueError('warm prefill fit: times must be positive and finite')
    n = big_n - m
    resid = t - (base.a * n * n + base.b * n + base.c)
    design = np.stack([n * m, m], axis=1)
    if relative:
        w = 1.0 / t
        design, resid = design * w[:, None], resid * w
    (d, e), *_ = np.linalg.lstsq(design, resid, rcond=None)
    return float(d), float(e)


def fit_model(
    prefill_n, prefill_t, decode_n, decode_t, relative: bool = True
) -> ExecutionTimeModel:
    a, b, c = fit_prefill(prefill_n, prefill_t, relative)
    p, q = fit_decode(decode_n, decode_t, relative)
    return ExecutionTimeModel(a, b, c, p, q)


def mape(measured: Sequence[float], predicted: Sequence[float]) -> float:
    """Mean absolute percentage error, in percent, relative to the measured values."""
    m, p = np.asarray(measured, dtype=float), np.asarray(predicted, dtype=float)
    if m.shape != p.shape or m.size == 0:
        raise ValueError(
            f'mape needs two equally long non-empty arrays, got {m.shape} and {p.shape}'
        )
    if np.any(m == 0):
        raise ValueError('mape is undefined for a measured value of 0')
    return float(np.mean(np.abs((p - m) / m)) * 100.0)


# ------------------------------------------------------------------------------- FLOPs cross-check
_UNGATED_MLP = ('gpt2', 'gpt_neox', 'gptj', 'opt', 'bloom', 'falcon', 'phi', 'starcoder2')


def flops_coefficients(config: Any, logits_kept: int = 1) -> dict:
    """
    Per-term FLOP counts of a decoder-only transformer, matching the ETE's terms.

    A fitted coefficient ratio far from its FLOPs ratio (or of the wrong sign) flags a bad fit.
    The prefill quadratic assumes a causal kernel (N²/2 query-key pairs); the constant terms
    (c, and q's launch overheads) are not FLOPs and are left out.
    """
    cfg = config.get_text_config(decoder=True) if hasattr(config, 'get_text_config') else config
    d = int(cfg.hidden_size)
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, 'num_key_value_heads', None) or heads)
    head_dim = int(getattr(cfg, 'head_dim', None) or d // heads)
    d_ff = int(getattr(cfg, 'intermediate_size', None) or 4 * d)
    vocab = int(cfg.vocab_size)
    gated = getattr(cfg, 'model_type', '') not in _UNGATED_MLP
    proj = 2 * d * heads * head_dim * 2 + 2 * d * kv_heads * head_dim * 2  # q,o + k,v
    mlp = 2 * d * d_ff * (3 if gated else 2)
    per_token = layers * (proj + mlp)
    attn_pair = layers * heads * head_dim * 4  # QKᵀ and A·V: 2 FLOPs per multiply-add, each
    head = 2 * d * vocab
    return {
        'prefill_quadratic': attn_pair / 2.0,  # a: causal, N²/2 pairs
        'prefill_linear': float(per_token),  # b
        'prefill_const': float(head * logits_kept),  # c: the LM head on the kept positions
        'decode_per_kv': float(attn_pair),  # p
        'decode_const': float(per_token + head),  # q
    }


def flops_ratios(config: Any) -> dict:
    """FLOPs-predicted a/b and p/q (1/token); compare with :func:`fitted_ratios`."""
    f = flops_coefficients(config)
    return {
        'prefill_a_over_b': f['prefill_quadratic'] / f['prefill_linear'],
        'decode_p_over_q': f['decode_per_kv'] / f['decode_const'],
    }


def fitted_ratios(model: ExecutionTimeModel) -> dict:
    return {
        'prefill_a_over_b': model.a / model.b if model.b else math.inf,
        'decode_p_over_q': model.p / model.q if model.q else math.inf,
    }


# ------------------------------------------------------------------------------
# served vs predicted
def served_errors(
    model: ExecutionTimeModel,
    n_prompt: int,
    kv_after: int,
    prefill_s: float,
    decode_step_s: Sequence[float],
    cached: int = 0,
) -> dict:
    """
    Estimator error on one served request (from a GenerationResult's recorded timings).

    Step j (0-based) of the engine's decode list read ``kv_after + j`` cached entries;
    ``cached`` prompt tokens came from the prefix cache (a warm prefill).
    """
    steps = np.asarray(decode_step_s, dtype=float)
    pred_steps = model.p * (kv_after + np.arange(steps.size)) + model.q
    pred_prefill = model.prefill_s(n_prompt, cached)
    out = {
        'prefill_pred_s': pred_prefill,
        'prefill_s': float(prefill_s),
        'prefill_ape': abs(pred_prefill - prefill_s) / prefill_s * 100.0
        if prefill_s > 0
        else math.nan,
        'decode_pred_s': float(pred_steps.sum()),
        'decode_s': float(steps.sum()),
        'decode_step_mape': mape(steps, pred_steps)
        if steps.size and np.all(steps > 0)
        else math.nan,
    }
    out['decode_ape'] = (
        abs(out['decode_pred_s'] - out['decode_s']) / out['decode_s'] * 100.0
        if out['decode_s'] > 0
        else math.nan
    )
    return out
