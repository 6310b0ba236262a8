"""
Hand one request to a generator and wait for its answer, surviving a lost goal reply.

The server sends the generator's goal under the planner's own goal id. A service reply written
before DDS discovery has matched both ways is dropped (Fast DDS: "failed to send response
(timeout)"), and rclpy then never learns that the goal was accepted: the goal runs, its answer
is kept, and nobody asks for it. Because the server chose the goal id itself it need not learn
it from the reply: when no reply came within ``REPLY_WAIT_S`` it asks for the result by that id.
The generator answers "unknown goal" at once if the request itself was lost (then the request is
sent again, same id), and otherwise answers when the goal ends, like any result request. A
resend that meets the first copy is refused as a duplicate id, which changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
import time
from typing import Any, Callable, Optional

from action_msgs.msg import GoalStatus
from rclpy.action.client import ClientGoalHandle
from timebill_ros.nodes.spin import wait_first

# a goal reply normally comes within milliseconds; past this the server asks by id
REPLY_WAIT_S = 1.0
MAX_SENDS = 3  # the request itself lost this many times: give up (the graph is broken)


@dataclass
class Dispatched:
    """How a dispatch ended: the generator's result, or why there is none."""

    result: Any = None  # the generator's Result message
    stopped: Optional[str] = None  # a reason to stop arrived (``stop`` future)
    refused: bool = False  # the generator refused the goal (not active)
    lost: bool = False  # no answer by the time allowed
    sends: int = 0  # requests sent (> 1: the request was lost and sent again)
    asked_by_id: bool = False  # the goal reply was lost; the result was asked for by id


def dispatch(
    client,
    goal_msg,
    goal_id,
    feedback: Callable,
    stop,
    left: Callable[[], float],
    on_handle: Callable[[ClientGoalHandle], None],
) -> Dispatched:
    """
    Send ``goal_msg`` to the action ``client`` under ``goal_id``; wait for its result.

    ``stop`` is an rclpy Future whose result is a reason to stop waiting; ``left()`` is the
    time still allowed (seconds); ``on_handle`` receives the goal handle as soon as there is
    one (the server cancels through it).
    """
    out = Dispatched()
    while True:
        send = client.send_goal_async(goal_msg, feedback_callback=feedback, goal_uuid=goal_id)
        out.sends += 1
        first = wait_first(send, stop, timeout_s=max(min(REPLY_WAIT_S, left()), 0.0))
        if first is stop:
            out.stopped = stop.result()
            return out
        if first is send and send.result().accepted:
            handle = send.result()
        elif first is send and out.sends == 1:
            out.refused = True
            return out
        else:
            # no reply (or a duplicate-id refusal of a resend): ask for the result by the id
            out.asked_by_id = True
            reply = client._action_type.Impl.SendGoalService.Response(accepted=True)
            handle = ClientGoalHandle(client, goal_id, reply)
        on_handle(handle)
        answer = handle.get_result_async()
        first = wait_first(answer, stop, timeout_s=max(left(), 0.0))
        if first is None:
            handle.cancel_goal_async()
            out.lost = True
            return out
        if first is stop:
            out.stopped = stop.result()
            return out
        if answer.result().status != GoalStatus.STATUS_UNKNOWN:
            out.result = answer.result().result
            return out
        # the generator never had the goal: the request was lost; send it again
        if out.sends >= MAX_SENDS or left() <= 0:
            out.lost = True
            return out
        time.sleep(0.05)  # let discovery settle a little before the resend
