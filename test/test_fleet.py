"""core.fleet.rank: which generator a goal goes to (no ROS)."""

import math

from timebill_ros.core.fleet import Member, rank
from timebill_ros.core.time_estimator import ExecutionTimeModel

# prefill 2 ms per token, decode 1 ms + 10 µs per cached entry
MODEL = ExecutionTimeModel(a=0.0, b=2e-3, c=0.0, p=1e-5, q=1e-3)


def test_the_idle_generator_gets_the_goal_and_the_busy_one_would_need_eviction():
    busy = Member('busy', MODEL, busy_s=9.0)
    idle = Member('idle', MODEL, busy_s=0.0)
    first, second = rank([busy, idle], left_s=10.0, n_prompt=2000, max_new=100, alpha_cap=0.95)
    assert first.name == 'idle' and first.feasible and first.alpha == 0.0
    assert second.name == 'busy' and second.start_s == 9.0
    # behind 9 s of work only 1 s is left: its plan needs eviction or cannot be met at all
    assert second.alpha > 0.0 or not second.feasible


def test_least_eviction_beats_less_work_ahead():
    # a faster generator with some work ahead still needs no eviction: it wins over a slow idle one
    slow = Member('slow', ExecutionTimeModel(a=0.0, b=4e-3, c=0.0, p=1e-4, q=5e-2))
    fast = Member('fast', MODEL, busy_s=1.0)
    ranked = rank([slow, fast], left_s=6.0, n_prompt=1000, max_new=60, alpha_cap=0.95)
    assert [c.name for c in ranked] == ['fast', 'slow']
    assert ranked[0].alpha == 0.0 and ranked[1].alpha > 0.0


def test_a_tie_goes_to_the_generator_holding_the_context_then_to_fewer_goals_in_flight():
    a = Member('a', MODEL)
    b = Member('b', MODEL, holds_context=True)
    assert rank([a, b], 30.0, 500, 50, 0.95)[0].name == 'b'
    c = Member('c', MODEL, inflight=2)
    d = Member('d', MODEL, inflight=0)
    assert rank([c, d], 30.0, 500, 50, 0.95)[0].name == 'd'


def test_an_inactive_generator_comes_last_and_past_the_deadline_is_infeasible():
    late = Member('late', MODEL, busy_s=20.0)
    waking = Member('waking', MODEL, active=False)
    ok = Member('ok', MODEL)
    ranked = rank([late, waking, ok], 10.0, 500, 50, 0.95)
    assert [c.name for c in ranked] == ['ok', 'late', 'waking']
    assert not ranked[1].feasible and math.isinf(ranked[1].end_s)


def test_the_goals_eviction_cap_is_respected():
    # 9 s: prefill 4 s, so 400 steps must fit in 5 s -- about α = 0.53 of the 2000 entries
    loose = rank([Member('g', MODEL)], left_s=9.0, n_prompt=2000, max_new=400, alpha_cap=0.95)[0]
    tight = rank([Member('g', MODEL)], left_s=9.0, n_prompt=2000, max_new=400, alpha_cap=0.5)[0]
    assert loose.feasible and 0.45 < loose.alpha < 0.6
    assert not tight.feasible and tight.alpha == 0.5
