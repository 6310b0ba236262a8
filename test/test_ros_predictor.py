"""The predictor node publishes the *trained* length predictor's estimate for a real request."""

import json
import subprocess
import sys
import uuid

from conftest import close_client, make_client
import pytest

pytest.importorskip('timebill_ros.action', reason='ROS interfaces not built (run `make ros`)')


@pytest.fixture(scope='module')
def small_checkpoint(tmp_path_factory):
    """Train a frozen-MiniLM RLP in seconds on part of the committed SmolLM2 labels."""
    from timebill_ros.core.length_data import DEFAULT_LABEL_FILE, load_labels

    tmp = tmp_path_factory.mktemp('rlp')
    records = load_labels(DEFAULT_LABEL_FILE)
    subset = [r for r in records if r['split'] == 'train'][:240] + [
        r for r in records if r['split'] == 'val'
    ][:60]
    labels = tmp / 'labels.jsonl'
    labels.write_text(''.join(json.dumps(r) + '\n' for r in subset))
    ckpt = tmp / 'ckpt'
    subprocess.run(
        [
            sys.executable,
            '-m',
            'timebill_ros.cli',
            'train-predictor',
            '--labels',
            str(labels),
            '--mode',
            'frozen',
            '--epochs',
            '40',
            '--out',
            str(ckpt),
        ],
        check=True,
        timeout=600,
    )
    return ckpt


QUIET_S = 3.0  # an active predictor answers in milliseconds (+ 0.2 s waiting for a plan)


def test_predictor_node_publishes_the_trained_estimate(small_checkpoint, tiny_domain_id, tmp_path):
    """
    Estimates come only from an active predictor, and they are the trained model's N̂.

    The estimates publisher is a lifecycle publisher: configured (inactive) or deactivated, the
    predictor publishes nothing for a request; activated, it answers the same request.
    """
    import rclpy
    from timebill_ros.bringup import Bringup, NODES
    from timebill_ros.core.config import TimeBillConfig
    from timebill_ros.core.length_predictor import load_length_predictor
    from timebill_ros.core.model import ensure_tiny_model
    from timebill_ros.msg import Estimate, Request
    from timebill_ros.nodes.qos import CHANNEL_QOS, TOPIC_ESTIMATES, TOPIC_REQUESTS

    ensure_tiny_model()
    domain = 170 + tiny_domain_id % 31  # its own domain: no other predictor may answer
    spec = {s.name: s for s in NODES}['timebill_predictor']
    overrides = {'model': 'tiny', 'threads': 1, 'predictor_checkpoint': str(small_checkpoint)}
    node = Bringup(overrides=overrides, nodes=[spec], domain_id=domain, log_dir=tmp_path)
    client = make_client(domain, 'timebill_rlp_test_client')
    got = []
    prompt = 'Write a long story about a robot that learns to paint.'

    def request() -> Request:
        now = client.get_clock().now()
        req = Request(
            request_id=uuid.uuid4().hex,
            prompt=prompt,
            input_ids=list(range(1, 40)),
            max_new_tokens=4096,
            overrun_policy='kill',
        )
        req.accepted_at = now.to_msg()
        req.deadline = (now + rclpy.duration.Duration(seconds=600)).to_msg()
        return req

    def answered(rid: str) -> bool:
        return any(e.request_id == rid for e in got)

    try:
        # a lifecycle node: it loads the predictor when configured (the manager does it)
        node.start()
        assert client.wait_for_lifecycle('timebill_predictor', 120.0), node.log_tail(spec.name)
        assert client.change_state('configure', 'timebill_predictor', 120.0), node.log_tail(
            spec.name
        )
        assert 'configured: length predictor RLP' in node.log_tail('timebill_predictor')
        sub = client.create_subscription(Estimate, TOPIC_ESTIMATES, got.append, CHANNEL_QOS)
        pub = client.create_publisher(Request, TOPIC_REQUESTS, CHANNEL_QOS)
        # matched both ways (the lifecycle publisher exists while inactive): what is not
        # received below was not sent
        assert client._wait(
            lambda: pub.get_subscription_count() > 0 and sub.get_publisher_count() > 0, 30.0
        )
        quiet = request()
        pub.publish(quiet)
        assert not client._wait(lambda: answered(quiet.request_id), QUIET_S), 'inactive, yet sent'

        assert client.change_state('activate', 'timebill_predictor', 30.0)
        req = request()
        pub.publish(req)
        assert client._wait(lambda: answered(req.request_id), 30.0), node.log_tail(spec.name)

        assert client.change_state('deactivate', 'timebill_predictor', 30.0)
        after = request()
        pub.publish(after)
        sent = client._wait(lambda: answered(after.request_id), QUIET_S)
        assert not sent, 'deactivated, yet sent'
    finally:
        close_client(client)
        node.stop()
    assert not answered(quiet.request_id)  # not even late
    est = next(e for e in got if e.request_id == req.request_id)
    assert not est.fallback
    cfg = TimeBillConfig().replace(predictor_checkpoint=str(small_checkpoint), threads=1)
    local = load_length_predictor(cfg).predict(prompt)
    assert local.source != 'fallback'
    assert est.predicted_length == min(local.n_hat, 4096)  # the trained model's N̂, not N_max
    assert est.predicted_length < cfg.n_max and est.prediction_s > 0
