"""Eviction presses: what is kept, how many, and that SnapKV keeps what the window looks at."""

from types import SimpleNamespace

import pytest
from timebill_ros.core.engine import Engine
from timebill_ros.core.eviction import get_press, n_keep, PRESSES, SnapKVPress, StreamingLLMPress
from timebill_ros.core.generation import GenerationRequest
import torch


def _planted(length=48, window=4, d=16, targets=(5, 20), hq=4, hkv=2):
    """Make queries in the window point at one key per KV head; every other key is noise."""
    g = torch.Generator().manual_seed(0)
    key = torch.randn(1, hkv, length, d, generator=g) * 0.1
    query = torch.randn(1, hq, length, d, generator=g) * 0.1
    for h, pos in enumerate(targets):
        direction = torch.zeros(d)
        direction[h] = 8.0
        key[0, h, pos] = direction
        for qh in range(h * hq // hkv, (h + 1) * hq // hkv):
            query[0, qh, -window:] = direction
    return query, key


def test_snapkv_keeps_the_entry_the_window_attends_to_most():
    query, key = _planted()
    press = SnapKVPress(window_size=4, kernel_size=1)
    scores = press.score(SimpleNamespace(scaling=0.25), query, key)
    assert scores.shape == (1, 2, 48)
    idx = press.keep_indices(key, scores, keep=5)  # the window (4) + one more
    assert idx[0, 0].tolist() == [5, 44, 45, 46, 47]
    assert idx[0, 1].tolist() == [20, 44, 45, 46, 47]


def test_snapkv_pooling_keeps_the_neighbourhood_of_the_target():
    query, key = _planted()
    press = SnapKVPress(window_size=4, kernel_size=5)
    scores = press.score(SimpleNamespace(scaling=0.25), query, key)
    idx = press.keep_indices(key, scores, keep=4 + 5)
    assert set(range(3, 8)) <= set(idx[0, 0].tolist())
    assert set(range(18, 23)) <= set(idx[0, 1].tolist())


@pytest.mark.parametrize('alpha', [0.0, 0.1, 0.5, 0.75, 0.95])
def test_snapkv_keeps_window_and_exact_count_per_head_in_a_real_prefill(tiny, alpha):
    window = 8
    engine = Engine(tiny, None, press='snapkv', window_size=window, kernel_size=5)
    length = 100
    ids = torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(3)).tolist()
    state = engine.prefill(ids)
    assert sorted(state.scores) == list(range(engine.num_layers))
    keys_before = [layer.keys.clone() for layer in state.cache.layers]
    per_layer = [
        engine.press.keep_indices(layer.keys, state.scores[i], n_keep(length, alpha))
        for i, layer in enumerate(state.cache.layers)
    ]
    engine.evict(state, alpha)
    keep = round((1 - alpha) * length)
    assert state.kv_after == keep
    for layer, idx, before in zip(state.cache.layers, per_layer, keys_before):
        assert layer.keys.shape[2] == keep  # same count for every head
        for h in range(idx.shape[1]):
            kept = idx[0, h].tolist()
            # the window is always kept (its most recent
            # entries when fewer than the window are kept)
            assert set(range(length - min(window, keep), length)) <= set(kept)
            # the cache holds exactly those
            assert torch.equal(layer.keys[0, h], before[0, h, kept])


def test_streaming_llm_keeps_sinks_and_recent():
    keys = torch.zeros(1, 2, 50, 4)
    idx = StreamingLLMPress(n_sink=4).keep_indices(keys, None, keep=10)
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 44, 45, 46, 47, 48, 49]


def test_registry_and_options():
    assert set(PRESSES) >= {'none', 'snapkv', 'streaming_llm'}  # more in test_presses.py
    # n_sink ignored for snapkv
    press = get_press('snapkv', window_size=32, kernel_size=7, n_sink=9)
    assert (press.window_size, press.kernel_size) == (32, 7)
    assert get_press('streaming_llm', n_sink=2).n_sink == 2


@pytest.mark.parametrize(
    'length,alpha,expected', [(100, 0.5, 50), (1009, 0.5, 504), (10, 0.95, 1), (7, 0.0, 7)]
)
def test_keep_count_is_rounded_and_at_least_one(length, alpha, expected):
    assert n_keep(length, alpha) == expected


PASSKEY = '68142'


def passkey_prompt(passkey=PASSKEY, reps=40, where=0.5):
    filler = (
        'The grass is green. The sky is blue. The sun is yellow. Here we go. '
        'There and back again. '
    )
    before = int(reps * where)
    return (
        'There is important info hidden inside a lot of irrelevant text. Find it and memorize it. '
        'I will quiz you about the important information there.\n\n'
        + filler * before
        + f'The pass key is {passkey}. Remember it. '
        + filler * (reps - before)
        + '\n\nWhat is the pass key?'
    )


@pytest.mark.slow
def test_passkey_survives_half_eviction(smollm2):
    """
    Keep a passkey's digits at α = 0.5 with max pooling.

    SmolLM2 reads digits one token each. kvpress's average pooling (kernel 5) drops middle
    digits at α = 0.5 on this model; max pooling over 7 keys keeps the whole span.
    """
    model, tok = smollm2
    engine = Engine(model, tok, press='snapkv', window_size=64, kernel_size=7, pooling='max')
    ids = engine.encode(passkey_prompt())
    assert 900 <= len(ids) <= 1200
    out = engine.generate(GenerationRequest(input_ids=ids, max_new_tokens=16, alpha=0.5))
    assert out.kv_after == round(0.5 * len(ids))
    assert PASSKEY in out.text, out.text
