"""The predictor node publishes the *trained* length predictor's estimate for a real request."""

import json
import subprocess
import sys
import time
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


def test_predictor_node_publishes_the_trained_estimate(small_checkpoint, tiny_domain_id, tmp_path):
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
    try:
        # a lifecycle node: it loads the predictor when configured (the server does it)
        node.start()
        assert client.wait_for_lifecycle('timebill_predictor', 120.0), node.log_tail(spec.name)
        assert client.change_state('configure', 'timebill_predictor', 120.0), node.log_tail(
            spec.name
        )
        assert 'configured: length predictor RLP' in node.log_tail('timebill_predictor')
        client.create_subscription(Estimate, TOPIC_ESTIMATES, got.append, CHANNEL_QOS)
        pub = client.create_publisher(Request, TOPIC_REQUESTS, CHANNEL_QOS)
        prompt = 'Write a long story about a robot that learns to paint.'
        rid = uuid.uuid4().hex
        now = client.get_clock().now()
        req = Request(
            request_id=rid,
            prompt=prompt,
            input_ids=list(range(1, 40)),
            max_new_tokens=4096,
            overrun_policy='kill',
        )
        req.accepted_at = now.to_msg()
        req.deadline = (now + rclpy.duration.Duration(seconds=600)).to_msg()
        end = time.monotonic() + 30
        while not any(e.request_id == rid for e in got) and time.monotonic() < end:
            # again each second until discovery has matched us; the first estimate counts
            pub.publish(req)
            client._wait(lambda: any(e.request_id == rid for e in got), 1.0)
    finally:
        close_client(client)
        node.stop()
    mine = [e for e in got if e.request_id == rid]
    assert mine, f'no estimate for {rid}; log: {node.log_tail(spec.name)}'
    est = mine[0]
    assert not est.fallback
    cfg = TimeBillConfig().replace(predictor_checkpoint=str(small_checkpoint), threads=1)
    local = load_length_predictor(cfg).predict(prompt)
    assert local.source != 'fallback'
    assert est.predicted_length == min(local.n_hat, 4096)  # the trained model's N̂, not N_max
    assert est.predicted_length < cfg.n_max and est.prediction_s > 0
