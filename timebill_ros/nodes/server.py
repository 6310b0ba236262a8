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
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.task import Future
from timebill_ros.action import TimedInference
from timebill_ros.msg import Request
from timebill_ros.nodes.diagnostics import ServedStats
from timebill_ros.nodes.fleet import Fleet, Lost
from timebill_ros.nodes.heartbeat import HeartbeatSender
from timebill_ros.nodes.orphans import OrphanWatch, ServedGoal
from timebill_ros.nodes.parameters import declare_config, read_config
from timebill_ros.nodes.qos import (
    ACTION_QOS,
    ACTION_TIMED_INFERENCE,
    CHANNEL_QOS,
    SERVICE_ESTIMATE_BUDGET,
    SERVICE_PRIME,
    SERVICE_RELEASE_PRIME,
    TOPIC_REQUESTS,
)
from timebill_ros.nodes.recording import GoalRecording
from timebill_ros.nodes.ros_time import ros_now_s, uuid_hex
from timebill_ros.nodes.serve_goal import serve
from timebill_ros.nodes.spin import goal_threads, N_THREADS, run_node, safe_reason
from timebill_ros.nodes.tokenizer import PromptTokenizer
from timebill_ros.srv import EstimateBudget, Prime, ReleasePrime

R = TimedInference.Result


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
        self._planning_services = []
        group = ReentrantCallbackGroup()
        self._group = group
        # Created once, before any executor spins this node: rclpy's ActionClient registers itself
        # with the node before it has its lock (a configure-time creation crashed the executor).
        # The generator list is read here, so changing it needs a restart of the server.
        self.fleet = Fleet(
            self, list(self.get_parameter('generators').value), group, self._generator_restarted
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
        # planner-facing planning services, answered for the fleet
        self._planning_services = [
            self.create_service(srv, name, lambda rq, rs, f=f: f(rq, rs, self.cfg),
                                callback_group=self._group)
            for srv, name, f in (
                (EstimateBudget, SERVICE_ESTIMATE_BUDGET, self.fleet.estimate),
                (Prime, SERVICE_PRIME, self.fleet.prime),
                (ReleasePrime, SERVICE_RELEASE_PRIME, self.fleet.release),
            )
        ]
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
        for service in self._planning_services:
            self.destroy_service(service)
        self._planning_services = []
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
    def _generator_restarted(self, name: str, old: int, new: int) -> None:
        for g in list(self._goals.values()):
            if g.generator == name and g.generator_pid == old:
                self._stop(g, Lost(f'lost the generator {name}: it restarted (pid {old} -> '
                                   f'{new}) while the goal was running'))

    def _watchdog(self) -> None:
        """Take goals from a generator whose heartbeat stopped; end orphaned goals."""
        if not self._goals or self.cfg is None:
            return
        self.orphans.check()
        for peer in self.fleet.peers.values():
            silent = peer.silent_s()
            if silent <= self.fleet.lost_after_s(peer.name, self.cfg):
                continue
            pid = peer.beat.pid if peer.beat is not None else 0
            for g in list(self._goals.values()):
                if g.dispatched and g.generator == peer.name:
                    self._stop(g, Lost(f'lost the generator {peer.name} (pid {pid}): no '
                                       f'heartbeat for {silent:.2f} s'))

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
            result = serve(self, goal_handle, ctx)
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
        peers = self.fleet.fresh(self.cfg.peer_timeout_s if self.cfg else 5.0)
        beat = peers[0].beat if peers else next(iter(self.fleet.peers.values())).beat
        name = self.get_fully_qualified_name()
        msg.status = self.stats.statuses(beat, bool(peers), self._active, name)
        msg.status.append(
            self.fleet.status(name.lstrip('/'), self.cfg.peer_timeout_s if self.cfg else 5.0)
        )
        self._diag_pub.publish(msg)


def main(args=None) -> int:
    rclpy.init(args=args)
    node = TimeBillServer()
    # one waiting thread per held goal
    # one waiting thread per held goal, and as many for planning calls forwarded to the fleet
    threads = goal_threads(node.get_parameter('max_goals').value) + 2 * N_THREADS
    return run_node(node, num_threads=threads)


if __name__ == '__main__':
    sys.exit(main())
