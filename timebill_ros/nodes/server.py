"""
timebill_server: the lifecycle node planners talk to (``timed_inference`` action); it only serves.

configure loads its tokenizer and creates the action server; ``timebill_lifecycle_manager``
brings it up after the predictor and the generator, and brings a restarted peer back.

Each accepted goal gets its absolute deadline at acceptance and is validated (an invalid goal
ends at once as ABORTED with ``status = STATUS_REJECTED`` and a readable reason, since a ROS 2
goal response carries no reason). It is then handed to the predictor (``timebill/requests``)
and the generator (internal ``timebill/generate``) at the same moment. The generator owns the
queue and admission; the server relays feedback, cancels, and the result. It calls the
generator lost only when its heartbeat stops (or its pid changes), never because a prefill is
long. A goal's execute callback waits on events (its result, or a reason to stop), never polls.
A goal whose client left the ROS graph is ended (``orphans.py``): it would hold the queue. The
generator's heartbeat decides what the server refuses itself (``admission.py``); ``record_bag``
records goals to a bag (``recording.py``).

A structured goal (``json_schema`` or ``grammar``) travels as it is: the generator's pipeline
compiles it at submit and an invalid one comes back REJECTED with llguidance's message. With
``schema_in_prompt`` the server encodes the prompt with the schema appended and sends that text
as the request's prompt, so the predictor predicts from what the model reads.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import rclpy
from rclpy.action import ActionClient, ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.task import Future
from timebill_ros.action import Generate, TimedInference
from timebill_ros.msg import Heartbeat, Request
from timebill_ros.nodes.admission import grace_s, hopeless as refuse_hopeless
from timebill_ros.nodes.diagnostics import ServedStats
from timebill_ros.nodes.dispatch import dispatch
from timebill_ros.nodes.heartbeat import heartbeat_topic, HeartbeatSender
from timebill_ros.nodes.orphans import OrphanWatch, ServedGoal
from timebill_ros.nodes.parameters import declare_config, read_config
from timebill_ros.nodes.qos import (
    ACTION_GENERATE,
    ACTION_QOS,
    ACTION_TIMED_INFERENCE,
    CHANNEL_QOS,
    HEARTBEAT_QOS,
    TOPIC_REQUESTS,
)
from timebill_ros.nodes.recording import GoalRecording
from timebill_ros.nodes.results import copy_fields
from timebill_ros.nodes.ros_time import ros_now_s, s_to_time, uuid_hex
from timebill_ros.nodes.spin import goal_threads, run_node, safe_reason
from timebill_ros.nodes.tokenizer import PromptTokenizer
from timebill_ros.nodes.validation import InvalidGoal, model_prompt, validate_goal

R = TimedInference.Result
GENERATOR = 'timebill_generator'


class TimeBillServer(LifecycleNode):
    def __init__(self):
        super().__init__('timebill_server')
        declare_config(self)
        self._active = False
        self._goals: dict[str, ServedGoal] = {}
        self.cfg = self.tokenizer = None
        self._action_server = self._requests = None
        self._recording: Optional[GoalRecording] = None
        self.stats = ServedStats()
        self._beat: Optional[Heartbeat] = None
        self._beat_at = 0.0  # time.monotonic() of the last heartbeat
        group = ReentrantCallbackGroup()
        self._group = group
        # Created once, before any executor spins this node: rclpy's ActionClient registers itself
        # with the node before it has its lock (a configure-time creation crashed the executor).
        self._generator = ActionClient(
            self, Generate, ACTION_GENERATE, callback_group=group, **ACTION_QOS
        )
        self.create_subscription(
            Heartbeat, heartbeat_topic(GENERATOR), self._on_heartbeat, HEARTBEAT_QOS,
            callback_group=group,
        )
        self.alive = HeartbeatSender(
            self, float(self.get_parameter('heartbeat_s').value), callback_group=group
        )
        self.orphans = OrphanWatch(self, self._goals, self._stop)
        from diagnostic_msgs.msg import DiagnosticArray

        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.create_timer(1.0, self.publish_diagnostics, callback_group=group)
        self.create_timer(0.1, self._watchdog, callback_group=group)

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.cfg = read_config(self)
            self.tokenizer = PromptTokenizer(self.cfg)
        except Exception as exc:  # noqa: BLE001 - a failed configure must say why
            return self._configure_failed(safe_reason(exc))
        self._requests = self.create_publisher(Request, TOPIC_REQUESTS, CHANNEL_QOS)
        self._action_server = ActionServer(
            self,
            TimedInference,
            ACTION_TIMED_INFERENCE,
            execute_callback=self.execute,
            goal_callback=self.on_goal,
            handle_accepted_callback=self.on_accepted,
            cancel_callback=self.on_cancel,
            callback_group=self._group,
            **ACTION_QOS,
        )
        self.orphans.introspect(self._action_server, self.get_clock())  # who sent each goal
        if self.cfg.record_bag:
            self._recording = GoalRecording(self, self.cfg.record_bag)
        self.stats.model_state = 'configured'
        self.alive.state, self.alive.error = 'inactive', ''
        self.get_logger().info(
            f'configured: model {self.cfg.model}, context {self.tokenizer.max_context} tokens'
        )
        return TransitionCallbackReturn.SUCCESS

    def _configure_failed(self, reason: str) -> TransitionCallbackReturn:
        self.get_logger().error(f'configure failed: {reason}')
        self.cfg = self.tokenizer = None
        self.stats.model_state = f'configure failed: {reason}'
        self.alive.error = f'configure failed: {reason}'
        self.alive.send()  # before the answer: the lifecycle manager quotes it
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active, self.alive.state = True, 'active'
        self.stats.model_state = 'active'
        self.get_logger().info('active: accepting goals')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active, self.alive.state = False, 'inactive'
        self.stats.model_state = 'inactive'
        self._abort_all('the server was deactivated while the goal was running')
        self.get_logger().info('inactive: rejecting goals')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def release(self, exiting: bool = False) -> None:
        """Free everything configure created (main() calls it on SIGINT with ``exiting``)."""
        self._active = False
        self._abort_all('the server is shutting down')
        if self._action_server is not None:
            self._action_server.destroy()
            self._action_server = None
        if self._requests is not None:
            self.destroy_publisher(self._requests)
            self._requests = None
        recording, self._recording = self._recording, None
        if recording is not None:
            recording.close()
        self.cfg = self.tokenizer = None
        self.stats.model_state = self.alive.state = 'unconfigured'

    def _record(self, what: str, *args, **kw) -> None:
        recording = self._recording
        if recording is not None:
            recording.record(what, *args, **kw)

    def _abort_all(self, reason: str) -> None:
        for g in list(self._goals.values()):
            self._stop(g, reason)

    def _stop(self, g: ServedGoal, reason: str) -> None:
        if g.stop is not None and not g.stop.done():
            g.stop.set_result(reason)
        if g.inner is not None:
            g.inner.cancel_goal_async()

    # ---------------------------------------------------------------- liveness
    def _on_heartbeat(self, msg: Heartbeat) -> None:
        previous = self._beat
        self._beat, self._beat_at = msg, time.monotonic()
        if previous is not None and previous.pid != msg.pid:
            for g in list(self._goals.values()):
                if g.generator_pid == previous.pid:
                    self._stop(
                        g,
                        f'lost the generator: it restarted (pid {previous.pid} -> {msg.pid}) '
                        f'while the goal was running',
                    )

    def _watchdog(self) -> None:
        """Abort dispatched goals when the generator's heartbeat stops; end orphaned goals."""
        if not self._goals or self.cfg is None:
            return
        self.orphans.check()
        silent = time.monotonic() - self._beat_at
        if silent <= self.cfg.peer_timeout_s:
            return
        pid = self._beat.pid if self._beat is not None else 0
        for g in list(self._goals.values()):
            if g.dispatched:
                self._stop(g, f'lost the generator (pid {pid}): no heartbeat for {silent:.1f} s')

    # ------------------------------------------------------------------- goals
    def on_goal(self, goal: TimedInference.Goal) -> GoalResponse:
        if not self._active:
            self.get_logger().warning('goal rejected: the server is not active')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def on_accepted(self, goal_handle) -> None:
        """Stamp the acceptance time (the budget counts from here), then execute."""
        rid = uuid_hex(goal_handle.goal_id)
        self._goals[rid] = ServedGoal(
            rid, ros_now_s(self), stop=Future(), accepted_mono=time.monotonic()
        )
        self._record('record_goal', goal_handle.goal_id, goal_handle.request)
        goal_handle.execute()

    def on_cancel(self, goal_handle) -> CancelResponse:
        g = self._goals.get(uuid_hex(goal_handle.goal_id))
        if g is not None and g.inner is not None:
            g.inner.cancel_goal_async()
        return CancelResponse.ACCEPT

    def execute(self, goal_handle) -> TimedInference.Result:
        rid = uuid_hex(goal_handle.goal_id)
        ctx = self._goals.get(rid) or ServedGoal(rid, ros_now_s(self), stop=Future())
        try:
            result = self._execute(goal_handle, ctx)
            self.stats.record(result)
            self._record(
                'record_result', goal_handle.goal_id, result, status=int(goal_handle.status)
            )
            return result
        except Exception as exc:  # noqa: BLE001 - one goal's failure must not take the server down
            self.get_logger().error(f'goal {rid[:8]} failed: {safe_reason(exc)}')
            goal_handle.abort()
            return R(
                status=R.STATUS_ABORTED,
                reason=f'server error: {safe_reason(exc)}',
                estimate_received_s=-1.0,
            )
        finally:
            self._goals.pop(rid, None)

    def _execute(self, goal_handle, ctx: ServedGoal) -> TimedInference.Result:
        rel = lambda: ros_now_s(self) - ctx.accepted_s  # noqa: E731
        # stages that never happen stay -1 (a refusal by the server starts none of them)
        never = ('dispatch_at_s', 'prefill_start_s', 'prefill_end_s', 'estimate_received_s',
                 'decode_start_s')
        # a refusal by the server evicts nothing and plans no quality: unknown, not 0
        result = R(**{name: -1.0 for name in never}, expected_quality=-1.0, alpha_limit=-1.0)
        goal = goal_handle.request
        result.structured = bool(goal.json_schema or goal.grammar)
        cfg = self.cfg
        if cfg is None:
            return self._end(
                goal_handle, result, rel, R.STATUS_ABORTED, 'the server is not configured'
            )
        if len(self._goals) > cfg.max_goals:  # each held goal holds an executor thread
            return self._end(
                goal_handle, result, rel, R.STATUS_REJECTED,
                f'queue full: {len(self._goals) - 1} goals are held (max_goals '
                f'{cfg.max_goals}); retry later',
            )
        try:
            deadline, ids, overrun, max_new = validate_goal(
                goal_handle.request, ctx.accepted_s, cfg, self.tokenizer
            )
        except InvalidGoal as exc:
            return self._end(goal_handle, result, rel, R.STATUS_REJECTED, str(exc))
        result.prompt_tokens = len(ids)
        ctx.client_node = goal.client_node
        request = Request(
            request_id=ctx.request_id,
            accepted_at=s_to_time(ctx.accepted_s),
            deadline=s_to_time(deadline),
            # the text the ids encode: the predictor predicts from what the model reads
            prompt=model_prompt(goal.prompt, goal.json_schema, cfg),
            system_prompt=goal.system_prompt,
            input_ids=ids,
            max_new_tokens=max_new,
            overrun_policy=overrun,
            min_quality=float(goal.min_quality),
            max_alpha=float(goal.max_alpha),
            json_schema=goal.json_schema,
            grammar=goal.grammar,
        )
        hopeless = refuse_hopeless(
            self._beat, self._beat_fresh(), cfg, ros_now_s(self), len(ids), deadline
        )
        if hopeless:
            return self._end(goal_handle, result, rel, R.STATUS_REJECTED, hopeless)
        if not self._generator.server_is_ready():
            why = (
                self._beat.error
                if self._beat is not None and self._beat.error
                else 'not reachable'
            )
            return self._end(goal_handle, result, rel, R.STATUS_ABORTED, f'the generator is {why}')

        def relay(feedback_msg) -> None:
            goal_handle.publish_feedback(
                copy_fields(feedback_msg.feedback, TimedInference.Feedback())
            )

        # Hand the request to predictor and generator at the same moment: the estimate is
        # computed while the generator queues and prefills.
        result.dispatch_at_s = rel()
        ctx.generator_pid = self._beat.pid if self._beat is not None else 0
        ctx.dispatched = True
        self._requests.publish(request)
        # the generator ends every goal by its deadline plus a step or a chunk; past that its
        # request or answer was lost on the way
        grace = grace_s(self._beat, cfg, len(ids), max_new, overrun)
        left = lambda: deadline + grace - ros_now_s(self)  # noqa: E731

        def held(inner) -> None:
            ctx.inner = inner
            if goal_handle.is_cancel_requested or ctx.stop.done():
                inner.cancel_goal_async()

        sent = dispatch(
            self._generator, Generate.Goal(request=request), goal_handle.goal_id, relay,
            ctx.stop, left, held,
        )
        if sent.asked_by_id or sent.sends > 1:
            self.get_logger().warning(
                f"goal {ctx.request_id[:8]}: the generator's goal reply was lost; result asked "
                f'for by id ({sent.sends} request(s) sent)'
            )
        if sent.result is None:
            why = (
                sent.stopped
                if sent.stopped is not None
                else 'the generator refused the request (not active?)'
                if sent.refused
                else f'no answer from the generator {grace:.2f} s after the deadline: the '
                f'request or its answer was lost on the way ({sent.sends} request(s) sent)'
            )
            return self._end(goal_handle, result, rel, R.STATUS_ABORTED, why)
        dispatched = result.dispatch_at_s
        copy_fields(sent.result, result)
        result.dispatch_at_s = dispatched
        result.structured = bool(goal.json_schema or goal.grammar)
        result.total_s = rel()
        if result.status == R.STATUS_CANCELED and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.status in (R.STATUS_SUCCEEDED, R.STATUS_TRUNCATED):
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def _end(self, goal_handle, result, rel, status: int, reason: str) -> TimedInference.Result:
        log = self.get_logger().warning
        log(
            f'goal {uuid_hex(goal_handle.goal_id)[:8]} '
            f'{"rejected" if status == R.STATUS_REJECTED else "aborted"}: {reason}'
        )
        result.status, result.reason = status, reason
        result.completed = result.deadline_met = False
        result.total_s = result.finished_at_s = rel()
        goal_handle.abort()
        return result

    def publish_diagnostics(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        # /diagnostics is one topic for the whole robot: name the node with its namespace
        msg.status = self.stats.statuses(
            self._beat, self._beat_fresh(), self._active, self.get_fully_qualified_name()
        )
        self._diag_pub.publish(msg)

    def _beat_fresh(self) -> bool:
        """Tell whether the generator's last heartbeat is recent enough to go by."""
        timeout = self.cfg.peer_timeout_s if self.cfg is not None else 5.0
        return self._beat is not None and time.monotonic() - self._beat_at <= timeout


def main(args=None) -> int:
    rclpy.init(args=args)
    node = TimeBillServer()
    # one waiting thread per held goal
    return run_node(node, num_threads=goal_threads(node.get_parameter('max_goals').value))


if __name__ == '__main__':
    sys.exit(main())
