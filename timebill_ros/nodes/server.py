"""timebill_server: the lifecycle node planners talk to (``timed_inference`` action).

configure loads the config and the tokenizer and creates the action server; activate starts
accepting goals; deactivate refuses new goals and aborts running ones with a reason; cleanup
frees everything. Each accepted goal gets its absolute deadline at acceptance, is validated
(invalid goals end as ABORTED with ``status = STATUS_REJECTED`` and a readable reason, since a
ROS 2 goal response carries no reason), then is handed to the predictor (``timebill/requests``
topic) and the generator (internal ``timebill/generate`` action) at the same moment. The
server relays feedback, returns the result, forwards cancels, and aborts a goal whose
generator has gone away for ``peer_timeout_s``.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import rclpy
from rclpy.action import ActionClient, ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from timebill_ros.action import Generate, TimedInference
from timebill_ros.core.config import OVERRUN_POLICIES
from timebill_ros.msg import Request
from timebill_ros.nodes.common import (ACTION_GENERATE, ACTION_TIMED_INFERENCE, CHANNEL_QOS, TOPIC_REQUESTS,
                                       PromptTokenizer, copy_fields, declare_config, duration_to_s, read_config,
                                       ros_now_s, run_node, s_to_time, safe_reason, time_to_s, uuid_hex)

R = TimedInference.Result
INT32_MAX = 2**31 - 1
ABORT_GRACE_S = 2.0  # after a cancel/abort, how long to wait for the generator's partial result


@dataclass
class _Goal:
    request_id: str
    accepted_s: float  # ROS time of acceptance
    abort_reason: Optional[str] = None
    done: threading.Event = None  # type: ignore[assignment]

    def __post_init__(self):
        self.done = threading.Event()


class InvalidGoal(ValueError):
    """A goal that cannot be served; the message is the reason the client reads."""


class TimeBillServer(LifecycleNode):
    def __init__(self):
        super().__init__("timebill_server")
        declare_config(self)
        self._active = False
        self._goals: dict[str, _Goal] = {}
        self._goals_lock = threading.Lock()
        self.cfg = None
        self.tokenizer = None
        self._action_server = self._generator = self._requests = None

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.cfg = read_config(self)
            self.tokenizer = PromptTokenizer(self.cfg)
        except Exception as exc:  # noqa: BLE001 - a failed configure must say why
            self.get_logger().error(f"configure failed: {safe_reason(exc)}")
            self.cfg = self.tokenizer = None
            return TransitionCallbackReturn.FAILURE
        group = ReentrantCallbackGroup()
        self._requests = self.create_publisher(Request, TOPIC_REQUESTS, CHANNEL_QOS)
        self._generator = ActionClient(self, Generate, ACTION_GENERATE, callback_group=group)
        self._action_server = ActionServer(
            self, TimedInference, ACTION_TIMED_INFERENCE, execute_callback=self.execute,
            goal_callback=self.on_goal, handle_accepted_callback=self.on_accepted, cancel_callback=self.on_cancel,
            callback_group=group)
        self.get_logger().info(f"configured: model {self.cfg.model}, context {self.tokenizer.max_context} tokens")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = True
        self.get_logger().info("active: accepting goals")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        self._abort_all("the server was deactivated while the goal was running")
        self.get_logger().info("inactive: rejecting goals")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release(wait_s=None)
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        self.release(wait_s=None)
        return TransitionCallbackReturn.SUCCESS

    def release(self, wait_s: Optional[float] = 1.0) -> None:
        """Free everything configure created (main() calls it on SIGINT with a short wait)."""
        self._active = False
        self._abort_all("the server is shutting down", wait_s)
        for name in ("_action_server", "_generator"):
            entity = getattr(self, name)
            if entity is not None:
                entity.destroy()
                setattr(self, name, None)
        if self._requests is not None:
            self.destroy_publisher(self._requests)
            self._requests = None
        self.cfg = self.tokenizer = None

    def _abort_all(self, reason: str, wait_s: Optional[float] = None) -> None:
        """Ask every running goal to abort with ``reason``; wait until each has ended."""
        with self._goals_lock:
            goals = list(self._goals.values())
        for g in goals:
            g.abort_reason = g.abort_reason or reason
        if wait_s is None:
            wait_s = (self.cfg.peer_timeout_s if self.cfg else 5.0) + ABORT_GRACE_S
        end = time.monotonic() + wait_s
        for g in goals:  # "cleanly": each goal has ended with its reason when the transition returns
            g.done.wait(max(end - time.monotonic(), 0.0))

    # ------------------------------------------------------------------- goals
    def on_goal(self, goal: TimedInference.Goal) -> GoalResponse:
        if not self._active:
            self.get_logger().warning("goal rejected: the server is not active")
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def on_accepted(self, goal_handle) -> None:
        """Stamp the acceptance time (the budget counts from here), then execute."""
        rid = uuid_hex(goal_handle.goal_id)
        with self._goals_lock:
            self._goals[rid] = _Goal(rid, ros_now_s(self))
        goal_handle.execute()

    def on_cancel(self, goal_handle) -> CancelResponse:
        return CancelResponse.ACCEPT

    def validate(self, goal: TimedInference.Goal, accepted_s: float) -> tuple[float, list, str, int]:
        """(absolute deadline, token ids, overrun policy, max_new_tokens) or raise InvalidGoal."""
        cfg = self.cfg
        if not goal.prompt.strip():
            raise InvalidGoal("prompt is empty: nothing to answer")
        b = goal.time_budget
        if b.nanosec >= 1_000_000_000:
            raise InvalidGoal(f"time_budget is malformed: nanosec {b.nanosec} >= 1e9")
        if b.sec >= INT32_MAX:
            raise InvalidGoal("time_budget is infinite (Duration max): give a finite budget in seconds")
        budget = duration_to_s(b)
        if budget < 0:
            raise InvalidGoal(f"time_budget must be positive, got {budget:g} s")
        has_deadline = goal.deadline.sec != 0 or goal.deadline.nanosec != 0
        if budget == 0 and not has_deadline:
            raise InvalidGoal("no time budget: set time_budget > 0 s or an absolute deadline")
        deadline = accepted_s + budget if budget > 0 else math.inf
        if has_deadline:
            absolute = time_to_s(goal.deadline)
            if absolute <= accepted_s:
                raise InvalidGoal(f"deadline is in the past ({accepted_s - absolute:.3f} s before acceptance)")
            deadline = min(deadline, absolute)
        overrun = goal.overrun_policy or cfg.overrun_policy
        if overrun not in OVERRUN_POLICIES:
            raise InvalidGoal(f"unknown overrun policy {goal.overrun_policy!r}; use one of {', '.join(OVERRUN_POLICIES)}")
        max_new = int(goal.max_new_tokens) or cfg.max_new_tokens
        try:
            ids = self.tokenizer.encode(goal.prompt, goal.system_prompt)
        except Exception as exc:  # noqa: BLE001
            raise InvalidGoal(f"cannot tokenize the prompt: {safe_reason(exc)}") from exc
        if len(ids) >= self.tokenizer.max_context:
            raise InvalidGoal(f"prompt has {len(ids)} tokens; the model's context is "
                              f"{self.tokenizer.max_context} (no room to answer)")
        return deadline, ids, overrun, max_new

    def execute(self, goal_handle) -> TimedInference.Result:
        rid = uuid_hex(goal_handle.goal_id)
        with self._goals_lock:
            ctx = self._goals.get(rid) or _Goal(rid, ros_now_s(self))
        try:
            return self._execute(goal_handle, ctx)
        except Exception as exc:  # noqa: BLE001 - one goal's failure must not take the server down
            self.get_logger().error(f"goal {rid[:8]} failed: {safe_reason(exc)}")
            goal_handle.abort()
            return R(status=R.STATUS_ABORTED, reason=f"server error: {safe_reason(exc)}", estimate_received_s=-1.0)
        finally:
            with self._goals_lock:
                self._goals.pop(rid, None)
            ctx.done.set()

    def _execute(self, goal_handle, ctx: _Goal) -> TimedInference.Result:
        rel = lambda: ros_now_s(self) - ctx.accepted_s  # noqa: E731
        result = R(estimate_received_s=-1.0)
        try:
            deadline, ids, overrun, max_new = self.validate(goal_handle.request, ctx.accepted_s)
        except InvalidGoal as exc:
            self.get_logger().warning(f"goal {ctx.request_id[:8]} rejected: {exc}")
            result.status, result.reason, result.total_s = R.STATUS_REJECTED, str(exc), rel()
            goal_handle.abort()
            return result
        result.prompt_tokens = len(ids)
        goal = goal_handle.request
        request = Request(request_id=ctx.request_id, accepted_at=s_to_time(ctx.accepted_s),
                          deadline=s_to_time(deadline), prompt=goal.prompt, system_prompt=goal.system_prompt,
                          input_ids=ids, max_new_tokens=max_new, overrun_policy=overrun)
        generator = self._generator
        if not generator.server_is_ready() and not generator.wait_for_server(timeout_sec=self.cfg.peer_timeout_s):
            return self._abort(goal_handle, result, rel, f"generator unavailable for {self.cfg.peer_timeout_s:g} s")

        heard = [time.monotonic()]  # last sign of life from the generator for this goal

        def relay(feedback_msg) -> None:
            heard[0] = time.monotonic()
            goal_handle.publish_feedback(copy_fields(feedback_msg.feedback, TimedInference.Feedback()))

        # Hand the request to predictor and generator at the same moment: the estimate is
        # computed while the generator runs prefill.
        result.dispatch_at_s = rel()
        self._requests.publish(request)
        send = generator.send_goal_async(Generate.Goal(request=request), feedback_callback=relay,
                                         goal_uuid=goal_handle.goal_id)
        inner = self._wait(send, self.cfg.peer_timeout_s)
        if inner is None or not inner.accepted:
            return self._abort(goal_handle, result, rel, "the generator did not accept the request"
                               if inner is not None else f"no answer from the generator in {self.cfg.peer_timeout_s:g} s")
        answer = inner.get_result_async()
        stop_sent_at: Optional[float] = None
        lost_since: Optional[float] = None
        while not answer.done():
            time.sleep(0.01)
            if stop_sent_at is None and (goal_handle.is_cancel_requested or ctx.abort_reason):
                inner.cancel_goal_async()
                stop_sent_at = time.monotonic()
            if stop_sent_at is not None and ctx.abort_reason and time.monotonic() - stop_sent_at > ABORT_GRACE_S:
                break  # the generator did not confirm in time; abort anyway
            silent = time.monotonic() - heard[0]
            if ros_now_s(self) > deadline + self.cfg.peer_timeout_s and silent > self.cfg.peer_timeout_s:
                # a killed (-9) generator can look "ready" until DDS's lease expires: the deadline bounds it
                inner.cancel_goal_async()
                return self._abort(goal_handle, result, rel, f"lost the generator: nothing from it for {silent:.1f} s "
                                   f"and the deadline passed {self.cfg.peer_timeout_s:g} s ago")
            if generator.server_is_ready():
                lost_since = None
            elif lost_since is None:
                lost_since = time.monotonic()
            elif time.monotonic() - lost_since > self.cfg.peer_timeout_s:
                return self._abort(goal_handle, result, rel,
                                   f"lost the generator (unreachable for {self.cfg.peer_timeout_s:g} s)")
        if answer.done():
            dispatched = result.dispatch_at_s
            copy_fields(answer.result().result, result)
            result.dispatch_at_s = dispatched
        result.total_s = rel()
        if ctx.abort_reason:
            return self._abort(goal_handle, result, rel, ctx.abort_reason)
        if result.status == R.STATUS_CANCELED and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.status in (R.STATUS_SUCCEEDED, R.STATUS_TRUNCATED):
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def _abort(self, goal_handle, result, rel, reason: str) -> TimedInference.Result:
        self.get_logger().warning(f"goal {uuid_hex(goal_handle.goal_id)[:8]} aborted: {reason}")
        result.status, result.reason, result.completed, result.deadline_met = R.STATUS_ABORTED, reason, False, False
        result.total_s = rel()
        goal_handle.abort()
        return result

    @staticmethod
    def _wait(future, timeout_s: float):
        end = time.monotonic() + timeout_s
        while not future.done():
            if time.monotonic() > end:
                return None
            time.sleep(0.005)
        return future.result()


def main(args=None) -> int:
    rclpy.init(args=args)
    node = TimeBillServer()
    return run_node(node)


if __name__ == "__main__":
    sys.exit(main())
