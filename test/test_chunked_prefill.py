"""
Chunked prefill: a deadline or cancel can stop it between chunks.

When it runs through, it leaves what one pass leaves (cache, logits, and the very same SnapKV
keep sets).
"""

import json
from pathlib import Path
import pickle

import pytest
import timebill_ros
from timebill_ros.core import attention
from timebill_ros.core.engine import Engine
from timebill_ros.core.errors import InvalidRequestError, PrefillStopped, TimeBillError
from timebill_ros.core.eviction import n_keep, SnapKVPress
from timebill_ros.core.generation import GenerationRequest
import torch
import torch.nn.functional as F


def _ids(n, seed=0, vocab=256):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _kept(engine, state, alpha):
    """Return the press's keep sets per layer, as ``Engine.evict`` would apply them."""
    keep = n_keep(state.n_prompt, alpha)
    return [
        engine.press.keep_indices(layer.keys, state.scores[i], keep)
        for i, layer in enumerate(state.cache.layers)
    ]


def _assert_same_prefill(engine, one, chunked, alphas=(0.5, 0.9), atol=1e-4):
    assert torch.allclose(chunked.logits, one.logits, atol=atol, rtol=0)
    assert int(chunked.logits.argmax()) == int(one.logits.argmax())
    for a, b in zip(one.cache.layers, chunked.cache.layers):
        assert a.keys.shape == b.keys.shape
        assert torch.allclose(a.keys, b.keys, atol=atol)
        assert torch.allclose(a.values, b.values, atol=atol)
    for alpha in alphas:
        for a, b in zip(_kept(engine, one, alpha), _kept(engine, chunked, alpha)):
            assert torch.equal(a, b), f'SnapKV keeps other entries at alpha={alpha}'


@pytest.mark.parametrize(
    'n,chunk,window',
    [
        (300, 64, 64),
        (300, 64, 16),
        (130, 64, 8),
        (100, 32, 64),
        (50, 64, 16),
        (64, 64, 64),
        (1000, 7, 64),
    ],
)
def test_chunk_bounds_put_the_whole_window_in_the_last_chunk(tiny, n, chunk, window):
    bounds = Engine(tiny, None, press='snapkv', window_size=window)._chunk_bounds(n, chunk)
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == n
    assert sizes[-1] >= min(window, n)
    assert all(s == chunk for s in sizes[:-1])
    assert sizes[-1] < chunk + max(window, 1)  # a short tail joined the chunk before, no more


def test_no_chunking_is_one_pass(tiny):
    engine = Engine(tiny, None, press='snapkv', window_size=8)
    ids = _ids(90)
    ref = engine.prefill(ids)
    for chunk in (None, 0, 90, 10_000):
        state = engine.prefill(ids, chunk_tokens=chunk)
        assert state.chunks == 1 and torch.equal(state.logits, ref.logits)
    assert engine._chunk_bounds(90, None) == [0, 90]


@pytest.mark.parametrize('n,chunk', [(120, 16), (300, 37), (300, 64), (700, 128)])
@pytest.mark.parametrize('window', [8, 32])
def test_chunked_matches_one_pass_tiny(tiny, n, chunk, window):
    engine = Engine(tiny, None, press='snapkv', window_size=window)
    ids = _ids(n, seed=n + window)
    one = engine.prefill(ids)
    chunked = engine.prefill(ids, chunk_tokens=chunk)
    assert chunked.chunks == len(engine._chunk_bounds(n, chunk)) - 1 > 1
    _assert_same_prefill(engine, one, chunked)
    for alpha in (0.5, 0.9):  # and through the engine's own eviction
        a = engine.evict(engine.clone_state(one), alpha)
        b = engine.evict(engine.clone_state(chunked), alpha)
        assert a.kv_after == b.kv_after == n_keep(n, alpha)
        for la, lb in zip(a.cache.layers, b.cache.layers):
            assert torch.allclose(la.keys, lb.keys, atol=1e-4)


@pytest.mark.parametrize('press', ['none', 'streaming_llm'])
def test_chunked_matches_one_pass_without_scores(tiny, press):
    engine = Engine(tiny, None, press=press)
    ids = _ids(200, 3)
    one, chunked = engine.prefill(ids), engine.prefill(ids, chunk_tokens=48)
    assert chunked.chunks == 5 and not chunked.scores
    assert torch.allclose(chunked.logits, one.logits, atol=1e-4, rtol=0)


def test_chunked_with_dynamic_cache(tiny):
    engine = Engine(tiny, None, press='snapkv', window_size=16, preallocate=False)
    ids = _ids(250, 4)
    _assert_same_prefill(engine, engine.prefill(ids), engine.prefill(ids, chunk_tokens=64))


def test_chunked_prefill_then_decode_matches_generate(tiny):
    ids = _ids(150, 6)
    ref = tiny.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
    ref = ref[0, len(ids):].tolist()
    engine = Engine(tiny, None, press='snapkv', window_size=16)
    state = engine.prefill(ids, capacity=len(ids) + 21, chunk_tokens=32)
    out = engine.decode(state, GenerationRequest(input_ids=ids, max_new_tokens=20))
    assert out.token_ids == ref


@pytest.mark.parametrize('hq,hkv,past,n', [(9, 3, 300, 64), (4, 4, 17, 5), (4, 2, 1, 2)])
def test_chunk_attention_equals_masked_sdpa(hq, hkv, past, n):
    """
    Check that the mask-free split is plain causal attention of the chunk's queries over all keys.

    The split: cached part + causal chunk, merged by log-sum-exp.
    """
    g = torch.Generator().manual_seed(hq + past)
    q = torch.randn(1, hq, n, 16, generator=g)
    k, v = torch.randn(2, 1, hkv, past + n, 16, generator=g)
    mask = torch.ones(n, past + n, dtype=torch.bool).tril(past)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    out = attention._chunk_attention(q, k, v, 0.3)  # [1, n, hq, d] as attention layers return
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)


def test_chunked_prefill_takes_the_mask_free_path(tiny, monkeypatch):
    calls = []
    real = attention._chunk_attention
    monkeypatch.setattr(attention, '_chunk_attention', lambda *a: calls.append(1) or real(*a))
    engine = Engine(tiny, None, press='snapkv', window_size=16)
    state = engine.prefill(_ids(200, 9), chunk_tokens=64)
    assert len(calls) == engine.num_layers * (state.chunks - 1)  # every chunk after the first


class _SpyPress(SnapKVPress):
    """SnapKV that records the shapes it is asked to score."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def score(self, module, query, key):
        self.calls.append((module.layer_idx, tuple(query.shape), tuple(key.shape)))
        return super().score(module, query, key)


def test_press_scores_once_per_layer_against_all_keys(tiny):
    press = _SpyPress(window_size=16)
    engine = Engine(tiny, None, press=press)
    state = engine.prefill(_ids(200, 8), chunk_tokens=64)
    assert state.chunks == 3
    assert [c[0] for c in press.calls] == list(range(engine.num_layers))  # last chunk only
    for _, q, k in press.calls:
        assert k[2] == 200 and q[2] == 200  # the full cache keys; queries laid out as one pass


def test_should_stop_raises_between_chunks(tiny):
    engine = Engine(tiny, None, press='snapkv', window_size=16)
    seen = []

    def should_stop(done, elapsed):
        seen.append((done, elapsed))
        return 'cancelled' if done >= 128 else None

    with pytest.raises(PrefillStopped) as err:
        engine.prefill(_ids(300), chunk_tokens=64, should_stop=should_stop)
    assert err.value.reason == 'cancelled' and err.value.done_tokens == 128
    assert isinstance(err.value, TimeBillError) and '128' in str(err.value)
    assert [d for d, _ in seen] == [0, 64, 128]
    assert all(b >= a >= 0 for (_, a), (_, b) in zip(seen, seen[1:]))
    # nothing left switched on for this thread: a later plain forward neither scores nor splits
    assert attention.collect.press is None and not attention.collect.chunk
    seen.clear()
    state = engine.prefill(
        _ids(300), chunk_tokens=64, should_stop=lambda done, elapsed: seen.append(done) or ''
    )
    assert seen == [0, 64, 128, 192, 256] and state.chunks == 5  # "" means go on


def test_should_stop_before_the_first_chunk(tiny):
    engine = Engine(tiny, None, press='snapkv', window_size=16)
    with pytest.raises(PrefillStopped) as err:
        engine.prefill(_ids(100), should_stop=lambda done, elapsed: 'deadline')
    assert (err.value.reason, err.value.done_tokens) == ('deadline', 0)


def test_prefill_stopped_pickles():
    err = pickle.loads(pickle.dumps(PrefillStopped('deadline', 256)))
    assert (err.reason, err.done_tokens) == ('deadline', 256)
    assert str(err) == 'prefill stopped after 256 tokens: deadline'


@pytest.mark.parametrize('bad', [-1, 1.5, True, '64'])
def test_bad_chunk_tokens(tiny, bad):
    with pytest.raises(InvalidRequestError):
        Engine(tiny, None, press='none').prefill(_ids(20), chunk_tokens=bad)


def _real_text_ids(tok, n):
    data = Path(timebill_ros.__file__).parent / 'data' / 'lengths_smollm2.jsonl'
    text = ' '.join(json.loads(line).get('prompt', '') for line in data.open())
    ids = tok(text)['input_ids'][:n]
    assert len(ids) == n
    return ids


@pytest.mark.slow
@pytest.mark.parametrize('n,chunks', [(300, (64, 128)), (1000, (128, 256))])
def test_chunked_matches_one_pass_smollm2(smollm2, n, chunks):
    model, tok = smollm2
    engine = Engine(model, tok)  # SnapKV, window 64, as the nodes run it
    ids = _real_text_ids(tok, n)
    one = engine.prefill(ids)
    for chunk in chunks:
        _assert_same_prefill(engine, one, engine.prefill(ids, chunk_tokens=chunk))
