"""
Several goals at once: EDF order, admission control, Skip-Next, and 5 clients x 20 goals.

Real rclpy and DDS between processes; the tiny random model so the queue, not the model, is
what is tested (its timing model is the pessimistic SmolLM2 fallback).
"""

import json
import math
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

LONG = 'The robot logged an obstacle near the loading dock. ' * 150  # ~1500 tokens


def _by_index(records):
    return {r.index: r for r in records}


def _settle(client, seconds=1.0):
    """Spin the client for a moment (goal 0 gets the model before the others are sent)."""
    end = client.now_s() + seconds
    while client.now_s() < end:
        client._executor.spin_once(timeout_sec=0.05)


def _until_running(client, tries=100):
    """Wait until the generator holds a goal (EstimateBudget counts it ahead): A has the model."""
    for _ in range(tries):
        plan = client.estimate_budget('Name a color.', 60.0)
        if plan is not None and plan.queued_ahead >= 1:
            return
        _settle(client, 0.02)
    raise AssertionError('the first goal never reached the generator')


def _first_holds_model(client):
    return lambda i: _until_running(client) if i == 0 else None


def test_edf_serves_earliest_deadline_first_and_queued_time_counts(tiny_server):
    from timebill_ros.loadgen import fire, GoalSpec

    # A holds the model (sent once the generator counts it); then B (far deadline) and C (near
    # deadline) queue: C must run first. A decodes 1600 tokens (~2 s of the tiny model: more
    # than B's and C's sends take), B and C 200 each, so the order shows in their results
    recs = _by_index(
        fire(
            tiny_server,
            [
                GoalSpec('Tell me a story.', 60.0, 1600),
                GoalSpec('Name a color.', 50.0, 200),
                GoalSpec('Name a fruit.', 20.0, 200),
            ],
            after_send=_first_holds_model(tiny_server),
        )
    )
    assert all(r.status == 'succeeded' for r in recs.values()), [
        (r.status, r.reason) for r in recs.values()
    ]
    assert recs[2].received_s < recs[1].received_s  # EDF, not arrival order
    # B waited behind A and C: its end-to-end time (counted from acceptance) includes the queue
    assert recs[0].received_s < recs[2].received_s
    assert recs[1].server_total_s > (recs[0].received_s - recs[1].sent_s) * 0.5


def test_admission_rejects_hopeless_goal_with_numbers_and_estimate_service_agrees(tiny_server):
    """
    Refuse at once a goal whose own prefill cannot fit behind the running one.

    The generator plans with its online-recalibrated model (the tiny model runs far faster than
    the SmolLM2 fallback it starts from, but the recalibration never scales below 0.1x: LONG's
    prefill stays above 0.5 s), so a 0.4 s budget is hopeless whatever was learned before.
    """
    from timebill_ros.loadgen import fire, GoalSpec

    plans = []

    def after_send(i):
        if i == 0:
            _settle(tiny_server)
        if i == 2:  # A runs, B1 and B2 (later deadlines) are queued
            for _ in range(30):
                plan = tiny_server.estimate_budget(LONG, 0.4)
                if plan is not None and plan.queued_ahead >= 1:  # A, running
                    break
            plans.append(plan)

    goals = [
        GoalSpec('Tell me a story.', 60.0, 900),
        GoalSpec(LONG, 11.5, 2),
        GoalSpec(LONG, 11.5, 2),
        GoalSpec(LONG, 0.4, 2),
    ]
    recs = _by_index(fire(tiny_server, goals, after_send=after_send))
    c = recs[3]
    assert c.status == 'rejected', (c.status, c.reason)
    # hopeless even alone: the server refuses it by the generator's own model, no round trip
    assert 'cannot finish even at α=' in c.reason and 'bigger budget' in c.reason, c.reason
    assert c.received_s - c.sent_s < 5.0  # at once, not at its deadline (wide margin)
    assert recs[0].status == 'succeeded' and recs[1].status != 'rejected', [
        (r.status, r.reason) for r in recs.values()
    ]
    plan = plans[0]
    assert plan is not None and plan.ok and not plan.admissible and plan.queued_ahead >= 1, plan
    assert (
        plan.queue_ahead_s > 0 and 'goal(s) ahead' in plan.admission_reason and not plan.guaranteed
    )
    # alone, with room, the same service says admissible
    later = tiny_server.estimate_budget('Name a color.', 30.0)
    assert later.admissible and later.admission_reason == ''


def test_skip_next_late_goal_runs_on_and_the_waiting_goal_is_skipped(tiny_server):
    from timebill_ros.loadgen import fire, GoalSpec

    recs = _by_index(
        fire(
            tiny_server,
            [
                GoalSpec('Tell me a story.', 1.0, 900, 'skip-next'),
                GoalSpec('Name a color.', 30.0, 4),
            ],
            after_send=_first_holds_model(tiny_server),
        )
    )
    late, waiting = recs[0], recs[1]
    assert late.status == 'deadline_missed' and late.tokens == 900, (late.status, late.reason)
    assert waiting.status == 'rejected' and 'skip-next' in waiting.reason, (
        waiting.status,
        waiting.reason,
    )
    assert tiny_server.ask('Name a fruit.', 30.0, max_new_tokens=4).status_name == 'succeeded'


def test_five_clients_twenty_goals_each_all_end_with_a_reason_and_server_stays_healthy(
    tiny_server, tiny_domain_id, tmp_path
):
    from timebill_ros.bringup import ros_env

    env = dict(ros_env(), ROS_DOMAIN_ID=str(tiny_domain_id))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                '-P',
                '-m',
                'timebill_ros.loadgen',
                '--goals',
                '20',
                '--seed',
                str(i),
                '--cancel-every',
                '7',
                '--out',
                str(tmp_path / f'c{i}.json'),
            ],
            env=env,
        )
        for i in range(5)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0
    records = [
        r for i in range(5) for r in json.loads((tmp_path / f'c{i}.json').read_text())['records']
    ]
    assert len(records) == 100
    ends = {
        'succeeded',
        'truncated',
        'killed',
        'deadline_missed',
        'rejected',
        'aborted',
        'canceled',
    }
    assert all(r['status'] in ends for r in records), [
        r for r in records if r['status'] not in ends
    ]
    assert all(r['reason'] for r in records)
    # Where each answer arrived against its deadline is measured, not asserted: eight Python
    # processes on two cores put the client's own scheduling in the number (see
    # benchmarks/load_lateness.py for the two-planner table the issue asks for).
    met = [r for r in records if r['deadline_met']]
    assert met, records
    statuses = {r['status'] for r in records}
    assert 'succeeded' in statuses and 'canceled' in statuses and 'rejected' in statuses, statuses
    assert not any(math.isnan(r['received_s']) for r in records)
    # the server is still healthy afterwards
    assert tiny_server.ask('Name a color.', 30.0, max_new_tokens=4).status_name == 'succeeded'
