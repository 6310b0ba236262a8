"""
The 16-bit KV cache (config ``kv_dtype``): half the bytes, read as it is by the C++ attention.

Bounds: the kernel over a 16-bit cache equals attention over those entries widened to fp32 to
1e-6 (the same fp32 arithmetic), and attention over the fp32 originals to 2 u max|v|, u the
dtype's unit roundoff (fp16 2^-11, bf16 2^-8): a softmax-weighted mean of values each rounded
by at most u |v| / 2, plus the keys' rounding of the scores (measured: at most 0.61 u max|v|,
at one cached entry, falling to 0.015 at 2500).
"""

import json
import os

from conftest import run_python
import pytest
from timebill_ros.core import kernels, kv_cache
from timebill_ros.core import weights as W
from timebill_ros.core.calibration.store import check_key, key_from_config, profile_key
from timebill_ros.core.config import TimeBillConfig
from timebill_ros.core.engine import Engine
from timebill_ros.core.errors import ProfileMismatchError
from timebill_ros.core.model import tiny_model
import torch
import torch.nn.functional as F

K = kernels.load()
needs_kernels = pytest.mark.skipif(K is None, reason=f'kernels off: {kernels.why_not()}')
UNIT = {'float16': 2.0 ** -11, 'bfloat16': 2.0 ** -8}
LENGTHS = (1, 7, 300, 1000, 2500)  # tails of 8, one split, several splits


def _reference(q, keys, values, length):
    hq, d = q.shape
    hkv = keys.shape[0]
    out = F.scaled_dot_product_attention(
        q.view(1, hkv, hq // hkv, d).double(), keys[None, :, :length].double(),
        values[None, :, :length].double(),
    )
    return out.reshape(hq, d)


def _int4_tiny(seed=0):
    model = tiny_model(seed=seed, layers=3)
    W.apply_weights(model, 'int4', prefill_weights='fp32')
    return model


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _fused_step(kern, kv):
    """Return the C++ step's worst relative gap to transformers' step on the same 16-bit cache."""
    from timebill_ros.core.fast_decode import FastDecoder

    engine = Engine(_int4_tiny(), None, press='snapkv', chat_template=False, kv_dtype=kv)
    engine.fast = FastDecoder(engine.model)  # this process's variant (kern)
    ids = torch.randint(3, 256, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    state = engine.prefill(ids, capacity=len(ids) + 40)
    engine.evict(state, 0.5)
    other = engine.clone_state(state)
    tok, pos, worst, same = int(state.logits.argmax()), len(ids), 0.0, True
    for i in range(20):
        fast = engine.fast.step(tok, pos + i, state.cache)
        ref = engine.model(
            input_ids=torch.tensor([[tok]]), cache=other.cache, use_cache=True,
            position_ids=torch.tensor([[pos + i]]),
        ).logits[0, -1]
        worst = max(worst, _rel(fast, ref))
        same = same and int(fast.argmax()) == int(ref.argmax())
        tok = int(ref.argmax())
    layer = state.cache.layers[0]
    entry = max(_rel(a.keys, b.keys) for a, b in zip(state.cache.layers, other.cache.layers))
    return {'dtype': str(layer._kbuf.dtype), 'logits': worst, 'argmax': same, 'entries': entry}


def check_all(kern):
    """Errors of ``kern`` (one ISA variant) per dtype and length, and its fused step's gaps."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for length in LENGTHS:
        q = torch.randn(6, 64, generator=g)
        keys = torch.randn(2, length + 3, 64, generator=g)
        values = torch.randn(2, length + 3, 64, generator=g) * 2
        ref = _reference(q, keys, values, length)
        for kv in UNIT:
            k16, v16 = keys.to(getattr(torch, kv)), values.to(getattr(torch, kv))
            got = kern.decode_attention(q, k16, v16, length, 64 ** -0.5).double()
            widened = _reference(q, k16.float(), v16.float(), length)
            vmax = float(values[:, :length].abs().max())
            out[f'{kv} {length}'] = [
                float((got - widened).abs().max()),
                float((got - ref).abs().max()) / (UNIT[kv] * vmax),
            ]
    out['step'] = {kv: _fused_step(kern, kv) for kv in UNIT}
    return out


@needs_kernels
@pytest.mark.parametrize('isa', ['avx2', 'avx512'])
def test_each_variant_reads_a_16bit_cache_within_the_bound(isa):
    # each variant in its own process; the avx2 one with torch limited to AVX2 as well
    if isa not in kernels.cpu_isas():
        pytest.skip(f'this CPU does not run {isa}')
    code = (
        'import json, sys\n'
        'sys.path.insert(0, sys.argv[1])\n'
        'from timebill_ros.core import kernels\n'
        'import test_kv16 as t\n'
        'print(json.dumps([kernels.origin(), t.check_all(kernels.load())]))\n'
    )
    env = {'TIMEBILL_KERNELS_ISA': isa}
    if isa == 'avx2':
        env['ATEN_CPU_CAPABILITY'] = 'avx2'
    run = run_python(code, os.path.dirname(__file__), **env)
    info, result = json.loads(run.stdout.splitlines()[-1])
    assert info['isa'] == isa
    steps = result.pop('step')
    assert len(result) == len(LENGTHS) * len(UNIT)
    for case, (vs_widened, vs_fp32_in_units) in result.items():
        assert vs_widened < 1e-6, (case, vs_widened)
        assert vs_fp32_in_units < 2.0, (case, vs_fp32_in_units)
    for kv, step in steps.items():
        assert step['dtype'] == f'torch.{kv}'
        assert step['logits'] < 1e-3 and step['argmax'], (kv, step)
        assert step['entries'] < UNIT[kv], (kv, step)  # new entries rounded as torch rounds


@needs_kernels
def test_the_kernel_refuses_mixed_or_other_cache_dtypes():
    q = torch.randn(4, 64)
    keys = torch.randn(2, 10, 64)
    with pytest.raises(RuntimeError, match='share one dtype'):
        K.decode_attention(q, keys.half(), keys.bfloat16(), 5, 0.125)
    with pytest.raises(RuntimeError, match='fp32, fp16 or bf16'):
        K.decode_attention(q, keys.double(), keys.double(), 5, 0.125)


@pytest.mark.parametrize('kv', ['float16', 'bfloat16'])
def test_the_cache_holds_half_the_bytes_and_prefill_follows_fp32(tiny, kv):
    ids = torch.randint(3, 256, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    full = Engine(tiny, None, press='snapkv', chat_template=False, kv_dtype='float32')
    half = Engine(tiny, None, press='snapkv', chat_template=False, kv_dtype=kv)
    assert half.kv_bytes_per_token() * 2 == full.kv_bytes_per_token()
    a = full.prefill(ids, chunk_tokens=64)
    b = half.prefill(ids, chunk_tokens=64)  # chunks after cached keys: the widened chunk path
    c = half.prefill(ids)  # one pass
    for i, (la, lb) in enumerate(zip(a.cache.layers, b.cache.layers)):
        assert lb._kbuf.dtype == getattr(torch, kv) and lb.keys.dtype == getattr(torch, kv)
        assert lb._kbuf.nbytes * 2 == la._kbuf.nbytes
        # layer 0's keys are the fp32 ones rounded; later layers' inputs saw rounded attention
        assert _rel(lb.keys, la.keys) < (1 if i == 0 else 10) * UNIT[kv]
    assert _rel(b.logits, a.logits) < 20 * UNIT[kv]
    assert _rel(c.logits, b.logits) < 1e-4
    assert all(s.dtype == torch.float32 for s in b.scores.values())  # the press scores in fp32


def test_a_16bit_prefix_cache_holds_half_the_bytes_and_a_warm_prefill_matches_cold(tiny):
    from timebill_ros.core.prefix_cache import PrefixCache

    ids = torch.randint(3, 256, (160,), generator=torch.Generator().manual_seed(5)).tolist()
    held = {}
    for kv in ('float32', 'float16'):
        engine = Engine(tiny, None, press='snapkv', chat_template=False, kv_dtype=kv,
                        prefix_cache=PrefixCache(16, 32))
        cold = engine.prefill(ids, chunk_tokens=32)
        warm = engine.prefill(ids, chunk_tokens=32)
        assert cold.cached_tokens == 0 and warm.cached_tokens == 96  # the window is recomputed
        assert warm.cache.layers[0].keys.dtype == getattr(torch, kv)
        assert _rel(warm.logits, cold.logits) < 1e-5
        held[kv] = engine.prefix_cache.bytes_held
    assert held['float16'] * 2 == held['float32'] > 0


@pytest.mark.parametrize('press', ['snapkv', 'chunkkv'])
def test_eviction_keeps_what_it_keeps_with_fp32(tiny, press):
    ids = torch.randint(3, 256, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    kept = {}
    for kv in ('float32', 'float16', 'bfloat16'):
        engine = Engine(tiny, None, press=press, chat_template=False, kv_dtype=kv)
        state = engine.prefill(ids)
        keys = [la.keys for la in state.cache.layers]
        kept[kv] = engine.press.select(keys, state.scores, 150)
        engine.evict(state, 0.5)
        assert state.cache.layers[0].length == 150
    for kv in ('float16', 'bfloat16'):
        for ref, got in zip(kept['float32'], kept[kv]):
            same = sum(len(set(r.tolist()) & set(x.tolist()))
                       for r, x in zip(ref.flatten(0, 1), got.flatten(0, 1)))
            assert same / ref.numel() >= (0.99 if kv == 'float16' else 0.95), (kv, same)


def test_an_unknown_kv_dtype_is_refused_with_the_choices(tiny):
    choices = r"kv_dtype must be one of float32, float16, bfloat16, got 'int8'"
    with pytest.raises(ValueError, match=choices):
        TimeBillConfig(kv_dtype='int8').validate()
    with pytest.raises(ValueError, match='kv_dtype must be one of'):
        TimeBillConfig.from_mapping({'kv_dtype': 'fp16'})
    with pytest.raises(ValueError, match='kv_dtype must be one of'):
        kv_cache.kv_dtype('half')
    with pytest.raises(ValueError, match='kv_dtype must be one of'):
        Engine(tiny, None, chat_template=False, kv_dtype='float8')
    with pytest.raises(ValueError, match='needs the preallocated cache'):
        Engine(tiny, None, chat_template=False, kv_dtype='float16', preallocate=False)
    assert TimeBillConfig().kv_dtype == 'float32'


def test_the_timing_profile_key_names_a_16bit_cache(tiny):
    cfg = TimeBillConfig(model='tiny', threads=1)
    key32, key16 = key_from_config(cfg), key_from_config(cfg.replace(kv_dtype='float16'))
    assert 'kv_dtype' not in key32 and key16['kv_dtype'] == 'float16'
    with pytest.raises(ProfileMismatchError, match='kv_dtype'):
        check_key(key32, key16)
    engine = Engine(tiny, None, chat_template=False, kv_dtype='bfloat16')
    assert profile_key(engine)['kv_dtype'] == 'bfloat16'
    assert 'kv_dtype' not in profile_key(Engine(tiny, None, chat_template=False))
