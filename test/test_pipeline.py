"""
The request pipeline (core, no ROS): deadlines bound every stage, one owner of the queue.

The node, offline replay and the sweep choose the same α and status for the same timings.
"""

import math
import threading
import time

import pytest
from timebill_ros.core.config import TimeBillConfig
from timebill_ros.core.engine import Engine
from timebill_ros.core.pipeline import classify, FixedLength, Job, Pipeline
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
    hold = threading.Event()
    # holds the model ~2 s per token
    first = Job(
        'long', _ids(40), deadline=math.inf, max_new_tokens=16, on_token=lambda *a: hold.wait(2.0)
    )
    f1 = p.submit(first)
    time.sleep(0.2)
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
    hold = threading.Event()
    f1 = p.submit(Job('long', _ids(40), max_new_tokens=16, on_token=lambda *a: hold.wait(2.0)))
    time.sleep(0.2)
    f2 = p.submit(Job('waiting', _ids(10), deadline=time.monotonic() + 60, max_new_tokens=4))
    assert p.snapshot()['order'] == ['waiting']
    assert p.cancel('waiting')
    out = f2.result(timeout=1.0)
    assert out.status == 'canceled' and 'queued' in out.reason
    hold.set()
    p.cancel('long')
    assert f1.result(timeout=30).status == 'canceled'
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
    assert '1 goal(s) ahead' in late.reason and f'{own:.3f}' in late.reason
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
    hold = threading.Event()
    f1 = p.submit(
        Job(
            'late',
            _ids(40),
            deadline=time.monotonic() + 0.5,
            max_new_tokens=3,
            overrun='skip-next',
            on_token=lambda *a: hold.wait(0.4),
        )
    )
    time.sleep(0.1)
    f2 = p.submit(Job('waits', _ids(10), deadline=time.monotonic() + 60, max_new_tokens=3))
    assert f1.result(timeout=30).status == 'deadline_missed'
    out = f2.result(timeout=5)
    assert out.status == 'rejected' and 'skip-next' in out.reason
    p.close()


def test_node_replay_and_sweep_choose_the_same_alpha_and_status(engine):
    """One fake time model, one set of timings: the three callers' α and status agree."""
    from timebill_ros.core.evaluation.sweep import PromptResult, SweepConfig, Sweeper
    from timebill_ros.core.evaluation.tasks import Task

    model = ExecutionTimeModel(a=0.0, b=0.0, c=0.0, p=5e-3, q=0.0)  # decode 5 ms per cached entry
    p = _pipeline(engine, model=model)
    ids = _ids(200)
    # node and offline replay: Pipeline.plan after a measured prefill
    job = Job('x', ids, deadline=5.0, accepted_at=0.0, max_new_tokens=10, k=1.0, min_quality=0.0)
    alpha, verdict = p.plan(job, prefill_s=0.0, n_hat=10, elapsed_s=0.0)
    assert verdict.status == 'met' and 0.0 < alpha < 0.95
    # the sweep, from a prompt result with the same timings
    task = Task(
        id='x',
        kind='t',
        prompt='p',
        references=['r'],
        metric='contains',
        n_tokens=200,
        max_new_tokens=10,
    )
    sw = Sweeper(
        engine, model, None, SweepConfig(budgets={'g': [5.0]}), log=lambda m: None, config=CFG
    )
    res = PromptResult(
        task=task,
        input_ids=ids,
        n_prompt=200,
        prefill_s=0.0,
        n_hat=10,
        predict_s=0.0,
        predictor_source='test',
    )
    assert sw.timebill_alpha(res, 5.0, 1.0, 0.95) == pytest.approx(alpha)
    # one table of how runs end
    assert classify('eos', True, 4.0, 5.0, 'kill', 3)[0] == 'succeeded'
    assert classify('eos', True, 6.0, 5.0, 'skip-next', 3)[0] == 'deadline_missed'
    assert classify('deadline', False, 5.0, 5.0, 'truncate', 3)[0] == 'truncated'
    assert classify('deadline', False, 5.0, 5.0, 'kill', 3)[0] == 'killed'
    assert classify('cancelled', False, 1.0, 5.0, 'kill', 3)[0] == 'canceled'
    p.close()


def test_bad_jobs_are_rejected_with_a_reason(engine):
    p = _pipeline(engine)
    assert 'no tokens' in p.run(Job('e', [])).reason
    assert 'unknown overrun policy' in p.run(Job('o', _ids(5), overrun='skip_next')).reason
    hopeless = p.run(Job('h', _ids(100), deadline=time.monotonic() + 0.1))
    assert hopeless.status == 'rejected' and 'cannot finish even at' in hopeless.reason
    p.close()
