"""
A fleet across a real network boundary: the generator in another network namespace.

Two namespaces joined by a veth pair: predictor, server, lifecycle manager, one generator and the
planner's client in A, the second generator in B. Fast DDS is limited to UDPv4 (its shared-memory
transport would carry the data between processes of one host without touching the link). A goal
the generator in B serves succeeds, and its answer crossed the veth: the bytes A's end received
during that goal are at least the answer's. Needs root and ``ip`` (skipped, with the reason,
elsewhere); the namespaces and anything left in them are removed at the end whatever happens.
"""

import json
import signal
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

LOCAL, REMOTE = 'timebill_generator_0', 'timebill_generator_1'
RUN_TIMEOUT_S = 480


@pytest.fixture(scope='module')
def pair():
    from timebill_ros.netns import NetnsPair, unavailable

    why = unavailable()
    if why:
        print(f'test_ros_netns skipped: {why}')
        pytest.skip(f'cannot make network namespaces: {why}')
    made = NetnsPair().create()
    try:
        yield made
    finally:
        left = made.remove()
        listed = subprocess.run(['ip', 'netns', 'list'], capture_output=True, text=True).stdout
        assert made.a not in listed and made.b not in listed, listed
        assert not left, f'processes were still running in the namespaces: {left}'


@pytest.fixture(scope='module')
def across(pair, ros_domain_id, tmp_path_factory):
    """Run the system split across the link; return (the runner's report, link counters)."""
    from timebill_ros.core.model import ensure_tiny_model
    from timebill_ros.netns import run_env

    ensure_tiny_model()
    logs = tmp_path_factory.mktemp('netns_logs')
    cmd = [
        *pair.exec_prefix(pair.a), sys.executable, '-P', '-m', 'timebill_ros.netns',
        '--dev', pair.dev_a, '--remote-ns', pair.b, '--generators', f'{LOCAL},{REMOTE}',
        '--remote', REMOTE, '--domain', str(ros_domain_id), '--log-dir', str(logs),
        '--pair', '--goals', '2',
    ]
    before = pair.counters('a')
    proc = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the runner stops its nodes on SIGTERM
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    after = pair.counters('a')
    lines = [ln for ln in out.splitlines() if ln.startswith('{')]
    assert lines, f'runner exit {proc.returncode}, no report\n{err[-4000:]}\nlogs: {logs}'
    report = json.loads(lines[-1])
    link = {k: after[k] - before[k] for k in before}
    print(json.dumps({'report': report, 'link_total': link}, indent=1))
    assert 'error' not in report, f'{report["error"]}\n{err[-4000:]}\nlogs: {logs}'
    return report, link


def test_a_goal_served_across_the_link_succeeds_and_its_answer_crossed(across):
    report, link = across
    remote = [g for g in report['pair'] + report['goals'] if g.get('generator') == REMOTE]
    assert remote, f'no goal went to {REMOTE}: {report["pair"]}'
    for goal in remote:
        assert goal['status'] == 'succeeded', goal
        assert goal['text_bytes'] > 0 and goal['link']['rx_bytes'] >= goal['text_bytes'], goal
        assert goal['link']['rx_packets'] > 0, goal
    # two goals at once: the second one went to the idle generator, whichever side it is on
    assert {g['generator'] for g in report['pair']} == {LOCAL, REMOTE}, report['pair']
    assert all(g['status'] == 'succeeded' for g in report['pair']), report['pair']
    # discovery and everything else crossed too, seen from outside the namespaces
    assert link['rx_bytes'] > 0 and link['tx_bytes'] > 0, link


def test_every_node_on_both_sides_exits_cleanly(across):
    report, _ = across
    codes = report['exit_codes']
    assert set(codes) >= {LOCAL, REMOTE, 'timebill_server'}, codes
    assert all(code == 0 for code in codes.values()), codes


def test_bringup_runs_a_wrapped_node_under_its_prefix():
    from timebill_ros.bringup import Bringup

    prefix = ['ip', 'netns', 'exec', 'tb_b_x']
    nodes = Bringup(generators=[LOCAL, REMOTE], wrap={REMOTE: prefix})
    assert nodes.command(REMOTE)[:5] == [*prefix, sys.executable]
    assert nodes.command(LOCAL)[0] == sys.executable
