"""
timebill_generator: owns the model, the queue and the time model (a lifecycle node).

configure loads the model and builds the request pipeline (``core.pipeline``); cleanup frees
them. Every goal of the internal ``timebill/generate`` action goes through that one pipeline:
admission, the EDF queue, chunked prefill while the predictor's ``Estimate`` arrives on
``timebill/estimates``, α, eviction, decoding with re-planning, and the outcome. Because the
pipeline holds the queue and the online-recalibrated time model, this node also answers
``timebill/estimate_budget`` (``planning.py``): the same model, queue and answer a goal gets.

The engine keeps a prefix KV cache (``core.prefix_cache``): a goal whose prompt starts with a
cached context prefills only the rest. This node serves ``timebill/prime`` and
``timebill/release_prime`` (load a standing context ahead of its goals, and let it go), and
publishes on ``timebill/prefill_plans`` the cached length of every goal it admits, so the
predictor's WCET prices the prefill this node will really run. The cache lives in this process:
it starts empty on configure, and cleanup frees it.

A heartbeat (pid, lifecycle state, last configure error, queue, the time model it plans with)
goes out on ``timebill_generator/heartbeat`` every ``heartbeat_s`` from a timer, also during a
long prefill: the server calls the generator lost only when the heartbeat stops, the lifecycle
manager brings it back after a restart, and the predictor prices its WCET with that time model.
An execute callback waits on its goal's future (an event) while the pipeline's one model thread
works.
"""

from __future__ import annotations

from dataclasses import astuple
import gc
import math
import os
import sys
import time

import rclpy
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from timebill_ros.action import Generate
from timebill_ros.core.calibration.store import profile_key, time_model_for
from timebill_ros.core.job import Job
from timebill_ros.core.pipeline import Pipeline
from timebill_ros.msg import Estimate, Heartbeat, PrefillPlan
from timebill_ros.nodes.diagnostics import estimator_status, prefix_status
from timebill_ros.nodes.heartbeat import HeartbeatSender
from timebill_ros.nodes.parameters import declare_config, read_config
from timebill_ros.nodes.planning import PlanningServices
from timebill_ros.nodes.qos import (
    ACTION_QOS,
    CHANNEL_QOS,
    generator_endpoint,
    SERVICE_PREDICT_LENGTH,
    TOPIC_ESTIMATES,
    TOPIC_PREFILL_PLANS,
)
from timebill_ros.nodes.results import to_result
from timebill_ros.nodes.ros_time import ros_now_s, s_to_duration, time_to_s, to_monotonic, uuid_hex
from timebill_ros.nodes.spin import goal_threads, run_node, safe_reason
from timebill_ros.nodes.topic_lengths import TopicLengths
from timebill_ros.srv import EstimateBudget, PredictLength, Prime, ReleasePrime

R = Generate.Result
F = Generate.Feedback
STAGES = {'queued': F.STAGE_QUEUED, 'prefill': F.STAGE_PREFILL, 'decoding': F.STAGE_DECODING}
FEEDBACK_PERIOD_S = 0.05  # at most this often a partial-text feedback while decoding


def _trim_heap() -> None:
    """Hand memory freed by a finished goal or a cleanup (KV buffers, weights) back to the OS."""
    try:
        import ctypes

        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


class GeneratorNode(PlanningServices, LifecycleNode):
    def __init__(self):
        super().__init__('timebill_generator')
        declare_config(self)
        self.cfg = self.pipeline = self.engine = None
        self.state_label, self.error = 'unconfigured', ''
        self._active = False
        self._group = ReentrantCallbackGroup()
        self._lengths = TopicLengths()
        self._entities: list = []
        from collections import deque

        self._ape = deque(maxlen=200)  # (prefill, decode) absolute % error of served requests
        self.alive = HeartbeatSender(
            self, float(self.get_parameter('heartbeat_s').value), self._group, fill=self._fill_beat
        )
        from diagnostic_msgs.msg import DiagnosticArray

        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=self._group)
        self._predict = self.create_client(
            PredictLength, SERVICE_PREDICT_LENGTH, callback_group=self._group
        )
        self._plans = None  # PrefillPlan publisher, while configured

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from timebill_ros.core.engine import Engine

        try:
            self.cfg = read_config(self)
            self.engine = Engine.from_config(self.cfg)
            model, source = time_model_for(
                self.cfg, log=self.get_logger().warning, running_key=profile_key(self.engine)
            )
        except Exception as exc:  # noqa: BLE001 - a failed configure says why (heartbeat.error)
            self.error = f'configure failed: {safe_reason(exc)}'
            self.get_logger().error(self.error)
            self.cfg = self.engine = None
            self.publish_heartbeat()
            return TransitionCallbackReturn.FAILURE
        self.error = ''
        self.pipeline = Pipeline(
            self.engine,
            model,
            self.cfg,
            self._lengths,
        )
        self.pipeline.on_observed = self._observe

        def endpoint(what: str) -> str:  # this generator's own, beside others in the namespace
            return generator_endpoint(self.get_name(), what)

        self._entities = [
            self.create_subscription(
                Estimate,
                TOPIC_ESTIMATES,
                self._lengths.put,
                CHANNEL_QOS,
                callback_group=self._group,
            ),
            ActionServer(
                self,
                Generate,
                endpoint('generate'),
                execute_callback=self.execute,
                goal_callback=self.on_goal,
                cancel_callback=self.on_cancel,
                callback_group=self._group,
                **ACTION_QOS,
            ),
            self.create_service(
                EstimateBudget,
                endpoint('estimate_budget'),
                self.on_estimate_budget,
                callback_group=self._group,
            ),
            self.create_service(
                Prime, endpoint('prime'), self.on_prime, callback_group=self._group
            ),
            self.create_service(
                ReleasePrime,
                endpoint('release_prime'),
                self.on_release_prime,
                callback_group=self._group,
            ),
        ]
        # a lifecycle publisher: an inactive generator announces no plans
        self._plans = self.create_lifecycle_publisher(
            PrefillPlan, TOPIC_PREFILL_PLANS, CHANNEL_QOS
        )
        self.state_label = 'inactive'
        self.get_logger().info(
            f'configured: model {self.cfg.model}, press {self.cfg.press}, '
            f'timing model from {source}'
        )
        from timebill_ros.core import kernels

        self.get_logger().info(kernels.describe())  # prebuilt, or why compiled / off
        pc = self.engine.prefix_cache
        self.get_logger().info(
            f'prefix cache: starts empty in this process (pid {os.getpid()}), bound '
            f'{pc.capacity_bytes / 2**20:.0f} MB, blocks of {pc.block_tokens} tokens'
            if pc is not None
            else 'prefix cache: off (prefix_cache: false or prefix_cache_mb: 0); every goal '
            'prefills cold'
        )
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active, self.state_label = True, 'active'
        self.publish_heartbeat()  # at once: the server dispatches by the state it last heard
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active, self.state_label = False, 'inactive'
        self.publish_heartbeat()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def release(self, exiting: bool = False) -> None:
        """
        Free the model and the pipeline.

        On cleanup and shutdown; on SIGINT with ``exiting`` (no heap trim).
        """
        self._active = False
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.close('the generator is shutting down')
        for entity in self._entities:
            entity.destroy() if isinstance(entity, ActionServer) else self._destroy(entity)
        self._entities = []
        plans, self._plans = self._plans, None
        if plans is not None:
            self.destroy_lifecycle_publisher(plans)
        self.engine = self.cfg = None
        if not exiting:
            gc.collect()
            _trim_heap()
        self.state_label = 'unconfigured'

    def _destroy(self, entity) -> None:
        if hasattr(entity, 'srv_type'):
            self.destroy_service(entity)
        else:
            self.destroy_subscription(entity)

    # ---------------------------------------------------------------- heartbeat
    def publish_heartbeat(self) -> None:
        self.alive.state, self.alive.error = self.state_label, self.error
        self.alive.send()

    def _fill_beat(self, msg: Heartbeat) -> None:
        """Add the queue and the time model it plans with now (online scale applied)."""
        msg.state, msg.error = self.state_label, self.error
        pipeline = self.pipeline
        snap = pipeline.snapshot() if pipeline is not None else {'queued': 0, 'running': ''}
        msg.queued, msg.running = snap['queued'], snap['running']
        if pipeline is not None:
            msg.time_model = [float(x) for x in astuple(pipeline.time_model())]
            # the work it holds, as admission counts it ahead of a goal with no deadline
            msg.busy_s = float(pipeline.admission(1, math.inf).ahead_s)
            pc = pipeline.prefix_cache
            msg.primed = sorted(pc.holds()) if pc is not None else []

    def _observe(self, outcome) -> None:
        """Time-model error of one served request, for /diagnostics."""
        from timebill_ros.core.time_estimator import served_errors

        res, pipeline = outcome.result, self.pipeline
        if res is None or pipeline is None or not res.decode_step_s or outcome.prefill_s <= 0:
            return
        e = served_errors(
            pipeline.time_model(),
            outcome.prompt_tokens,
            res.kv_after,
            outcome.prefill_s,
            list(res.decode_step_s),
        )
        self._ape.append((e['prefill_ape'], e['decode_ape']))

    def _publish_diagnostics(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        pipeline = self.pipeline
        if pipeline is None:
            return
        name = self.get_fully_qualified_name().lstrip('/')
        msg = DiagnosticArray(
            status=[
                estimator_status(name, pipeline, list(self._ape)),
                prefix_status(name, self.engine),
            ]
        )
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)

    # -------------------------------------------------------------------- goals
    def on_goal(self, goal: Generate.Goal) -> GoalResponse:
        return (
            GoalResponse.ACCEPT if self._active and goal.request.input_ids else GoalResponse.REJECT
        )

    def on_cancel(self, goal_handle) -> CancelResponse:
        if self.pipeline is not None:
            self.pipeline.cancel(uuid_hex(goal_handle.goal_id))
        return CancelResponse.ACCEPT

    def execute(self, goal_handle) -> Generate.Result:
        req = goal_handle.request.request
        pipeline = self.pipeline
        if pipeline is None:
            goal_handle.abort()
            return R(
                status=R.STATUS_ABORTED,
                reason='the generator is not configured',
                estimate_received_s=-1.0,
            )
        feedback = F()

        def on_stage(job: Job, stage: str) -> None:
            feedback.stage = STAGES[stage]
            feedback.alpha, feedback.predicted_length = job.alpha_used, job.n_hat
            self._feedback(goal_handle, feedback, job, deadline_s)

        last = [0.0]

        def on_token(step: int, token_id: int, text: str) -> None:
            feedback.partial_text = text
            now = time.monotonic()
            if now - last[0] >= FEEDBACK_PERIOD_S:  # every token would flood DDS under load
                last[0] = now
                self._feedback(goal_handle, feedback, job, deadline_s)

        deadline_s = time_to_s(req.deadline)
        job = Job(
            request_id=req.request_id,
            input_ids=[int(t) for t in req.input_ids],
            deadline=to_monotonic(deadline_s, self),
            accepted_at=to_monotonic(time_to_s(req.accepted_at), self),
            max_new_tokens=int(req.max_new_tokens),
            overrun=req.overrun_policy,
            min_quality=float(req.min_quality),
            max_alpha=float(req.max_alpha),
            prompt=req.prompt,
            system_prompt=req.system_prompt,
            json_schema=req.json_schema,
            grammar=req.grammar,
            on_stage=on_stage,
            on_token=on_token,
        )
        if goal_handle.is_cancel_requested:
            job.cancel.set()
        future = pipeline.submit(job)  # admitted: the cached prefix is pinned, job.cached known
        self._publish_plan(job, pipeline)
        outcome = future.result()  # this thread waits; the model thread works
        if outcome.decode_start_s >= 0:  # the last tokens' feedback, before the result
            feedback.stage, feedback.partial_text = F.STAGE_DECODING, outcome.text
            job.tokens = outcome.tokens_generated
            self._feedback(goal_handle, feedback, job, deadline_s)
        result = to_result(outcome, R)
        result.structured = bool(req.json_schema or req.grammar)  # refused ones too
        if outcome.status == 'canceled' and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        else:
            goal_handle.succeed()
        return result

    def _publish_plan(self, job: Job, pipeline) -> None:
        """Tell the predictor the cached length this goal's prefill will really have."""
        plans = self._plans
        if plans is None:
            return
        try:
            plans.publish(
                PrefillPlan(
                    request_id=job.request_id,
                    prompt_tokens=job.n_prompt,
                    cached_tokens=int(job.cached),
                    prefill_s=float(pipeline.time_model().prefill_s(job.n_prompt, job.cached)),
                )
            )
        except Exception as exc:  # noqa: BLE001 - a lost plan costs the predictor cached = 0
            self.get_logger().warning(f'prefill plan not published: {safe_reason(exc)}')

    def _feedback(self, goal_handle, feedback, job: Job, deadline_s: float) -> None:
        feedback.tokens_so_far = job.tokens
        feedback.time_remaining = s_to_duration(max(deadline_s - ros_now_s(self), 0.0))
        goal_handle.publish_feedback(feedback)


def main(args=None) -> int:
    # The model thread holds the GIL between torch ops; executor threads carrying results,
    # refusals and cancels would wait up to 5 ms per hand-over (CPython's default), hundreds of
    # hand-overs per result under load. 1 ms keeps the ROS side responsive at no measurable cost.
    sys.setswitchinterval(0.001)
    rclpy.init(args=args)
    try:
        node = GeneratorNode()
    except Exception as exc:  # noqa: BLE001 - one readable line, not a traceback
        print(f'[timebill_generator] cannot start: {safe_reason(exc)}', file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    # one waiting thread per held goal
    return run_node(node, num_threads=goal_threads(node.get_parameter('max_goals').value))


if __name__ == '__main__':
    sys.exit(main())
