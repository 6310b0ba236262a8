"""
Calibration runs: time prefills and decode steps on this machine, then fit a profile.

The grids say which lengths are timed; held-out lengths sit between grid points and are only
scored, never fitted. Timings are taken as requests run: chunked prefill with the press's score
collection on, a decode step on a cache whose memory was written.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .fit import fit_profile
from .store import Measurement, Profile, profile_key, summarize
from .. import kv_cache
from ..prefix_cache import PrefixCache

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
        time_prefill(engine, pg[len(pg) // 2], warmup)
        bar.update(warmup)
    for _ in range(repeats):
        rng.shuffle(order)
        for n in order:
            bar.set_postfix_str(f'prefill N={n}')
            pre[n].extend(time_prefill(engine, n, 1))
            bar.update()
    dec: Dict[int, List[float]] = {n: [] for n in dg + dh}
    order = list(dec)
    for r in range(rounds):
        rng.shuffle(order)
        for n in order:
            bar.set_postfix_str(f'decode N_kv={n}')
            dec[n].extend(time_decode_step(engine, n, warmup + per_round[r])[warmup:])
            bar.update()
    warm = _time_warm(engine, wg, wh, warm_repeats, rng, bar, block, seed) if wg else []
    bar.close()

    held_p, held_d = set(ph), set(dh)
    return fit_profile(
        profile_key(engine),
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


@torch.inference_mode()
def time_prefill(engine, n_tokens: int, repeats: int = 3) -> List[float]:
    """
    Time a cold prefill of ``n_tokens`` (random ids) on ``engine`` as requests run it.

    Wall time, with score collection on, in chunks of the engine's ``prefill_chunk`` tokens; the
    prefix cache is neither used nor filled (``_time_warm`` times warm prefills).
    """
    vocab = engine.model.config.get_text_config(decoder=True).vocab_size
    g = torch.Generator().manual_seed(n_tokens)
    out = []
    for _ in range(repeats):
        ids = torch.randint(3, vocab, (n_tokens,), generator=g).tolist()
        state = engine.prefill(
            ids, capacity=n_tokens + 1, chunk_tokens=engine.prefill_chunk, prefix=False
        )
        out.append(state.prefill_s)
    return out


@torch.inference_mode()
def time_decode_step(engine, n_kv: int, repeats: int = 5) -> List[float]:
    """
    Return the wall time of one decode step on ``engine`` with ``n_kv`` entries cached.

    The cache is written first: buffers never written are pages the kernel has not backed
    yet, which all read as one zero page from cache, and under-reported decode at 8k KV by
    ~30 %. Random values cost the same to read as real ones (checked by bench_engine.py).
    """
    cfg = engine.model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    like = torch.zeros(
        1, cfg.num_key_value_heads, 1, head_dim, dtype=engine.model.dtype, device=engine.device
    )
    cache = kv_cache.make_cache(
        engine.num_layers, n_kv + 1, preallocate=True, dtype=getattr(engine, 'kv_dtype', None)
    )
    gen = torch.Generator(device=engine.device).manual_seed(n_kv)
    for layer in cache.layers:
        layer.fill_random(n_kv, like, generator=gen)
    out = []
    for _ in range(repeats):
        for layer in cache.layers:
            layer.crop(n_kv)
        t0 = time.monotonic()
        int(torch.argmax(engine.step(5, n_kv, cache)))
        out.append(time.monotonic() - t0)
    return out
