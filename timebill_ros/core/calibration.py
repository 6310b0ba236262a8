"""
Calibration: measure this machine, fit the ETE, and keep the result as a keyed profile.

Timings only hold for the model, dtype, device, thread count and library versions they
were measured with, so a profile carries that key and is refused for any other engine.
Accuracy is judged on held-out lengths only: the fit points say nothing about interpolation.

With a prefix cache a goal copies its cached prefix and computes only the rest: the warm
prefill of N tokens whose first m are cached is timed on a grid of (N, m) and fitted as
``a·n² + b·n + c + d·n·m + e·m`` (n = N − m) with the cold (a, b, c) held fixed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
import hashlib
import json
import math
import os
from pathlib import Path
import random
import re
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .config import cache_dir
from .errors import ProfileMismatchError
from .time_estimator import (
    ExecutionTimeModel,
    fit_decode,
    fit_prefill,
    fit_prefill_cached,
    fitted_ratios,
    flops_ratios,
    mape,
)

PROFILE_VERSION = 1
STATISTICS = ('min', 'median')

# SmolLM2-135M, fp32, 2 CPU threads: ~5 min in all. Held-out lengths sit between grid points.
PREFILL_GRID = (32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
PREFILL_HELD_OUT = (96, 320, 640, 1280, 2560)
DECODE_GRID = (32, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 5120, 6144, 7168, 8190)
DECODE_HELD_OUT = (192, 768, 1792, 3584, 5632, 7680)
# --quick: seconds, for tests and smoke runs; says nothing about accuracy
QUICK_PREFILL_GRID = (16, 32, 64, 128)
QUICK_PREFILL_HELD_OUT = (48, 96)
QUICK_DECODE_GRID = (16, 64, 128, 256)
QUICK_DECODE_HELD_OUT = (96, 192)
# Warm prefill (prefix cache): (N, m) = N prompt tokens, the first m (whole 64-token blocks)
# cached. m = N/2 (many new tokens attend to the cached ones: d) and m = N − 128 (a question
# after a standing context: the copy-in and the press's window scores over every cached key, e).
# The cached prefixes are one random sequence primed once; at most WARM_REPEATS passes: ~2 min
# on 2 quiet cores (4 min at 2 passes, 1 thread, on a shared 2-core machine where a cold 4k
# prefill took 73 s), half of it the (4096, 2048) point.
WARM_GRID = tuple((n, m) for n in (512, 1024, 2048, 4096) for m in (n // 2, n - 128))
WARM_HELD_OUT = ((768, 640), (1536, 768), (3072, 2944))
QUICK_WARM_GRID = ((192, 64), (256, 128))
QUICK_WARM_HELD_OUT = ((256, 64),)
WARM_REPEATS = 3


@dataclass
class Measurement:
    n: int  # prompt length (prefill) or KV length (decode)
    samples: List[float]  # seconds, warm-up runs excluded
    held_out: bool = False
    cached: int = 0  # warm prefill: prompt tokens copied from the prefix cache (0: cold)

    def value(self, statistic: str = 'min') -> float:
        return summarize(self.samples, statistic)


def summarize(samples: Sequence[float], statistic: str = 'min') -> float:
    """
    Reduce the repeats to one number per length.

    ``min`` by default: on a shared machine interference only ever adds time, so the minimum is
    the reproducible cost of the work; the median drifts with whatever else runs. Pessimism k,
    not the statistic, buys the safety margin.
    """
    if statistic not in STATISTICS:
        raise ValueError(f'statistic must be one of {STATISTICS}, got {statistic!r}')
    if not samples:
        raise ValueError('no samples')
    return float(np.min(samples) if statistic == 'min' else np.median(samples))


@dataclass
class Profile:
    key: Dict[str, str]
    model: ExecutionTimeModel
    statistic: str
    prefill: List[Measurement]
    decode: List[Measurement]
    mape: Dict[str, float]  # held-out points only, percent
    fit_mape: Dict[str, float]  # fit points (how well the curve shape matches, not accuracy)
    flops_ratios: Dict[str, float] = field(default_factory=dict)
    fitted_ratios: Dict[str, float] = field(default_factory=dict)
    repeats: int = 0
    decode_repeats: int = 0
    warmup: int = 0
    created: str = ''
    duration_s: float = 0.0
    # 1-min load at start and end: was the machine shared?
    load_avg: List[float] = field(default_factory=list)
    # warm prefills (prefix cache), fitted as d, e in ``model``; empty: not measured (d = 2a)
    warm: List[Measurement] = field(default_factory=list)
    warm_note: str = ''  # how (d, e) came about when the plain least squares was not kept

    def to_dict(self) -> dict:
        d = asdict(self)
        d['model'] = self.model.to_dict()
        d['version'] = PROFILE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'Profile':
        d = dict(d)
        version = d.pop('version', None)
        if version != PROFILE_VERSION:
            raise ValueError(
                f'profile format version {version} is not '
                f'{PROFILE_VERSION}: re-run `timebill calibrate`'
            )
        d['model'] = ExecutionTimeModel.from_dict(d['model'])
        d['prefill'] = [Measurement(**m) for m in d['prefill']]
        d['decode'] = [Measurement(**m) for m in d['decode']]
        d['warm'] = [Measurement(**m) for m in d.get('warm') or []]
        return cls(**d)


# ----------------------------------------------------------------------------------- fit (pure)
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


# --------------------------------------------------------------------------------- measurement
def _lengths(grid: Sequence[int], held_out: Sequence[int], limit: int, what: str):
    grid = sorted({int(n) for n in grid})
    held_out = sorted({int(n) for n in held_out})
    both = set(grid) & set(held_out)
    if both:
        raise ValueError(
            f'{what}: held-out lengths {sorted(both)} are '
            f'also grid points; a held-out point must be unseen'
        )
    bad = [n for n in grid + held_out if not 1 <= n <= limit]
    if bad:
        raise ValueError(f"{what}: lengths {bad} outside 1..{limit} (the model's context)")
    return grid, held_out


def _warm_points(
    grid: Sequence[Sequence[int]],
    held_out: Sequence[Sequence[int]],
    limit: int,
    block: int,
    tail: int,
) -> Tuple[list, list]:
    """
    Check the warm (N, m) points; return them sorted, as tuples.

    m must be whole cache blocks (a hit is whole blocks) and leave the last ``tail`` tokens (the
    press's observation window, always recomputed) to compute; the fit needs two cached lengths.
    """
    grid = sorted({(int(n), int(m)) for n, m in grid})
    held_out = sorted({(int(n), int(m)) for n, m in held_out})
    if not grid and not held_out:
        return [], []
    both = set(grid) & set(held_out)
    if both:
        raise ValueError(
            f'warm prefill: held-out points {sorted(both)} are also grid points; '
            'a held-out point must be unseen'
        )
    bad = [(n, m) for n, m in grid + held_out if not 1 <= n <= limit]
    if bad:
        raise ValueError(f"warm prefill: N of {bad} outside 1..{limit} (the model's context)")
    bad = [(n, m) for n, m in grid + held_out if m <= 0 or m % block or m > n - tail]
    if bad:
        raise ValueError(
            f'warm prefill: cached lengths of {bad} must be whole {block}-token blocks, > 0 '
            f'and at most N - {tail} (the press recomputes the last {tail} tokens)'
        )
    if len({m for _, m in grid}) < 2:
        raise ValueError('warm prefill: the grid needs at least two distinct cached lengths')
    return grid, held_out


def calibrate(
    engine,
    prefill_grid: Sequence[int] = PREFILL_GRID,
    decode_grid: Sequence[int] = DECODE_GRID,
    prefill_held_out: Sequence[int] = PREFILL_HELD_OUT,
    decode_held_out: Sequence[int] = DECODE_HELD_OUT,
    repeats: int = 5,
    decode_repeats: int = 9,
    warmup: int = 1,
    statistic: str = 'min',
    progress: bool = True,
    seed: int = 0,
    warm_grid: Sequence[Sequence[int]] = (),
    warm_held_out: Sequence[Sequence[int]] = (),
    warm_repeats: Optional[int] = None,
) -> Profile:
    """
    Time prefill and single decode steps on ``engine``, fit, score on held-out lengths.

    Lengths are visited in a shuffled order, one repeat per pass, so a burst of load from
    elsewhere lands on a few scattered samples instead of biasing one stretch of lengths.
    ``warm_grid``/``warm_held_out``: (N, m) points of the warm prefill (prefix cache), timed
    ``warm_repeats`` times each (default min(repeats, WARM_REPEATS)) and fitted as (d, e)
    (``WARM_GRID``; empty: not measured, d = 2a).
    """
    from tqdm.auto import tqdm

    summarize([1.0], statistic)  # validate before spending minutes
    if warm_repeats is None:
        warm_repeats = min(repeats, WARM_REPEATS)
    if repeats < 1 or decode_repeats < 1 or warm_repeats < 1 or warmup < 0:
        raise ValueError('repeats, decode_repeats and warm_repeats must be >= 1, warmup >= 0')
    limit = int(engine.max_context) - 1  # a decode step at KV length n needs position n
    pg, ph = _lengths(prefill_grid, prefill_held_out, limit, 'prefill')
    dg, dh = _lengths(decode_grid, decode_held_out, limit, 'decode')
    block = engine.prefix_cache.block_tokens if engine.prefix_cache is not None else 64
    wg, wh = _warm_points(warm_grid, warm_held_out, limit, block, _recomputed_tail(engine))
    rng = random.Random(seed)
    # a decode call refills a whole cache: few calls, several steps each
    rounds = min(3, decode_repeats)
    per_round = [decode_repeats // rounds + (r < decode_repeats % rounds) for r in range(rounds)]
    total = warmup + repeats * (len(pg) + len(ph)) + rounds * (len(dg) + len(dh))
    total += (1 + warm_repeats * (len(wg) + len(wh))) if wg else 0
    bar = tqdm(total=total, desc='calibrate', unit='run', disable=not progress, file=sys.stderr)
    t_start = time.monotonic()
    load_start = _load1()

    pre: Dict[int, List[float]] = {n: [] for n in pg + ph}
    order = list(pre)
    # first calls pay for lazy init and page faults; later shapes need no warm-up of their own
    if warmup:
        bar.set_postfix_str('warm-up')
        engine.time_prefill(pg[len(pg) // 2], warmup)
        bar.update(warmup)
    for _ in range(repeats):
        rng.shuffle(order)
        for n in order:
            bar.set_postfix_str(f'prefill N={n}')
            pre[n].extend(engine.time_prefill(n, 1))
            bar.update()
    dec: Dict[int, List[float]] = {n: [] for n in dg + dh}
    order = list(dec)
    for r in range(rounds):
        rng.shuffle(order)
        for n in order:
            bar.set_postfix_str(f'decode N_kv={n}')
            dec[n].extend(engine.time_decode_step(n, warmup + per_round[r])[warmup:])
            bar.update()
    warm = _time_warm(engine, wg, wh, warm_repeats, rng, bar, block, seed) if wg else []
    bar.close()

    held_p, held_d = set(ph), set(dh)
    return fit_profile(
        engine.profile_key(),
        [Measurement(n, pre[n], n in held_p) for n in sorted(pre)],
        [Measurement(n, dec[n], n in held_d) for n in sorted(dec)],
        statistic=statistic,
        config=engine.model.config,
        warm=warm,
        repeats=repeats,
        decode_repeats=decode_repeats,
        warmup=warmup,
        duration_s=time.monotonic() - t_start,
        load_avg=[load_start, _load1()],
    )


def _recomputed_tail(engine) -> int:
    """Last prompt tokens a warm prefill always computes (the press reads their queries)."""
    if not engine.press.needs_scores:
        return 1
    return max(int(getattr(engine.press, 'window_size', 1) or 1), 1)


def _time_warm(engine, grid, held_out, repeats, rng, bar, block, seed) -> List[Measurement]:
    """
    Time warm prefills: N tokens whose first m come from a prefix cache.

    As requests run them (chunks of ``prefill_chunk``, scores on). One random sequence is primed
    once into a private cache (the engine's own is neither read nor filled); each sample is its
    first m tokens and a fresh random tail, so exactly m tokens are found cached (the tail's
    blocks, cached by every prefill, never match again and are dropped least recently used).
    Priming once matters: priming afresh for every sample would cost more than the sample at
    m = 3968.
    """
    import torch

    from .prefix_cache import PrefixCache

    points = grid + held_out
    vocab = engine.model.config.get_text_config(decoder=True).vocab_size
    g = torch.Generator().manual_seed(seed + 7919)
    top = max(m for _, m in points)
    span = max(n - m for n, m in points)
    mb = (top + 2 * span + 4 * block) * engine.kv_bytes_per_token() / 2**20
    master = torch.randint(3, vocab, (top,), generator=g).tolist()
    samples: Dict[tuple, List[float]] = {p: [] for p in points}
    own = engine.prefix_cache
    engine.prefix_cache = PrefixCache(capacity_mb=mb, block_tokens=block)
    try:
        bar.set_postfix_str(f'prime {top} tokens')
        engine.prefill(master, chunk_tokens=engine.prefill_chunk, prime='calibrate-warm')
        bar.update()
        order = list(points)
        for _ in range(repeats):
            rng.shuffle(order)
            for n, m in order:
                bar.set_postfix_str(f'warm prefill N={n} m={m}')
                ids = master[:m] + torch.randint(3, vocab, (n - m,), generator=g).tolist()
                state = engine.prefill(ids, capacity=n + 1, chunk_tokens=engine.prefill_chunk)
                if state.cached_tokens != m:
                    raise RuntimeError(
                        f'warm prefill N={n}: {state.cached_tokens} tokens came from the '
                        f'prefix cache, not {m}'
                    )
                samples[n, m].append(state.prefill_s)
                bar.update()
    finally:
        engine.prefix_cache = own
    held = set(held_out)
    return [Measurement(n, samples[n, m], (n, m) in held, m) for n, m in sorted(samples)]


def _load1() -> float:
    try:
        return float(os.getloadavg()[0])
    except OSError:  # not available on this platform
        return math.nan


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


# ------------------------------------------------------------------------------ keyed storage
def default_profile_path(key: Mapping[str, str]) -> Path:
    """``<cache>/profiles/<model>-<dtype>-<device>-t<threads>-<hash of the whole key>.json``."""
    digest = hashlib.sha1(
        json.dumps({k: str(v) for k, v in key.items()}, sort_keys=True).encode()
    ).hexdigest()[:10]
    model = re.sub(r'[^A-Za-z0-9._-]+', '_', Path(str(key.get('model', 'model'))).name or 'model')
    name = (
        f'{model}-{key.get("dtype", "")}-{key.get("device", "")}-t{key.get("threads", "")}'
        f'-{digest}.json'
    )
    return cache_dir() / 'profiles' / re.sub(r'[^A-Za-z0-9._-]+', '_', name)


def check_key(
    profile_key: Mapping[str, str], running_key: Mapping[str, str], source: str = ''
) -> None:
    """Refuse a profile measured for another setup, naming every field that differs."""
    fields = sorted(set(profile_key) | set(running_key))
    diffs = [
        f'{f}: profile {profile_key.get(f, "<missing>")!r} '
        f'vs engine {running_key.get(f, "<missing>")!r}'
        for f in fields
        if str(profile_key.get(f, '<missing>')) != str(running_key.get(f, '<missing>'))
    ]
    if diffs:
        where = f' {source}' if source else ''
        raise ProfileMismatchError(
            f'timing profile{where} was measured for a different '
            f'setup ({"; ".join(diffs)}); its timings do not '
            f'hold for this engine: run `timebill calibrate` with this configuration'
        )


def save_profile(profile: Profile, path: Optional[Path] = None) -> Path:
    path = Path(path) if path else default_profile_path(profile.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(json.dumps(profile.to_dict(), indent=1))
    tmp.replace(path)
    return path


def load_profile(path: Path | str, running_key: Optional[Mapping[str, str]] = None) -> Profile:
    """Read a profile; with ``running_key``, refuse it unless it was measured for that setup."""
    path = Path(path)
    profile = Profile.from_dict(json.loads(path.read_text()))
    if running_key is not None:
        check_key(profile.key, running_key, source=str(path))
    return profile


def load_profile_for(running_key: Mapping[str, str], path: Optional[Path | str] = None) -> Profile:
    """Load this engine's profile: ``path`` (config ``profile_path``) or the keyed default."""
    path = Path(path).expanduser() if path else default_profile_path(running_key)
    if not path.is_file():
        raise FileNotFoundError(
            f'no timing profile at {path} for this setup: run `timebill calibrate` first'
        )
    return load_profile(path, running_key)


def key_from_config(cfg) -> Dict[str, str]:
    """
    Return the key ``Engine.from_config(cfg).profile_key()`` will have, without the model.

    Lets a process that holds no engine (the predictor node) find and check the profile.
    """
    import torch
    import transformers

    from .fast_decode import decode_step_name
    from .model import DTYPES
    from .weights import effective_format

    device = str(torch.device(cfg.device))
    if device == 'cuda':  # parameters live on an indexed device
        device = 'cuda:0'
    return {
        'model': str(cfg.model),
        'dtype': DTYPES.get(cfg.dtype, cfg.dtype),
        'device': device,
        'threads': str(cfg.threads if cfg.threads > 0 else torch.get_num_threads()),
        'torch': torch.__version__,
        'transformers': transformers.__version__,
        'press': str(cfg.press),
        'preallocate': 'True',
        'weights': effective_format(cfg.weights, device),
        'decode_step': decode_step_name(cfg.model, cfg.weights, device),
    }


def load_time_model(
    cfg, running_key: Optional[Mapping[str, str]] = None
) -> Optional[ExecutionTimeModel]:
    """
    Load the calibrated ETE for ``cfg`` (key-checked); None when no profile was ever written.

    A profile that exists but was measured for another setup raises ProfileMismatchError.
    """
    key = dict(running_key) if running_key is not None else key_from_config(cfg)
    path = Path(cfg.profile_path).expanduser() if cfg.profile_path else default_profile_path(key)
    if not path.is_file():
        return None
    return load_profile(path, key).model


# Coefficients fitted to SmolLM2-135M, fp32, on the
# project's 2-core CPU while it was busy (load ~7,
# 1 thread): pessimistic on purpose; used only until `timebill calibrate` writes a profile.
FALLBACK_TIME_MODEL = {'a': 4.9e-7, 'b': 2.7e-3, 'c': 0.08, 'p': 1.15e-5, 'q': 0.10}


def time_model_for(cfg, running_key: Optional[Mapping[str, str]] = None, log=print):
    """
    Return (model, source) for every user of a time model, saying why.

    The calibrated, key-checked profile ("profile"), else the built-in pessimistic coefficients
    ("fallback").
    """
    try:
        model = load_time_model(cfg, running_key)
        if model is not None:
            return model, 'profile'
        log(
            'no timing profile for this setup (run `timebill '
            'calibrate`); using built-in SmolLM2/CPU coefficients'
        )
    except Exception as exc:  # noqa: BLE001 - a stale profile must not take a node down
        log(f'timing profile unusable: {exc}; using built-in SmolLM2/CPU coefficients')
    return ExecutionTimeModel.from_dict(FALLBACK_TIME_MODEL), 'fallback'


# ------------------------------------------------------------------------------------- report
def _errors(ms: Sequence[Measurement], predict, statistic: str):
    return [(m.n, m.value(statistic), predict(m.n), m.held_out) for m in ms]


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


def write_plot(profile: Profile, path: Path) -> Path:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    m = profile.model
    cols = 3 if profile.warm else 2
    fig, axes = plt.subplots(
        2, cols, figsize=(5.5 * cols, 7), sharex='col', gridspec_kw={'height_ratios': [3, 1.3]}
    )
    for col, (name, ms, predict, xlabel, unit, scale) in enumerate(
        (
            ('prefill', profile.prefill, m.prefill_s, 'prompt length N (tokens)', 's', 1.0),
            ('decode step', profile.decode, m.decode_step_s, 'KV-cache length N_kv', 'ms', 1e3),
        )
    ):
        rows = _errors(ms, predict, profile.statistic)
        xs = np.linspace(0, max(r[0] for r in rows) * 1.02, 300)
        top, bot = axes[0, col], axes[1, col]
        top.plot(xs, [predict(x) * scale for x in xs], '-', color='tab:blue', lw=1.2, label='fit')
        for held, style, label in (
            (False, {'marker': 'o', 'color': 'tab:blue', 'ls': ''}, 'fit points'),
            (True, {'marker': 'x', 'color': 'tab:red', 'ls': '', 'ms': 9, 'mew': 2}, 'held out'),
        ):
            sel = [r for r in rows if r[3] == held]
            if sel:
                top.plot([r[0] for r in sel], [r[1] * scale for r in sel], label=label, **style)
                bot.plot([r[0] for r in sel], [(r[2] - r[1]) / r[1] * 100 for r in sel], **style)
        key = 'prefill' if col == 0 else 'decode'
        top.set_title(f'{name}: held-out MAPE {profile.mape[key]:.2f}%')
        top.set_ylabel(f'{profile.statistic} time ({unit})')
        top.legend()
        top.grid(alpha=0.3)
        bot.axhline(0, color='gray', lw=0.8)
        bot.set_ylabel('fit error (%)')
        bot.set_xlabel(xlabel)
        bot.grid(alpha=0.3)
    if profile.warm:
        _plot_warm(profile, axes[0, 2], axes[1, 2])
    k = profile.key
    fig.suptitle(
        f'ETE calibration: {k.get("model")} {k.get("dtype")} '
        f'{k.get("device")} threads={k.get("threads")}'
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _warm_errors(profile: Profile):
    m = profile.model
    return [
        (w.n, w.cached, w.value(profile.statistic), m.prefill_s(w.n, w.cached), w.held_out)
        for w in profile.warm
    ]


def _plot_warm(profile: Profile, top, bot) -> None:
    """Warm prefill panel: measured points, the fit along m = N/2 and m = N − 128, cold."""
    from matplotlib.ticker import FormatStrFormatter

    m = profile.model
    rows = _warm_errors(profile)
    xs = np.linspace(256, max(r[0] for r in rows) * 1.02, 200)
    top.plot(xs, [m.prefill_s(x) for x in xs], '--', color='gray', lw=1, label='cold fit')
    for frac, style, label in (
        (lambda x: x / 2, '-', 'fit, m = N/2'),
        (lambda x: x - 128, ':', 'fit, m = N − 128'),
    ):
        top.plot(xs, [m.prefill_s(x, frac(x)) for x in xs], style, color='tab:blue', lw=1.2,
                 label=label)
    for held, style, label in (
        (False, {'marker': 'o', 'color': 'tab:blue', 'ls': ''}, 'fit points'),
        (True, {'marker': 'x', 'color': 'tab:red', 'ls': '', 'ms': 9, 'mew': 2}, 'held out'),
    ):
        sel = [r for r in rows if r[4] == held]
        if sel:
            top.plot([r[0] for r in sel], [r[2] for r in sel], label=label, **style)
            bot.plot([r[0] for r in sel], [(r[3] - r[2]) / r[2] * 100 for r in sel], **style)
    top.set_yscale('log')
    top.yaxis.set_major_formatter(FormatStrFormatter('%g'))
    top.yaxis.set_minor_formatter(FormatStrFormatter('%g'))
    top.set_title(
        f'warm prefill (prefix cache): held-out MAPE {profile.mape.get("warm", math.nan):.2f}%'
    )
    top.set_ylabel(f'{profile.statistic} time (s, log)')
    top.legend(fontsize=8)
    top.grid(alpha=0.3, which='both')
    bot.axhline(0, color='gray', lw=0.8)
    bot.set_ylabel('fit error (%)')
    bot.set_xlabel('prompt length N (m of it cached)')
    bot.grid(alpha=0.3)


def report_markdown(profile: Profile) -> str:
    m, k = profile.model, profile.key
    lines = [
        '# ETE calibration',
        '',
        'Key: ' + ', '.join(f'`{f}={v}`' for f, v in k.items()),
        '',
        f'Statistic per length: **{profile.statistic}** of '
        f'{profile.repeats} prefill / {profile.decode_repeats} decode '
        + (f'/ {min(len(w.samples) for w in profile.warm)} warm prefill ' if profile.warm else '')
        + f'samples after {profile.warmup} warm-up; '
        f'{profile.duration_s:.0f} s in all; 1-min load average '
        f'{" -> ".join(f"{x:.2f}" for x in profile.load_avg) or "n/a"} on {os.cpu_count()} CPUs.',
        '',
        '| model | coefficients |',
        '|---|---|',
        f'| prefill t = a·N² + b·N + c | a = {m.a:.4e} s, b = {m.b:.4e} s, c = {m.c:.4e} s |',
        f'| decode step t = p·N_kv + q | p = {m.p:.4e} s, q = {m.q:.4e} s |',
    ]
    if profile.warm:
        lines.append(
            f'| warm prefill, m of N cached, n = N − m: a·n² + b·n + c + d·n·m + e·m '
            f'| d = {m.d:.4e} s ({m.d / (2 * m.a) if m.a else math.nan:.2f} × 2a), '
            f'e = {m.e:.4e} s |'
        )
    else:
        lines.append(f'| warm prefill (not measured) | d = 2a = {m.d:.4e} s, e = {m.e:.4e} s |')
    lines += [
        '',
        '| MAPE (%) | held-out | fit points |',
        '|---|---|---|',
        f'| prefill | {profile.mape["prefill"]:.3f} | {profile.fit_mape["prefill"]:.3f} |',
        f'| decode step | {profile.mape["decode"]:.3f} | {profile.fit_mape["decode"]:.3f} |',
    ]
    if profile.warm:
        lines.append(
            f'| warm prefill | {profile.mape.get("warm", math.nan):.3f} '
            f'| {profile.fit_mape.get("warm", math.nan):.3f} |'
        )
    lines.append('')
    if profile.warm_note:
        lines += [f'Warm fit: {profile.warm_note}.', '']
    if profile.flops_ratios:
        lines += ['| ratio (1/token) | FLOPs | fitted | fitted / FLOPs |', '|---|---|---|---|']
        for r in ('prefill_a_over_b', 'decode_p_over_q'):
            f, g = profile.flops_ratios[r], profile.fitted_ratios[r]
            lines.append(f'| {r} | {f:.3e} | {g:.3e} | {g / f:.2f} |')
        lines += [
            '',
            'FLOPs ratios assume every FLOP costs the same; on CPU attention and small GEMMs run '
            'less efficiently than the big projections, '
            'so a factor of a few is normal, a sign flip '
            'or orders of magnitude is a bad fit.',
            '',
        ]
    slopes = decode_slopes(profile)
    if slopes:
        lines += [
            f'Decode linearity: p = {slopes[0]:.3e} s below '
            f'N_kv = {slopes[2]}, {slopes[1]:.3e} s above '
            f'(ratio {slopes[1] / slopes[0]:.2f}; 1 for a linear step).',
            '',
        ]
    for name, ms, predict in (
        ('prefill', profile.prefill, m.prefill_s),
        ('decode step', profile.decode, m.decode_step_s),
    ):
        lines += [
            f'## {name}',
            '',
            '| N | measured (ms) | fitted (ms) | error (%) | held out |',
            '|---|---|---|---|---|',
        ]
        for n, meas, pred, held in _errors(ms, predict, profile.statistic):
            lines.append(
                f'| {n} | {meas * 1e3:.2f} | {pred * 1e3:.2f} '
                f'| {(pred - meas) / meas * 100:+.2f} | '
                f'{"yes" if held else ""} |'
            )
        lines.append('')
    if profile.warm:
        lines += [
            '## warm prefill (prefix cache)',
            '',
            '| N | cached m | computed N − m | measured (ms) | fitted (ms) | error (%) '
            '| held out |',
            '|---|---|---|---|---|---|---|',
        ]
        for n, cached, meas, pred, held in _warm_errors(profile):
            lines.append(
                f'| {n} | {cached} | {n - cached} | {meas * 1e3:.2f} | {pred * 1e3:.2f} '
                f'| {(pred - meas) / meas * 100:+.2f} | {"yes" if held else ""} |'
            )
        lines.append('')
    return '\n'.join(lines)


def write_report(
    profile: Profile, out_dir: Path | str, stem: str = 'calibration'
) -> Dict[str, Path]:
    """``<stem>.json`` (the profile), ``<stem>.md`` and ``<stem>.png`` (measured vs fitted)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        'json': save_profile(profile, out / f'{stem}.json'),
        'md': out / f'{stem}.md',
        'png': out / f'{stem}.png',
    }
    paths['md'].write_text(report_markdown(profile))
    write_plot(profile, paths['png'])
    return paths
