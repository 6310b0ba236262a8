#!/usr/bin/env python
"""
Engine benchmark: decode and prefill per weight format, eviction gain, roofline, quality guard.

Per format (fp32, bf16, int8, int4) and thread count: decode ms/token at KV 128/1k/4k/8k on a
cache holding a real prompt's entries (one 8k prefill, cropped: causal attention makes the first
n entries exactly those of an n-token prefill), prefill seconds at 128/1k/4k (chunks of 256 as
requests run them), the step at 8k ÷ the step after real α = 0.95 SnapKV eviction, and the
roofline (bytes one step reads ÷ measured read bandwidth). With ``llama-cpp-python`` importable
the same GGUF runs in llama.cpp beside it as an anchor (optional, benchmark only)::

    .venv/bin/pip install llama-cpp-python==0.3.36   # builds from source: several minutes

``--quality`` adds the quality guard (greedy agreement with fp32, long-context task scores),
``--calibration`` the held-out accuracy of the calibrated time model and its error on real
prefill + decode runs. Timings are medians of steps (decode) or minima of repeats (prefill); the
load average is recorded beside each section. Writes ``results/bench_engine.json`` and ``.png``.

    .venv/bin/python benchmarks/bench_engine.py [--quick] [--quality] [--calibration]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path
import platform
import statistics
import sys
import time

from timebill_ros.core import weights as W
from timebill_ros.core.calibration.timing import time_decode_step
from timebill_ros.core.config import TimeBillConfig
from timebill_ros.core.engine import Engine
from timebill_ros.core.generation import GenerationRequest
from timebill_ros.core.model import gguf_source, load_model
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also under -P
from benchkit import load1  # noqa: E402,I100
from engine_quality import quality_guard  # noqa: E402
from engine_report import CHUNK, markdown, plot  # noqa: E402

FORMATS = ('fp32', 'bf16', 'int8', 'int4')
DECODE_KV = (128, 1024, 4096, 8000)
PREFILL_N = (128, 1024, 4096)
INSTALL_HINT = 'pip install llama-cpp-python==0.3.36  (optional anchor; builds from source)'


def wait_for_quiet(limit: float = 1.3, tries: int = 5) -> float:
    """Wait (up to ``tries`` minutes) for a 1-minute load under ``limit``; return the load."""
    for _ in range(tries):
        if load1() <= limit:
            break
        print(f'load {load1()} > {limit}: waiting 60 s', flush=True)
        time.sleep(60)
    return load1()


def read_bandwidth(threads: int, mib: int = 1024, repeats: int = 5) -> float:
    """Bytes per second a sum over a large tensor reads: the decode roofline's denominator."""
    torch.set_num_threads(threads)
    x = torch.ones(mib * 1024 * 1024 // 4)
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def long_prompt(engine: Engine, n: int) -> list:
    """Return a real prompt of at least ``n`` tokens (a long-context QA task) as token ids."""
    from timebill_ros.core.evaluation.tasks import counter_for, make_task

    task = make_task('qa', n + 64, counter_for(engine), seed=0)
    ids = engine.encode(task.prompt, task.system_prompt)
    assert len(ids) >= n, (len(ids), n)
    return ids


@torch.inference_mode()
def decode_steps(engine: Engine, cache, ids, n_kv: int, pos: int, steps: int) -> float:
    """Return the median step time at ``n_kv`` cached entries (real tokens at real positions)."""
    for layer in cache.layers:
        if layer.get_seq_length() < n_kv:
            raise ValueError(f'the cache holds {layer.get_seq_length()} entries, not {n_kv}')
        layer.crop(n_kv)
    times = []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        int(torch.argmax(engine.step(ids[(pos + s) % len(ids)], pos + s, cache)))
        times.append(time.perf_counter() - t0)
    for layer in cache.layers:
        layer.crop(n_kv)
    return statistics.median(times[1:])


def kv_bytes_per_token(model) -> int:
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # fp32 KV


def bench_format(fmt, ids, threads, bandwidth, steps, repeats, kv_lengths, prefill_lengths):
    """Measure one weight format (the model is loaded once)."""
    t0 = time.perf_counter()
    model, tok = load_model(weights=fmt, threads=max(threads))
    load_s = time.perf_counter() - t0
    engine = Engine(model, tok, press='snapkv')
    row = {
        'format': fmt,
        'load_s': load_s,
        'weight_bytes_per_step': W.weight_bytes(model),
        'weight_bytes_held': W.weight_bytes(model, decode=False),
        'threads': {},
    }
    n_long = max(kv_lengths)
    torch.set_num_threads(max(threads))
    state = engine.prefill(
        ids[:n_long], capacity=n_long + steps + 8, chunk_tokens=CHUNK, prefix=False
    )
    evicted = engine.evict(engine.clone_state(state), 0.95)
    kvb = kv_bytes_per_token(model)
    for t in threads:
        torch.set_num_threads(t)
        r = {'load_start': load1(), 'decode_ms': {}, 'calib_decode_ms': {}, 'roofline_ms': {}}
        # a copy per thread count, longest first: a crop cannot grow the cache back, and the
        # steps at n only write entries >= n, which the shorter lengths never read
        cache = engine.clone_state(state).cache
        for n in sorted(kv_lengths, reverse=True):
            r['decode_ms'][n] = 1e3 * decode_steps(engine, cache, ids, n, n, steps)
            r['roofline_ms'][n] = 1e3 * (row['weight_bytes_per_step'] + kvb * n) / bandwidth[t]
        r['decode_ms'] = dict(sorted(r['decode_ms'].items()))
        r['roofline_ms'] = dict(sorted(r['roofline_ms'].items()))
        del cache
        # what calibration times (a random-filled cache), beside the real cache
        r['calib_decode_ms'][n_long] = 1e3 * statistics.median(
            time_decode_step(engine, n_long, steps + 1)[1:]
        )
        r['evicted_kv'] = evicted.kv_after
        r['evicted_ms'] = 1e3 * decode_steps(
            engine, engine.clone_state(evicted).cache, ids, evicted.kv_after, n_long, steps
        )
        r['eviction_gain'] = r['decode_ms'][n_long] / r['evicted_ms']
        r['prefill_s'] = {}
        for n in prefill_lengths:
            best = min(
                engine.prefill(ids[:n], capacity=n + 1, chunk_tokens=CHUNK, prefix=False).prefill_s
                for _ in range(repeats)
            )
            r['prefill_s'][n] = best
        r['load_end'] = load1()
        row['threads'][t] = r
        print(
            f'  {fmt} t={t}: decode ms '
            + ' '.join(f'{n}:{v:.1f}' for n, v in r['decode_ms'].items())
            + f' | evicted {r["evicted_ms"]:.1f} (gain {r["eviction_gain"]:.2f}x) | prefill s '
            + ' '.join(f'{n}:{v:.2f}' for n, v in r['prefill_s'].items())
            + f' | load {r["load_start"]}->{r["load_end"]}',
            flush=True,
        )
    del state, evicted, engine, model
    gc.collect()
    return row


def bench_llama_cpp(ids, threads, steps, prefill_repeats, kv_lengths, prefill_lengths):
    """Measure the same in llama.cpp, on the GGUF the default model comes from."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError:
        print(f'llama.cpp anchor skipped (llama_cpp not importable): {INSTALL_HINT}')
        return None
    path = gguf_source('')
    n_long = max(kv_lengths)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_long + steps + 16,
        n_batch=512,
        n_threads=max(threads),
        n_threads_batch=max(threads),
        flash_attn=False,
        verbose=False,
    )
    row = {'format': 'llama.cpp Q4_1', 'version': llama_cpp.__version__, 'threads': {}}

    def set_threads(t):
        llama_cpp.llama_set_n_threads(llm.ctx, t, t)

    def step(n_kv, pos):
        llm.n_tokens = n_kv  # eval() first drops every cached position >= n_tokens
        times = []
        for s in range(steps + 1):
            t0 = time.perf_counter()
            llm.eval([ids[(pos + s) % len(ids)]])
            int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    set_threads(max(threads))
    llm.reset()
    llm.eval(ids[:n_long])
    for t in threads:
        row['threads'][t] = {'load_start': load1(), 'decode_ms': {}, 'prefill_s': {}}
    # llama.cpp really drops positions >= n: longest first, every thread count at each length
    for n in sorted(kv_lengths, reverse=True):
        for t in threads:
            set_threads(t)
            row['threads'][t]['decode_ms'][n] = 1e3 * step(n, n)
    for t in threads:
        row['threads'][t]['decode_ms'] = dict(sorted(row['threads'][t]['decode_ms'].items()))
    for t in threads:  # prefill last: it overwrites the long prompt's cache
        set_threads(t)
        r = row['threads'][t]
        for n in prefill_lengths:
            best = float('inf')
            for _ in range(prefill_repeats):
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(ids[:n])
                best = min(best, time.perf_counter() - t0)
            r['prefill_s'][n] = best
        r['load_end'] = load1()
        print(
            f'  llama.cpp t={t}: decode ms '
            + ' '.join(f'{n}:{v:.1f}' for n, v in r['decode_ms'].items())
            + ' | prefill s '
            + ' '.join(f'{n}:{v:.2f}' for n, v in r['prefill_s'].items()),
            flush=True,
        )
    llm.close() if hasattr(llm, 'close') else None
    return row


# -------------------------------------------------------------------------------- calibration
def calibration_check(fmt, threads, quick=False, profile=None):
    """
    Calibrate ``fmt`` (or take ``profile``, a `timebill calibrate` output), then compare.

    The fitted model against real prefill + decode runs of real prompts.
    """
    from timebill_ros.core.calibration import fit, store, timing

    cfg = TimeBillConfig(weights=fmt, threads=threads)
    engine = Engine.from_config(cfg)
    load_start = load1()
    if profile:
        prof = store.load_profile(profile, store.profile_key(engine))
    elif quick:
        prof = timing.calibrate(
            engine,
            timing.QUICK_PREFILL_GRID,
            timing.QUICK_DECODE_GRID,
            timing.QUICK_PREFILL_HELD_OUT,
            timing.QUICK_DECODE_HELD_OUT,
            repeats=2,
            decode_repeats=3,
            progress=False,
        )
    else:  # the grids of `timebill calibrate`, fewer repeats: minutes, not a quarter hour
        prof = timing.calibrate(engine, repeats=2, decode_repeats=3, progress=False)
    m = prof.model
    shape = fit.chunked_prefill_fit(prof, CHUNK)
    res = {
        'format': fmt,
        'threads': threads,
        'key': prof.key,
        'load': [load_start, load1()],
        'coefficients': m.to_dict(),
        'mape_held_out': prof.mape,
        'mape_fit': prof.fit_mape,
        'chunk_aware_prefill': shape,
        'real_runs': [],
    }
    print(
        f'  {fmt} t={threads}: held-out MAPE prefill {prof.mape["prefill"]:.2f} % '
        f'(chunk-aware {shape["mape_held_out"]:.2f} %), decode {prof.mape["decode"]:.2f} %',
        flush=True,
    )
    steps = 8 if quick else 32
    for n in (256, 512) if quick else (1024, 4096, 8000):
        ids = long_prompt(engine, n)[:n]
        state = engine.prefill(ids, capacity=n + steps + 2, chunk_tokens=CHUNK, prefix=False)
        eos = engine.eos_ids
        engine.eos_ids = set()
        try:
            r = engine.decode(state, GenerationRequest(input_ids=ids, max_new_tokens=steps + 1))
        finally:
            engine.eos_ids = eos
        dec_pred = sum(m.decode_step_s(n + i) for i in range(len(r.decode_step_s)))
        run = {
            'n': n,
            'prefill_s': state.prefill_s,
            'prefill_pred_s': m.prefill_s(n),
            'decode_s': r.decode_s,
            'decode_pred_s': dec_pred,
            'steps': len(r.decode_step_s),
        }
        run['prefill_err_pct'] = 100 * (run['prefill_pred_s'] / run['prefill_s'] - 1)
        run['decode_err_pct'] = 100 * (dec_pred / r.decode_s - 1)
        res['real_runs'].append(run)
        print(
            f'    N={n}: prefill {state.prefill_s:.3f} s vs {m.prefill_s(n):.3f} '
            f'({run["prefill_err_pct"]:+.1f} %), {run["steps"]} decode steps {r.decode_s:.3f} s '
            f'vs {dec_pred:.3f} ({run["decode_err_pct"]:+.1f} %)',
            flush=True,
        )
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--quick', action='store_true', help='short lengths, few repeats')
    ap.add_argument('--formats', default=','.join(FORMATS))
    ap.add_argument('--threads', default='1,2')
    ap.add_argument('--kv', default=','.join(map(str, DECODE_KV)), help='decode KV lengths')
    ap.add_argument('--prefill', default=','.join(map(str, PREFILL_N)), help='prefill lengths')
    ap.add_argument('--steps', type=int, default=12, help='decode steps per length')
    ap.add_argument('--repeats', type=int, default=2, help='prefill repeats (minimum kept)')
    ap.add_argument('--quality', action='store_true', help='add the quality guard')
    ap.add_argument('--calibration', action='store_true', help='add the calibration check')
    ap.add_argument('--calibration-format', default=TimeBillConfig().weights)
    ap.add_argument(
        '--calibration-profile', help='check this `timebill calibrate` profile, not a new fit'
    )
    ap.add_argument('--no-speed', action='store_true', help='skip the speed tables')
    ap.add_argument('--out', default='results/bench_engine.json')
    args = ap.parse_args()
    formats = [W.check_format(f) for f in args.formats.split(',') if f]
    threads = [int(t) for t in args.threads.split(',')]
    kv = (128, 512) if args.quick else tuple(int(n) for n in args.kv.split(','))
    pre = (128, 256) if args.quick else tuple(int(n) for n in args.prefill.split(','))
    steps, repeats = (4, 1) if args.quick else (args.steps, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        'machine': platform.processor() or platform.machine(),
        'cpu_capability': torch.backends.cpu.get_cpu_capability(),
        'cpus': os.cpu_count(),
        'torch': torch.__version__,
        'threads': threads,
        'decode_kv': list(kv),
        'prefill_n': list(pre),
        'prefill_chunk': CHUNK,
        'load_at_start': wait_for_quiet(),
    }
    print(f'load {report["load_at_start"]}, cpu {report["cpu_capability"]}', flush=True)
    if not args.no_speed:
        report['read_bandwidth_GBps'] = {}
        bw = {}
        for t in threads:
            bw[t] = read_bandwidth(t)
            report['read_bandwidth_GBps'][t] = bw[t] / 1e9
        print('read bandwidth GB/s', {t: round(v / 1e9, 1) for t, v in bw.items()})
        probe, tok = load_model(threads=max(threads))
        ids = long_prompt(Engine(probe, tok, press='none'), max(kv))
        del probe
        report['formats'] = []
        for fmt in formats:
            report['formats'].append(
                bench_format(fmt, ids, threads, bw, steps, repeats, kv, pre)
            )
        report['llama_cpp'] = bench_llama_cpp(ids, threads, steps, repeats, kv, pre)
        md = markdown(report)
        print('\n' + md)
        report['markdown'] = md
        plot(report, out.with_suffix('.png'))
    if args.quality:
        print('\nquality guard (greedy vs fp32, α = 0 task scores)', flush=True)
        report['quality'] = quality_guard(formats, new_tokens=32 if args.quick else 64,
                                          task_tokens=256 if args.quick else 1024)
    if args.calibration:
        print('\ncalibration check', flush=True)
        report['calibration'] = calibration_check(
            args.calibration_format, max(threads), quick=args.quick,
            profile=args.calibration_profile,
        )
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f'\nwrote {out}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
