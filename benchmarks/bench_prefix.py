#!/usr/bin/env python
"""
Prefix KV cache benchmark: time to first token with a standing context cold, warm and primed.

A robot's planner asks many short questions about one long standing context (a scene: rooms,
objects with ids, colours and positions, and an event log). For contexts of about 1k, 4k and 8k
tokens (SmolLM2-135M-Instruct through the default config, core only, no ROS) and questions of
20-60 tokens appended after the context:

- **cold**: ``prefill(prefix=False)``, the whole prompt computed;
- **warm**: an earlier goal with the same context and another question cached it (every prefill
  caches its whole 64-token blocks); the goal copies the cached prefix and computes the rest;
- **primed**: the context was primed first (``prime=``), then the goal.

Time to first token (TTFT) = the prefill call + the argmax of its logits (the first token);
end to end = TTFT + greedy decoding to EOS or 64 tokens. Also: the memory the prefix cache holds,
the tokens a goal took from it, where the warm time goes (copy-in of the cached KV, the model
calls on the tokens left: the question, the template's closing tokens and the context tail the
press's observation window makes the goal recompute, caching the new blocks), and whether the
warm greedy answer is the cold one token for token at α = 0 and at α = 0.5 (both paths evicted
with the default press before decoding).

Prints a table; writes ``results/bench_prefix/bench_prefix.json`` and ``.png`` (with matplotlib).
``--quick`` runs the 4k case only with few repeats; its last line is
``cold_ttft_s=<x> warm_ttft_s=<y> identical=<True|False>``. Timings are minima over repeats
(interference from other processes only ever adds time); the load average is recorded.

    .venv/bin/python benchmarks/bench_prefix.py [--quick] [--sizes 1024,4096,7680] [--repeats 3]
"""

from __future__ import annotations

import argparse
import cProfile
import json
from pathlib import Path
import pstats
import sys
import time

from timebill_ros.core.calibration.store import profile_key
from timebill_ros.core.config import default_config_path, TimeBillConfig
from timebill_ros.core.engine import Engine
from timebill_ros.core.generation import GenerationRequest
from timebill_ros.core.prefix_cache import PrefixCache
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also under -P
from benchkit import cpu_info, load1, progress, uptime  # noqa: E402,I100
from prefix_scene import (  # noqa: E402
    ALPHAS, MAX_NEW, questions, SIZES, standing_context, SYSTEM_PROMPT
)
from prefix_tables import breakdown_table, table, write_plot  # noqa: E402


# ------------------------------------------------------------------------------- measurement
class Timed:
    """Wrap a PrefixCache's copy-in and insert on one instance, summing their wall time."""

    def __init__(self, pc: PrefixCache):
        self.copy_s = self.insert_s = 0.0
        copy_into, insert = pc.copy_into, pc.insert

        def timed_copy(*a, **kw):
            t0 = time.perf_counter()
            try:
                return copy_into(*a, **kw)
            finally:
                self.copy_s += time.perf_counter() - t0

        def timed_insert(*a, **kw):
            t0 = time.perf_counter()
            try:
                return insert(*a, **kw)
            finally:
                self.insert_s += time.perf_counter() - t0

        pc.copy_into, pc.insert = timed_copy, timed_insert

    def reset(self) -> None:
        self.copy_s = self.insert_s = 0.0


def fresh_cache(engine: Engine, cfg: TimeBillConfig) -> Timed:
    engine.prefix_cache = PrefixCache(cfg.prefix_cache_mb, cfg.prefix_block_tokens)
    return Timed(engine.prefix_cache)


def first_token(engine: Engine, ids: list, chunk: int, prefix, timer: Timed = None) -> dict:
    """Prefill ``ids`` and take the first (greedy) token: the time to first token."""
    if timer is not None:
        timer.reset()
    t0 = time.perf_counter()
    state = engine.prefill(ids, capacity=len(ids) + MAX_NEW + 1, chunk_tokens=chunk, prefix=prefix)
    tok = int(torch.argmax(state.logits))
    ttft = time.perf_counter() - t0
    out = {
        'ttft_s': ttft,
        'prefill_s': state.prefill_s,
        'cached_tokens': state.cached_tokens,
        'computed_tokens': len(ids) - state.cached_tokens,
        'chunks': state.chunks,
        'first_token': tok,
        'state': state,
    }
    if timer is not None:
        out['copy_in_s'], out['insert_s'] = timer.copy_s, timer.insert_s
    return out


def warm_breakdown(engine: Engine, ids: list, chunk: int) -> dict:
    """
    Where one warm prefill's time goes, from a cProfile of it (big ops: little overhead).

    copy-in (the cached KV into the goal's buffer), attention (sdpa of the computed queries
    against the cached and their own keys), press scores (the observation window's queries
    against every key, for eviction), linear layers (projections and MLP of the computed tokens),
    cache insert (the goal's new whole blocks), other (norms, RoPE, the rest).
    """
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    state = engine.prefill(ids, capacity=len(ids) + 1, chunk_tokens=chunk)
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)

    def tot(pred):
        return sum(v[2] for k, v in stats.items() if pred(*k))

    def cum(pred):  # outermost match: nested calls are inside its cumulative time
        return max((v[3] for k, v in stats.items() if pred(*k)), default=0.0)

    out = {
        'total_s': total,
        'cached_tokens': state.cached_tokens,
        'computed_tokens': len(ids) - state.cached_tokens,
        'chunks': state.chunks,
        'copy_in_s': cum(lambda f, _, n: f.endswith('prefix_cache.py') and n == 'copy_into'),
        'insert_s': cum(lambda f, _, n: f.endswith('prefix_cache.py') and n == 'insert'),
        'press_scores_s': cum(lambda f, _, n: f.endswith('eviction.py') and n == 'score')
        + cum(lambda f, _, n: f.endswith('attention.py') and n == '_as_full_query'),
        'attention_s': tot(lambda f, _, n: 'scaled_dot_product' in n),
        'linear_s': tot(lambda f, _, n: n in ('<built-in method torch._C._nn.linear>',)),
    }
    out['other_s'] = total - sum(
        out[k] for k in ('copy_in_s', 'insert_s', 'press_scores_s', 'attention_s', 'linear_s')
    )
    return out


def answer(engine: Engine, state, ids: list, alpha: float) -> tuple:
    """Greedy ids of a clone of ``state`` evicted by ``alpha``; (ids, evict + decode seconds)."""
    st = engine.clone_state(state)
    t0 = time.perf_counter()
    if alpha > 0:
        engine.evict(st, alpha)
    res = engine.decode(st, GenerationRequest(input_ids=ids, max_new_tokens=MAX_NEW))
    return list(res.token_ids), time.perf_counter() - t0


def best(runs: list) -> dict:
    """Return the run with the least TTFT (interference only ever adds time)."""
    return min(runs, key=lambda r: r['ttft_s'])


def bench_size(engine, cfg, target, repeats, seed, tick) -> dict:
    chunk = cfg.prefill_chunk or None
    text, ctx = standing_context(engine, target, seed)
    qs = questions(seed, repeats + 2)
    goals = [engine.encode(f'{text}\n\n{q}', SYSTEM_PROMPT) for q in qs]
    q_tokens = [len(engine.tokenizer(q, add_special_tokens=False)['input_ids']) for q in qs]
    shared = []
    for ids in goals:
        k = 0
        while k < min(len(ids), len(ctx)) and ids[k] == ctx[k]:
            k += 1
        shared.append(k)
    row = {
        'target': target,
        'context_tokens': len(ctx),
        'prompt_tokens': [len(g) for g in goals[1:-1]],
        'question_tokens': q_tokens[1:-1],
        'shared_with_context': shared[1:-1],  # leading ids equal to the context's
        'after_context_tokens': [len(g) - k for g, k in zip(goals[1:-1], shared[1:-1])],
        'load_start': load1(),
    }
    measured = goals[1:-1]  # goals[0] warms the cache; goals[-1] is the profiled warm goal

    # warm: an earlier goal (another question, same context) cached the context's blocks; every
    # measured goal has a question of its own, so it reuses the context only, never a repeat
    timer_w = fresh_cache(engine, cfg)
    cache_w = engine.prefix_cache
    tick(f'{target}: earlier goal')
    earlier = first_token(engine, goals[0], chunk, True, timer_w)
    earlier.pop('state')
    # primed: the standing context primed (held), then the goals
    timer_p = fresh_cache(engine, cfg)
    cache_p = engine.prefix_cache
    tick(f'{target}: prime')
    t0 = time.perf_counter()
    engine.prefill(ctx, chunk_tokens=chunk, prime='scene')
    prime_s = time.perf_counter() - t0
    primed_mb = cache_p.summary()['prefix_mb_held']

    # cold (every token computed, no cache read or written), warm and primed goal by goal, so
    # load from elsewhere drifting during the run falls on all three alike
    cold, warm, primed = [], [], []
    for i, ids in enumerate(measured):
        tick(f'{target}: cold')
        cold.append(first_token(engine, ids, chunk, False))
        engine.prefix_cache = cache_w
        tick(f'{target}: warm')
        warm.append(first_token(engine, ids, chunk, True, timer_w))
        engine.prefix_cache = cache_p
        tick(f'{target}: primed')
        primed.append(first_token(engine, ids, chunk, True, timer_p))
        if i > 0:  # the first goal's states are decoded below; free the others' caches
            for runs in (cold, warm, primed):
                runs[-1].pop('state')
    warm_mb = cache_w.summary()['prefix_mb_held']
    summary = cache_p.summary()
    engine.prefix_cache = cache_w
    tick(f'{target}: warm, profiled')
    breakdown = warm_breakdown(engine, goals[-1], chunk)

    # the same goal (the first measured question) answered from each path
    ids = measured[0]
    answers, decode_s = {}, {}
    for name, runs in (('cold', cold), ('warm', warm), ('primed', primed)):
        for alpha in ALPHAS:
            tick(f'{target}: decode {name} α={alpha}')
            answers[name, alpha], decode_s[name, alpha] = answer(
                engine, runs[0]['state'], ids, alpha
            )
    for runs in (cold, warm, primed):
        runs[0].pop('state')
    engine.prefix_cache = PrefixCache(cfg.prefix_cache_mb, cfg.prefix_block_tokens)  # free it

    def mode(name, runs, mb=None):
        b = best(runs)
        return {
            'ttft_s': b['ttft_s'],
            'ttft_all_s': [r['ttft_s'] for r in runs],
            'decode_s': decode_s[name, 0.0],
            'e2e_s': b['ttft_s'] + decode_s[name, 0.0],
            'cached_tokens': b['cached_tokens'],
            'computed_tokens': b['computed_tokens'],
            'chunks': b['chunks'],
            'copy_in_s': b.get('copy_in_s', 0.0),
            'insert_s': b.get('insert_s', 0.0),
            'model_s': b['prefill_s'] - b.get('copy_in_s', 0.0) - b.get('insert_s', 0.0),
            'prefix_mb_held': mb,
        }

    row.update(
        cold=mode('cold', cold),
        warm=mode('warm', warm, warm_mb),
        primed=mode('primed', primed, summary['prefix_mb_held']),
        warm_breakdown=breakdown,
        after_context_tokens_profiled=len(goals[-1]) - shared[-1],
        earlier_goal_ttft_s=earlier['ttft_s'],
        earlier_goal_insert_s=earlier['insert_s'],
        prime_s=prime_s,
        primed_context_mb=primed_mb,
        kv_mb_per_1k_tokens=engine.kv_bytes_per_token() * 1024 / 2**20,
        answer_tokens={f'{n}@{a}': len(v) for (n, a), v in answers.items()},
        identical={
            f'{n}@{a}': answers[n, a] == answers['cold', a]
            for n in ('warm', 'primed')
            for a in ALPHAS
        },
        first_token_equal=all(
            r['first_token'] == cold[i]['first_token']
            for runs in (warm, primed)
            for i, r in enumerate(runs)
        ),
        load_end=load1(),
    )
    row['identical_warm'] = all(row['identical'][f'warm@{a}'] for a in ALPHAS)
    row['speedup_warm'] = row['cold']['ttft_s'] / row['warm']['ttft_s']
    row['speedup_primed'] = row['cold']['ttft_s'] / row['primed']['ttft_s']
    row['answer_text'] = engine.decode_text(answers['cold', 0.0])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='the 4k context only, 2 repeats')
    ap.add_argument('--sizes', help=f'context tokens, comma-separated (default {SIZES})')
    ap.add_argument('--repeats', type=int, help='goals per mode (default 3; --quick 2)')
    ap.add_argument('--config', help='TimeBill YAML (default: the packaged config)')
    ap.add_argument(
        '--threads',
        type=int,
        help="torch threads (default: the config's; 1 on a machine shared with other jobs, "
        'where 2 OpenMP threads on 2 busy cores can run many times slower)',
    )
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', default='results/bench_prefix', help='output directory')
    ap.add_argument('--no-progress', action='store_true')
    args = ap.parse_args(argv)
    sizes = (
        [int(s) for s in args.sizes.split(',')] if args.sizes else [4096] if args.quick else SIZES
    )
    repeats = args.repeats or (2 if args.quick else 3)

    cfg = TimeBillConfig.from_yaml(args.config or default_config_path())
    if not (cfg.prefix_cache and cfg.prefix_cache_mb > 0):
        cfg = cfg.replace(prefix_cache=True, prefix_cache_mb=2048.0)
    if args.threads:
        cfg = cfg.replace(threads=args.threads)
    t_start = time.perf_counter()
    engine = Engine.from_config(cfg)
    info = {
        'date': time.strftime('%Y-%m-%d %H:%M:%S%z'),
        'cpu': cpu_info(),
        'uptime': uptime(),
        'config': {
            k: getattr(cfg, k)
            for k in (
                'model', 'weights', 'prefill_weights', 'threads', 'press', 'window_size',
                'prefill_chunk', 'prefix_cache_mb', 'prefix_block_tokens',
            )
        },
        'profile_key': profile_key(engine),
        'repeats': repeats,
        'max_new_tokens': MAX_NEW,
    }
    print(
        f'{info["date"]}  {info["cpu"]["model_name"]} (AVX2 {info["cpu"]["avx2"]}, AVX-512 '
        f'{info["cpu"]["avx512f"]}), {info["cpu"]["cpus"]} CPUs; {info["uptime"]}',
        flush=True,
    )
    print(
        f'model {cfg.model} weights {cfg.weights} threads {cfg.threads} press {cfg.press} '
        f'(window {cfg.window_size}) prefill_chunk {cfg.prefill_chunk}; sizes {sizes}, '
        f'{repeats} goals per mode',
        flush=True,
    )
    engine.prefill(engine.encode('Warm-up: say hello.'), prefix=False)  # lazy init, page faults

    steps_per_size = 3 * repeats + 3 + 3 * len(ALPHAS)
    bar = progress(len(sizes) * steps_per_size, not args.no_progress, 'bench_prefix')
    rows = []
    try:
        for i, target in enumerate(sizes):
            rows.append(bench_size(engine, cfg, target, repeats, args.seed + i, bar))
    finally:
        bar.close()
    info['duration_s'] = time.perf_counter() - t_start
    info['uptime_end'] = uptime()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = 'bench_prefix-quick' if args.quick else 'bench_prefix'
    (out / f'{stem}.json').write_text(json.dumps({'info': info, 'rows': rows}, indent=1))
    png = out / f'{stem}.png'
    has_png = write_plot(rows, png)

    print()
    print(table(rows))
    print()
    print(breakdown_table(rows))
    print()
    for r in rows:
        w = r['warm']
        print(
            f'{r["context_tokens"]} ctx: warm TTFT {r["speedup_warm"]:.1f}× faster than cold '
            f'(primed {r["speedup_primed"]:.1f}×); warm computes {w["computed_tokens"]} tokens '
            f'({min(r["after_context_tokens"])}–{max(r["after_context_tokens"])} after the '
            f'context: question {min(r["question_tokens"])}–{max(r["question_tokens"])} + '
            f'template; the rest the context tail the press window recomputes) in '
            f'{w["model_s"]:.3f} s, copies {w["cached_tokens"]} cached in {w["copy_in_s"]:.3f} s, '
            f'caches its new blocks in {w["insert_s"]:.3f} s; earlier goal '
            f'{r["earlier_goal_ttft_s"]:.2f} s, prime {r["prime_s"]:.2f} s; first tokens equal '
            f'{r["first_token_equal"]}; load {r["load_start"]} -> {r["load_end"]}'
        )
    print(f'json: {out / f"{stem}.json"}' + (f'\npng: {png}' if has_png else ''))
    print(f'{info["duration_s"]:.0f} s in all; {info["uptime_end"]}', flush=True)
    pick = next((r for r in rows if r['target'] == 4096), rows[-1])
    print(
        f'cold_ttft_s={pick["cold"]["ttft_s"]:.3f} warm_ttft_s={pick["warm"]["ttft_s"]:.3f} '
        f'identical={all(r["identical_warm"] for r in rows)}',
        flush=True,
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
