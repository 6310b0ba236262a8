"""
The request pipeline (core, no ROS): deadlines bound every stage, one owner of the queue.

Refusals and estimates say the truth: the rule a goal broke, the eviction cap that applies to it,
and the work ahead only when it is what stands in the way.
"""

import math
import threading
import time

import pytest
from timebill_ros.core.config import TimeBillConfig
from timebill_ros.core.engine import Engine
from timebill_ros.core.job import Job
from timebill_ros.core.lengths import FixedLength
from timebill_ros.core.outcome import classify
from timebill_ros.core.pipeline import Pipeline
from timebill_ros.core.scheduler import admission, min_job_s, Pending, Running, worst_start
from timebill_ros.core.time_estimator import ExecutionTimeModel

# a slow, made-up model: prefill 0.3 s + 1 ms/token, decode 20 ms + 10 µs/entry
SLOW = ExecutionTimeModel(a=0.0, b=1e-3, c=0.3, p=1e-5, q=0.02)
CFG = TimeBillConfig(max_new_tokens=16, prefill_chunk=32, window_size=8, estimate_slack_s=0.0)


@pytest.fixture(scope='module')
def engine(tiny):
    return Engine(tiny, None, press='snapkv', window_size=8)


def _ids(n, seed=0):
    return [3 + (seed * 7919 + i * 31) % 200 for i in range(n)]


def _pipeline(engine, model=SLOW, cfg=CFG, clock=time.monotonic, n_hat=8):
    return Pipeline(engine, model, cfg, FixedLength(n_hat, clock=clock), learn=False, clock=clock)


def _holding(decoding, hold, each_s=2.0):
    """Return an ``on_token`` that says decoding began, then holds the model ``each_s`` a token."""

    def on_token(*_):
        decoding.set()
        hold.wait(each_s)

    return on_token


def test_served_job_reports_what_was_done(engine):
    p = _pipeline(engine)
    out = p.run(Job('a', _ids(100), deadline=time.monotonic() + 60.0, max_new_tokens=8))
    assert out.status == 'succeeded' and out.deadline_met and out.tokens_generated >= 1
    # a roomy budget evicts nothing
    assert out.alpha == 0.0 and out.kv_after == out.kv_before == 100
    assert 0 <= out.prefill_start_s <= out.prefill_end_s <= out.decode_start_s <= out.finished_at_s
    p.close()


def test_queued_job_leaves_the_queue_before_its_deadline_when_it_can_no_longer_finish(engine):
    p = _pipeline(engine)
    hold, decoding = threading.Event(), threading.Event()
    # holds the model ~2 s per token
    first = Job(
        'long', _ids(40), deadline=math.inf, max_new_tokens=16, on_token=_holding(decoding, hold)
    )
    f1 = p.submit(first)
    assert decoding.wait(30.0)
    deadline = time.monotonic() + 0.9  # needs 0.3 + 0.01 s: admitted, but the model stays busy
    f2 = p.submit(Job('queued', _ids(10), deadline=deadline, max_new_tokens=4))
    out = f2.result(timeout=10.0)
    arrived = time.monotonic()
    hold.set()
    assert out.status == 'killed' and out.reason.startswith('not started'), out.reason
    assert arrived < deadline, f'ended {arrived - deadline:.3f} s after its deadline'
    assert out.alpha == 0.0 and out.kv_after == out.kv_before  # never started: nothing evicted
    assert f1.result(timeout=60).status == 'succeeded'
    p.close()


def test_cancel_of_a_queued_job_ends_it_at_once(engine):
    p = _pipeline(engine)
    hold, decoding = threading.Event(), threading.Event()
    f1 = p.submit(Job('long', _ids(40), max_new_tokens=16, on_token=_holding(decoding, hold)))
    assert decoding.wait(30.0)
    f2 = p.submit(Job('waiting', _ids(10), deadline=time.monotonic() + 60, max_new_tokens=4))
    assert p.snapshot()['order'] == ['waiting']
    assert p.cancel('waiting')
    out = f2.result(timeout=1.0)
    assert out.status == 'canceled' and 'queued' in out.reason
    hold.set()
    p.cancel('long')
    assert f1.result(timeout=30).status == 'canceled'
    p.close()


def test_more_goals_than_max_goals_are_refused_and_a_freed_place_is_reused(engine):
    from dataclasses import replace

    p = _pipeline(engine, cfg=replace(CFG, max_goals=2))
    hold, decoding = threading.Event(), threading.Event()
    f1 = p.submit(Job('long', _ids(40), max_new_tokens=16, on_token=_holding(decoding, hold)))
    assert decoding.wait(30.0)
    f2 = p.submit(Job('second', _ids(10), deadline=time.monotonic() + 60, max_new_tokens=4))
    full = p.submit(Job('third', _ids(10), deadline=time.monotonic() + 60, max_new_tokens=4))
    out = full.result(timeout=1.0)
    assert out.status == 'rejected' and 'queue full' in out.reason and 'max_goals 2' in out.reason
    assert p.cancel('second') and f2.result(timeout=1.0).status == 'canceled'
    again = p.submit(Job('again', _ids(10), deadline=time.monotonic() + 60, max_new_tokens=4))
    assert p.snapshot()['order'] == ['again']  # the freed place is taken, not refused
    hold.set()
    p.cancel('long')
    assert f1.result(timeout=30).status == 'canceled'
    assert again.result(timeout=60).status == 'succeeded'
    p.close()


def test_prefill_stops_between_chunks_once_the_deadline_cannot_be_met(engine):
    jump = [0.0]
    clock = lambda: time.monotonic() + jump[0]  # noqa: E731
    p = _pipeline(engine, clock=clock)
    seen = []

    def on_stage(job, stage):
        seen.append(stage)
        if stage == 'prefill':
            jump[0] = 0.79  # the machine stalls at once: after the first chunk, no time is left

    out = p.run(
        Job('slow', _ids(200), deadline=clock() + 0.8, max_new_tokens=4, on_stage=on_stage)
    )
    assert out.status == 'killed' and out.reason.startswith('stopped prefill after 32 of 200'), (
        out.reason
    )
    assert 'decoding' not in seen and out.tokens_generated == 0 and out.alpha == 0.0
    p.close()


def test_admission_counts_the_running_jobs_remaining_work():
    now = 100.0
    running = Running('r', deadline=110.0, expected_end=104.0, worst_end=110.0)
    own = min_job_s(SLOW, 50, 0.95)
    fits = admission(SLOW, now, now + 4.0 + own + 0.01, 50, [], running)
    late = admission(SLOW, now, now + 3.0 + own, 50, [], running)
    assert fits.admit and not late.admit and late.ahead == 1
    assert '1 goal(s) ahead' in late.reason and f'{own:.3f}' in late.reason, late.reason
    # the worst start: the running job ends by its deadline (+ one step), queued ones by theirs
    assert worst_start(now, running, [Pending('q', 112.0, 10)], 0.02) == pytest.approx(112.02)


def test_estimate_guarantees_only_what_survives_the_jobs_ahead(engine):
    p = _pipeline(engine)
    est = p.estimate(100, budget_s=5.0, n_hat=8)
    assert est.guaranteed and est.verdict.status == 'met'
    p._running = Running(
        'r',
        deadline=time.monotonic() + 4.9,
        expected_end=time.monotonic() + 1.0,
        worst_end=time.monotonic() + 4.9,
    )
    est = p.estimate(100, budget_s=5.0, n_hat=8)
    assert est.admission.admit and not est.guaranteed and 'not guaranteed' in est.reason
    p._running = None
    p.close()


def test_a_guarantee_leaves_the_result_time_to_reach_the_planner(engine):
    # the worst case of 100 prompt tokens and N̂_W answer tokens on SLOW, evicting nothing
    n_w = _pipeline(engine).estimate(100, budget_s=60.0, n_hat=8).verdict.n_wcet
    worst = SLOW.prefill_s(100) + sum(SLOW.decode_step_s(100 + i) for i in range(n_w))
    tight = worst + 0.2
    assert _pipeline(engine, cfg=CFG.replace(guarantee_margin_s=0.0)).estimate(
        100, budget_s=tight, n_hat=8
    ).guaranteed
    est = _pipeline(engine, cfg=CFG.replace(guarantee_margin_s=0.5)).estimate(
        100, budget_s=tight, n_hat=8
    )
    assert est.verdict.status == 'met' and not est.guaranteed  # served on time, not promised
    assert _pipeline(engine, cfg=CFG.replace(guarantee_margin_s=0.5)).estimate(
        100, budget_s=worst + 0.6, n_hat=8
    ).guaranteed


def test_skip_next_overrun_skips_the_jobs_that_waited(engine):
    p = _pipeline(engine)
    hold, decoding = threading.Event(), threading.Event()
    f1 = p.submit(
        Job(
            'late',
            _ids(40),
            deadline=time.monotonic() + 0.5,
            max_new_tokens=3,
            overrun='skip-next',
            on_token=_holding(decoding, hold, 0.4),
        )
    )
    assert decoding.wait(30.0)
    f2 = p.submit(Job('waits', _ids(10), deadline=time.monotonic() + 60, max_new_tokens=3))
    assert f1.result(timeout=30).status == 'deadline_missed'
    out = f2.result(timeout=5)
    assert out.status == 'rejected' and 'skip-next' in out.reason
    p.close()


def test_one_table_says_how_runs_end():
    assert classify('eos', True, 4.0, 5.0, 'kill', 3)[0] == 'succeeded'
    assert classify('eos', True, 6.0, 5.0, 'skip-next', 3)[0] == 'deadline_missed'
    assert classify('deadline', False, 5.0, 5.0, 'truncate', 3)[0] == 'truncated'
    assert classify('deadline', False, 5.0, 5.0, 'kill', 3)[0] == 'killed'
    assert classify('cancelled', False, 1.0, 5.0, 'kill', 3)[0] == 'canceled'


def test_bad_jobs_are_rejected_with_a_reason(engine):
    p = _pipeline(engine)
    assert 'no tokens' in p.run(Job('e', [])).reason
    assert 'unknown overrun policy' in p.run(Job('o', _ids(5), overrun='skip_next')).reason
    hopeless = p.run(Job('h', _ids(100), deadline=time.monotonic() + 0.1))
    assert hopeless.status == 'rejected' and 'cannot finish even at' in hopeless.reason
    p.close()


@pytest.mark.parametrize(
    'min_quality,max_alpha,field',
    [(-5.0, -1.0, 'min_quality'), (math.nan, -1.0, 'min_quality'), (2.0, -1.0, 'min_quality'),
     (-1.0, 1.0, 'max_alpha'), (-1.0, -0.5, 'max_alpha'), (0.0, math.nan, 'max_alpha')],
)
def test_quality_wishes_out_of_range_are_refused_by_submit_and_estimate(
    engine, min_quality, max_alpha, field
):
    p = _pipeline(engine)
    job = Job('q', _ids(20), deadline=time.monotonic() + 60, min_quality=min_quality,
              max_alpha=max_alpha)
    out = p.run(job)
    assert out.status == 'rejected' and out.reason.startswith(f'{field} must be'), out.reason
    est = p.estimate(20, budget_s=60.0, n_hat=8, min_quality=min_quality, max_alpha=max_alpha)
    assert est.quality_refusal == out.reason and not est.guaranteed
    p.close()


def test_refusals_quote_the_eviction_cap_that_applies_and_why(engine):
    p = _pipeline(engine)
    floor = p.limit(Job('d', _ids(100)))  # the default quality floor caps α below α_max
    assert floor.alpha_limit < CFG.alpha_max
    out = p.run(Job('h', _ids(100), deadline=time.monotonic() + 0.1))
    assert out.status == 'rejected', out.reason
    assert f'α={floor.alpha_limit:.2f}, the most it allows ({floor.why})' in out.reason
    assert 'α_max' not in out.reason, out.reason
    capped = p.estimate(100, budget_s=0.1, n_hat=8, min_quality=0.0, max_alpha=0.3)
    assert not capped.admission.admit
    assert 'α=0.30, the most it allows (the goal allows α ≤ 0.3)' in capped.admission.reason
    free = p.estimate(100, budget_s=0.1, n_hat=8, min_quality=0.0)
    assert f'α_max={CFG.alpha_max:g}' in free.admission.reason  # nothing caps it below α_max
    p.close()


def test_not_guaranteed_blames_the_work_ahead_only_when_it_is_the_cause(engine):
    cfg = CFG.replace(guarantee_margin_s=4.99)  # the margin alone breaks a 5 s guarantee
    p = _pipeline(engine, cfg=cfg)
    alone = p.estimate(100, budget_s=5.0, n_hat=8)
    assert alone.verdict.status == 'met' and not alone.guaranteed
    assert 'ahead' not in alone.reason and 'kept for the way back' in alone.reason, alone.reason
    now = time.monotonic()
    # a goal that ends in 0.1 ms is not what breaks the guarantee
    p._running = Running('r', deadline=now + 1e-4, expected_end=now, worst_end=now + 1e-4)
    ending = p.estimate(100, budget_s=5.0, n_hat=8)
    assert not ending.guaranteed and 'ahead' not in ending.reason, ending.reason
    p.close()
    p = _pipeline(engine)
    now = time.monotonic()
    p._running = Running('prime:ctx', deadline=math.inf, expected_end=now, worst_end=now + 4.9)
    primed = p.estimate(100, budget_s=5.0, n_hat=8)
    assert not primed.guaranteed
    assert 'a standing context being primed may hold the model' in primed.reason, primed.reason
    assert 'goal(s)' not in primed.reason
    p._running = None
    p.close()
