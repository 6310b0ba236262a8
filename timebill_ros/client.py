"""
A typed client for planners (in the spirit of nav2_simple_commander's BasicNavigator).

    from timebill_ros.client import TimeBillClient
    with TimeBillClient() as tb:
        tb.wait_until_ready()
        plan = tb.estimate_budget("Is the corridor clear?", budget_s=5)   # before committing
        out = tb.ask("Is the corridor clear?", budget_s=5, on_feedback=print)
        print(out.status_name, out.text, out.deadline_met)
        primed = tb.prime(scene_text)   # a standing context, prefilled once (prefix KV cache)
        out = tb.ask(scene_text + " Is the corridor clear?", budget_s=5)
        print(out.cached_tokens, out.prefill_saved_s)
        tb.release(primed.prime_id)
        out = tb.ask("List three colours.", budget_s=5, overrun_policy="close",
                     schema={"type": "array", "items": {"type": "string"}, "maxItems": 3})
        print(out.valid, out.value)   # the parsed JSON when valid (the grammar saw to it)

Every way a goal can end comes back as one ``GoalResult`` (goal_result.py), including goals
the server refused (``accepted = False``) or that were invalid (``status == STATUS_REJECTED``
with a reason), so a planner branches on one object instead of catching exceptions. The client
is a Node that spins only while one of its methods waits, like BasicNavigator; use it from one
thread. Lifecycle and service calls are in ``client_services.py``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional
import uuid

import rclpy
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from timebill_ros.action import TimedInference
from timebill_ros.client_checks import budget_problem, schema_text, text_problem
from timebill_ros.client_services import ServiceCalls
from timebill_ros.goal_result import GoalResult
from timebill_ros.nodes.qos import (
    ACTION_QOS,
    ACTION_TIMED_INFERENCE,
    SERVICE_ESTIMATE_BUDGET,
    SERVICE_PRIME,
    SERVICE_RELEASE_PRIME,
)
from timebill_ros.nodes.ros_time import s_to_duration, s_to_time
from timebill_ros.srv import EstimateBudget, Prime, ReleasePrime
from unique_identifier_msgs.msg import UUID

R = TimedInference.Result


class TimeBillClient(ServiceCalls, Node):
    """
    Send TimedInference goals, ask EstimateBudget, drive the system's lifecycle.

    Lifecycle calls without a node name go to ``manager`` (timebill_lifecycle_manager), which
    takes every node through the transition in order, as BasicNavigator.lifecycleStartup does.
    """

    def __init__(
        self,
        node_name: str = 'timebill_client',
        server: str = 'timebill_server',
        namespace: str = '',
        context=None,
        manager: str = 'timebill_lifecycle_manager',
    ):
        self._owns_rclpy = context is None and not rclpy.ok()
        if self._owns_rclpy:
            rclpy.init(args=[])  # our CLI options are not ROS arguments
        super().__init__(node_name, namespace=namespace, context=context)
        self.server, self.manager = server, manager
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self)
        self._action = ActionClient(self, TimedInference, ACTION_TIMED_INFERENCE, **ACTION_QOS)
        self._estimate = self.create_client(EstimateBudget, SERVICE_ESTIMATE_BUDGET)
        self._prime = self.create_client(Prime, SERVICE_PRIME)
        self._release = self.create_client(ReleasePrime, SERVICE_RELEASE_PRIME)
        self._lifecycle: dict = {}
        self._goal_handle = None
        self._result_future = None
        self._feedback: Optional[TimedInference.Feedback] = None
        self._on_feedback: Optional[Callable] = None
        self._budget_s = math.nan

    # ------------------------------------------------------------------ plumbing
    def spin_until(self, future, timeout_s: Optional[float]) -> bool:
        self._executor.spin_until_future_complete(future, timeout_sec=timeout_s)
        return future.done()

    def now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        end = self.now_s() + timeout_s
        while not predicate():
            if self.now_s() >= end:
                return False
            self._executor.spin_once(timeout_sec=0.05)
        return True

    def close(self) -> None:
        self._executor.shutdown()
        self.destroy_node()
        if self._owns_rclpy:
            rclpy.try_shutdown()

    def __enter__(self) -> 'TimeBillClient':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------- readiness
    def wait_until_ready(self, timeout_s: float = 60.0) -> bool:
        """Wait until the system is active and the action and estimate service answer."""
        end = self.now_s() + timeout_s
        ok = self.wait_for_lifecycle(timeout_s=timeout_s)
        ok = ok and self._wait(
            lambda: self.get_state(timeout_s=2.0) == 'active', max(end - self.now_s(), 0)
        )
        ok = ok and self._wait(self._action.server_is_ready, max(end - self.now_s(), 0))
        return ok and self.wait_for_estimator(max(end - self.now_s(), 0.1))

    # -------------------------------------------------------------------- goals
    def send_goal(
        self,
        prompt: str,
        budget_s: Optional[float] = None,
        deadline_s: Optional[float] = None,
        system_prompt: str = '',
        max_new_tokens: int = 0,
        overrun_policy: str = '',
        on_feedback: Optional[Callable[[TimedInference.Feedback], None]] = None,
        timeout_s: float = 10.0,
        min_quality: float = -1.0,
        max_alpha: float = -1.0,
        schema=None,
        grammar: str = '',
    ) -> Optional[GoalResult]:
        """
        Send a goal; None once accepted, else the refusal as a GoalResult.

        Once accepted, poll is_task_complete / get_result. ``deadline_s`` is absolute ROS time in
        seconds. ``min_quality`` (-1: the server's default floor, 0: none) and ``max_alpha`` (-1:
        no cap) bound the eviction the goal accepts. ``schema`` (a dict or JSON text) or
        ``grammar`` (Lark) constrain the answer (see ``ask``).
        """
        self._goal_handle = self._result_future = self._feedback = None
        self._budget_s = budget_s if budget_s is not None else math.nan
        json_schema, problem = schema_text(schema)
        problem = (
            problem
            or budget_problem(budget_s)
            or text_problem(prompt, system_prompt, json_schema=json_schema, grammar=grammar)
        )
        if problem:
            return GoalResult.rejected(problem, budget_s=self._budget_s)
        goal = TimedInference.Goal(
            prompt=prompt,
            system_prompt=system_prompt,
            max_new_tokens=max_new_tokens,
            overrun_policy=overrun_policy,
            client_node=self.get_fully_qualified_name(),
            min_quality=float(min_quality),
            max_alpha=float(max_alpha),
            json_schema=json_schema,
            grammar=grammar or '',
        )
        if budget_s is not None:
            goal.time_budget = s_to_duration(budget_s)
            # the budget runs from now, not from when the server gets to accept the goal: a
            # burst of goals can take a while to be accepted, and a promise is kept at the planner
            if budget_s > 0 and math.isfinite(budget_s):  # others: the server says what is wrong
                sent_deadline = self.now_s() + budget_s
                deadline_s = (
                    sent_deadline if deadline_s is None else min(deadline_s, sent_deadline)
                )
        if deadline_s is not None:
            goal.deadline = s_to_time(deadline_s)
        if not self._action.wait_for_server(timeout_sec=timeout_s):
            return GoalResult.rejected(
                f'no {ACTION_TIMED_INFERENCE} action server within {timeout_s:g} s '
                f'(is {self.server} configured?)',
                budget_s=self._budget_s,
            )
        self._on_feedback = on_feedback
        goal_id = UUID(uuid=list(uuid.uuid4().bytes))
        future = self._action.send_goal_async(
            goal, feedback_callback=self._feedback_cb, goal_uuid=goal_id
        )
        if not self.spin_until(future, timeout_s):
            return GoalResult.rejected(
                f'no answer to the goal request within {timeout_s:g} s', budget_s=self._budget_s
            )
        handle = future.result()
        if not handle.accepted:
            state = self.get_state(self.server, timeout_s=2.0)
            why = (
                f'{self.server} is {state or "unreachable"}, not active'
                if state != 'active'
                else f'{self.server} refused the goal'
            )
            return GoalResult.rejected(f'rejected: {why}', budget_s=self._budget_s)
        self._goal_handle = handle
        self._result_future = handle.get_result_async()
        return None

    def _feedback_cb(self, msg) -> None:
        self._feedback = msg.feedback
        if self._on_feedback is not None:
            self._on_feedback(msg.feedback)

    def is_task_complete(self, timeout_s: float = 0.1) -> bool:
        if self._result_future is None:
            return True
        return self.spin_until(self._result_future, timeout_s)

    def get_feedback(self) -> Optional[TimedInference.Feedback]:
        return self._feedback

    def cancel_task(self, timeout_s: float = 5.0) -> bool:
        """Ask the server to cancel the running goal; True if it accepted the request."""
        if self._goal_handle is None:
            return False
        future = self._goal_handle.cancel_goal_async()
        return self.spin_until(future, timeout_s) and len(future.result().goals_canceling) > 0

    def get_result(self, timeout_s: Optional[float] = None) -> GoalResult:
        """Wait for the running goal to end and return its GoalResult."""
        if self._result_future is None:
            return GoalResult.rejected('no goal was sent')
        if not self.spin_until(self._result_future, timeout_s):
            return GoalResult(
                accepted=True,
                status=R.STATUS_ABORTED,
                reason=f'no result within {timeout_s:g} s',
                budget_s=self._budget_s,
            )
        response = self._result_future.result()
        return GoalResult.from_result(
            response.result,
            response.status,
            budget_s=self._budget_s,
            goal_id=bytes(self._goal_handle.goal_id.uuid).hex(),
        )

    def ask(
        self,
        prompt: str,
        budget_s: Optional[float] = None,
        *,
        deadline_s: Optional[float] = None,
        system_prompt: str = '',
        max_new_tokens: int = 0,
        overrun_policy: str = '',
        on_feedback: Optional[Callable[[TimedInference.Feedback], None]] = None,
        timeout_s: Optional[float] = None,
        min_quality: float = -1.0,
        max_alpha: float = -1.0,
        schema=None,
        grammar: str = '',
    ) -> GoalResult:
        """
        Send a goal and wait for its GoalResult (``timeout_s`` None: budget + 60 s).

        ``schema``: a JSON schema (a dict or JSON text) the answer must match, enforced token by
        token; the GoalResult's ``valid`` says it does and ``value`` holds the parsed JSON.
        ``grammar``: a Lark grammar instead. With ``overrun_policy='close'`` an answer running
        out of time is closed into a shorter valid one (``truncated``, ``valid`` true). An
        invalid schema is ``rejected`` with llguidance's message.
        """
        refused = self.send_goal(
            prompt,
            budget_s,
            deadline_s,
            system_prompt,
            max_new_tokens,
            overrun_policy,
            on_feedback,
            min_quality=min_quality,
            max_alpha=max_alpha,
            schema=schema,
            grammar=grammar,
        )
        if refused is not None:
            return refused
        if timeout_s is None:
            timeout_s = (
                (budget_s or 0.0) + 60.0
                if deadline_s is None
                else max(deadline_s - self.now_s(), 0) + 60
            )
        return self.get_result(timeout_s)
