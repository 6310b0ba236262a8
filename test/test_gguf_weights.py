"""GGUF checkpoints: each type read into the engine's layout, mixed files, refusals, memory."""

import json
import subprocess
import sys

import gguf
from gguf import GGMLQuantizationType as T
import gguf.quants as gq
import numpy as np
import pytest
from timebill_ros.core import gguf_weights as G
from timebill_ros.core import kernels
from timebill_ros.core import weights as W
from timebill_ros.core.errors import ModelLoadError
from timebill_ros.core.gguf_write import quantize, write_gguf, write_model_gguf
import torch

KERNELS = kernels.load() is not None  # else Int4Linear keeps bf16 scales (torch's int4 kernel)


def _deq(q, d, m):
    n, k = q.shape
    w = q.float().reshape(n, -1, 32) * d.float()[..., None] + m.float()[..., None]
    return w.reshape(n, k)


def _tiny(arch='llama', tied=True, seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, cls = {'llama': (LlamaConfig, LlamaForCausalLM),
                    'qwen2': (Qwen2Config, Qwen2ForCausalLM)}[arch]
    shape = {'vocab_size': 320, 'hidden_size': 256, 'intermediate_size': 512,
             'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
             'max_position_embeddings': 512}
    torch.manual_seed(seed)
    return cls(cfg_cls(**{**shape, **kw}, tie_word_embeddings=tied)).eval()


def _int4_bound(ref):
    """Exact where the kernel's fp32 scales are kept; bf16 scales (torch's kernel) round."""
    return 0.0 if KERNELS else 2 ** -7 * float(ref.abs().max())


@pytest.mark.parametrize('qtype', [T.Q4_0, T.Q4_1, T.Q4_K])
def test_four_bit_blocks_convert_without_loss(qtype):
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(int(qtype)))
    raw = quantize(w, qtype)
    ref = torch.from_numpy(gq.dequantize(raw, qtype))
    parse = {T.Q4_0: G.parse_q4_0, T.Q4_1: G.parse_q4_1, T.Q4_K: G.parse_q4_k}[qtype]
    q, d, m = parse(raw)
    assert q.shape == (48, 512) and d.shape == m.shape == (48, 16) and int(q.max()) <= 15
    assert torch.equal(_deq(q, d, m), ref)  # the kernel's layout: codes, per-32 d and m
    layer = W.Int4Linear(q, d, m)
    assert (layer.dequantized() - ref).abs().max() <= _int4_bound(ref)
    assert (ref - w).abs().max() < 0.5  # and the quantiser itself is sane (N(0, 1) weights)


def test_llama_unpermute_inverts_llama_cpp_permute():
    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.LlamaModel.permute
        shape = (n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        return w.reshape(shape).swapaxes(1, 2).reshape(w.shape)

    w = torch.arange(64 * 3).reshape(64, 3)
    assert torch.equal(G._llama_unpermute(permute(w, 4), 4), w)


def test_header_index_matches_gguf_reader(tmp_path):
    path = write_model_gguf(_tiny('qwen2', tied=False), tmp_path / 'm.gguf', 'q4_k_m')
    reader = gguf.GGUFReader(str(path))
    with G.GGUFFile(path) as gf:
        assert gf.architecture == 'qwen2' and gf.fields['qwen2.block_count'] == 2
        assert len(gf.tensors) == len(reader.tensors)
        for t in reader.tensors:
            info = gf.tensors[t.name]
            assert info.qtype == t.tensor_type and info.offset == t.data_offset
            assert info.shape == tuple(int(s) for s in reversed(t.shape))
            assert info.nbytes == t.n_bytes and np.array_equal(gf.raw(t.name).ravel(), t.data
                                                               .view(np.uint8).ravel())


@pytest.mark.parametrize('qtype', [T.Q8_0, T.Q6_K, T.Q5_0, T.Q5_1])
def test_wider_types_become_per_row_int8_within_one_step(qtype):
    """Int8Linear has one (bf16) scale per row: blocks are requantised, error < row max / 127."""
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(int(qtype)))
    raw = quantize(w, qtype)
    ref = torch.from_numpy(gq.dequantize(raw, qtype))
    layer = W.Int8Linear(ref, None)
    err = (layer.dequantized() - ref).abs().amax(dim=1)
    assert (err <= ref.abs().amax(dim=1) / 127).all()


@pytest.mark.parametrize('arch,tied', [('llama', True), ('qwen2', False)])
def test_q4_k_m_file_loads_as_transformers_reads_it(tmp_path, arch, tied):
    """Mixed Q4_K / Q6_K / F32 file: fp32 logits equal transformers' own GGUF load exactly."""
    from transformers import AutoModelForCausalLM

    path = write_model_gguf(_tiny(arch, tied), tmp_path / f'{arch}.gguf', 'q4_k_m')
    with G.GGUFFile(path) as gf:
        assert {t.qtype for t in gf.tensors.values()} == {T.Q4_K, T.Q6_K, T.F32}
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    x = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(1))
    fp32, counts = G.load_gguf_model(path, ref.config, 'fp32')
    with torch.inference_mode():
        assert torch.equal(fp32(x).logits, ref(x).logits)
    model, counts = G.load_gguf_model(path, ref.config, 'int4', prefill_weights='none')
    assert counts == {'int4 (gguf Q4_K)': 12, 'int8 (gguf Q6_K)': 3}  # layer 1 attn_v, ffn_down
    int8 = G.load_gguf_model(path, ref.config, 'int8')[1]
    assert int8 == {'int8 (gguf Q4_K)': 12, 'int8 (gguf Q6_K)': 3}
    refs = dict(ref.named_modules())
    for name, mod in model.named_modules():
        if isinstance(mod, W.Int4Linear):  # rows in the HF order (llama: q/k un-permuted)
            want = refs[name].weight
            assert (mod.dequantized() - want).abs().max() <= _int4_bound(want), name
            if arch == 'qwen2' and name.endswith('q_proj'):
                assert torch.equal(mod.bias, refs[name].bias)
    with torch.inference_mode():
        a, b = ref(x).logits[0], model(x).logits[0]
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


@pytest.mark.parametrize('mix,qtype,want', [
    ('q8_0', T.Q8_0, {'int8 (gguf Q8_0)': 15}),
    ('q4_1', T.Q4_1, {'int4 (gguf Q4_1)': 14, 'int8 (gguf Q4_1)': 1}),
    ('f16', T.F16, {'int4 (quantised)': 14, 'int8 (gguf F16)': 1}),  # as a float checkpoint
])
def test_q8_0_and_q4_1_files_load_within_the_bounds(tmp_path, mix, qtype, want):
    model = _tiny('llama', tied=True, hidden_size=64, intermediate_size=128)
    path = write_model_gguf(model, tmp_path / f'{mix}.gguf', mix)
    loaded, counts = G.load_gguf_model(path, model.config, 'int4', prefill_weights='none')
    assert counts == want
    with G.GGUFFile(path) as gf:
        ref = G._Source(gf, model.config).tensor('blk.1.attn_k.weight')  # rows un-permuted
    got = loaded.model.layers[1].self_attn.k_proj.dequantized()
    if qtype == T.F16:  # quantised here like a float checkpoint: half a group-32 step
        g = ref.reshape(ref.shape[0], -1, 32)
        bound = (g.amax(-1) - g.amin(-1)).max() / 15 * 0.51 + _int4_bound(ref)
    else:
        bound = ref.abs().amax(1, keepdim=True) / 127 if qtype == T.Q8_0 else _int4_bound(ref)
    assert ((got - ref).abs() <= bound).all()


def test_an_unread_type_is_refused_naming_the_tensor_and_type(tmp_path):
    model = _tiny('llama', tied=True)
    shapes = {k: v.shape for k, v in model.state_dict().items() if 'inv_freq' not in k}
    path = write_gguf(tmp_path / 'm.gguf', model.config, shapes, model.state_dict().__getitem__,
                      'q4_k')
    # rewrite one tensor's type id in place as Q2_K (its bytes then mean something else)
    with G.GGUFFile(path) as gf:
        target = gf.info('blk.1.ffn_up.weight')
    data = bytearray(path.read_bytes())
    name = b'blk.1.ffn_up.weight'
    at = data.index(name) + len(name) + 4 + 8 * 2  # name, n_dims, two dims -> the type id
    assert int.from_bytes(data[at: at + 4], 'little') == int(target.qtype)
    data[at: at + 4] = int(T.Q2_K).to_bytes(4, 'little')
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"'blk\.1\.ffn_up\.weight' has GGUF type Q2_K"):
        G.load_gguf_model(path, model.config, 'int4')
    with pytest.raises(ModelLoadError, match='not a readable GGUF'):
        (tmp_path / 'bad.gguf').write_bytes(b'GGUF' + b'\0' * 8)
        G.GGUFFile(tmp_path / 'bad.gguf')


_MEASURE = r"""
import json, sys
from timebill_ros.core import gguf_weights as G
from timebill_ros.core import kernels
from timebill_ros.core import weights as W
from transformers import LlamaConfig
kernels.load()
cfg = LlamaConfig(**json.loads(sys.argv[2]))
def status():
    d = dict(line.split(':', 1) for line in open('/proc/self/status'))
    return {k: int(d[k].split()[0]) * 1024 for k in ('VmRSS', 'VmHWM')}
try:
    open('/proc/self/clear_refs', 'w').write('5')  # reset the peak to the current RSS
except OSError:
    pass
before = status()
model, counts = G.load_gguf_model(sys.argv[1], cfg, 'int4', prefill_weights='none')
print(json.dumps({'before': before, 'after': status(), 'counts': counts}))
"""


def test_loading_never_builds_the_float_model(tmp_path):
    """A 67M-weight decoder (268 MB in fp32) loads with far less peak growth than its fp32."""
    shape = {'vocab_size': 256, 'hidden_size': 1024, 'intermediate_size': 4096,
             'num_hidden_layers': 4, 'num_attention_heads': 8, 'num_key_value_heads': 8,
             'max_position_embeddings': 256, 'tie_word_embeddings': True}
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape)
    with init_empty_weights():
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).named_parameters()}
    gen = torch.Generator().manual_seed(0)
    path = write_gguf(tmp_path / 'big.gguf', cfg, shapes,
                      lambda name: torch.randn(shapes[name], generator=gen) * 0.02, 'q4_k')
    out = subprocess.run([sys.executable, '-c', _MEASURE, str(path), json.dumps(shape)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got['counts'] == {'int4 (gguf Q4_K)': 28, 'int8 (gguf Q4_K)': 1}
    linear_fp32 = 4 * 4 * (4 * 1024 * 1024 + 3 * 1024 * 4096)  # 268 MB
    growth = got['after']['VmHWM'] - got['before']['VmRSS']
    print(f'peak growth {growth / 2**20:.0f} MiB vs the linears in fp32 {linear_fp32 / 2**20:.0f}')
    assert growth < linear_fp32 / 2, (growth, linear_fp32)  # int4 weights: ~38 MB


def test_other_architectures_are_left_to_transformers(tmp_path):
    """Gemma, GPT-2, ... need tensor rewrites transformers does: load_model falls back."""
    writer = gguf.GGUFWriter(tmp_path / 'g.gguf', 'gemma')
    writer.add_tensor('token_embd.weight', np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert not G.streams(tmp_path / 'g.gguf') and G.streams(
        write_model_gguf(_tiny('qwen2'), tmp_path / 'q.gguf', 'q8_0'))
    with pytest.raises(ModelLoadError, match="architecture 'gemma' is not read"):
        G.load_gguf_model(tmp_path / 'g.gguf', _tiny().config, 'int4')
