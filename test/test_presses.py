"""The presses added for the quality comparison: budgets, spans, windows, and a real prefill."""

from types import SimpleNamespace

import pytest
from timebill_ros.core.engine import Engine
from timebill_ros.core.eviction import (
    AdaLayersPress,
    ChunkKVPress,
    get_press,
    layer_budgets,
    PRESSES,
    PyramidKVPress,
    QuestionWindowPress,
    SnapKVPress,
)
from timebill_ros.core.generation import GenerationRequest
import torch

NEW = ('pyramidkv', 'chunkkv', 'question_window', 'ada_layers')


def _ids(n, seed=3):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_registry_has_the_new_presses():
    assert set(NEW) <= set(PRESSES)
    press = get_press('chunkkv', window_size=16, kernel_size=3, pooling='max', n_sink=2)
    assert (press.window_size, press.kernel_size, press.pooling) == (16, 3, 'max')


@pytest.mark.parametrize(
    'weights,total,length,floor',
    [([1, 1, 1], 30, 100, 1), ([5, 1, 0], 30, 12, 1), ([1, 2, 3, 4], 10, 100, 2),
     ([0.3, 7.1, 2.2, 9.9, 1.0], 77, 40, 3), ([0, 0], 9, 10, 1)],
)
def test_layer_budgets_keep_the_total_within_bounds(weights, total, length, floor):
    budgets = layer_budgets(weights, total, length, floor)
    assert sum(budgets) == total
    assert all(floor <= b <= length for b in budgets)


def test_pyramid_budgets_fall_from_bottom_to_top():
    keys = [torch.zeros(1, 2, 1000, 4) for _ in range(10)]
    scores = {i: torch.rand(1, 2, 1000) for i in range(10)}
    idx = PyramidKVPress(window_size=32).select(keys, scores, keep=300)
    counts = [i.shape[-1] for i in idx]
    assert sum(counts) == 300 * 10
    assert counts == sorted(counts, reverse=True) and counts[0] > 2 * counts[-1]
    assert counts[-1] >= 32  # the window always fits


def test_chunkkv_keeps_whole_chunks_around_the_strongest_vote():
    g = torch.Generator().manual_seed(0)
    length, window, d = 64, 4, 16
    key = torch.randn(1, 1, length, d, generator=g) * 0.1
    query = torch.randn(1, 1, length, d, generator=g) * 0.1
    key[0, 0, 23] = torch.eye(d)[0] * 8  # one strong key inside chunk 20..29
    query[0, 0, -window:] = torch.eye(d)[0] * 8
    press = ChunkKVPress(window_size=window, kernel_size=1, chunk_size=10)
    scores = press.score(SimpleNamespace(scaling=0.25), query, key)
    kept = press.keep_indices(key, scores, keep=window + 10)[0, 0].tolist()
    assert kept == list(range(20, 30)) + list(range(60, 64))


class _Tok:
    """Token id 10 decodes to a line break; every other id to a letter."""

    def get_vocab(self):
        return {f't{i}': i for i in range(256)}

    def decode(self, ids):
        return '\n' if ids == [10] else 'a'


def test_question_window_starts_after_the_last_line_break():
    ids = [5] * 100 + [10] + [7] * 20 + [10, 8, 8]  # context, break, question, template tail
    press = QuestionWindowPress(window_size=64, min_window=8)
    assert press.for_prompt(ids, _Tok()).window_size == 23
    assert press.for_prompt(ids, None) is press
    assert press.for_prompt([5] * 300, _Tok()).window_size == 64  # no break: as SnapKV


def test_question_window_scores_like_snapkv_with_that_window():
    g = torch.Generator().manual_seed(1)
    query, key = torch.randn(1, 4, 50, 8, generator=g), torch.randn(1, 2, 50, 8, generator=g)
    module = SimpleNamespace(scaling=0.3)
    q = QuestionWindowPress(window_size=12).score(module, query, key)
    s = SnapKVPress(window_size=12).score(module, query, key)
    assert torch.allclose(q, s)
    padded = query.clone()
    padded[:, :, :45] = 0  # a chunked prefill's earlier chunks: only 5 real query rows
    q = QuestionWindowPress(window_size=12).score(module, padded, key)
    s = SnapKVPress(window_size=5).score(module, padded, key)
    assert torch.allclose(q, s)


def test_ada_layers_gives_flat_layers_more():
    length, keep = 200, 50
    keys = [torch.zeros(1, 2, length, 4) for _ in range(3)]
    sharp = torch.zeros(1, 2, length)
    sharp[..., :5] = 0.2
    flat = torch.full((1, 2, length), 1.0 / length)
    idx = AdaLayersPress(window_size=4).select(keys, {0: sharp, 1: flat, 2: flat}, keep)
    counts = [i.shape[-1] for i in idx]
    assert sum(counts) == 3 * keep
    assert counts[0] < keep < counts[1]
    assert counts[0] >= int(0.2 * keep)  # the safeguard


@pytest.mark.parametrize('name', NEW)
@pytest.mark.parametrize('alpha', [0.0, 0.5, 0.9])
def test_real_prefill_evict_decode(tiny, name, alpha):
    engine = Engine(tiny, None, press=name, window_size=8)
    length = 120
    ids = _ids(length)
    state = engine.prefill(ids)
    before = [layer.keys.clone() for layer in state.cache.layers]
    keys = [layer.keys for layer in state.cache.layers]
    expected = engine.press.select(keys, state.scores, round((1 - alpha) * length))
    engine.evict(state, alpha)
    counts = [layer.keys.shape[2] for layer in state.cache.layers]
    assert sum(counts) == round((1 - alpha) * length) * engine.num_layers
    for layer, idx, b in zip(state.cache.layers, expected, before):
        for h in range(idx.shape[1]):
            kept = idx[0, h].tolist()
            assert kept == sorted(set(kept))
            assert set(range(length - 8, length)) <= set(kept)  # the window stays
            assert torch.equal(layer.keys[0, h], b[0, h, kept])
    out = engine.decode(state, GenerationRequest(input_ids=ids, max_new_tokens=4))
    assert out.tokens_generated == 4


def test_alpha_zero_is_the_same_for_every_press(tiny):
    ids = _ids(90, 5)
    outs = set()
    for name in PRESSES:
        out = Engine(tiny, None, press=name, window_size=8).generate(
            GenerationRequest(input_ids=ids, max_new_tokens=6, alpha=0.0)
        )
        outs.add(tuple(out.token_ids))
    assert len(outs) == 1
