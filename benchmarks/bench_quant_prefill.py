#!/usr/bin/env python
"""
Prefill on the quantised weights: the many-row int4 kernel vs dense fp32 / bf16 copies.

Stack: one transformer layer's linears shaped like Qwen2.5-0.5B (hidden 896, intermediate
4864, 14 query / 2 KV heads of 64: q 896->896, k and v 896->128, o 896->896, gate and up
896->4864, down 4864->896), random Q4_1 weights, 1024 token rows with outlier channels (1 % of
the channels x20, as LLM activations have; they decide which blocks take the residual pass).
Modes: the int4 kernel at the engine's outlier threshold, plain int8 (threshold inf) and every
block twice (0); dense fp32 and dense bf16 GEMMs (torch). tok/s = rows / seconds through the
seven linears. Each ISA variant this CPU runs is measured in its own process
(``TIMEBILL_KERNELS_ISA``); the avx2 process also limits torch to AVX2 (``ATEN_CPU_CAPABILITY``,
``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``), so its baselines are an AVX2 machine's
(no native bf16 there). Two timings: wall clock with ``--threads`` (minimum of interleaved
repeats; the load average is recorded) and CPU time on one thread (the work done, robust on a
shared machine).

Roofline: peak int8 ops/s = cores x clock x 128, where 128 = 64 u8 x s8 multiply-adds per
cycle per core (two 256-bit ``vpdpbusd`` or ``vpmaddubsw`` per cycle on Zen 4 / Intel AVX2
cores; 2 ops each). The clock is /proc/cpuinfo's (nominal; turbo runs faster) and the one
implied by torch's one-thread fp32 GEMM at 32 FLOP/cycle (a lower bound on the real clock).
Achieved GOP/s counts 2·M·N·K per linear (the useful products, not the residual passes).

``--engine`` adds SmolLM2 (the default model) through the Engine: a 1024-token prefill in chunks
of 256 with ``prefill_weights`` none (the kernel), fp32 and bf16, each in a fresh process, with
its resident memory after loading. Prints a table, writes ``results/bench_quant_prefill.json``.

    .venv/bin/python benchmarks/bench_quant_prefill.py [--engine] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also under -P
from benchkit import cpu_info, load1, proc_status, uptime  # noqa: E402,I100

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 896, 4864, 14, 2, 64
ROWS = 1024
AVX2_ONLY = {'ATEN_CPU_CAPABILITY': 'avx2', 'MKL_ENABLE_INSTRUCTIONS': 'AVX2',
             'ONEDNN_MAX_CPU_ISA': 'AVX2'}
INT8_OPS_PER_CYCLE = 128


def layer_shapes() -> list:
    """Return the (N, K) of one Qwen2.5-0.5B layer's seven linears."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return [(q, HIDDEN), (kv, HIDDEN), (kv, HIDDEN), (HIDDEN, q), (INTER, HIDDEN),
            (INTER, HIDDEN), (HIDDEN, INTER)]


def activations(k: int, seed: int) -> torch.Tensor:
    """Return ROWS x k activations with 1 % outlier channels (x20)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, k, generator=g)
    x[:, torch.randperm(k, generator=g)[: max(1, k // 100)]] *= 20
    return x


def twice_fraction(x: torch.Tensor, outlier: float) -> float:
    """Return the share of (row, block) pairs whose max exceeds ``outlier`` x their mean |x|."""
    a = x.abs().reshape(x.shape[0], -1, 32)
    return float((a.amax(-1) * 32 >= outlier * a.sum(-1)).float().mean())


def child_stack(threads: int, repeats: int) -> dict:
    """Time the stack in this process (one kernel variant): wall at ``threads``, CPU at 1."""
    import torch.nn.functional as F

    from timebill_ros.core import kernels
    from timebill_ros.core import weights as W

    kern = kernels.load()
    if kern is None:
        raise SystemExit(f'kernels off: {kernels.why_not()}')
    layers = [W.Int4Linear.quantize(torch.randn(n, k) * 0.05) for n, k in layer_shapes()]
    xs = {k: activations(k, k) for k in (HIDDEN, INTER)}
    dense = [(ly.dequantized(), ly.dequantized().bfloat16()) for ly in layers]
    default = W.PREFILL_OUTLIER

    def q4(outlier):
        return lambda: [kern.q4_1_gemm(xs[ly.in_features], ly.q4_blocks, ly.q4_d, ly.q4_m,
                                       outlier) for ly in layers]

    modes = {
        f'int4 kernel (outlier {default:g})': q4(default),
        'int4 kernel, plain int8': q4(float('inf')),
        'int4 kernel, every block twice': q4(0.0),
        'dense fp32': lambda: [F.linear(xs[w.shape[1]], w) for w, _ in dense],
        'dense bf16': lambda: [F.linear(xs[b.shape[1]].bfloat16(), b).float() for _, b in dense],
    }
    ops = 2 * ROWS * sum(n * k for n, k in layer_shapes())
    out = {'kernels': kernels.origin(), 'bf16_native': torch.cpu._is_avx512_bf16_supported(),
           'load_start': load1(), 'modes': {}}
    for name, fn in modes.items():
        fn()  # warm-up: first calls allocate
        out['modes'][name] = {'wall_s': float('inf'), 'cpu1_s': float('inf')}
    torch.set_num_threads(threads)
    for _ in range(repeats):
        for name, fn in modes.items():
            t0 = time.perf_counter()
            fn()
            rec = out['modes'][name]
            rec['wall_s'] = min(rec['wall_s'], time.perf_counter() - t0)
    torch.set_num_threads(1)
    for _ in range(max(2, repeats // 2)):
        for name, fn in modes.items():
            c0 = time.process_time()
            fn()
            rec = out['modes'][name]
            rec['cpu1_s'] = min(rec['cpu1_s'], time.process_time() - c0)
    for rec in out['modes'].values():
        rec['tok_s'] = ROWS / rec['wall_s']
        rec['gops'] = ops / rec['wall_s'] / 1e9
        rec['tok_s_1core'] = ROWS / rec['cpu1_s']
        rec['gops_1core'] = ops / rec['cpu1_s'] / 1e9
    out['load_end'] = load1()
    out['twice_fraction'] = {k: twice_fraction(x, default) for k, x in xs.items()}
    return out


def child_engine(prefill_weights: str, threads: int, repeats: int) -> dict:
    """Load SmolLM2 int4 with ``prefill_weights``; return its RSS and 1k-token prefill times."""
    from timebill_ros.core import kernels
    from timebill_ros.core import weights as W
    from timebill_ros.core.engine import Engine
    from timebill_ros.core.model import load_model

    model, tok = load_model(weights='int4', threads=threads, prefill_weights=prefill_weights)
    rss = proc_status(os.getpid()).get('VmRSS', 0)
    engine = Engine(model, tok, chat_template=False)
    ids = (tok(Path(__file__).with_name('bench_engine.py').read_text()).input_ids * 4)[:ROWS]
    out = {'kernels': kernels.origin(), 'rss_mib_loaded': rss / 1024,
           'weight_bytes_held': W.weight_bytes(model, decode=False), 'load_start': load1()}

    def prefill():
        engine.prefill(ids, capacity=ROWS + 1, chunk_tokens=256, prefix=False)

    prefill()  # warm-up
    wall, cpu = float('inf'), float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        prefill()
        wall = min(wall, time.perf_counter() - t0)
    torch.set_num_threads(1)
    for _ in range(max(2, repeats // 2)):
        c0 = time.process_time()
        prefill()
        cpu = min(cpu, time.process_time() - c0)
    out.update(tok_s=ROWS / wall, tok_s_1core=ROWS / cpu, load_end=load1(),
               rss_mib_peak=proc_status(os.getpid()).get('VmRSS', 0) / 1024)
    return out


def run_child(isa: str, args, what: list) -> dict:
    """Run this script as a child for one ISA variant; return its JSON answer."""
    env = dict(os.environ, TIMEBILL_KERNELS_ISA=isa, **(AVX2_ONLY if isa == 'avx2' else {}))
    cmd = [sys.executable, __file__, '--child', json.dumps(what), '--threads',
           str(args.threads), '--repeats', str(args.repeats)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if run.returncode:
        raise RuntimeError(f'{isa} {what}: {run.stderr[-2000:]}')
    return json.loads(run.stdout.splitlines()[-1])


def clocks(fp32_gflops_1core: float) -> dict:
    """Return the nominal clock (/proc/cpuinfo) and the one torch's fp32 GEMM implies, GHz."""
    mhz = 0.0
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('cpu MHz'):
                mhz = max(mhz, float(line.split(':')[1]))
    except (OSError, ValueError):
        pass
    return {'nominal_ghz': mhz / 1e3, 'fp32_implied_ghz': fp32_gflops_1core / 32}


def peak_share(gops: float, cores: int, clock: dict) -> str:
    """Return GOP/s as % of the int8 peak of ``cores`` at the nominal / fp32-implied clock."""
    peaks = [cores * INT8_OPS_PER_CYCLE * clock[c] for c in ('nominal_ghz', 'fp32_implied_ghz')]
    return ' / '.join(f'{100 * gops / p:.0f}' for p in peaks if p)


def table(results: dict, cores: int) -> str:
    """Return the Markdown tables of the stack (and the engine, if measured)."""
    lines = ['| ISA | mode | tok/s | GOP/s | % int8 peak | tok/s 1 core (CPU) | GOP/s 1 core | '
             '% int8 peak 1 core |', '|' + '---|' * 8]
    for isa, res in results['stack'].items():
        for name, rec in res['modes'].items():
            lines.append(f"| {isa} | {name} | {rec['tok_s']:.0f} | {rec['gops']:.0f} | "
                         f"{peak_share(rec['gops'], results['threads'], res['clock'])} | "
                         f"{rec['tok_s_1core']:.0f} | {rec['gops_1core']:.0f} | "
                         f"{peak_share(rec['gops_1core'], 1, res['clock'])} |")
    if results.get('engine'):
        lines += ['', '| ISA | SmolLM2 prefill_weights | tok/s (wall) | tok/s (1 core, CPU) | '
                  'RSS after load MiB | weights held MiB |', '|' + '---|' * 6]
        for isa, rows in results['engine'].items():
            for pw, rec in rows.items():
                lines.append(f"| {isa} | {pw} | {rec['tok_s']:.0f} | {rec['tok_s_1core']:.0f} "
                             f"| {rec['rss_mib_loaded']:.0f} | "
                             f"{rec['weight_bytes_held'] / 2**20:.0f} |")
    clk = next(iter(results['stack'].values()))['clock']
    nominal, implied = clk['nominal_ghz'], clk['fp32_implied_ghz']
    lines.append(f"\n{results['threads']} threads on {cores} cores, {ROWS} rows. % int8 peak: "
                 f'of cores x clock x {INT8_OPS_PER_CYCLE} ops/cycle at the nominal '
                 f'{nominal:.2f} GHz / the fp32-implied {implied:.2f} GHz')
    return '\n'.join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--engine', action='store_true', help='also SmolLM2 through the Engine')
    ap.add_argument('--isa', nargs='+', help='variants to measure (default: all this CPU runs)')
    ap.add_argument('--out', default='results/bench_quant_prefill.json')
    ap.add_argument('--child', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what = json.loads(args.child)
        res = (child_stack(args.threads, args.repeats) if what[0] == 'stack'
               else child_engine(what[1], args.threads, args.repeats))
        print(json.dumps(res))
        return 0
    from timebill_ros.core import kernels

    isas = args.isa or kernels.cpu_isas()
    results = {'machine': cpu_info(), 'uptime': uptime(), 'threads': args.threads,
               'rows': ROWS, 'shapes': layer_shapes(), 'stack': {}, 'engine': {}}
    for isa in isas:
        print(f'[bench] stack {isa} ...', file=sys.stderr, flush=True)
        res = run_child(isa, args, ['stack'])
        res['clock'] = clocks(res['modes']['dense fp32']['gops_1core'])
        results['stack'][isa] = res
        if args.engine:
            results['engine'][isa] = {}
            for pw in ('none', 'fp32', 'bf16'):
                print(f'[bench] engine {isa} prefill_weights={pw} ...', file=sys.stderr,
                      flush=True)
                results['engine'][isa][pw] = run_child(isa, args, ['engine', pw])
    text = table(results, results['machine']['cpus'])
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + '\n')
    out.with_suffix('.md').write_text(text + '\n')
    print(f'wrote {out}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
