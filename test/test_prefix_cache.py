"""
Prefix KV cache: a standing context prefilled once, and the warm answer is the cold one.

What a planner relies on: a goal that shares a cached prefix gets the same kept sets and the
same greedy text as a cold prefill (every press, α = 0 and α > 0); the cached prefix is never
changed by a goal's eviction; the memory bound holds; priming yields to a goal with a deadline;
cleanup frees the cache; a context bigger than the bound is served cold, never an error.
"""

import threading
import time

import pytest
from timebill_ros.core.config import TimeBillConfig
from timebill_ros.core.engine import Engine
from timebill_ros.core.eviction import n_keep, PRESSES
from timebill_ros.core.generation import GenerationRequest
from timebill_ros.core.job import Job
from timebill_ros.core.lengths import FixedLength
from timebill_ros.core.pipeline import Pipeline
from timebill_ros.core.prefix_cache import block_keys, PrefixCache
from timebill_ros.core.scheduler import admission
from timebill_ros.core.time_estimator import ExecutionTimeModel, fit_prefill_cached
import torch

CHUNK = 64
SLOW = ExecutionTimeModel(a=0.0, b=1e-3, c=0.05, p=1e-5, q=0.02)


def _ids(n, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _engine(tiny, press='snapkv', mb=64.0):
    return Engine(tiny, None, press=press, window_size=16, prefix_cache=PrefixCache(mb, 32))


def _kept(engine, state, alpha):
    keep = n_keep(state.n_prompt, alpha)
    return engine.press.select([la.keys for la in state.cache.layers], state.scores, keep)


def _answer(engine, state, alpha, ids):
    if alpha > 0:
        engine.evict(state, alpha)
    return engine.decode(state, GenerationRequest(input_ids=ids, max_new_tokens=12)).token_ids


@pytest.mark.parametrize('press', sorted(PRESSES))
def test_warm_prefill_keeps_and_answers_as_the_cold_one(tiny, press):
    context, question = _ids(420, 1), _ids(25, 2)
    ids = context + question
    engine = _engine(tiny, press)
    engine.prefill(context, chunk_tokens=CHUNK, prime='scene')  # the standing context
    for alpha in (0.0, 0.5, 0.8):
        cold = engine.prefill(ids, chunk_tokens=CHUNK, prefix=False)
        warm = engine.prefill(ids, chunk_tokens=CHUNK)
        assert cold.cached_tokens == 0 and warm.cached_tokens >= 384  # whole 32-token blocks
        # the press's window (16) and the question are recomputed, never taken from the cache
        assert warm.cached_tokens <= len(ids) - 16
        rel = (warm.logits - cold.logits).abs().max() / cold.logits.abs().max()
        assert float(rel) < 1e-4
        if alpha > 0 and engine.press.needs_scores:
            for a, b in zip(_kept(engine, cold, alpha), _kept(engine, warm, alpha)):
                assert torch.equal(a, b), f'{press} keeps other entries warm at α={alpha}'
        assert _answer(engine, warm, alpha, ids) == _answer(engine, cold, alpha, ids)


def test_a_goal_evicting_its_copy_leaves_the_cached_prefix_whole(tiny):
    engine = _engine(tiny, 'snapkv')
    context = _ids(256, 3)
    engine.prefill(context, chunk_tokens=CHUNK, prime='p')
    pc = engine.prefix_cache
    before = [[(k.clone(), v.clone()) for k, v in b.kv] for b in pc._blocks.values()]
    ids = context + _ids(30, 4)
    state = engine.prefill(ids, chunk_tokens=CHUNK)
    assert state.cached_tokens == 256
    _answer(engine, state, 0.9, ids)  # eviction compacts the goal's own buffers in place
    after = [b.kv for b in pc._blocks.values()][: len(before)]
    for blk_before, blk_after in zip(before, after):
        for (k0, v0), (k1, v1) in zip(blk_before, blk_after):
            assert torch.equal(k0, k1) and torch.equal(v0, v1)
    # and the next goal still reuses it, with the cold answer
    again = engine.prefill(ids, chunk_tokens=CHUNK)
    cold = engine.prefill(ids, chunk_tokens=CHUNK, prefix=False)
    assert again.cached_tokens >= 256
    assert _answer(engine, again, 0.5, ids) == _answer(engine, cold, 0.5, ids)


def test_the_memory_bound_holds_under_a_stream_of_distinct_contexts(tiny):
    engine = _engine(tiny, 'none', mb=0.25)
    pc = engine.prefix_cache
    per_block = 32 * engine.kv_bytes_per_token()
    engine.prefill(_ids(96, 99), prime='kept')  # three held blocks: never dropped
    for seed in range(12):
        ids = _ids(200, seed)
        state = engine.prefill(ids, chunk_tokens=CHUNK)
        assert state.cached_tokens == 0  # distinct contexts share nothing
        assert pc.bytes_held <= pc.capacity_bytes
    assert pc.stats.blocks_dropped > 0  # LRU made room
    assert pc.bytes_held > pc.capacity_bytes - 2 * per_block  # and kept it used
    assert pc.holds() == {'kept': 96} and pc.peek(_ids(96, 99)) == 96
    # the most recent context survived, the oldest did not
    assert pc.peek(_ids(200, 11)) > 0 and pc.peek(_ids(200, 0)) == 0


def test_a_context_bigger_than_the_bound_is_served_cold(tiny):
    engine = _engine(tiny, 'snapkv', mb=0.05)
    ids = _ids(500, 5)
    state = engine.prefill(ids, chunk_tokens=CHUNK)
    out = engine.decode(state, GenerationRequest(input_ids=ids, max_new_tokens=4))
    assert out.tokens_generated == 4
    pc = engine.prefix_cache
    assert pc.bytes_held <= pc.capacity_bytes and pc.stats.blocks_refused > 0
    assert 'prefix cache full' in pc.last_refusal
    p = Pipeline(engine, SLOW, TimeBillConfig(prefill_chunk=CHUNK), FixedLength(4), learn=False)
    res = p.prime(_ids(2000, 6)[:960], 'big').result(timeout=30)
    assert not res.ok and not res.fit and 'does not fit' in res.reason
    p.close()


def test_hash_chain_keys_name_the_whole_prefix():
    a, b = _ids(128, 1), _ids(128, 1)
    b[40] = (b[40] + 1) % 256
    ka, kb = block_keys(a, 32), block_keys(b, 32)
    assert len(ka) == 4 and ka[0] == kb[0]
    assert all(x != y for x, y in zip(ka[1:], kb[1:]))  # one token changes every later key
    assert block_keys(a[:100], 32) == ka[:3]  # a partial block is never a key


def _slow_primes(engine, started, pause):
    """Make every prime chunk of ``engine`` set ``started`` and ``pause()`` before it runs."""
    real_prefill = engine.prefill

    def slow_prime(*args, **kw):
        if kw.get('prime'):
            inner = kw['should_stop']

            def should_stop(done, elapsed):
                started.set()
                pause()
                return inner(done, elapsed)

            kw['should_stop'] = should_stop
        return real_prefill(*args, **kw)

    engine.prefill = slow_prime


def test_priming_yields_to_a_goal_with_a_deadline(tiny):
    engine = _engine(tiny, 'snapkv', mb=256)
    cfg = TimeBillConfig(prefill_chunk=CHUNK, max_new_tokens=4, window_size=16)
    p = Pipeline(engine, SLOW, cfg, FixedLength(4), learn=False)
    started, release = threading.Event(), threading.Event()
    _slow_primes(engine, started, lambda: release.wait(0.3))  # a goal arrives mid-prime
    context = _ids(800, 7)
    fut = p.prime(context, 'scene')
    assert started.wait(10)
    deadline = time.monotonic() + 5.0
    goal = p.submit(Job('g', context[:300] + _ids(20, 8), deadline=deadline, max_new_tokens=4))
    out = goal.result(timeout=30)
    assert out.status == 'succeeded' and time.monotonic() < deadline, out.reason
    assert not fut.done()  # the goal went first; priming goes on afterwards
    release.set()
    res = fut.result(timeout=60)
    assert res.ok and res.fit and res.cached_tokens == 800 and res.seconds > 0
    # the goal reused what priming had cached before it yielded
    assert out.cached_tokens > 0 and out.prefill_saved_s > 0
    assert p.release('scene') == 800 // 32
    p.close()
    assert len(engine.prefix_cache) == 0  # cleanup (close) frees the cache


def test_admission_and_estimate_count_the_cached_prefix(tiny):
    engine = _engine(tiny, 'snapkv')
    p = Pipeline(engine, SLOW, TimeBillConfig(prefill_chunk=CHUNK), FixedLength(4), learn=False)
    context = _ids(900, 9)
    assert p.prime(context, 's').result(timeout=60).ok
    ids = context + _ids(30, 10)
    cached = p.cached_for(ids)
    assert cached >= 864
    # a budget the cold prefill (0.05 + 0.93 s) cannot meet, the warm one (~0.1 s) can
    cold = p.estimate(len(ids), 0.5, n_hat=4)
    warm = p.estimate(len(ids), 0.5, n_hat=4, cached=cached)
    assert not cold.admission.admit and warm.admission.admit and warm.verdict.feasible
    assert warm.cached_tokens == cached and warm.prefill_saved_s == pytest.approx(
        SLOW.prefill_s(len(ids)) - SLOW.prefill_s(len(ids), cached)
    )
    # served within a budget its cold prefill alone would overrun (0.98 s)
    assert not p.admission(len(ids), time.monotonic() + 0.95).admit
    out = p.run(
        Job('w', ids, deadline=time.monotonic() + 0.95, max_new_tokens=4, min_quality=0.0)
    )
    assert out.status == 'succeeded' and out.cached_tokens == cached, out.reason
    p.close()


def test_time_model_prices_new_tokens_after_cached_ones():
    m = ExecutionTimeModel(a=1e-7, b=1e-3, c=0.05, p=1e-5, q=0.02)
    assert m.d == pytest.approx(2e-7)  # a profile without a warm fit: theory, d = 2a
    assert m.prefill_s(1000, 0) == pytest.approx(m.prefill_s(1000))
    assert m.prefill_s(1000, 960) < m.prefill_s(1000) / 10
    assert admission(m, 0.0, 0.3, 1000, [], None, 0.95, cached=960).admit
    assert not admission(m, 0.0, 0.3, 1000, [], None, 0.95).admit
    # (d, e) recovered from warm timings by least squares
    true = ExecutionTimeModel(a=1e-7, b=1e-3, c=0.05, p=1e-5, q=0.02, d=3e-7, e=2e-5)
    big_n = [512, 1024, 2048, 4096, 1024, 4096]
    cached = [256, 896, 1024, 3968, 512, 2048]
    t = [true.prefill_s(n, m_) for n, m_ in zip(big_n, cached)]
    d, e = fit_prefill_cached(m, big_n, cached, t)
    assert d == pytest.approx(3e-7, rel=1e-6) and e == pytest.approx(2e-5, rel=1e-6)
    round_trip = ExecutionTimeModel.from_dict(true.to_dict())
    assert round_trip == true and ExecutionTimeModel.from_dict(m.to_dict()).d == m.d


def test_real_model_warm_answer_is_the_cold_one(smollm2):
    model, tok = smollm2
    engine = Engine(model, tok, press='chunkkv', prefix_cache=PrefixCache(512, 64))
    scene = ' '.join(
        f'Object {i}: a {c} {o} in the {r}.'
        for i, (c, o, r) in enumerate(
            (c, o, r)
            for r in ('kitchen', 'lab', 'hall')
            for c in ('red', 'blue', 'green', 'white')
            for o in ('cup', 'box', 'drill', 'cable')
        )
    )
    ids_ctx = engine.encode_prefix(scene)
    ids = engine.encode(scene + '\n\nWhich objects in the lab are blue? Answer briefly.')
    assert ids[: len(ids_ctx) - 2] == ids_ctx[:-2]  # the context's ids lead the goal's
    engine.prefill(ids_ctx, chunk_tokens=256, prime='scene')
    for alpha in (0.0, 0.5):
        cold = engine.prefill(ids, chunk_tokens=256, prefix=False)
        warm = engine.prefill(ids, chunk_tokens=256)
        assert warm.cached_tokens >= len(ids_ctx) - 128
        assert _answer(engine, warm, alpha, ids) == _answer(engine, cold, alpha, ids)


class _LateLength:
    """A length source whose estimate arrives once ``tokens`` answer tokens exist."""

    deferrable = True

    def __init__(self, n_hat, tokens, seen):
        self.n_hat, self.tokens, self.seen = n_hat, tokens, seen

    def start(self, job):
        pass

    def wait(self, job, until):
        from timebill_ros.core.lengths import LengthEstimate

        if len(self.seen) < self.tokens:
            time.sleep(max(until - time.monotonic(), 0.0))
            return None
        return LengthEstimate(self.n_hat, False, time.monotonic(), 0.1)


def test_a_late_estimate_sets_alpha_during_decoding_without_waiting(tiny):
    engine = _engine(tiny, 'snapkv')
    # decode steps of 2 ms/entry-free model: a 0.6 s budget after a 0.05 s prefill needs eviction
    model = ExecutionTimeModel(a=0.0, b=1e-5, c=0.01, p=2e-4, q=0.001)
    cfg = TimeBillConfig(prefill_chunk=CHUNK, max_new_tokens=40, window_size=16)
    ids = _ids(400, 11)
    seen = []
    p = Pipeline(engine, model, cfg, _LateLength(8, 3, seen), learn=False)
    job = Job(
        'late',
        ids,
        deadline=time.monotonic() + 3.0,
        max_new_tokens=40,
        on_token=lambda step, tok, text: seen.append(time.monotonic()),
    )
    out = p.run(job)
    assert out.status == 'succeeded', out.reason
    assert not out.estimate_fallback and out.estimate_received_s > out.prefill_end_s
    assert out.decode_start_s < out.estimate_received_s  # decoding did not wait for it
    assert out.predicted_length == 8 and 0 < out.alpha < 0.95
    # prompt entries were evicted, every generated token kept
    assert out.kv_after == round((1 - out.alpha) * len(ids))
    assert out.result.kv_after == out.kv_after
    # the same goal with the estimate on time chooses an α for the same N̂
    p2 = Pipeline(engine, model, cfg, FixedLength(8), learn=False)
    on_time = p2.run(Job('now', ids, deadline=time.monotonic() + 3.0, max_new_tokens=40))
    assert on_time.predicted_length == 8 and on_time.alpha > 0
    p.close()
    p2.close()


def test_a_prime_released_while_it_runs_holds_nothing(tiny):
    engine = _engine(tiny, 'snapkv', mb=256)
    p = Pipeline(engine, SLOW, TimeBillConfig(prefill_chunk=CHUNK), FixedLength(4), learn=False)
    started = threading.Event()
    _slow_primes(engine, started, lambda: time.sleep(0.2))
    fut = p.prime(_ids(640, 12), 'gone')
    assert started.wait(10)
    p.release('gone')
    res = fut.result(timeout=60)
    assert not res.ok and 'released' in res.reason
    assert engine.prefix_cache.holds() == {}  # its blocks may stay cached, but none is held
    p.close()


def test_warm_prefills_off_the_model_do_not_skew_cold_predictions():
    from timebill_ros.core.online_estimator import OnlineTimeModel

    base = ExecutionTimeModel(a=1e-7, b=1e-3, c=0.05, p=1e-5, q=0.02)
    online = OnlineTimeModel(base)
    for _ in range(30):  # warm prefills 3x slower than the warm form says, cold ones as modelled
        online.observe_prefill(4000, 3.0 * base.prefill_s(4000, 3900), cached=3900)
        online.observe_prefill(1000, base.prefill_s(1000))
    m = online.model()
    assert m.prefill_s(4000) == pytest.approx(base.prefill_s(4000), rel=0.02)
    assert m.prefill_s(4000, 3900) == pytest.approx(3.0 * base.prefill_s(4000, 3900), rel=0.05)
    assert online.worst_model().prefill_s(4000, 3900) >= m.prefill_s(4000, 3900)
    # the heartbeat's flat tuple rebuilds the same model on the server
    from dataclasses import astuple

    assert ExecutionTimeModel(*astuple(m)) == m
