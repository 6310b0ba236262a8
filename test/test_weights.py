"""Weight formats: the Q4_1 quantiser, layers that compute what their weights say, one engine."""

import gguf.quants as gq
import pytest
from timebill_ros.core import weights as W
from timebill_ros.core.calibration.store import profile_key
from timebill_ros.core.calibration.timing import time_decode_step
from timebill_ros.core.decoding import TextStream
from timebill_ros.core.engine import Engine
from timebill_ros.core.generation import GenerationRequest
from timebill_ros.core.model import tiny_model
import torch
import torch.nn.functional as F


def _ids(n, seed=0, vocab=256):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _deq(q, d, m):
    n, k = q.shape
    w = q.float().reshape(n, -1, 32) * d.float()[..., None] + m.float()[..., None]
    return w.reshape(n, k)


def test_our_q4_1_quantiser_matches_gguf_to_rounding():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    q, d, m = W.quantize_q4_1(x)
    ours = _deq(q, d, m)
    raw = gq.quantize(x.numpy(), gq.GGMLQuantizationType.Q4_1)
    ref = torch.from_numpy(gq.dequantize(raw, gq.GGMLQuantizationType.Q4_1))
    step = d.float().repeat_interleave(32, dim=1)
    assert ((ours - ref).abs() <= step * 1.001).all()  # at most one code apart
    assert (ours - x).abs().max() <= step.max() * 0.51


@pytest.mark.parametrize('rows', [1, 3, 32])
@pytest.mark.parametrize('dense', [None, torch.float32, torch.bfloat16])
def test_int4_linear_computes_with_its_dequantised_weights(rows, dense):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(48, 96, generator=g) * 0.1, torch.randn(48, generator=g)
    layer = W.Int4Linear.quantize(w, b, dense=dense)
    deq = layer.dequantized()
    q, d, m = W.quantize_q4_1(w)
    exact = _deq(q, d, m)
    assert (deq - exact).abs().max() <= 2**-7 * exact.abs().max()  # bf16 scales only
    x = torch.randn(2, rows, 96, generator=g)
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (2, rows, 48)
    ref = F.linear(x, deq, b)
    assert (y - ref).abs().max() <= 0.02 * ref.abs().max()


def test_int8_linear_is_close_to_fp32():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=g)
    layer = W.Int8Linear(w, None)
    assert (layer.dequantized() - w).abs().max() <= w.abs().amax(1).max() / 127
    x = torch.randn(5, 32, generator=g)
    ref = F.linear(x, w)
    assert (layer(x) - ref).abs().max() <= 0.03 * ref.abs().max()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_int8_linear_quantises_in_row_chunks_as_in_one_piece(monkeypatch, dtype):
    # the chunks bound the load peak of a vocab x hidden head; the codes are the same
    monkeypatch.setattr(W, 'QUANT_CHUNK', 1000)  # 31 rows of 32 per chunk, a short last one
    w = (torch.randn(301, 32, generator=torch.Generator().manual_seed(4)) * 0.3).to(dtype)
    before = w.clone()
    layer = W.Int8Linear(w, None)
    wf = before.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    assert torch.equal(layer.qweight, (wf / scale[:, None]).round().clamp(-127, 127).char())
    assert torch.equal(layer.scale32, scale.to(torch.bfloat16).float())
    assert torch.equal(w, before)  # the weights it was given are not scaled in place


def test_formats_and_shapes_the_kernel_cannot_take():
    with pytest.raises(ValueError, match='weights must be one of'):
        W.check_format('int3')
    assert W.effective_format('int4', 'cuda') == 'bf16'
    assert W.effective_format('int4', 'cpu') == 'int4'
    assert not W.int4_fits(torch.nn.Linear(64, 40)) and W.int4_fits(torch.nn.Linear(64, 48))


@pytest.mark.parametrize('fmt', W.WEIGHT_FORMATS)
def test_every_format_runs_the_engine_and_stays_near_fp32(fmt):
    ref_model = tiny_model(seed=4)
    model = tiny_model(seed=4)
    counts = W.apply_weights(model, fmt)
    assert W.weight_format(model) == fmt
    assert sum(counts.values()) == (0 if fmt == 'fp32' else 2 * 7 + 1)
    ids = _ids(60, 2)
    x = torch.tensor([ids])
    with torch.inference_mode():
        a, b = ref_model(x).logits[0], model(x).logits[0]
    cos = F.cosine_similarity(a, b, dim=-1)  # random weights: int4 noise compounds, hence lax
    assert cos.mean() > {'fp32': 0.9999, 'bf16': 0.99, 'int8': 0.97, 'int4': 0.8}[fmt]
    engine = Engine(model, None, press='snapkv', window_size=8)
    assert profile_key(engine)['weights'] == fmt
    out = engine.generate(GenerationRequest(input_ids=ids, max_new_tokens=12, alpha=0.5))
    assert out.tokens_generated == 12 and out.kv_after == 30


@pytest.mark.parametrize('press', ['none', 'snapkv'])
def test_int4_engine_matches_hf_generate_at_alpha_zero(press):
    """The packed decode attention and the preallocated cache change nothing computed."""
    model = tiny_model(seed=5)
    W.apply_weights(model, 'int4')
    ids = _ids(70, 5)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, 70:]
    out = Engine(model, None, press=press, window_size=8).generate(
        GenerationRequest(input_ids=ids, max_new_tokens=20)
    )
    assert out.token_ids == ref.tolist()


def test_packed_decode_attention_equals_gqa_sdpa():
    from timebill_ros.core.attention import _decode_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 1, 64, generator=g)
    k, v = torch.randn(1, 3, 300, 64, generator=g), torch.randn(1, 3, 300, 64, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(_decode_attention(q, k, v, None), ref, atol=1e-5)


def test_text_stream_equals_full_decode_of_whole_characters():
    from transformers import AutoTokenizer
    from timebill_ros.core.model import ensure_tiny_model

    tok = AutoTokenizer.from_pretrained(str(ensure_tiny_model()))
    text = 'Grüße, 東京 🤖 robots: naïve café — done.<|im_end|> after'
    ids = tok(text)['input_ids'] + [tok.eos_token_id]
    stream = TextStream(tok)
    whole = ''  # full decode of the longest prefix that ends on a whole character
    for k, t in enumerate(ids, 1):
        got = stream.add(t)
        full = tok.decode(ids[:k], skip_special_tokens=True)
        whole = whole if full.endswith('\ufffd') else full
        assert got == whole
    assert '\ufffd' in ''.join(tok.decode([t]) for t in ids), 'no split character: weak test'
    assert got == tok.decode(ids, skip_special_tokens=True)


def test_decode_timing_reads_a_written_cache(tiny):
    engine = Engine(tiny, None, press='none')
    from timebill_ros.core import kv_cache

    cache = kv_cache.make_cache(2, 40)
    like = torch.zeros(1, 2, 1, 16)
    for layer in cache.layers:
        layer.fill_random(32, like)
        assert layer.keys.shape[2] == 32 and torch.isfinite(layer.keys).all()
        assert layer.keys.abs().sum() > 0 and layer.values.abs().sum() > 0
    assert len(time_decode_step(engine, 32, repeats=3)) == 3


# ------------------------------------------------------------------- real model (slow)
@pytest.mark.slow
def test_int4_uses_the_gguf_blocks_exactly_and_still_answers(smollm2):
    from timebill_ros.core import kernels
    from timebill_ros.core.evaluation.scoring import score
    from timebill_ros.core.evaluation.tasks import counter_for, make_task
    from timebill_ros.core.model import load_model

    ref_model, tok = smollm2
    cfg = ref_model.config
    model, _ = load_model(weights='int4', threads=2)  # read from the GGUF tensor by tensor
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count('Int4Linear') == 7 * cfg.num_hidden_layers  # all from Q4_1 blocks
    assert kinds.count('Int8Linear') == 1  # the head
    for layer, path in ((3, 'self_attn.q_proj'), (7, 'mlp.down_proj')):  # q: rows permuted
        want = ref_model.model.layers[layer].get_submodule(path).weight
        got = model.model.layers[layer].get_submodule(path).dequantized()
        exact = kernels.load() is not None  # torch's int4 kernel keeps bf16 scales
        assert (got - want).abs().max() <= (0 if exact else 2 ** -7 * want.abs().max())

    prompt = 'What is the capital of France?'
    ref = Engine(ref_model, tok).generate(GenerationRequest(prompt=prompt, max_new_tokens=24))
    engine = Engine(model, tok)
    out = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=24))
    assert out.token_ids[:3] == ref.token_ids[:3]  # greedy agreement does not break at once
    assert 'Paris' in out.text
    task = make_task('passkey', 512, counter_for(engine), seed=0)  # a planted fact, α = 0
    got = engine.generate(
        GenerationRequest(
            prompt=task.prompt, system_prompt=task.system_prompt, max_new_tokens=32
        )
    )
    assert score(task.metric, got.text, task.references) == 1.0, got.text
