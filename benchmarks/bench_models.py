#!/usr/bin/env python
"""
Model sizes: load memory and speed of real model shapes, loaded from GGUF files as users do.

Shapes (from the models' own configs): Qwen2.5-0.5B/1.5B/3B/7B-Instruct, Llama-3.2-1B-Instruct,
plus the real SmolLM2-135M-Instruct (its shipped GGUF, the default config). Each shape is built
from a transformers config (parameters on ``meta``), filled with random weights and written once
as a Q4_K_M-like GGUF (``core.gguf_write``: Q4_K, Q6_K for the head / some attn_v and ffn_down,
Q4_1 / Q8_0 where a row is not whole 256-blocks; each (shape, type) drawn once and reused, the
values do not change a timing) into ``$TIMEBILL_CACHE/bench_models/`` with SmolLM2's tokenizer.

Every (size, prefill_weights) runs in its own process, loaded through ``Engine.from_config``
(model = the .gguf file): RSS held after the load and the peak during it (/proc VmRSS, VmHWM
reset before), the GGUF size, the KV cache of the configured context (the model's
``max_position_embeddings``, or ``--context``; bytes per the config's ``kv_dtype``, or
``--kv-dtype``), prefill tok/s at 1k/4k (random ids,
chunks of the config's ``prefill_chunk``) and decode ms/token at KV 1k/4k (a written cache, as
calibration times it). Prefill runs twice: the default ``prefill_weights`` and the other path
(a dense copy vs the quantised layers); llama.cpp runs the same file when ``llama_cpp`` imports.
A size whose estimated need exceeds MemAvailable is skipped with the numbers. Writes
``results/bench_models.{json,md,png}``.

    .venv/bin/python benchmarks/bench_models.py [--quick] [--sizes qwen2.5-0.5b,...]

``--quick``: the 0.5B shape only, prefill at 1k; the last line is
``params_m=... rss_gib=... gguf_plus_kv_gib=... prefill_tok_s=... dense_prefill_tok_s=...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also under -P
from benchkit import cpu_info, load1, mem_available, proc_status, progress  # noqa: E402
from benchkit import reset_peak, uptime, wait_for_quiet  # noqa: E402

GIB = 2 ** 30
QWEN = {'model_type': 'qwen2', 'rope_theta': 1e6, 'rms_norm_eps': 1e-6,
        'max_position_embeddings': 32768, 'vocab_size': 151936, 'tie_word_embeddings': True}
SHAPES = {  # name: transformers config (Hugging Face config.json of the Instruct models)
    'smollm2-135m': None,  # the shipped GGUF, default config
    'qwen2.5-0.5b': {**QWEN, 'hidden_size': 896, 'num_hidden_layers': 24,
                     'num_attention_heads': 14, 'num_key_value_heads': 2,
                     'intermediate_size': 4864},
    'llama3.2-1b': {'model_type': 'llama', 'hidden_size': 2048, 'num_hidden_layers': 16,
                    'num_attention_heads': 32, 'num_key_value_heads': 8, 'head_dim': 64,
                    'intermediate_size': 8192, 'vocab_size': 128256, 'rope_theta': 500000.0,
                    'rms_norm_eps': 1e-5, 'max_position_embeddings': 131072,
                    'tie_word_embeddings': True},
    'qwen2.5-1.5b': {**QWEN, 'hidden_size': 1536, 'num_hidden_layers': 28,
                     'num_attention_heads': 12, 'num_key_value_heads': 2,
                     'intermediate_size': 8960},
    'qwen2.5-3b': {**QWEN, 'hidden_size': 2048, 'num_hidden_layers': 36,
                   'num_attention_heads': 16, 'num_key_value_heads': 2,
                   'intermediate_size': 11008},
    'qwen2.5-7b': {**QWEN, 'hidden_size': 3584, 'num_hidden_layers': 28,
                   'num_attention_heads': 28, 'num_key_value_heads': 4,
                   'intermediate_size': 18944, 'vocab_size': 152064,
                   'tie_word_embeddings': False},
}
INSTALL_HINT = 'pip install llama-cpp-python==0.3.36  (optional anchor; builds from source)'


# ------------------------------------------------------------------------------- the shapes
def hf_config(name: str):
    """Return the transformers config of a shape (the real SmolLM2's for 'smollm2-135m')."""
    from transformers import AutoConfig

    if SHAPES[name] is None:
        from timebill_ros.core.model import resolve_model_path

        return AutoConfig.from_pretrained(resolve_model_path('')[0])
    spec = dict(SHAPES[name])
    return AutoConfig.for_model(spec.pop('model_type'), **spec)


def facts(cfg, kv_dtype: str = 'float32') -> dict:
    """Parameters of a config and the per-token KV bytes (``kv_dtype``), on a meta skeleton."""
    from timebill_ros.core.kv_cache import kv_dtype as torch_kv_dtype

    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    if getattr(cfg, 'tie_word_embeddings', False):
        model.tie_weights()  # not done on meta by from_config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)
                 and m is not model.get_output_embeddings())
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        'params': sum(p.numel() for p in model.parameters()),
        'linear_params': linear,
        'embedding_params': cfg.vocab_size * cfg.hidden_size,
        'kv_bytes_per_token': 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim
        * torch_kv_dtype(kv_dtype).itemsize,
        'kv_dtype': kv_dtype,
        'max_position_embeddings': cfg.max_position_embeddings,
    }


def ensure_gguf(name: str, cfg, log) -> Path:
    """Write the shape's random Q4_K_M-like GGUF once (cached); SmolLM2: its shipped file."""
    from timebill_ros.core.config import cache_dir
    from timebill_ros.core.model import gguf_source

    if SHAPES[name] is None:
        return gguf_source('')
    path = cache_dir() / 'bench_models' / f'{name}-q4_k_m-random.gguf'
    if path.is_file():
        return path
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from timebill_ros.core.gguf_write import write_gguf

    with init_empty_weights():
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).named_parameters()}
    gen = torch.Generator().manual_seed(0)

    def tensor(hf):
        if len(shapes[hf]) == 1 and 'norm' in hf:
            return torch.ones(shapes[hf])
        return torch.randn(shapes[hf], generator=gen) * 0.02

    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log(f'writing {path.name} (random weights, once)')
    write_gguf(path, cfg, shapes, tensor, 'q4_k_m', tokenizer_from=gguf_source(''), reuse=True)
    log(f'wrote {path.name}: {path.stat().st_size / GIB:.2f} GiB in {time.monotonic() - t0:.0f}s')
    return path


def estimate_need(f: dict, dense_bytes: int, kv_tokens: int) -> int:
    """Bytes a load + run is expected to hold at its peak (int4 0.75 B/weight with fp32 d/m)."""
    emb = f['embedding_params']
    held = f['linear_params'] * (0.75 + dense_bytes) + emb * (4 + 1)  # fp32 embedding, int8 head
    return int(0.7 * GIB + held + 2 * 4 * emb + f['kv_bytes_per_token'] * kv_tokens)


# ------------------------------------------------------------------------------ one process
def child(job: dict) -> dict:
    """Load one (size, prefill_weights) through the config path and measure it."""
    import torch  # noqa: F401  - the libraries a load uses are in the baseline
    from transformers import AutoModelForCausalLM  # noqa: F401

    from timebill_ros.core import kernels, weights as W
    from timebill_ros.core.calibration.timing import time_decode_step, time_prefill
    from timebill_ros.core.config import TimeBillConfig
    from timebill_ros.core.engine import Engine

    kernels.load()
    cfg = TimeBillConfig(model=job['spec'], prefill_weights=job['prefill_weights'],
                         threads=job['threads'], kv_dtype=job.get('kv_dtype', 'float32'))
    before = proc_status()
    reset_peak()
    t0 = time.monotonic()
    engine = Engine.from_config(cfg)
    out = {'load_s': time.monotonic() - t0, 'before': before, 'after': proc_status(),
           'weights_held_bytes': W.weight_bytes(engine.model, decode=False),
           'weights_step_bytes': W.weight_bytes(engine.model),
           'max_context': engine.max_context, 'load1': [load1()], 'prefill_tok_s': {},
           'decode_ms': {}, 'skipped_lengths': {}}
    last = None
    for n in job['prefill']:
        if last and last[1] * n / last[0] * 1.3 > job['prefill_limit_s']:
            est = last[1] * n / last[0]
            out['skipped_lengths'][f'prefill {n}'] = (
                f'estimated {est:.0f}s from {last[0]} tokens > --prefill-limit-s')
            continue
        best = min(time_prefill(engine, n, job['repeats']))
        out['prefill_tok_s'][n], last = n / best, (n, best)
        print(f'  prefill {n}: {n / best:.1f} tok/s', file=sys.stderr, flush=True)
    for n in job['decode']:
        out['decode_ms'][n] = 1e3 * statistics.median(time_decode_step(engine, n, 6)[1:])
        print(f'  decode @{n}: {out["decode_ms"][n]:.1f} ms', file=sys.stderr, flush=True)
    out['load1'].append(load1())
    return out


def llama_cpp_child(job: dict) -> dict:
    """Measure the same GGUF in llama.cpp (prefill tok/s, decode ms/token at KV n)."""
    import llama_cpp

    n_max = max(job['prefill'] + job['decode'])
    llm = llama_cpp.Llama(model_path=job['gguf'], n_ctx=n_max + 16, n_batch=512,
                          n_threads=job['threads'], n_threads_batch=job['threads'], verbose=False)
    ids = [5 + i % 1000 for i in range(n_max + 8)]
    out = {'version': llama_cpp.__version__, 'prefill_tok_s': {}, 'decode_ms': {}}
    for n in job['prefill']:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:n])
        out['prefill_tok_s'][n] = n / (time.perf_counter() - t0)
    llm.reset()
    llm.eval(ids[:max(job['decode'])])
    for n in sorted(job['decode'], reverse=True):
        steps = []
        for s in range(6):
            llm.n_tokens = n
            t0 = time.perf_counter()
            llm.eval([ids[n + s]])
            steps.append(time.perf_counter() - t0)
        out['decode_ms'][n] = 1e3 * statistics.median(steps[1:])
    return out


def run_child(job: dict, timeout: float) -> dict:
    """Run one job in a fresh interpreter; return its JSON or {'error': why}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), '--child', json.dumps(job)]
    try:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'error': f'timed out after {timeout:.0f}s'}
    lines = res.stdout.strip().splitlines()
    if res.returncode or not lines:
        return {'error': f'exit {res.returncode}: {res.stdout[-300:]}'}
    return json.loads(lines[-1])


def write_child(name: str) -> dict:
    """Write a shape's GGUF in its own process (the parent stays small for the measured ones)."""
    path = ensure_gguf(name, hf_config(name), lambda m: print(m, file=sys.stderr, flush=True))
    return {'gguf': str(path), 'bytes': path.stat().st_size}


# ---------------------------------------------------------------------------------- the runs
def prefill_settings():
    """Return (the default prefill_weights, the other path to compare it with)."""
    import torch

    from timebill_ros.core.config import TimeBillConfig
    from timebill_ros.core.weights import prefill_dtype

    default = TimeBillConfig().prefill_weights
    if prefill_dtype(default) is not None:  # the default is a dense copy: compare the layers
        return default, 'none'
    return default, 'bf16' if torch.cpu._is_avx512_bf16_supported() else 'fp32'


def _name(dtype):
    return None if dtype is None else str(dtype).removeprefix('torch.')


def measure(name: str, args, say) -> dict:
    """Write (once) and measure one size: both prefill paths, llama.cpp where it imports."""
    import importlib.util

    from timebill_ros.core.config import DEFAULT_MODEL
    from timebill_ros.core.weights import prefill_dtype

    cfg = hf_config(name)
    f = facts(cfg, args.kv_dtype)
    say(f'{name}: GGUF')
    written = run_child({'write': name}, args.child_timeout)
    if 'error' in written:
        return {'size': name, 'error': f'writing the GGUF: {written["error"]}'}
    ctx = args.context or f['max_position_embeddings']
    row = {'size': name, 'arch': cfg.model_type, **f, 'gguf': written['gguf'],
           'gguf_bytes': written['bytes'], 'context': ctx,
           'kv_bytes': f['kv_bytes_per_token'] * ctx, 'runs': {}}
    default, other = prefill_settings()
    for pw in (default, other):
        say(f'{name}: prefill_weights={pw}')
        dense = prefill_dtype(pw)
        need = estimate_need(f, 0 if dense is None else dense.itemsize, max(args.kv) + 512)
        avail = mem_available()
        if avail and need > 0.9 * avail:
            why = (f'needs ~{need / GIB:.1f} GiB (weights, fp32 embedding, '
                   f'{_name(dense) or "no"} prefill copy, peak temporaries)'
                   f' > 90 % of MemAvailable {avail / GIB:.1f} GiB')
            print(f'  {name} prefill_weights={pw} skipped: {why}', flush=True)
            row['runs'][pw] = {'skipped': why}
            continue
        job = {'spec': written['gguf'] if SHAPES[name] else DEFAULT_MODEL,
               'prefill_weights': pw, 'threads': args.threads, 'prefill': args.prefill,
               'decode': args.kv if pw == default else [], 'repeats': args.repeats,
               'prefill_limit_s': args.prefill_limit_s, 'kv_dtype': args.kv_dtype}
        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet, say=lambda m: print(f'  {m}', flush=True))
        res = run_child(job, args.child_timeout)
        res['dense'] = _name(dense)
        row['runs'][pw] = res
    if importlib.util.find_spec('llama_cpp') is None:
        row['llama_cpp'] = {'skipped': f'llama_cpp not importable: {INSTALL_HINT}'}
    else:
        say(f'{name}: llama.cpp')
        row['llama_cpp'] = run_child({'llama_cpp': True, 'gguf': written['gguf'],
                                      'threads': args.threads, 'prefill': args.prefill,
                                      'decode': args.kv}, args.child_timeout)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='0.5B shape, prefill at 1k (<= 5 min)')
    ap.add_argument('--sizes', default='', help=f'comma-separated, of {", ".join(SHAPES)}')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--context', type=int, default=0, help="KV context (0: the model's)")
    ap.add_argument('--kv-dtype', default='', help="the engine's kv_dtype (empty: the config's)")
    ap.add_argument('--repeats', type=int, default=2, help='prefill repeats (the best counts)')
    ap.add_argument('--prefill-lengths', default='1024,4096', help='prompt tokens to prefill')
    ap.add_argument('--prefill-limit-s', type=float, default=900.0,
                    help='skip a prefill length estimated to take longer')
    ap.add_argument('--child-timeout', type=float, default=3600.0)
    ap.add_argument('--wait-quiet', type=float, default=0.0, metavar='LOAD',
                    help='before each measured run wait (up to 5 min) for a 1-min load <= LOAD')
    ap.add_argument('--out', default='results/bench_models')
    ap.add_argument('--no-progress', action='store_true')
    ap.add_argument('--child', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        fn = write_child if 'write' in job else llama_cpp_child if 'llama_cpp' in job else child
        print(json.dumps(fn(job['write']) if 'write' in job else fn(job)), flush=True)
        return 0
    from models_report import markdown, plot, quick_line

    sizes = ['qwen2.5-0.5b'] if args.quick else [s for s in args.sizes.split(',') if s] or list(
        SHAPES)
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        ap.error(f'unknown sizes {unknown}; known: {", ".join(SHAPES)}')
    args.prefill = [1024] if args.quick else [int(n) for n in args.prefill_lengths.split(',')]
    args.kv = [1024, 4096]
    if not args.kv_dtype:
        from timebill_ros.core.config import TimeBillConfig

        args.kv_dtype = TimeBillConfig().kv_dtype
    args.repeats = 1 if args.quick else args.repeats
    meta = {'cpu': cpu_info(), 'uptime_start': uptime(), 'threads': args.threads,
            'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'argv': sys.argv[1:]}
    step = progress(3 * len(sizes), not args.no_progress, 'bench_models')
    rows = [measure(name, args, step) for name in sizes]
    step.close()
    meta['uptime_end'] = uptime()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps({'meta': meta, 'rows': rows}, indent=1))
    table = markdown(rows, meta)
    out.with_suffix('.md').write_text(table)
    png = plot(rows, out.with_suffix('.png'))
    print(table)
    print(f'wrote {out}.json, {out}.md' + (f', {png}' if png else ''))
    print(quick_line(rows[0]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
