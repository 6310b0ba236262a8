"""
Re-planning during decode (tiny model).

When steps run slower than estimated or the answer outgrows N̂, the Replanner evicts more
mid-decode and the decode carries on.
"""

import math

from timebill_ros.core.engine import Engine
from timebill_ros.core.generation import GenerationRequest
from timebill_ros.core.replan import re_evict, Replanner, target_kv
from timebill_ros.core.time_estimator import ExecutionTimeModel

MODEL = ExecutionTimeModel(a=0.0, b=1e-4, c=0.0, p=1e-4, q=1e-3)


class FakeClock:
    """Each reading advances by ``step`` seconds: the decode looks as slow as we like."""

    def __init__(self, step):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


def _prefilled(tiny, n_prompt=200, max_new=64):
    engine = Engine(tiny, None, press='snapkv', window_size=8)
    ids = [(7 * i) % 250 + 2 for i in range(n_prompt)]
    state = engine.prefill(ids, capacity=n_prompt + max_new + 1)
    return engine, ids, state


def test_target_kv_shrinks_with_less_time_and_more_slowdown():
    assert (
        target_kv(MODEL, 10.0, 10, 1.0)
        > target_kv(MODEL, 1.0, 10, 1.0)
        > target_kv(MODEL, 1.0, 10, 3.0)
    )
    assert target_kv(MODEL, 1e-4, 10, 1.0) == -math.inf or target_kv(MODEL, 1e-4, 10, 1.0) < 0
    assert target_kv(MODEL, 1.0, 0, 1.0) == math.inf


def test_re_evict_keeps_sinks_and_recent_entries(tiny):
    engine, ids, state = _prefilled(tiny)
    keys0 = state.cache.layers[0].keys.clone()
    assert re_evict(state.cache, 50, n_sink=4) == 50
    k = state.cache.layers[0].keys
    assert k.shape[-2] == 50
    assert (k[:, :, :4] == keys0[:, :, :4]).all() and (k[:, :, 4:] == keys0[:, :, -46:]).all()
    assert re_evict(state.cache, 500) == 50  # never grows


def test_slow_steps_trigger_mid_decode_eviction_and_decode_finishes(tiny):
    engine, ids, state = _prefilled(tiny)
    kv0 = state.kv_before
    # the estimate says ~0.02 s/step at this KV; the clock says each step takes 0.1 s
    clock = FakeClock(0.1)
    deadline = 0.1 * 64 * 0.6  # 60 % of what 64 slow steps need
    rp = Replanner(
        state.cache, MODEL, deadline, n_hat=64, n_cap=64, n_prompt=len(ids), every=8, clock=clock
    )
    out = engine.decode(state, GenerationRequest(input_ids=ids, max_new_tokens=64, on_token=rp))
    assert out.completed and out.tokens_generated == 64
    assert rp.events, 'no re-plan although steps ran 5x slower than estimated'
    ev = rp.events[0]
    assert ev.kv_after < ev.kv_before and 'slower than estimated' in ev.reason
    assert rp.kv_len() < kv0 + 64  # the cache really is smaller than a one-shot plan leaves it
    assert rp.kv_len() >= math.ceil(len(ids) * 0.05)  # never below α_max of the prompt


def test_answer_outgrowing_n_hat_triggers_replan_but_on_plan_decode_does_not(tiny):
    engine, ids, state = _prefilled(tiny)
    # on plan: steps as estimated, plenty of time -> nothing happens
    calm = Replanner(
        state.cache, MODEL, 1e9, n_hat=64, n_cap=64, n_prompt=len(ids), clock=FakeClock(0.02)
    )
    engine.decode(
        engine.clone_state(state),
        GenerationRequest(input_ids=ids, max_new_tokens=32, on_token=calm),
    )
    assert calm.events == []
    # N̂ = 8 but the answer keeps going: after 8 tokens it expects 1.5x more each check
    clock = FakeClock(MODEL.decode_step_s(state.kv_before))
    grow = Replanner(
        state.cache,
        MODEL,
        clock.step * 14,
        n_hat=8,
        n_cap=64,
        n_prompt=len(ids),
        every=8,
        clock=clock,
    )
    engine.decode(state, GenerationRequest(input_ids=ids, max_new_tokens=64, on_token=grow))
    assert any('outgrew' in e.reason for e in grow.events), grow.events
