"""
One request through the node, the offline replay of its bag, and the sweep: one plan.

The three callers share the generator's ``Pipeline``; this runs the same goal through each of
them for real -- the node over DDS (recording the goal to a bag), ``timebill replay --offline``'s
server on that bag, and the evaluation ``Sweeper`` -- with one timing profile written for the
tiny model in which decode dominates (10 ms per cached entry and step), so the budget forces
eviction and the measured prefill (milliseconds) moves α by far less than the tolerance.
"""

import time

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

PROMPT = 'The robot logged an obstacle near the loading dock. ' * 16 + 'What is near the dock?'
BUDGET_S = 12.0
MAX_NEW = 8


def test_node_replay_and_sweep_choose_the_same_alpha_and_status(tiny_domain_id, tmp_path):
    from timebill_ros.bringup import Bringup
    from timebill_ros.cli.replay import OfflineServer
    from timebill_ros.core.calibration.store import Profile, profile_key, save_profile
    from timebill_ros.core.config import default_config_path, TimeBillConfig
    from timebill_ros.core.engine import Engine
    from timebill_ros.core.evaluation.policies import simulate, timebill
    from timebill_ros.core.evaluation.rosbag.reader import read_requests
    from timebill_ros.core.evaluation.runs import SweepConfig
    from timebill_ros.core.evaluation.sweep import Sweeper
    from timebill_ros.core.evaluation.tasks import Task
    from timebill_ros.core.rlp.predictor import load_length_predictor
    from timebill_ros.core.model import ensure_tiny_model
    from timebill_ros.core.time_estimator import ExecutionTimeModel

    from conftest import close_client, make_client

    ensure_tiny_model()
    overrides = {
        'threads': 1,
        'model': 'tiny',
        'weights': 'fp32',
        'profile_path': str(tmp_path / 'profile.json'),
        'record_bag': str(tmp_path / 'bags'),
        # no trained predictor: N̂ = N_max (capped at max_new_tokens) on all three paths, so
        # the plan cannot hinge on whether the node's estimate beat its prefill
        'predictor_checkpoint': str(tmp_path / 'no_predictor'),
    }
    cfg = TimeBillConfig.from_yaml(default_config_path()).replace(**overrides)
    engine = Engine.from_config(cfg)
    decode_bound = ExecutionTimeModel(a=0.0, b=0.0, c=0.0, p=0.01, q=0.0)
    profile = Profile(profile_key(engine), decode_bound, 'min', [], [], {}, {})
    save_profile(profile, tmp_path / 'profile.json')

    # 1. the node, over DDS: the goal is recorded to a bag by the server
    domain = tiny_domain_id + 10
    client = make_client(domain, 'same_alpha_client')
    nodes = Bringup(overrides=overrides, domain_id=domain, log_dir=tmp_path / 'logs')
    try:
        nodes.up(client, timeout_s=240.0)
        node = client.ask(PROMPT, BUDGET_S, max_new_tokens=MAX_NEW, min_quality=0.0)
    finally:
        nodes.stop()
        close_client(client)
    assert node.status_name == 'succeeded', node.reason
    assert 0.05 < node.alpha < 0.95, node  # the budget forced eviction, within α_max

    # 2. the offline replay of that bag, in this process
    requests = read_requests(next((tmp_path / 'bags').iterdir()))
    assert len(requests) == 1 and requests[0].budget_s == pytest.approx(BUDGET_S, abs=0.01)
    offline = OfflineServer(cfg, 'timebill+replan', log=lambda m: None)
    try:
        replay = offline.serve(requests[0], time.monotonic())
    finally:
        offline.close()

    # 3. the sweep, from its own measured prefill of the same prompt
    predictor = load_length_predictor(cfg, logger=lambda m: None)
    task = Task(
        id='dock', kind='t', prompt=requests[0].prompt, references=['dock'], metric='contains',
        n_tokens=node.prompt_tokens, max_new_tokens=MAX_NEW,
    )
    policy = timebill()
    sweeper = Sweeper(
        engine, decode_bound, predictor,
        SweepConfig(budgets={str(node.prompt_tokens): [BUDGET_S]}, policies=[policy], ks=()),
        log=lambda m: None, config=cfg,
    )
    res = sweeper.measure(task)
    sweep_alpha = sweeper.timebill_alpha(res, BUDGET_S, policy.k, policy.alpha_max)
    [judged] = simulate([sweeper.trace(res, sweep_alpha, True)], BUDGET_S, 'kill')

    assert node.prompt_tokens == replay['prompt_tokens'] == res.n_prompt
    assert node.predicted_length == replay['predicted_length'] == res.n_hat
    assert replay['status'] == judged.status == node.status_name == 'succeeded'
    assert replay['alpha'] == pytest.approx(node.alpha, abs=0.02)
    assert sweep_alpha == pytest.approx(node.alpha, abs=0.02)
