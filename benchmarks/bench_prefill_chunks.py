#!/usr/bin/env python
"""
What chunked prefill costs: SmolLM2 prefill time in one pass vs chunks of 128/256/512 tokens.

Chunks are what lets a deadline or a cancel stop a long prefill; this checks they are nearly
free. Modes are interleaved within each repeat (so machine drift hits all alike); the median
and the minimum of the repeats are reported, SnapKV score collection on, as the generator runs
it. On shared machines single runs vary by 5-15 %: read the ratios with that in mind. Prints a
Markdown table and writes ``results/bench_prefill_chunks.json``.

    .venv/bin/python benchmarks/bench_prefill_chunks.py [--sizes 512 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import platform
import statistics
import time

from timebill_ros.core.config import TimeBillConfig
from timebill_ros.core.engine import Engine
import torch


def prompt_ids(engine: Engine, n: int) -> list:
    vocab = engine.model.config.vocab_size
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def time_prefill(engine: Engine, ids: list, chunk: int) -> tuple:
    """
    Return (wall s, CPU s of this process) of one prefill.

    On a shared machine the CPU time shows the work done, the wall time also what the
    neighbours took.
    """
    c0, t0 = time.process_time(), time.perf_counter()
    engine.prefill(ids, capacity=len(ids) + 1, chunk_tokens=chunk, prefix=False)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--sizes', type=int, nargs='+', default=[512, 1024, 2048, 4096])
    ap.add_argument('--chunks', type=int, nargs='+', default=[128, 256, 512])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--out', default='results/bench_prefill_chunks.json')
    args = ap.parse_args()
    engine = Engine.from_config(TimeBillConfig(threads=args.threads))
    load = os.getloadavg()
    modes = [0] + args.chunks  # 0 = one pass
    print(
        f'threads={torch.get_num_threads()} loadavg={load[0]:.2f} press={engine.press.name}',
        flush=True,
    )
    time_prefill(engine, prompt_ids(engine, 256), 0)  # warm-up: first call allocates and loads
    rows = []
    for n in args.sizes:
        ids = prompt_ids(engine, n)
        wall = {m: [] for m in modes}
        cpu = {m: [] for m in modes}
        for _ in range(args.repeats):
            for m in modes:
                w, c = time_prefill(engine, ids, m)
                wall[m].append(w)
                cpu[m].append(c)
        base_w, base_c = statistics.median(wall[0]), statistics.median(cpu[0])
        base_min = min(wall[0])
        for m in modes:
            med_w, med_c = statistics.median(wall[m]), statistics.median(cpu[m])
            rows.append(
                {
                    'tokens': n,
                    'chunk': m or None,
                    'chunks': len(engine._chunk_bounds(n, m)) - 1,
                    'median_s': med_w,
                    'ratio': med_w / base_w,
                    'min_s': min(wall[m]),
                    'min_ratio': min(wall[m]) / base_min,
                    'cpu_median_s': med_c,
                    'cpu_ratio': med_c / base_c,
                    'wall_s': wall[m],
                    'cpu_s': cpu[m],
                }
            )
            print(
                f'  {n:>5} tokens  chunk {m or "-":>4}: wall {med_w:.3f} s '
                f'({med_w / base_w:.3f})  cpu {med_c:.3f} s ({med_c / base_c:.3f})',
                flush=True,
            )
    print(
        '\n| tokens | chunk | chunks | median s | ratio | min s | min ratio '
        '| CPU median s | CPU ratio |'
    )
    print('|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        print(
            f'| {r["tokens"]} | {r["chunk"] or "one pass"} | {r["chunks"]} '
            f'| {r["median_s"]:.3f} | {r["ratio"]:.3f} | {r["min_s"]:.3f} '
            f'| {r["min_ratio"]:.3f} | {r["cpu_median_s"]:.3f} | {r["cpu_ratio"]:.3f} |'
        )
    report = {
        'machine': platform.processor() or platform.machine(),
        'threads': torch.get_num_threads(),
        'cpus': os.cpu_count(),
        'loadavg_at_start': load,
        'loadavg_at_end': os.getloadavg(),
        'torch': torch.__version__,
        'press': engine.press.name,
        'repeats': args.repeats,
        'rows': rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f'\nwrote {out}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
