"""
A planner primes a standing context into the generator's prefix KV cache, then asks about it.

Real SmolLM2 on the shared bringup (``ready_server``): the goal whose prompt starts with the
primed context prefills only the rest, EstimateBudget and the predictor's Estimate count the
cached tokens, /diagnostics shows the hit, and a release gives the blocks back.
"""

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

# a robot's standing context, about 600 SmolLM2 tokens: some ten whole 64-token blocks
COLORS = 'red blue green yellow white black orange purple grey brown pink cyan'.split()
SCENE = 'Warehouse map, aisle by aisle. ' + ' '.join(
    f'Shelf {i}: {(i * 5) % 9 + 1} {COLORS[i % 12]} boxes at x={i * 1.5:.1f} m, '
    f'y={(i * 7) % 11:.1f} m, checked {(i * 3) % 24} hours ago.'
    for i in range(18)
)
QUESTION = ' Which shelf has the most boxes?'


def _first(client, msg_type, topic, qos, predicate, timeout_s):
    """Spin ``client`` until a message on ``topic`` satisfies ``predicate``; it, or None."""
    from rclpy.task import Future

    got = Future()

    def on_msg(msg):
        if not got.done() and predicate(msg):
            got.set_result(msg)

    sub = client.create_subscription(msg_type, topic, on_msg, qos)
    try:
        return got.result() if client.spin_until(got, timeout_s) else None
    finally:
        client.destroy_subscription(sub)


def test_primed_context_is_reused_by_goal_estimate_and_predictor(ready_server):
    from timebill_ros.msg import Estimate
    from timebill_ros.nodes.qos import CHANNEL_QOS, TOPIC_ESTIMATES

    tb = ready_server
    estimates = []  # subscribed first: discovery settles while the context is primed
    sub = tb.create_subscription(Estimate, TOPIC_ESTIMATES, estimates.append, CHANNEL_QOS)
    try:
        _ask_about_the_primed_scene(tb, estimates)
    finally:
        tb.destroy_subscription(sub)


def _ask_about_the_primed_scene(tb, estimates):
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.task import Future

    primed = tb.prime(SCENE, timeout_s=120.0)
    assert primed.ok, primed.reason
    assert primed.fit and primed.prime_id
    assert 500 <= primed.context_tokens <= 800, primed.context_tokens
    # every whole 64-token block is held
    assert primed.cached_tokens == primed.context_tokens - primed.context_tokens % 64
    assert primed.cache_mb_held > 0
    again = tb.prime(SCENE, timeout_s=120.0)  # the same context: the same id, nothing new
    assert again.ok and again.prime_id == primed.prime_id, again
    assert again.cached_tokens == primed.cached_tokens

    prompt = SCENE + QUESTION
    plan = tb.estimate_budget(prompt, budget_s=120.0, max_new_tokens=8)
    assert plan is not None and plan.ok, plan
    assert plan.cached_tokens > 0 and plan.prefill_saved_s > 0, plan
    assert plan.cached_tokens < plan.prompt_tokens

    out = tb.ask(prompt, budget_s=120.0, max_new_tokens=8)
    assert out.status_name == 'succeeded', out.reason
    assert out.cached_tokens > 0 and out.prefill_saved_s > 0, out
    assert out.cached_tokens == plan.cached_tokens < out.prompt_tokens
    # the predictor priced the prefill the generator really ran (its PrefillPlan)
    mine = lambda: [e for e in estimates if e.request_id == out.goal_id]  # noqa: E731
    if not mine():
        tb.spin_until(Future(), 2.0)  # a stream beside the result: let it land
    assert mine(), f'no Estimate for goal {out.goal_id} seen ({len(estimates)} others)'
    assert mine()[0].cached_tokens == out.cached_tokens

    diag = _first(
        tb,
        DiagnosticArray,
        '/diagnostics',
        10,
        lambda m: any(s.name.endswith(': prefix cache') for s in m.status),
        10.0,
    )
    assert diag is not None, 'no prefix cache status on /diagnostics'
    st = next(s for s in diag.status if s.name.endswith(': prefix cache'))
    values = {kv.key: kv.value for kv in st.values}
    assert int(values['prefix_hits']) >= 1 and int(values['prefix_tokens_reused']) > 0, values
    assert int(values['prefix_primed']) >= 1 and 'hits' in st.message

    released = tb.release(primed.prime_id)
    assert released.ok and released.released_blocks == primed.cached_tokens // 64, released
    twice = tb.release(primed.prime_id)
    assert not twice.ok and twice.released_blocks == 0 and 'nothing is held' in twice.reason


def test_prime_refuses_an_empty_or_tiny_context_with_a_reason(ready_server):
    empty = ready_server.prime('   ', timeout_s=30.0)
    assert not empty.ok and 'empty' in empty.reason, empty
    tiny = ready_server.prime('Shelf 1 is empty.', timeout_s=30.0)
    assert not tiny.ok and 'less than one cached block' in tiny.reason, tiny
    nul = ready_server.prime('a\x00b')
    assert not nul.ok and 'NUL' in nul.reason


def test_prime_refused_while_inactive(ready_server):
    tb = ready_server
    assert tb.change_state('deactivate')
    try:
        out = tb.prime(SCENE, timeout_s=30.0)
        assert not out.ok and 'inactive' in out.reason, out
    finally:
        assert tb.change_state('activate')


def test_timebill_prime_cli_primes_and_releases(ready_server, ros_domain_id):
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros_domain_id))
    code = 'import sys; from timebill_ros.cli import main; sys.exit(main())'

    def cli(*args):
        return subprocess.run(
            [sys.executable, '-P', '-c', code, 'prime', *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    proc = cli(SCENE, '--id', 'cli_scene', '--timeout', '120')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'prime cli_scene: ok=True' in proc.stdout and 'context tokens' in proc.stdout
    proc = cli('--release', 'cli_scene')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'release cli_scene: ok=True' in proc.stdout
