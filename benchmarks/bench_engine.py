#!/usr/bin/env python
"""
Engine benchmark: decode speed vs HF generate, the cost of DynamicCache's torch.cat, roofline.

Prints tables and writes ``results/bench_engine.json``. Timings are minima over repeats
(shared machines are noisy; the minimum is the least disturbed run); the load average at
start is recorded beside them.

    .venv/bin/python benchmarks/bench_engine.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import platform
import time

from timebill_ros.core import kv_cache
from timebill_ros.core.engine import Engine, GenerationRequest
from timebill_ros.core.model import load_model
import torch
from transformers.cache_utils import DynamicCache


def copy_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy (read + write), the memory roofline."""
    src = torch.ones(mb * 1024 * 1024 // 4)
    dst = torch.empty_like(src)
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def decode_vs_generate(engine: Engine, prompt_tokens: int, new_tokens: int, repeats: int):
    model = engine.model
    vocab = model.config.vocab_size
    ids = torch.randint(
        3, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    x = torch.tensor([ids])
    eos = engine.eos_ids
    engine.eos_ids = set()  # run to max_new_tokens on both sides
    ours, hf = [], []
    try:
        for _ in range(repeats):
            r = engine.generate(GenerationRequest(input_ids=ids, max_new_tokens=new_tokens))
            ours.append((r.token_times[-1] - r.token_times[0]) / (new_tokens - 1))
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            model.generate(
                x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
            t2 = time.perf_counter()
            hf.append(((t2 - t1) - (t1 - t0)) / (new_tokens - 1))
    finally:
        engine.eos_ids = eos
    return min(ours), min(hf)


@torch.inference_mode()
def step_time(engine: Engine, n_kv: int, preallocate: bool, steps: int) -> float:
    """Per-step decode time at KV length n_kv, growing the cache as real decoding does."""
    cfg = engine.model.config
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (1, cfg.num_key_value_heads, n_kv, head_dim)
    if preallocate:
        cache = kv_cache.make_cache(engine.num_layers, n_kv + steps + 1, preallocate=True)
        for layer in cache.layers:
            layer.fill_random(n_kv, torch.zeros(1, shape[1], 1, head_dim))
    else:
        cache = DynamicCache()
        for i in range(engine.num_layers):
            cache.update(torch.randn(shape), torch.randn(shape), i)
    times = []
    tok = torch.tensor([[5]])
    for s in range(steps):
        t0 = time.perf_counter()
        engine.model(
            input_ids=tok, cache=cache, use_cache=True, position_ids=torch.tensor([[n_kv + s]])
        )
        times.append(time.perf_counter() - t0)
    return min(times[1:]) if len(times) > 1 else times[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--out', default='results/bench_engine.json')
    ap.add_argument('--threads', type=int, default=2)
    args = ap.parse_args()
    model, tok = load_model(threads=args.threads)
    engine = Engine(model, tok, press='snapkv')
    load = os.getloadavg()
    report = {
        'machine': platform.processor() or platform.machine(),
        'threads': torch.get_num_threads(),
        'loadavg_at_start': load,
        'torch': torch.__version__,
    }
    print(f'threads={torch.get_num_threads()} loadavg={load[0]:.2f}')

    # 1. decode speed: engine at α = 0 vs model.generate
    rows = []
    for n in [512] if args.quick else [128, 1024]:
        ours, hf = decode_vs_generate(engine, n, 32 if args.quick else 64, 2 if args.quick else 3)
        rows.append(
            {
                'prompt_tokens': n,
                'engine_ms_per_token': 1e3 * ours,
                'hf_generate_ms_per_token': 1e3 * hf,
                'ratio': ours / hf,
            }
        )
    report['decode_vs_generate'] = rows
    print('\nDecode time per token, engine (α=0) vs HF generate')
    print(f'{"prompt":>7} {"engine ms":>10} {"generate ms":>12} {"ratio":>6}')
    for r in rows:
        print(
            f'{r["prompt_tokens"]:>7} {r["engine_ms_per_token"]:>10.2f} '
            f'{r["hf_generate_ms_per_token"]:>12.2f} {r["ratio"]:>6.3f}'
        )

    # 2. step time vs KV length, preallocated vs DynamicCache; 3. roofline
    bw = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    rows = []
    lengths = [512, 2048, 4096] if args.quick else [512, 1024, 2048, 4096, 8192]
    steps = 4 if args.quick else 8
    for n in lengths:
        pre = step_time(engine, n, True, steps)
        dyn = step_time(engine, n, False, steps)
        bytes_step = weight_bytes + kv_bytes_per_token * n
        roof = bytes_step / bw
        rows.append(
            {
                'kv_len': n,
                'prealloc_ms': 1e3 * pre,
                'dynamic_ms': 1e3 * dyn,
                'dynamic_over_prealloc': dyn / pre,
                'bytes_per_step': bytes_step,
                'roofline_ms': 1e3 * roof,
                'prealloc_over_roofline': pre / roof,
            }
        )
    report['copy_bandwidth_GBps'] = bw / 1e9
    report['weight_bytes'] = weight_bytes
    report['kv_bytes_per_token'] = kv_bytes_per_token
    report['step_vs_kv'] = rows
    print(
        f'\nDecode step vs KV length (copy bandwidth {bw / 1e9:.1f} GB/s, weights '
        f'{weight_bytes / 1e6:.0f} MB, '
        f'KV {kv_bytes_per_token / 1e3:.1f} kB/token)'
    )
    print(
        f'{"kv":>6} {"prealloc ms":>12} {"dynamic ms":>11} '
        f'{"dyn/pre":>8} {"roofline ms":>12} {"pre/roof":>9}'
    )
    for r in rows:
        print(
            f'{r["kv_len"]:>6} {r["prealloc_ms"]:>12.2f} {r["dynamic_ms"]:>11.2f} '
            f'{r["dynamic_over_prealloc"]:>8.3f} '
            f'{r["roofline_ms"]:>12.2f} {r["prealloc_over_roofline"]:>9.3f}'
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f'\nwrote {out}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
