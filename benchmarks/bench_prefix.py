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
import os
from pathlib import Path
import platform
import pstats
import random
import sys
import time

from timebill_ros.core.config import default_config_path, TimeBillConfig
from timebill_ros.core.engine import Engine, GenerationRequest
from timebill_ros.core.prefix_cache import PrefixCache
import torch

SIZES = (1024, 4096, 7680)  # context tokens; 7680 + question + 64 answer tokens fit 8192
MAX_NEW = 64
ALPHAS = (0.0, 0.5)
SYSTEM_PROMPT = (
    'You are the task planner of a mobile service robot. Answer briefly and only from the scene '
    'description and the event log.'
)
ROOMS = (
    'kitchen', 'lab', 'corridor', 'storage room', 'office', 'workshop', 'lobby', 'charging bay',
    'meeting room', 'server room',
)
COLOURS = (
    'red', 'blue', 'green', 'yellow', 'white', 'black', 'orange', 'grey', 'purple', 'brown',
)
OBJECTS = (
    'cup', 'box', 'drill', 'cable', 'bottle', 'screwdriver', 'tray', 'laptop', 'chair', 'bin',
    'toolbox', 'lamp', 'helmet', 'cart', 'valve', 'sensor', 'keyboard', 'book', 'bucket', 'mug',
)
SURFACES = ('table', 'shelf', 'floor', 'bench', 'cabinet', 'desk', 'rack', 'windowsill')
STATES = ('idle', 'in use', 'damaged', 'reserved', 'missing a part', 'needs cleaning')
EVENTS = (
    'picked up {o}', 'placed {o} on the {s}', 'scanned {o}', 'reported {o} as {st}',
    'moved {o} to the {r}', 'could not grasp {o}', 'opened the door to the {r}',
    'charged to {p} %', 'detected a person near {o}', 'navigated to the {r}',
)


def load1() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float('nan')


def cpu_info() -> dict:
    name, flags = '', set()
    try:
        with open('/proc/cpuinfo') as fh:
            for line in fh:
                key, _, val = line.partition(':')
                if key.strip() == 'model name':
                    name = val.strip()
                elif key.strip() == 'flags':
                    flags |= set(val.split())
    except OSError:
        pass
    name = name or platform.processor()
    return {
        'model_name': name,
        'avx2': 'avx2' in flags,
        'avx512f': 'avx512f' in flags,
        'cpus': os.cpu_count(),
        'torch_capability': torch.backends.cpu.get_cpu_capability(),
    }


# ------------------------------------------------------------------------------ standing context
def scene_lines(seed: int, n_lines: int) -> list:
    """Return a robot's scene description and event log, ``n_lines`` lines, seeded."""
    rng = random.Random(seed)
    lines = [f'Scene report of site {seed}. Map frame: metres, origin at the main entrance.']
    objects = []
    for i in range(n_lines):
        if i % 3 != 2 or not objects:  # two object lines per log line
            oid = f'obj_{len(objects):04d}'
            room, colour, kind = rng.choice(ROOMS), rng.choice(COLOURS), rng.choice(OBJECTS)
            x, y, z = rng.uniform(-40, 40), rng.uniform(-25, 25), rng.uniform(0, 2.2)
            objects.append((oid, colour, kind, room))
            lines.append(
                f'{oid}: {colour} {kind} in the {room}, on the {rng.choice(SURFACES)} at '
                f'({x:.2f}, {y:.2f}, {z:.2f}), {rng.choice(STATES)}.'
            )
        else:
            oid, colour, kind, room = rng.choice(objects)
            t = 8 * 3600 + 7 * i
            event = rng.choice(EVENTS).format(
                o=f'{oid} ({colour} {kind})',
                s=rng.choice(SURFACES),
                st=rng.choice(STATES),
                r=rng.choice(ROOMS),
                p=rng.randint(20, 100),
            )
            lines.append(f'[{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}] robot {event}.')
    return lines


def standing_context(engine: Engine, target: int, seed: int) -> tuple:
    """Return (text, ids): the longest scene whose shared ids (encode_prefix) fit ``target``."""
    lines = scene_lines(seed, 4 * target // 20 + 50)  # a line is ~20-30 tokens

    def ids(k):
        return engine.encode_prefix('\n'.join(lines[:k]), SYSTEM_PROMPT)

    lo, hi = 1, len(lines)
    while len(ids(hi)) <= target:  # more lines than that many tokens hold
        lines += scene_lines(seed + 1000 + len(lines), len(lines))
        hi = len(lines)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(ids(mid)) <= target else (lo, mid - 1)
    return '\n'.join(lines[:lo]), ids(lo)


def questions(seed: int, count: int) -> list:
    """Return ``count`` distinct questions of 20-60 tokens about the scene."""
    rng = random.Random(seed)
    forms = (
        'Which {c} objects are in the {r}, and which of them is closest to the door? '
        'Give their ids and positions.',
        'The operator needs the {c} {o}. In which room is it, on which surface, and what did the '
        'robot last do with it? Answer in one sentence.',
        'List every object in the {r} that is {st}, with its id, so the robot can plan a route '
        'that visits all of them.',
        'Where is {oid} now, and has the robot moved it since the start of the log? Answer with '
        'the room and the coordinates.',
        'Plan the next task: bring a {c} {o} from the {r} to the charging bay. Which object id '
        'should the robot take?',
    )
    out, seen = [], set()
    while len(out) < count:
        q = rng.choice(forms).format(
            c=rng.choice(COLOURS),
            r=rng.choice(ROOMS),
            o=rng.choice(OBJECTS),
            st=rng.choice(STATES),
            oid=f'obj_{rng.randrange(100):04d}',
        )
        if q not in seen:
            seen.add(q)
            out.append(q)
    return out


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


# ------------------------------------------------------------------------------------ output
def table(rows: list) -> str:
    out = [
        '| context | prompt | mode | TTFT (s) | ×cold | end to end (s) | cached | computed | '
        'copy-in (s) | model calls (s) | cache insert (s) | prefix MB held | identical α=0/0.5 |',
        '|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|',
    ]
    for r in rows:
        for name in ('cold', 'warm', 'primed'):
            m = r[name]
            ident = (
                '–'
                if name == 'cold'
                else '/'.join('yes' if r['identical'][f'{name}@{a}'] else 'NO' for a in ALPHAS)
            )
            mb = '–' if m['prefix_mb_held'] is None else f'{m["prefix_mb_held"]:.0f}'
            out.append(
                f'| {r["context_tokens"]} | {min(r["prompt_tokens"])}–{max(r["prompt_tokens"])} '
                f'| {name} | {m["ttft_s"]:.3f} | {r["cold"]["ttft_s"] / m["ttft_s"]:.1f} '
                f'| {m["e2e_s"]:.2f} | {m["cached_tokens"]} | {m["computed_tokens"]} '
                f'| {m["copy_in_s"]:.3f} | {m["model_s"]:.3f} | {m["insert_s"]:.3f} | {mb} '
                f'| {ident} |'
            )
    return '\n'.join(out)


def breakdown_table(rows: list) -> str:
    """Where a warm goal's time goes (one profiled warm prefill per context)."""
    out = [
        '| context | warm prefill (s) | computed: after context + recomputed context tail | '
        'copy-in | attention | press scores | linear layers | cache insert | other |',
        '|---:|---:|---|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        b = r['warm_breakdown']
        after = r['after_context_tokens_profiled']
        parts = ('copy_in_s', 'attention_s', 'press_scores_s', 'linear_s', 'insert_s', 'other_s')
        out.append(
            f'| {r["context_tokens"]} | {b["total_s"]:.3f} | {b["computed_tokens"]} = {after} + '
            f'{b["computed_tokens"] - after} | '
            + ' | '.join(f'{b[k]:.3f} ({100 * b[k] / b["total_s"]:.0f} %)' for k in parts)
            + ' |'
        )
    return '\n'.join(out)


def write_plot(rows: list, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.26
    for k, (name, colour) in enumerate(
        (('cold', 'tab:gray'), ('warm', 'tab:blue'), ('primed', 'tab:green'))
    ):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ys = [r[name]['ttft_s'] for r in rows]
        ax.bar(xs, ys, width, label=name, color=colour)
        for x, y in zip(xs, ys):
            ax.annotate(f'{y:.2f}', (x, y), ha='center', va='bottom', fontsize=8)
    ax.set_yscale('log')
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(
        [f'{r["context_tokens"]} ctx\n(warm {r["speedup_warm"]:.0f}× faster)' for r in rows]
    )
    ax.set_ylabel('time to first token (s, log)')
    ax.set_title('Prefix KV cache: TTFT of a question after a standing context')
    ax.legend()
    ax.grid(axis='y', alpha=0.3, which='both')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
        'uptime': _uptime(),
        'config': {
            k: getattr(cfg, k)
            for k in (
                'model', 'weights', 'prefill_weights', 'threads', 'press', 'window_size',
                'prefill_chunk', 'prefix_cache_mb', 'prefix_block_tokens',
            )
        },
        'profile_key': engine.profile_key(),
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
    bar = _progress(len(sizes) * steps_per_size, not args.no_progress)
    rows = []
    try:
        for i, target in enumerate(sizes):
            rows.append(bench_size(engine, cfg, target, repeats, args.seed + i, bar))
    finally:
        bar.close()
    info['duration_s'] = time.perf_counter() - t_start
    info['uptime_end'] = _uptime()

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


def _uptime() -> str:
    try:
        import subprocess

        return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f'load average {os.getloadavg()}'


class _Plain:
    def __init__(self, total, quiet=False):
        self.n, self.total, self.quiet = 0, total, quiet

    def __call__(self, what):
        self.n += 1
        if not self.quiet:
            print(f'[{self.n}/{self.total}] {what}', file=sys.stderr, flush=True)

    def close(self):
        pass


class _Bar:
    def __init__(self, bar):
        self.bar, self.started = bar, False

    def __call__(self, what):
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_postfix_str(what)

    def close(self):
        if self.started:
            self.bar.update()
        self.bar.close()


def _progress(total: int, enabled: bool):
    if not enabled:
        return _Plain(total, quiet=True)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Plain(total)
    return _Bar(tqdm(total=total, desc='bench_prefix', unit='step', file=sys.stderr))


if __name__ == '__main__':
    sys.exit(main())
