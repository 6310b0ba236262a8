"""
A good citizen of a ROS workspace.

Namespaced systems side by side, parameters that say what they are and refuse changes that
would be silently ignored.
"""

from conftest import close_client, make_client
import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def test_two_namespaced_systems_serve_at_the_same_time_and_are_independent(
    tiny_server, tiny_domain_id, tmp_path
):
    from timebill_ros.bringup import Bringup

    systems, clients = {}, {}
    try:
        for ns in ('robot1', 'robot2'):
            clients[ns] = make_client(tiny_domain_id, 'ns_test_client', namespace=ns)
            systems[ns] = Bringup(
                overrides={'threads': 1, 'model': 'tiny'},
                domain_id=tiny_domain_id,
                log_dir=tmp_path / ns,
                namespace=ns,
            )
            systems[ns].start()  # both load at once
        for ns in systems:
            systems[ns].wait_ready(clients[ns], 240.0)
            assert clients[ns].startup(timeout_s=240.0), systems[ns].log_tail('timebill_server')
        for ns, client in clients.items():
            assert client.send_goal(f'Say hello to {ns}.', 60.0, max_new_tokens=200) is None
        outcomes = {ns: client.get_result(timeout_s=120.0) for ns, client in clients.items()}
        assert all(o.status_name == 'succeeded' for o in outcomes.values()), outcomes
        # each system's own generator decoded its own goal
        for o in outcomes.values():
            assert o.timeline['decode_start'] >= 0 and o.tokens_generated, o
        # one system's lifecycle does not touch the other's, nor the root namespace's system
        assert clients['robot1'].change_state('deactivate')
        assert clients['robot1'].get_state() == 'inactive'
        assert clients['robot1'].get_state('timebill_generator') == 'inactive'
        assert clients['robot2'].get_state() == 'active'
        assert clients['robot2'].get_state('timebill_generator') == 'active'
        assert tiny_server.get_state() == 'active'
        again = clients['robot2'].ask('Name a color.', 30.0, max_new_tokens=4)
        assert again.status_name == 'succeeded', again
        refused = clients['robot1'].ask('Name a color.', 30.0, max_new_tokens=4)
        assert refused.status_name in ('rejected', 'aborted') and refused.reason, refused
    finally:
        codes = {ns: b.stop() for ns, b in systems.items()}
        for client in clients.values():
            close_client(client)
    assert all(c == 0 for per in codes.values() for c in per.values()), codes


def test_parameters_are_described_ranged_and_refused_while_configured(tiny_server):
    from rcl_interfaces.srv import DescribeParameters, SetParameters
    from rclpy.parameter import Parameter

    client = tiny_server
    describe = client.create_client(DescribeParameters, 'timebill_server/describe_parameters')
    setter = client.create_client(SetParameters, 'timebill_server/set_parameters')
    try:
        assert describe.wait_for_service(timeout_sec=10.0) and setter.wait_for_service(10.0)
        fut = describe.call_async(DescribeParameters.Request(names=['alpha_max', 'threads']))
        assert client.spin_until(fut, 10.0)
        alpha, threads = fut.result().descriptors
        assert alpha.description and alpha.floating_point_range[0].to_value < 1.0
        assert threads.integer_range[0].from_value == 0
        request = SetParameters.Request(
            parameters=[Parameter('alpha_max', value=0.5).to_parameter_msg()]
        )
        fut = setter.call_async(request)
        assert client.spin_until(fut, 10.0)
        (result,) = fut.result().results
        assert not result.successful and 'configure again' in result.reason, result
        out_of_range = SetParameters.Request(
            parameters=[Parameter('alpha_max', value=1.5).to_parameter_msg()]
        )
        fut = setter.call_async(out_of_range)
        assert client.spin_until(fut, 10.0)
        assert not fut.result().results[0].successful
    finally:
        client.destroy_client(describe)
        client.destroy_client(setter)


def test_every_config_field_is_a_described_parameter():
    from dataclasses import fields

    from timebill_ros.core.config import TimeBillConfig
    from timebill_ros.nodes.parameters import descriptor, PARAMETERS

    missing = [f.name for f in fields(TimeBillConfig) if f.name not in PARAMETERS]
    assert not missing, f'describe these in nodes/parameters.py: {missing}'
    assert descriptor('prefill_chunk', 256).integer_range[0].to_value > 4096
