"""timebill_server's lifecycle, driven from this process through the standard services."""

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

PROMPT = 'List two fruits.'


def _wait_decoding(client, min_tokens=2, timeout_s=120.0):
    """Spin until the running goal reports decoding with at least ``min_tokens`` tokens."""
    from timebill_ros.goal_result import STAGE_NAMES

    end = client.now_s() + timeout_s
    while client.now_s() < end:
        if client.is_task_complete(0.05):
            return None
        fb = client.get_feedback()
        if (
            fb is not None
            and STAGE_NAMES[fb.stage] == 'decoding'
            and fb.tokens_so_far >= min_tokens
        ):
            return fb
    raise AssertionError('the goal never reached decoding')


def test_rejected_while_inactive_served_when_active(ready_server):
    client = ready_server
    assert client.change_state('deactivate')
    assert client.get_state() == 'inactive'
    out = client.ask(PROMPT, 60.0, max_new_tokens=4, timeout_s=30.0)
    assert not out.accepted and out.status_name == 'rejected'
    assert 'inactive' in out.reason

    assert client.change_state('activate') and client.get_state() == 'active'
    out = client.ask(PROMPT, 90.0, max_new_tokens=4, timeout_s=150.0)
    assert out.accepted and out.status_name == 'succeeded', out.reason


def test_cleanup_and_configure_again(ready_server):
    client = ready_server
    assert client.change_state('deactivate') and client.change_state('cleanup')
    assert client.get_state() == 'unconfigured'
    # no action server at all
    assert client.send_goal(PROMPT, 30.0, timeout_s=2.0).status_name == 'rejected'
    assert client.startup() and client.get_state() == 'active'
    out = client.ask(PROMPT, 90.0, max_new_tokens=4, timeout_s=150.0)
    assert out.status_name == 'succeeded', out.reason


def test_deactivate_during_a_goal_aborts_it_with_a_reason(ready_server):
    from action_msgs.msg import GoalStatus

    client = ready_server
    assert client.send_goal('Write a long story about a robot.', 300.0, max_new_tokens=400) is None
    fb = _wait_decoding(client)
    assert fb is not None, 'the goal finished before it could be interrupted'
    assert client.change_state('deactivate')
    out = client.get_result(timeout_s=60.0)
    assert out.status_name == 'aborted' and out.goal_status == GoalStatus.STATUS_ABORTED
    assert 'deactivated' in out.reason
    assert out.tokens_generated < 400
    assert client.get_state() == 'inactive'
    assert client.change_state('activate')
