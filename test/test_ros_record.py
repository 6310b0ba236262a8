"""
The live server records goals, estimates and results to a rosbag2 MCAP bag.

The bag reads back while it is still being written (a crash loses nothing already written).
"""

import time

import pytest

pytest.importorskip('timebill_ros.action', reason='ROS interfaces not built (run `make ros`)')

from timebill_ros.core.evaluation.bags import (  # noqa: E402
    read_estimates,
    read_requests,
    read_results,
)


def test_live_server_records_goal_estimate_and_result(tiny_server, tiny_nodes):
    out = tiny_server.ask('Name a fruit.', 30.0, max_new_tokens=8)
    assert out.status_name == 'succeeded', out.reason
    bags = sorted(p for p in tiny_nodes.bag_dir.iterdir() if p.is_dir())
    assert bags, f'no bag under {tiny_nodes.bag_dir}'
    bag = bags[-1]
    deadline = time.monotonic() + 15
    while True:  # the result lands right after the server sends it; an estimate from a predictor
        results = read_results(bag)  # restarted by an earlier test may need discovery first
        estimates = read_estimates(bag)
        if (
            out.goal_id in results and any(e['request_id'] == out.goal_id for e in estimates)
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    requests = {r.request_id: r for r in read_requests(bag)}
    assert out.goal_id in requests, sorted(requests)
    assert requests[out.goal_id].prompt == 'Name a fruit.'
    assert out.goal_id in results
    recorded = results[out.goal_id]
    assert recorded['status'] == 4  # GoalStatus SUCCEEDED
    assert recorded['result']['text'] == out.text
    assert recorded['result']['tokens_generated'] == out.tokens_generated
    assert any(e['request_id'] == out.goal_id for e in estimates)
