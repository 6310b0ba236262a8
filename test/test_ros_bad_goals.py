"""
Invalid goals end at once with STATUS_REJECTED and a reason; the server keeps serving.

The reason is one a person can act on. A ROS 2 goal response has no reason field, so the
server accepts, then aborts with the reason in the result; NaN/infinite floats cannot be put
in a Duration at all, so the typed client refuses them with the same kind of Outcome.
"""

import math

import pytest
from timebill_ros.core.goal_rules import quality_problem

pytestmark = [pytest.mark.ros, pytest.mark.slow]

GOOD = 'Say hello.'


@pytest.mark.parametrize(
    'kwargs, words',
    [
        ({'prompt': ''}, ['prompt', 'empty']),
        ({'prompt': '   \n '}, ['prompt', 'empty']),
        ({'budget_s': 0.0}, ['no time budget']),
        ({'budget_s': -2.0}, ['positive', '-2']),
        ({'budget_s': float(2**31 - 1)}, ['infinite']),
        ({'budget_s': math.nan}, ['nan']),
        ({'budget_s': math.inf}, ['infinite']),
        ({'budget_s': None, 'deadline_in_s': -3.0}, ['deadline', 'past']),
        ({'overrun_policy': 'bogus'}, ['overrun policy', 'bogus', 'kill']),
        ({'prompt': 'robot ' * 9000}, ['tokens', 'context', '8192']),
        ({'min_quality': 1.5}, ['min_quality', '1.5']),
        ({'min_quality': -5.0}, [quality_problem(-5.0, -1.0)]),
        ({'min_quality': 2.0}, [quality_problem(2.0, -1.0)]),
        ({'min_quality': math.nan}, ['min_quality', 'nan']),
        ({'max_alpha': -0.5}, [quality_problem(-1.0, -0.5)]),
        ({'max_alpha': 1.0}, ['max_alpha', '[0, 1)']),
    ],
    ids=[
        'empty',
        'blank',
        'zero',
        'negative',
        'duration-max',
        'nan',
        'inf',
        'past-deadline',
        'policy',
        'over-context',
        'min-quality',
        'min-quality-negative',
        'min-quality-2',
        'min-quality-nan',
        'max-alpha-negative',
        'max-alpha',
    ],
)
def test_bad_goal_is_rejected_with_reason(ready_server, kwargs, words):
    kwargs = dict(kwargs)
    prompt = kwargs.pop('prompt', GOOD)
    budget = kwargs.pop('budget_s', 30.0)
    deadline_in = kwargs.pop('deadline_in_s', None)
    deadline = ready_server.now_s() + deadline_in if deadline_in is not None else None
    out = ready_server.ask(
        prompt, budget, deadline_s=deadline, max_new_tokens=4, timeout_s=60.0, **kwargs
    )
    assert out.status_name == 'rejected', (out.status_name, out.reason)
    assert not out.ok and not out.text and out.tokens_generated == 0
    assert out.expected_quality == -1.0 and out.alpha_limit == -1.0  # nothing planned: unknown
    reason = out.reason.lower()
    assert all(w.lower() in reason for w in words), out.reason


def test_estimate_budget_refuses_what_a_goal_is_refused_for(ready_server):
    """The EstimateBudget service answers with the goal rules' reason, word for word."""
    for q in (-5.0, 2.0):
        plan = ready_server.estimate_budget(GOOD, 30.0, max_new_tokens=4, min_quality=q)
        assert not plan.ok and plan.reason == quality_problem(q, -1.0), plan.reason


def test_server_keeps_serving_after_bad_goals(ready_server):
    for bad in ('', '   '):
        assert (
            ready_server.ask(bad, 30.0, max_new_tokens=4, timeout_s=60.0).status_name == 'rejected'
        )
    out = ready_server.ask(GOOD, 90.0, max_new_tokens=6, timeout_s=150.0)
    assert out.status_name == 'succeeded', out.reason
    assert out.text.strip()
