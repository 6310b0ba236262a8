"""
The EDF queue and the admission arithmetic (core, no ROS).

The pipeline's use of them is in test_pipeline.py.
"""

import math

import pytest
from timebill_ros.core.scheduler import (
    admission,
    answer_grace_s,
    EdfQueue,
    min_job_s,
    Pending,
    Running,
    worst_start,
)
from timebill_ros.core.time_estimator import ExecutionTimeModel

MODEL = ExecutionTimeModel.from_dict({'a': 1e-6, 'b': 1e-3, 'c': 0.05, 'p': 1e-5, 'q': 0.02})


class _J:
    def __init__(self, rid, deadline, n=10):
        self.request_id, self.deadline, self.n_prompt = rid, deadline, n


def test_edf_pops_earliest_deadline_first_not_arrival_order():
    q = EdfQueue()
    for rid, d in (('late', 30.0), ('soon', 10.0), ('mid', 20.0), ('tie', 10.0)):
        q.push(_J(rid, d))
    assert q.order() == ['soon', 'tie', 'mid', 'late']  # ties keep arrival order
    assert [q.pop().request_id for _ in range(4)] == ['soon', 'tie', 'mid', 'late']
    assert q.pop() is None


def test_expire_removes_exactly_the_jobs_past_their_latest_start():
    q = EdfQueue()
    for rid, d in (('a', 1.0), ('b', 5.0), ('c', 9.0)):
        q.push(_J(rid, d))
    latest = lambda j: j.deadline - 2.0  # noqa: E731
    assert q.next_expiry(latest) == -1.0
    gone = q.expire(4.0, latest)
    assert [j.request_id for j in gone] == ['a', 'b'] and q.order() == ['c']
    assert q.remove('c').request_id == 'c' and q.remove('c') is None and len(q) == 0
    assert math.isinf(q.next_expiry(latest))


def test_admission_is_a_lower_bound_with_the_numbers():
    own = min_job_s(MODEL, 100, 0.95)
    assert admission(MODEL, 0.0, own + 1e-6, 100, []).admit
    no = admission(MODEL, 0.0, own - 1e-6, 100, [])
    assert not no.admit and f'{own:.3f}' in no.reason and 'bigger budget' in no.reason
    # queued jobs with later deadlines do not count; earlier ones do
    assert admission(MODEL, 0.0, own + 0.01, 100, [Pending('x', 50.0, 4000)]).admit
    ahead = admission(MODEL, 0.0, 10.0, 100, [Pending('x', 5.0, 4000)])
    assert not ahead.admit and ahead.ahead == 1 and ahead.ahead_s == min_job_s(MODEL, 4000, 0.95)


def test_worst_start_is_bounded_by_the_deadlines_ahead():
    run = Running('r', deadline=8.0, expected_end=3.0, worst_end=6.0)
    assert worst_start(0.0, run, [], 0.1) == 6.0  # its planned worst case came first
    # else its deadline + 1 step
    assert worst_start(0.0, Running('r', 8.0, 3.0, math.inf), [], 0.1) == 8.1
    assert worst_start(0.0, None, [Pending('q', 9.0, 5)], 0.1) == 9.1
    assert worst_start(12.0, run, [], 0.1) == 12.0


def test_an_answer_is_lost_one_chunk_after_the_deadline_or_after_a_whole_late_job():
    slow = ExecutionTimeModel(a=0.0, b=4e-3, c=0.1, p=1e-5, q=0.02)  # a 256-token chunk: 1.124 s
    assert answer_grace_s(slow, 256) == pytest.approx(slow.prefill_s(256))
    assert answer_grace_s(MODEL, 256) == 0.5  # a fast chunk: the answer's way still counts
    # skip-next: the late job may finish its whole prefill and max_new steps after the deadline
    whole = slow.prefill_s(1000) + 64 * slow.decode_step_s(1064)
    late = answer_grace_s(slow, 256, 1000, 64, 'skip-next')
    assert late == pytest.approx(slow.prefill_s(256) + whole)
    assert answer_grace_s(slow, 256, 1000, 64, 'truncate') == answer_grace_s(slow, 256)
    assert answer_grace_s(None, 256) == 2.0 and answer_grace_s(None, 256, overrun='skip-next') > 60
