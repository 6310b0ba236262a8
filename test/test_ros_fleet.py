"""
Two generators behind one server: dispatch by deadline, the fleet's estimate, failover.

Real processes and DDS, the tiny model (fp32 weights: seconds for a long answer, so a goal is
still running when its generator is killed).
"""

import os
import signal
import threading
import time

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

GENERATORS = ['timebill_generator_0', 'timebill_generator_1']
STORY = 'Tell me a long story about a robot.'


@pytest.fixture(scope='module')
def fleet(tiny_domain_id, tmp_path_factory):
    from timebill_ros.bringup import Bringup
    from timebill_ros.core.model import ensure_tiny_model

    from conftest import close_client, make_client

    ensure_tiny_model()
    domain = tiny_domain_id + 20
    client = make_client(domain, 'fleet_test_client')
    logs = tmp_path_factory.mktemp('fleet_logs')
    nodes = Bringup(
        overrides={'threads': 1, 'model': 'tiny', 'weights': 'fp32'},
        domain_id=domain,
        log_dir=logs,
        generators=2,
    )
    try:
        nodes.up(client, timeout_s=240.0)
        assert _fleet_ready(client), nodes.log_tail('timebill_server')
        yield nodes, client
    finally:
        nodes.stop()
        close_client(client)


def test_both_generators_come_up_and_the_estimate_names_one(fleet):
    nodes, client = fleet
    assert set(GENERATORS) <= set(nodes.procs)
    assert client.wait_for_nodes(GENERATORS, 'active', 60.0)
    plan = client.estimate_budget('Name a color.', 30.0, max_new_tokens=8)
    assert plan is not None and plan.ok and plan.generator in GENERATORS, plan


def test_two_goals_at_once_are_served_by_different_generators(fleet, tiny_domain_id):
    from conftest import close_client, make_client

    nodes, client = fleet
    second = make_client(tiny_domain_id + 20, 'fleet_second_planner')  # a client is one thread
    out = {}

    def ask(i, planner):
        try:
            out[i] = planner.ask(STORY, 60.0, max_new_tokens=400, timeout_s=120)
        except Exception as exc:  # noqa: BLE001 - say it in the assertion below
            out[i] = exc

    # the second goal is sent while the first holds its generator: the other one is idle
    threads = [threading.Thread(target=ask, args=(i, c)) for i, c in enumerate((client, second))]
    try:
        threads[0].start()
        time.sleep(0.5)
        threads[1].start()
        for t in threads:
            t.join(150)
    finally:
        close_client(second)
    assert all(o.status_name == 'succeeded' for o in out.values()) and len(out) == 2, out
    assert {o.generator for o in out.values()} == set(GENERATORS), out


def test_a_killed_generators_goal_is_re_dispatched_and_served(fleet, tiny_domain_id):
    from conftest import close_client, make_client

    nodes, client = fleet
    watcher = make_client(tiny_domain_id + 20, 'fleet_watcher')  # a client is one thread
    feedback = []
    done = {}

    def ask():
        done['out'] = client.ask(
            STORY, 90.0, max_new_tokens=1500, on_feedback=feedback.append, timeout_s=150
        )

    t = threading.Thread(target=ask)
    t.start()
    end = time.monotonic() + 60
    while not any(f.tokens_so_far > 5 for f in feedback) and time.monotonic() < end:
        time.sleep(0.05)
    assert feedback, 'the goal never started decoding'
    # which generator holds it: the one whose heartbeat names a running goal
    try:
        busy = _running_generator(watcher)
    finally:
        close_client(watcher)
    assert busy in GENERATORS
    killed_at = time.monotonic()
    os.kill(nodes.procs[busy].pid, signal.SIGKILL)
    t.join(150)
    out = done['out']
    assert out.status_name == 'succeeded', out.reason
    other = next(g for g in GENERATORS if g != busy)
    assert out.generator == other and f'lost the generator {busy}' in out.reason
    assert f're-dispatched to {other}' in out.reason
    assert out.total_s < out.budget_s
    nodes.start([busy])  # back for the other tests: the manager brings it back
    assert client.wait_for_nodes([busy], 'active', 120.0)
    assert time.monotonic() - killed_at < 150


def _running_generator(client, timeout_s=10.0):
    from timebill_ros.msg import Heartbeat
    from timebill_ros.nodes.heartbeat import heartbeat_topic
    from timebill_ros.nodes.qos import HEARTBEAT_QOS

    beats = {}
    subs = [
        client.create_subscription(
            Heartbeat, heartbeat_topic(g), lambda m, g=g: beats.__setitem__(g, m), HEARTBEAT_QOS
        )
        for g in GENERATORS
    ]
    try:
        client._wait(lambda: any(b.running for b in beats.values()), timeout_s)
    finally:
        for s in subs:
            client.destroy_subscription(s)
    return next((g for g, b in beats.items() if b.running), '')


def _fleet_ready(client, timeout_s=60.0) -> bool:
    """Wait until the server reports every generator ready (heard, active, its action matched)."""
    from test_ros_faults import _diagnostics

    want = f'{len(GENERATORS)} of {len(GENERATORS)} generators ready'
    return _diagnostics(
        client, lambda d: d.get('timebill_server: generators', {}).get('_message') == want,
        timeout_s,
    ) is not None
