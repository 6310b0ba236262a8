#!/usr/bin/env python
"""
The 16-bit KV cache's quality guard and speed: fp32 KV vs fp16 / bf16 KV on the real SmolLM2.

One model (the default config: SmolLM2-135M-Instruct, int4 weights, the C++ decode step), one
engine per ``kv_dtype`` sharing it:

1. Greedy answers to the fixed prompts of ``engine_quality.GUARD_PROMPTS`` (chat template,
   ``--new-tokens``): the first token index where each differs from the fp32-KV answer (-1:
   identical), the answers identical, and the token agreement (tokens before the first
   divergence over the reference's), with fp32 KV's top-1 lead over its top-2 there (a near tie
   or not). Teacher-forced too: the fp32-KV answer fed to the 16-bit engine, the share of steps
   whose top-1 token is the reference's, and the largest logit gap.
2. Long-context tasks (``core.evaluation.longctx_tasks``: planted pass keys, cities, locker codes,
   two-hop facts in 1k-4k tokens of licence text), exact match at α = 0 and after the config's
   press evicts α = 0.5, per KV dtype; the same tasks for every dtype.
3. Decode ms/token at KV 1k / 4k on a written cache (calibration's ``time_decode_step``), and
   the C++ attention alone (µs per layer over 30 separate layers' caches), 1 thread, the dtypes
   interleaved; bytes per cached token.

Writes ``<out>/kv_quality.json`` and ``kv_quality.md`` (``results/kv_quality`` by default,
ignored by git).

    .venv/bin/python benchmarks/kv_quality.py [--quick] [--tasks 40] [--threads 2]

``--quick`` (<= 5 min on 2 cores): 40 greedy tokens, 10 tasks of 1k-2k tokens, 3 timing rounds.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import statistics
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also under -P
from benchkit import cpu_info, load1, progress, uptime  # noqa: E402
from engine_quality import first_divergence, GUARD_PROMPTS  # noqa: E402

DTYPES = ('float32', 'float16', 'bfloat16')


def make_engines(cfg, threads: int) -> dict:
    """Return one engine per KV dtype, all on one loaded model."""
    from timebill_ros.core.engine import Engine
    from timebill_ros.core.model import load_model

    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, threads=threads,
                            weights=cfg.weights, prefill_weights=cfg.prefill_weights)
    return {kv: Engine(model, tok, press=cfg.press, model_name=cfg.model, kv_dtype=kv,
                       window_size=cfg.window_size, kernel_size=cfg.kernel_size,
                       pooling=cfg.pooling, n_sink=cfg.n_sink) for kv in DTYPES}


def greedy(engines: dict, new_tokens: int, step) -> dict:
    """Greedy answers per dtype vs fp32 KV, free-running and teacher-forced."""
    import torch

    from timebill_ros.core.generation import GenerationRequest

    ref = {}
    out = {kv: {'first_divergence': [], 'forced_top1': [], 'max_logit_gap': [], 'margin': []}
           for kv in DTYPES}
    for i, prompt in enumerate(GUARD_PROMPTS):
        logits_ref = []
        for kv, engine in engines.items():
            step(f'greedy {kv} prompt {i}')
            req = GenerationRequest(prompt=prompt, max_new_tokens=new_tokens)
            res = engine.generate(req)
            toks = list(res.token_ids)
            if kv == 'float32':
                ref[i] = toks
            out[kv]['first_divergence'].append(first_divergence(ref[i], toks))
            out[kv].setdefault('answers', []).append(engine.decode_text(toks))
            # teacher-forced: the fp32-KV answer fed in, this cache's top-1 at every step
            ids = engine._request_ids(req)
            with torch.inference_mode():
                state = engine.prefill(ids, capacity=len(ids) + len(ref[i]) + 1, prefix=False)
                logits = [state.logits]
                for j, t in enumerate(ref[i][:-1]):
                    logits.append(engine.step(t, len(ids) + j, state.cache).float())
            if kv == 'float32':
                logits_ref = logits
            hits = sum(int(lg.argmax()) == t for lg, t in zip(logits, ref[i]))
            out[kv]['forced_top1'].append(hits / max(len(ref[i]), 1))
            out[kv]['max_logit_gap'].append(
                max(float((a - b).abs().max()) for a, b in zip(logits, logits_ref)))
            d = out[kv]['first_divergence'][-1]
            if 0 <= d < len(logits_ref):  # fp32 KV's top-1 lead over its top-2 where they part
                top = logits_ref[d].topk(2).values
                out[kv]['margin'].append(round(float(top[0] - top[1]), 4))
    for kv, r in out.items():
        div, n = r['first_divergence'], [len(ref[i]) for i in range(len(GUARD_PROMPTS))]
        r['identical'] = sum(d == -1 for d in div)
        r['token_agreement'] = sum(m if d == -1 else d for d, m in zip(div, n)) / sum(n)
        r['forced_top1_mean'] = statistics.mean(r['forced_top1'])
    return out


def long_context(engines: dict, n_tasks: int, lengths, alpha: float, step) -> dict:
    """Exact match on the planted-fact tasks at α = 0 and α per KV dtype (same tasks)."""
    from press_quality import answer

    from timebill_ros.core.evaluation import longctx_tasks as lt
    from timebill_ros.core.evaluation.tasks import counter_for

    first = engines['float32']
    path = str(Path(lt.default_path(0)).with_name(
        f'kv_quality-{"-".join(map(str, lengths))}.jsonl'))
    tasks, _ = lt.load_or_build(counter_for(first), n_tasks, path, lengths=lengths)
    out = {kv: {'alpha0': [], f'alpha{alpha:g}': []} for kv in DTYPES}
    rows = []
    for task in tasks:
        row = {'id': task.id, 'kind': task.kind, 'n_tokens': task.n_tokens}
        for kv, engine in engines.items():
            step(f'{task.id} {kv}')
            ids = engine.encode(task.prompt, task.system_prompt or None)
            state = engine.prefill(ids, capacity=len(ids) + lt.MAX_NEW_TOKENS + 1, prefix=False)
            evicted = engine.evict(engine.clone_state(state), alpha)
            for key, st in (('alpha0', state), (f'alpha{alpha:g}', evicted)):
                text, _ = answer(engine, st, task, lt.MAX_NEW_TOKENS)
                ok = lt.exact_match(task.kind, text, task.references[0])
                out[kv][key].append(ok)
                row[f'{kv} {key}'] = [ok, text.strip()[:40]]
        rows.append(row)
    summary = {kv: {k: sum(v) / len(v) for k, v in r.items()} for kv, r in out.items()}
    return {'tasks': rows, 'accuracy': summary, 'n': len(tasks), 'lengths': list(lengths),
            'alpha': alpha}


def timings(engines: dict, rounds: int, kv_lengths, step) -> dict:
    """Decode ms/token and attention µs per layer per dtype, 1 thread, dtypes interleaved."""
    import torch

    from timebill_ros.core import kernels
    from timebill_ros.core.calibration.timing import time_decode_step

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kern = kernels.load()
    cfg = engines['float32'].model.config
    hkv, hq = cfg.num_key_value_heads, cfg.num_attention_heads
    d = cfg.hidden_size // hq
    dec = {kv: {n: [] for n in kv_lengths} for kv in DTYPES}
    att = {kv: {n: [] for n in kv_lengths} for kv in DTYPES}
    q = torch.randn(hq, d)
    try:
        for r in range(rounds):
            for n in kv_lengths:
                caches = [(torch.randn(hkv, n + 1, d), torch.randn(hkv, n + 1, d))
                          for _ in range(cfg.num_hidden_layers)]
                for kv, engine in engines.items():
                    step(f'round {r} kv {n} {kv}')
                    dec[kv][n] += time_decode_step(engine, n, repeats=5)[1:]
                    if kern is None:
                        continue
                    dt = getattr(torch, kv)
                    cs = [(k.to(dt), v.to(dt)) for k, v in caches]
                    for _ in range(5):
                        t0 = time.perf_counter()
                        for k, v in cs:
                            kern.decode_attention(q, k, v, n, d ** -0.5)
                        att[kv][n].append((time.perf_counter() - t0) / len(cs))
    finally:
        torch.set_num_threads(threads)

    def stats(samples, scale):
        return {str(n): {'median': statistics.median(s) * scale, 'min': min(s) * scale}
                for n, s in samples.items() if s}

    return {kv: {'decode_ms': stats(dec[kv], 1e3), 'attention_us': stats(att[kv], 1e6),
                 'kv_bytes_per_token': engines[kv].kv_bytes_per_token(),
                 'decode_step': engines[kv].decode_step} for kv in DTYPES}


def quality_tables(res: dict, g: dict, lc: dict) -> list:
    """Return the markdown lines of parts 1 and 2."""
    lines = [f'## Greedy vs fp32 KV ({res["new_tokens"]} tokens, {len(GUARD_PROMPTS)} prompts)',
             '', '| KV | first divergence per prompt | fp32 top-1 lead there | identical '
             '| token agreement | teacher-forced top-1 | max logit gap |',
             '|---|---|---|---:|---:|---:|---:|']
    for kv in DTYPES:
        r = g[kv]
        lines.append(f'| {kv} | {r["first_divergence"]} | {r["margin"]} '
                     f'| {r["identical"]}/{len(GUARD_PROMPTS)} '
                     f'| {100 * r["token_agreement"]:.1f} % | {100 * r["forced_top1_mean"]:.1f} % '
                     f'| {max(r["max_logit_gap"]):.3f} |')
    a = f'alpha{lc["alpha"]:g}'
    lines += ['', f'## Long-context tasks ({lc["n"]} tasks, {lc["lengths"]} tokens, exact match)',
              '', f'| KV | α = 0 | α = {lc["alpha"]:g} ({res["press"]}) |', '|---|---:|---:|']
    for kv in DTYPES:
        acc = lc['accuracy'][kv]
        lines.append(f'| {kv} | {100 * acc["alpha0"]:.1f} % | {100 * acc[a]:.1f} % |')
    return lines + ['']


def markdown(res: dict) -> str:
    """Return the tables of one run."""
    g, lc, t = res.get('greedy'), res.get('long_context'), res['timing']
    lines = [f'# kv_quality ({res["started"]}, {res["cpu"]["model_name"]}, {res["model"]})', '',
             f'load: {res["uptime_start"]} -> {res["uptime_end"]}', '']
    if g and lc:
        lines += quality_tables(res, g, lc)
    lines += ['## Decode, 1 thread (median / min)', '',
              '| KV | bytes/token | step | decode ms @1k | @4k | attention µs/layer @1k | @4k |',
              '|---|---:|---|---:|---:|---:|---:|']
    for kv in DTYPES:
        r = t[kv]
        cells = []
        for key in ('decode_ms', 'attention_us'):
            for n in ('1024', '4096'):
                s = r[key].get(n)
                cells.append(f'{s["median"]:.2f} / {s["min"]:.2f}' if s else 'n/a')
        lines.append(f'| {kv} | {r["kv_bytes_per_token"]} | {r["decode_step"]} | '
                     + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='fewer tokens, tasks, rounds (<= 5 min)')
    ap.add_argument('--new-tokens', type=int, default=64)
    ap.add_argument('--tasks', type=int, default=40, help='long-context tasks')
    ap.add_argument('--lengths', default='1024,2048,3072,4096', help='task prompt tokens')
    ap.add_argument('--alpha', type=float, default=0.5, help='the evicted run of each task')
    ap.add_argument('--rounds', type=int, default=5, help='timing rounds (dtypes interleaved)')
    ap.add_argument('--threads', type=int, default=2, help='threads for the quality runs')
    ap.add_argument('--out', default='results/kv_quality')
    ap.add_argument('--timing-only', action='store_true', help='part 3 only (another ISA variant: '
                    'TIMEBILL_KERNELS_ISA=avx2 ATEN_CPU_CAPABILITY=avx2)')
    ap.add_argument('--no-progress', action='store_true')
    args = ap.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    if args.quick:
        args.new_tokens, args.tasks, args.lengths, args.rounds = 40, 10, '1024,2048', 3
    from timebill_ros.core.config import TimeBillConfig

    cfg = TimeBillConfig()
    lengths = [int(n) for n in args.lengths.split(',')]
    res = {'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'cpu': cpu_info(), 'model': cfg.model,
           'press': cfg.press, 'uptime_start': uptime(), 'load1': [load1()],
           'new_tokens': args.new_tokens, 'threads': args.threads, 'quick': args.quick}
    t0 = time.monotonic()
    engines = make_engines(cfg, args.threads)
    res['decode_step'] = engines['float32'].decode_step
    quality = 0 if args.timing_only else len(GUARD_PROMPTS) + args.tasks
    step = progress((quality + 2 * args.rounds) * len(DTYPES), not args.no_progress, 'kv_quality')
    if not args.timing_only:
        res['greedy'] = greedy(engines, args.new_tokens, step)
        res['long_context'] = long_context(engines, args.tasks, lengths, args.alpha, step)
    res['timing'] = timings(engines, args.rounds, (1024, 4096), step)
    step.close()
    res.update(uptime_end=uptime(), run_s=time.monotonic() - t0)
    res['load1'].append(load1())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'kv_quality.json').write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / 'kv_quality.md').write_text(md)
    print(md)
    print(f'wrote {out / "kv_quality.json"}, {out / "kv_quality.md"} in {res["run_s"]:.0f} s')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
