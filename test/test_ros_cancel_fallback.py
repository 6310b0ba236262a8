"""Cancel during decode, and the generator's N_max fallback when no estimate arrives."""

import re

import pytest
from test_ros_lifecycle import _wait_decoding

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def test_cancel_during_decode_stops_within_one_step(ready_server):
    from action_msgs.msg import GoalStatus

    client = ready_server
    assert (
        client.send_goal('Describe a warehouse robot in detail.', 300.0, max_new_tokens=400)
        is None
    )
    fb = _wait_decoding(client, min_tokens=3)
    assert fb is not None, 'the goal finished before it could be canceled'
    seen = fb.tokens_so_far
    assert client.cancel_task()
    out = client.get_result(timeout_s=60.0)
    assert out.status_name == 'canceled' and out.goal_status == GoalStatus.STATUS_CANCELED, (
        out.reason
    )
    # the generator counts the steps it decoded after the cancel reached it
    steps = int(re.search(r'stopped (\d+) decode step', out.reason).group(1))
    assert steps <= 1, out.reason
    assert seen <= out.tokens_generated < 400


def test_no_estimate_falls_back_to_n_max_and_meets_deadline(ready_server, timebill_nodes):
    client = ready_server
    timebill_nodes.stop(['timebill_predictor'])  # predictor gone: no estimate will ever come
    try:
        out = client.ask('Name one planet.', 90.0, max_new_tokens=16, timeout_s=150.0)
        assert out.status_name == 'succeeded' and out.deadline_met, out.reason
        assert out.estimate_fallback and out.timeline['estimate_received'] == -1
        assert out.predicted_length == 16  # N̂ = N_max, capped by the goal's max_new_tokens
        assert out.timeline['prefill_end'] <= out.timeline['decode_start']
    finally:
        # comes up unconfigured; the server configures it
        timebill_nodes.start(['timebill_predictor'])
        assert client._wait(
            lambda: client.get_state('timebill_predictor', 2.0) == 'active', 120.0
        ), timebill_nodes.log_tail('timebill_predictor')
