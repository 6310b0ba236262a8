"""The decode kernels: prebuilt, loaded without compiling, computing what transformers does."""

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

from conftest import run_python
import pytest
from timebill_ros.core import kernels
from timebill_ros.core import weights as W
from timebill_ros.core.calibration.store import profile_key
from timebill_ros.core.engine import Engine
from timebill_ros.core.fast_decode import FastDecoder, kernel_step_name
from timebill_ros.core.generation import GenerationRequest
from timebill_ros.core.model import tiny_model
import torch
import torch.nn.functional as F

K = kernels.load()
needs_kernels = pytest.mark.skipif(K is None, reason=f'kernels off: {kernels.why_not()}')


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@needs_kernels
def test_the_workspace_build_is_loaded_without_compiling():
    # make setup / colcon build put one library per ISA beside the package; load() takes the
    # best one this CPU runs, with no compiler involved
    info = kernels.origin()
    assert info['source'] == 'prebuilt', info
    assert info['isa'] == kernels.cpu_isas()[0]
    path = Path(info['path'])
    assert path.is_file() and path.parent.parent in kernels.prebuilt_roots()
    manifest = json.loads((path.parent / 'manifest.json').read_text())
    assert info['isa'] in manifest['variants'] and manifest['tag'] == info['tag']


@needs_kernels
@pytest.mark.parametrize('isa', ['avx2', 'avx512'])
def test_each_built_variant_this_cpu_runs_computes_the_reference(isa):
    if isa not in kernels.cpu_isas():
        pytest.skip(f'this CPU does not run {isa}')
    code = (
        'import json, torch\n'
        'from timebill_ros.core import kernels, weights as W\n'
        'K = kernels.load()\n'
        'g = torch.Generator().manual_seed(0)\n'
        'layer = W.Int4Linear.quantize(torch.randn(96, 256, generator=g) * 0.1)\n'
        'x = torch.randn(3, 256, generator=g)\n'
        'ref = x @ layer.dequantized().t()\n'
        'y = K.q4_1_linear(x, layer.q4_blocks, layer.q4_d, layer.q4_m)\n'
        'print(json.dumps([kernels.origin(), float((y - ref).norm() / ref.norm())]))\n'
    )
    info, err = json.loads(run_python(code, TIMEBILL_KERNELS_ISA=isa).stdout.splitlines()[-1])
    assert (info['source'], info['isa']) == ('prebuilt', isa)
    assert err < 1e-4


@needs_kernels
def test_tensors_on_another_device_are_refused_by_name():
    meta = {'device': 'meta'}
    layer = W.Int4Linear.quantize(torch.randn(64, 64) * 0.1)
    with pytest.raises(RuntimeError, match='x must be a CPU tensor, got one on meta'):
        K.q4_1_linear(torch.randn(1, 64, **meta), layer.q4_blocks, layer.q4_d, layer.q4_m)
    with pytest.raises(RuntimeError, match='Q4_1 d must be a CPU tensor'):
        K.q4_1_linear(torch.randn(1, 64), layer.q4_blocks, layer.q4_d.to('meta'), layer.q4_m)
    with pytest.raises(RuntimeError, match='scale must be a CPU tensor'):
        K.q8_linear(torch.randn(1, 64), torch.zeros(4, 64, dtype=torch.int8),
                    torch.ones(4, **meta))
    keys = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match='values must be a CPU tensor'):
        K.decode_attention(torch.randn(2, 8), keys, torch.randn(1, 4, 8, **meta), 3, 1.0)
    with pytest.raises(RuntimeError, match='q must be a CPU tensor'):
        K.decode_attention(torch.randn(2, 8, **meta), keys, keys, 3, 1.0)


def test_without_a_build_the_recipe_is_compiled_once_per_key_with_a_warning(tmp_path):
    # a package copy nobody built: load() says why and compiles build.py's recipe into the
    # cache; a second process with the same commands loads that library, compiling nothing
    if kernels.cpu_supports() is not None or 'avx2' not in kernels.cpu_isas():
        pytest.skip(f'kernels off: {kernels.cpu_supports()}')
    src = Path(kernels.__file__).absolute().parents[2]
    pkg = tmp_path / 'pkg' / 'timebill_ros'
    pkg.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name == 'core':
            shutil.copytree(entry, pkg / 'core', ignore=shutil.ignore_patterns('__pycache__'))
        elif entry.name not in ('_kernels', '__pycache__'):
            (pkg / entry.name).symlink_to(entry)
    code = (
        'import json, logging\n'
        'logging.basicConfig(level=logging.WARNING)\n'
        'from timebill_ros.core import kernels\n'
        'kernels.load()\n'
        'print(json.dumps([kernels.__file__, kernels.origin(), kernels.why_not()]))\n'
    )
    env = {
        'PYTHONPATH': os.pathsep.join([str(pkg.parent), os.environ.get('PYTHONPATH', '')]),
        'TIMEBILL_CACHE': str(tmp_path / 'cache'),
        'TIMEBILL_KERNELS_ISA': 'avx2',
    }
    first = run_python(code, cwd=tmp_path, **env)  # not the repo: '' on sys.path is the cwd
    where, info, why = json.loads(first.stdout.splitlines()[-1])
    assert where.startswith(str(pkg)) and why is None
    assert info['source'] == 'jit' and info['isa'] == 'avx2'
    assert Path(info['path']).is_relative_to(tmp_path / 'cache' / 'kernels')
    assert f"no prebuilt library for avx2/{info['tag']}" in first.stderr
    built = Path(info['path']).stat().st_mtime_ns
    _, again, _ = json.loads(run_python(code, cwd=tmp_path, **env).stdout.splitlines()[-1])
    assert again['source'] == 'jit' and again['path'] == info['path']
    assert Path(info['path']).stat().st_mtime_ns == built


@needs_kernels
@pytest.mark.parametrize('rows', [1, 2, 5])
def test_q4_1_linear_equals_its_dequantised_weights(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(80, 160, generator=g) * 0.1
    layer = W.Int4Linear.quantize(w)
    x = torch.randn(rows, 160, generator=g)
    ref = x @ layer.dequantized().t()
    assert layer.q4_blocks is not None  # the kernel layout, not torch's pack
    y = K.q4_1_linear(x, layer.q4_blocks, layer.q4_d, layer.q4_m)
    # int16 activations: the error is the activations' rounding, far below 4-bit weights' own
    assert _rel(y, ref) < 1e-4
    assert _rel(layer(x), ref) < 1e-4


@needs_kernels
def test_q8_head_equals_its_dequantised_weights():
    g = torch.Generator().manual_seed(3)
    head = W.Int8Linear(torch.randn(300, 96, generator=g), None)
    x = torch.randn(1, 96, generator=g)
    ref = x @ head.dequantized().t()
    assert _rel(K.q8_linear(x, head.qweight, head.scale32), ref) < 1e-4
    assert _rel(head(x), ref) < 1e-4


@needs_kernels
@pytest.mark.parametrize('length', [1, 7, 300, 2000])
@pytest.mark.parametrize('heads,kv_heads,dim', [(9, 3, 64), (4, 2, 16), (8, 8, 32)])
def test_decode_attention_equals_sdpa_on_the_live_entries(length, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(length + heads)
    cap = length + 13  # entries past the length are garbage that must not be read
    keys = torch.randn(kv_heads, cap, dim, generator=g) * 2
    values = torch.randn(kv_heads, cap, dim, generator=g)
    keys[:, length:] = float('nan')
    q = torch.randn(heads, dim, generator=g) * 2
    out = K.decode_attention(q, keys, values, length, dim**-0.5)
    group = heads // kv_heads
    ref = F.scaled_dot_product_attention(
        q.reshape(1, kv_heads, group, dim), keys[None, :, :length], values[None, :, :length]
    ).reshape(heads, dim)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 1e-5


@needs_kernels
def test_kernels_refuse_shapes_they_cannot_take():
    with pytest.raises(RuntimeError, match='multiple of 32'):
        K.q8_linear(torch.randn(1, 40), torch.zeros(4, 40, dtype=torch.int8), torch.ones(4))
    with pytest.raises(RuntimeError, match='length'):
        K.decode_attention(torch.randn(2, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8), 5, 1.0)


def _int4_tiny(seed=0):
    model = tiny_model(seed=seed, layers=3)
    W.apply_weights(model, 'int4', prefill_weights='fp32')
    return model


@needs_kernels
def test_fast_step_takes_an_int4_llama_and_says_why_not_otherwise():
    fast, why = FastDecoder.for_model(_int4_tiny())
    assert fast is not None and why is None
    fast, why = FastDecoder.for_model(tiny_model())
    assert fast is None and 'int4' in why
    engine = Engine(tiny_model(), None, press='snapkv', chat_template=False)
    assert engine.fast is None and profile_key(engine)['decode_step'] == 'transformers'


@needs_kernels
def test_profile_key_names_the_decode_step_the_config_will_run():
    from timebill_ros.core.calibration.store import key_from_config
    from timebill_ros.core.config import TimeBillConfig

    for fmt, step in (('int4', kernel_step_name()), ('fp32', 'transformers')):
        cfg = TimeBillConfig(model='tiny', threads=0, press='snapkv', weights=fmt)
        model = tiny_model(layers=2)
        W.apply_weights(model, fmt)
        engine = Engine(model, None, press=cfg.press, model_name=cfg.model)
        assert profile_key(engine)['decode_step'] == step
        assert key_from_config(cfg) == profile_key(engine)


@needs_kernels
@pytest.mark.parametrize('alpha', [0.0, 0.5])
def test_fast_step_follows_the_transformers_step_after_eviction(alpha):
    engine = Engine(_int4_tiny(), None, press='snapkv', chat_template=False)
    assert engine.fast is not None and profile_key(engine)['decode_step'] == kernel_step_name()
    ids = torch.randint(3, 256, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    state = engine.prefill(ids, capacity=len(ids) + 40)
    if alpha:
        engine.evict(state, alpha)
    other = engine.clone_state(state)
    tok, pos = int(state.logits.argmax()), len(ids)
    for i in range(30):
        fast = engine.fast.step(tok, pos + i, state.cache)
        ref = engine.model(
            input_ids=torch.tensor([[tok]]),
            cache=other.cache,
            use_cache=True,
            position_ids=torch.tensor([[pos + i]]),
        ).logits[0, -1]
        assert _rel(fast, ref) < 1e-3, i
        assert int(fast.argmax()) == int(ref.argmax()), i
        tok = int(ref.argmax())
    assert [la.length for la in state.cache.layers] == [la.length for la in other.cache.layers]
    for a, b in zip(state.cache.layers, other.cache.layers):
        assert _rel(a.keys, b.keys) < 1e-4 and _rel(a.values, b.values) < 1e-4


@needs_kernels
def test_fast_step_grows_a_full_cache_instead_of_writing_past_it():
    engine = Engine(_int4_tiny(), None, press='snapkv', chat_template=False)
    ids = list(range(3, 40))
    state = engine.prefill(ids, capacity=len(ids))  # no room for one answer token
    out = engine.decode(state, GenerationRequest(input_ids=ids, max_new_tokens=20))
    assert out.tokens_generated == 20
    assert state.cache.layers[0].length == len(ids) + 19


def test_kernels_can_be_switched_off_and_the_engine_still_decodes():
    code = (
        'from timebill_ros.core import kernels, weights as W\n'
        'from timebill_ros.core.model import tiny_model\n'
        'from timebill_ros.core.engine import Engine\n'
        'from timebill_ros.core.generation import GenerationRequest\n'
        'm = tiny_model(layers=2); W.apply_weights(m, "int4")\n'
        'e = Engine(m, None, chat_template=False)\n'
        'r = e.generate(GenerationRequest(input_ids=list(range(3, 30)), max_new_tokens=5))\n'
        'print(kernels.why_not(), e.fast is None, r.tokens_generated)\n'
    )
    env = dict(os.environ, TIMEBILL_KERNELS='0')
    out = subprocess.run(
        [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['TIMEBILL_KERNELS=0', 'True', '5']
