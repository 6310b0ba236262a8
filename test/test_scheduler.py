"""EDF queue, Skip-Next skipping and admission control (core, no ROS)."""

import threading
import time

import pytest

from timebill_ros.core.scheduler import EdfQueue, Pending, admission, min_job_s
from timebill_ros.core.time_estimator import ExecutionTimeModel

MODEL = ExecutionTimeModel.from_dict(dict(a=1e-6, b=1e-3, c=0.05, p=1e-5, q=0.02))


def _run_order(deadlines, overrun_first=False):
    """Job 'first' holds the model; the others queue with ``deadlines``; return the order they ran."""
    q = EdfQueue()
    assert q.acquire("first", 0.0)
    order, results, threads = [], {}, []

    def job(name, d):
        ok = q.acquire(name, d)
        results[name] = ok
        if ok:
            order.append(name)
            q.release(name)

    for i, d in enumerate(deadlines):
        t = threading.Thread(target=job, args=(f"j{i}", d))
        t.start()
        threads.append(t)
    end = time.monotonic() + 10
    while len(q) < len(deadlines) and time.monotonic() < end:
        time.sleep(0.01)
    skipped = q.release("first", overran=overrun_first)
    for t in threads:
        t.join(10)
    return order, results, skipped, q


def test_edf_runs_earliest_deadline_first_not_arrival_order():
    order, results, skipped, _ = _run_order([30.0, 10.0, 20.0, 5.0])
    assert order == ["j3", "j1", "j2", "j0"]
    assert all(results.values()) and skipped == []


def test_skip_next_skips_every_job_that_waited_during_the_overrun():
    order, results, skipped, q = _run_order([30.0, 10.0], overrun_first=True)
    assert order == [] and results == {"j0": False, "j1": False}
    assert sorted(skipped) == ["j0", "j1"]
    assert "overran" in q.skipped("j0") and q.skipped("j0") is None  # reason handed out once
    assert q.acquire("later", 1.0)  # the queue serves again afterwards


def test_cancel_while_queued_leaves_the_queue():
    q = EdfQueue()
    assert q.acquire("a", 1.0)
    cancel = threading.Event()
    out = []
    t = threading.Thread(target=lambda: out.append(q.acquire("b", 2.0, cancel.is_set)))
    t.start()
    time.sleep(0.1)
    cancel.set()
    t.join(5)
    assert out == [False] and len(q) == 0 and q.skipped("b") is None


def test_admission_counts_work_queued_ahead_with_numbers():
    own = min_job_s(MODEL, 100, 0.95)
    ok = admission(MODEL, 0.0, 10.0, 100, [], 0.95)
    assert ok.admit and ok.ahead == 0 and ok.own_s == pytest.approx(own)
    ahead = [Pending(f"p{i}", 5.0, 2000) for i in range(20)] + [Pending("late", 50.0, 2000)]
    no = admission(MODEL, 0.0, 10.0, 100, ahead, 0.95)
    assert not no.admit and no.ahead == 20  # the goal with a later deadline is not ahead under EDF
    assert no.ahead_s == pytest.approx(20 * min_job_s(MODEL, 2000, 0.95))
    assert "20 goal(s) ahead" in no.reason and f"{no.ahead_s:.3f}" in no.reason and "bigger budget" in no.reason
    # alone, the same goal is admitted; a running job counts but adds no known work
    assert admission(MODEL, 0.0, 10.0, 100, [Pending("run", 99.0, 4000, started=True)], 0.95).admit
    tight = admission(MODEL, 0.0, own * 0.5, 100, [], 0.95)
    assert not tight.admit and "prefill of 100 tokens" in tight.reason
