"""
The server's hand-over to a generator survives a goal reply that does not come.

A real rclpy action server and client (one process, own context and domain). The server's goal
callback holds the reply past ``REPLY_WAIT_S`` -- as a reply dropped by DDS never comes -- so
``dispatch`` must ask for the result by the goal id it chose and still return the answer.
"""

import threading
import time
import uuid

import pytest

pytestmark = pytest.mark.ros


@pytest.fixture
def pair(ros_domain_id):
    import rclpy
    from rclpy.action import ActionClient, ActionServer, GoalResponse
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.signals import SignalHandlerOptions
    from timebill_ros.action import Generate

    context = Context()
    rclpy.init(
        context=context,
        domain_id=(ros_domain_id + 50) % 100 + 1,
        signal_handler_options=SignalHandlerOptions.NO,
    )
    node = rclpy.create_node('dispatch_probe', context=context)
    held = {'replies': 0, 'hold_s': 0.0, 'executed': 0}

    def on_goal(goal):
        time.sleep(held['hold_s'])  # the reply comes late (or, for the client, never in time)
        held['replies'] += 1
        return GoalResponse.ACCEPT

    def execute(goal_handle):
        held['executed'] += 1
        goal_handle.succeed()
        return Generate.Result(text=f'answer to {goal_handle.request.request.prompt}', status=0)

    from rclpy.callback_groups import ReentrantCallbackGroup

    group = ReentrantCallbackGroup()
    server = ActionServer(
        node, Generate, 'probe_generate', execute, goal_callback=on_goal, callback_group=group
    )
    client = ActionClient(node, Generate, 'probe_generate', callback_group=group)
    executor = MultiThreadedExecutor(num_threads=8, context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    assert client.wait_for_server(timeout_sec=10.0)
    time.sleep(0.5)  # discovery both ways: this test is about a late reply, not a lost one
    yield node, client, held
    executor.shutdown(timeout_sec=1.0)
    server.destroy()
    client.destroy()
    node.destroy_node()
    rclpy.try_shutdown(context=context)


def _send(node, client, prompt):
    from rclpy.task import Future
    from timebill_ros.action import Generate
    from timebill_ros.msg import Request
    from timebill_ros.nodes.dispatch import dispatch
    from unique_identifier_msgs.msg import UUID

    end = time.monotonic() + 20.0
    handles = []
    return dispatch(
        client,
        Generate.Goal(request=Request(prompt=prompt)),
        UUID(uuid=list(uuid.uuid4().bytes)),
        lambda fb: None,
        Future(),
        lambda: end - time.monotonic(),
        handles.append,
    ), handles


def test_a_prompt_reply_is_used_as_it_comes(pair):
    node, client, held = pair
    out, handles = _send(node, client, 'one')
    assert out.result is not None and out.result.text == 'answer to one'
    assert not out.asked_by_id and out.sends == 1 and len(handles) == 1


def test_a_reply_that_does_not_come_in_time_is_replaced_by_asking_for_the_result_by_id(pair):
    from timebill_ros.nodes.dispatch import REPLY_WAIT_S

    node, client, held = pair
    held['hold_s'] = REPLY_WAIT_S * 2.5
    out, handles = _send(node, client, 'two')
    # the answer came although the goal reply was not there when the server needed it
    assert out.result is not None and out.result.text == 'answer to two', out
    assert out.asked_by_id and not out.lost and handles
    # the resends met the first copy: the goal ran once (a duplicate goal id is refused)
    time.sleep(held['hold_s'] * 2)
    assert held['executed'] == 1 and out.sends >= 2
