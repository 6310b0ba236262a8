"""
Shared fixtures.

The real SmolLM2 model is loaded once per session and only by tests that need it.
"""

import os

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


@pytest.fixture(scope='session')
def smollm2():
    """(model, tokenizer) of the default target model, fp32 on CPU."""
    from timebill_ros.core.model import load_model

    return load_model('smollm2-135m-instruct', threads=2)


@pytest.fixture(scope='session')
def tiny():
    from timebill_ros.core.model import tiny_model

    return tiny_model()


def run_python(code: str, *args: str, cwd=None, **env):
    """Run ``code`` in a fresh interpreter (``env`` added), fail with its stderr; the result."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, '-c', code, *args], env=dict(os.environ, **env), capture_output=True,
        text=True, timeout=600, cwd=cwd,
    )
    assert out.returncode == 0, out.stderr
    return out


# ---- ROS fixtures: one bringup of the three nodes, shared by the test_ros_* files ----
def _ros_built() -> bool:
    try:
        import rclpy  # noqa: F401
        import timebill_ros.msg  # noqa: F401  (only in the colcon install: `make test` sources it)
    except ImportError:
        return False
    return True


@pytest.fixture(scope='session')
def ros_domain_id():
    """Give this test run a ROS_DOMAIN_ID of its own (1..100), so concurrent runs cannot mix."""
    if not _ros_built():
        pytest.skip(
            'ROS interfaces not importable: run through `make test` (builds and sources install/)'
        )
    return int(os.environ.get('TIMEBILL_TEST_DOMAIN_ID') or 1 + os.getpid() % 100)


@pytest.fixture(scope='session')
def ros_client(ros_domain_id):
    """Make the planner side: a TimeBillClient in this (pytest) process, with its own context."""
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions
    from timebill_ros.client import TimeBillClient

    context = Context()
    rclpy.init(
        context=context, domain_id=ros_domain_id, signal_handler_options=SignalHandlerOptions.NO
    )
    client = TimeBillClient('timebill_test_client', context=context)
    yield client
    client.close()
    rclpy.try_shutdown(context=context)


@pytest.fixture(scope='session')
def timebill_nodes(ros_domain_id, ros_client, tmp_path_factory):
    """
    Run generator, predictor and server as separate processes, the server active.

    They are stopped at the end, and the suite fails if any node does not exit cleanly.
    """
    from timebill_ros.bringup import Bringup

    logs = tmp_path_factory.mktemp('ros_logs')
    # one torch thread: on the shared 2-core CI machine
    # two OpenMP threads were up to 25x slower per
    # token whenever another process ran, which would make outcomes depend on the neighbours
    bringup = Bringup(overrides={'threads': 1}, domain_id=ros_domain_id, log_dir=logs)
    try:
        bringup.up(ros_client, timeout_s=240.0)
    except BaseException:
        bringup.stop()
        raise
    yield bringup
    pids = [p.pid for p in bringup.procs.values()]
    codes = bringup.stop()
    still = [pid for pid in pids if os.path.exists(f'/proc/{pid}') and 'Z' not in _proc_state(pid)]
    assert not still, f'node processes left running: {still}'
    assert all(code == 0 for code in codes.values()), f'unclean node exits {codes}; logs in {logs}'


def _proc_state(pid: int) -> str:
    try:
        with open(f'/proc/{pid}/stat') as fh:
            return fh.read().split(')')[-1].split()[0]
    except OSError:
        return 'gone'


@pytest.fixture
def ready_server(timebill_nodes, ros_client):
    """Share the bringup with the server active and every node answering (tests may change it)."""
    if ros_client.get_state(timeout_s=5.0) != 'active':
        assert ros_client.startup(timeout_s=240.0), 'could not re-activate timebill_server'
    dead = {n: c for n, c in timebill_nodes.alive().items() if c is not None}
    assert not dead, f'node(s) died: {dead}'
    return ros_client


# ---- a second bringup with the tiny random model (load, faults, hostile goals) ----
def make_client(domain_id: int, name: str, namespace: str = ''):
    """Make a TimeBillClient with its own rclpy context in ``domain_id`` (see close_client)."""
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions
    from timebill_ros.client import TimeBillClient

    context = Context()
    rclpy.init(
        context=context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO
    )
    return TimeBillClient(name, namespace=namespace, context=context)


def close_client(client) -> None:
    import rclpy

    context = client.context
    client.close()
    rclpy.try_shutdown(context=context)


@pytest.fixture(scope='session')
def tiny_domain_id(ros_domain_id):
    return ros_domain_id + 100  # 101..200: never the shared bringup's domain


@pytest.fixture(scope='session')
def tiny_client(tiny_domain_id):
    client = make_client(tiny_domain_id, 'timebill_tiny_test_client')
    yield client
    close_client(client)


@pytest.fixture(scope='session')
def tiny_nodes(tiny_domain_id, tiny_client, tmp_path_factory):
    """
    Run the three nodes with ``model: tiny`` (random 2-layer Llama, SmolLM2 tokenizer).

    That is the whole ROS path at milliseconds per token. The timing model stays the pessimistic
    SmolLM2 fallback. fp32 weights: the transformers decode step, ~5 ms per token here, so a
    900-token goal holds the model for seconds as the queue tests need (the int4 C++ step runs
    the tiny model 8x faster); the real-model bringup runs the int4 C++ step.
    """
    from timebill_ros.bringup import Bringup
    from timebill_ros.core.model import ensure_tiny_model

    ensure_tiny_model()
    logs = tmp_path_factory.mktemp('ros_tiny_logs')
    bags = tmp_path_factory.mktemp('ros_tiny_bags')  # the server records every goal here
    bringup = Bringup(
        overrides={'threads': 1, 'model': 'tiny', 'weights': 'fp32', 'record_bag': str(bags)},
        domain_id=tiny_domain_id,
        log_dir=logs,
    )
    bringup.bag_dir = bags
    try:
        bringup.up(tiny_client, timeout_s=240.0)
    except BaseException:
        bringup.stop()
        raise
    yield bringup
    codes = bringup.stop()
    assert all(code == 0 for code in codes.values()), f'unclean node exits {codes}; logs in {logs}'


@pytest.fixture
def tiny_server(tiny_nodes, tiny_client):
    """
    Give the tiny bringup with every node running and the server active.

    Fault tests kill nodes: this restarts them and waits until the lifecycle manager has
    brought each back to active.
    """
    from timebill_ros.nodes.lifecycle_manager import NAME as MANAGER, NODE_NAMES

    tiny_nodes.start()  # restarts any node a previous test killed
    assert tiny_client.wait_for_generator(120.0), tiny_nodes.log_tail('timebill_generator')
    assert tiny_client.wait_for_estimator(120.0), tiny_nodes.log_tail('timebill_predictor')
    if tiny_client.get_state(timeout_s=5.0) != 'active':
        assert tiny_client.startup(timeout_s=240.0), tiny_nodes.log_tail('timebill_server')
    # a restarted node is active only once the manager has brought it back
    assert tiny_client.wait_for_nodes(NODE_NAMES, 'active', 240.0), tiny_nodes.log_tail(MANAGER)
    return tiny_client
