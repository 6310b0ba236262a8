"""
timebill_generator: owns the model, the queue and the time model (a lifecycle node).

configure loads the model and builds the request pipeline (``core.pipeline``); cleanup frees
them. Every goal of the internal ``timebill/generate`` action goes through that one pipeline:
admission, the EDF queue, chunked prefill while the predictor's ``Estimate`` arrives on
``timebill/estimates``, α, eviction, decoding with re-planning, and the outcome. Because the
pipeline holds the queue and the online-recalibrated time model, this node also answers
``timebill/estimate_budget``: the same model, the same queue, the same answer a goal gets.

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

from collections import OrderedDict
import concurrent.futures
from dataclasses import astuple
import gc
import hashlib
import math
import os
import sys
import threading
import time

import rclpy
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from timebill_ros.action import Generate
from timebill_ros.core.calibration import time_model_for
from timebill_ros.core.config import OVERRUN_POLICIES
from timebill_ros.core.job import Job
from timebill_ros.core.lengths import LengthEstimate
from timebill_ros.core.pipeline import Pipeline
from timebill_ros.msg import Estimate, Heartbeat, PrefillPlan
from timebill_ros.nodes.heartbeat import HeartbeatSender
from timebill_ros.nodes.parameters import declare_config, read_config
from timebill_ros.nodes.qos import (
    ACTION_GENERATE,
    ACTION_QOS,
    CHANNEL_QOS,
    SERVICE_ESTIMATE_BUDGET,
    SERVICE_PREDICT_LENGTH,
    SERVICE_PRIME,
    SERVICE_RELEASE_PRIME,
    TOPIC_ESTIMATES,
    TOPIC_PREFILL_PLANS,
)
from timebill_ros.nodes.results import to_result
from timebill_ros.nodes.ros_time import (
    duration_to_s,
    ros_now_s,
    s_to_duration,
    time_to_s,
    to_monotonic,
    uuid_hex,
)
from timebill_ros.nodes.spin import GOAL_THREADS, run_node, safe_reason, wait_first
from timebill_ros.nodes.validation import model_prompt, structure_problem
from timebill_ros.srv import EstimateBudget, PredictLength, Prime, ReleasePrime

R = Generate.Result
F = Generate.Feedback
STAGES = {'queued': F.STAGE_QUEUED, 'prefill': F.STAGE_PREFILL, 'decoding': F.STAGE_DECODING}
KEEP_ESTIMATES = 256
FEEDBACK_PERIOD_S = 0.05  # at most this often a partial-text feedback while decoding
PREDICT_TIMEOUT_S = 2.0  # EstimateBudget: without N̂ by then, plan with the cap (as a goal would)
NOT_ACTIVE = 'the generator is {state}, not active: start timebill_lifecycle_manager first'


def prime_id_for(ids) -> str:
    """Name a primed context by its token ids: the same context gets the same id."""
    digest = hashlib.sha1(b''.join(int(t).to_bytes(4, 'little') for t in ids)).hexdigest()
    return f'p{digest[:12]}'


class TopicLengths:
    """N̂ from the predictor's ``Estimate`` messages, as a pipeline length source."""

    deferrable = True  # a late estimate still arrives: α may wait for it while decoding starts

    def __init__(self):
        self._cv = threading.Condition()
        self._got: 'OrderedDict[str, LengthEstimate]' = OrderedDict()

    def put(self, msg: Estimate) -> None:
        with self._cv:
            self._got[msg.request_id] = LengthEstimate(
                int(msg.predicted_length),
                bool(msg.fallback),
                time.monotonic(),
                float(msg.prediction_s),
            )
            while len(self._got) > KEEP_ESTIMATES:
                self._got.popitem(last=False)
            self._cv.notify_all()

    def start(self, job: Job) -> None:
        pass  # the server published the request to the predictor when it dispatched the goal

    def wait(self, job: Job, until: float):
        with self._cv:
            self._cv.wait_for(
                lambda: job.request_id in self._got, max(until - time.monotonic(), 0.0)
            )
            return self._got.pop(job.request_id, None)


def _trim_heap() -> None:
    """Hand memory freed by a finished goal or a cleanup (KV buffers, weights) back to the OS."""
    try:
        import ctypes

        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


class GeneratorNode(LifecycleNode):
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
                self.cfg, log=self.get_logger().warning, running_key=self.engine.profile_key()
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
                ACTION_GENERATE,
                execute_callback=self.execute,
                goal_callback=self.on_goal,
                cancel_callback=self.on_cancel,
                callback_group=self._group,
                **ACTION_QOS,
            ),
            self.create_service(
                EstimateBudget,
                SERVICE_ESTIMATE_BUDGET,
                self.on_estimate_budget,
                callback_group=self._group,
            ),
            self.create_service(
                Prime, SERVICE_PRIME, self.on_prime, callback_group=self._group
            ),
            self.create_service(
                ReleasePrime,
                SERVICE_RELEASE_PRIME,
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
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active, self.state_label = False, 'inactive'
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
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

        pipeline = self.pipeline
        if pipeline is None:
            return
        drift = pipeline.online.drift()
        st = DiagnosticStatus(
            name=f'{self.get_fully_qualified_name().lstrip("/")}: online estimator',
            hardware_id='timebill',
            level=DiagnosticStatus.WARN if drift else DiagnosticStatus.OK,
            message='; '.join(drift) or "measured times inside the fitted model's band",
        )
        ape = list(self._ape)
        values = dict(pipeline.online.summary(), estimator_samples=len(ape))
        if ape:
            values['prefill_ape_pct_mean'] = sum(a for a, _ in ape) / len(ape)
            values['decode_ape_pct_mean'] = sum(b for _, b in ape) / len(ape)
        st.values = [
            KeyValue(key=k, value=f'{v:.4g}' if isinstance(v, float) else str(v))
            for k, v in values.items()
        ]
        msg = DiagnosticArray(status=[st, self._prefix_status()])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)

    def _prefix_status(self):
        """Describe the prefix cache for /diagnostics: hits, tokens reused, MB held, drops."""
        from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

        engine = self.engine
        pc = getattr(engine, 'prefix_cache', None) if engine is not None else None
        st = DiagnosticStatus(
            name=f'{self.get_fully_qualified_name().lstrip("/")}: prefix cache',
            hardware_id='timebill',
            level=DiagnosticStatus.OK,
        )
        if pc is None:
            st.message = 'off (prefix_cache: false or prefix_cache_mb: 0)'
            st.values = [KeyValue(key='prefix_cache', value='off')]
            return st
        v = pc.summary()
        st.message = (
            f"{v['prefix_hits']} hits of {v['prefix_lookups']} lookups, "
            f"{v['prefix_tokens_reused']} tokens reused; {v['prefix_blocks']} blocks, "
            f"{v['prefix_mb_held']:.1f} of {v['prefix_mb_bound']:.0f} MB held, "
            f"{v['prefix_primed']} primed context(s), {v['prefix_blocks_dropped']} blocks dropped"
        )
        if pc.last_refusal:
            st.message += f'; last refused: {pc.last_refusal}'
        st.values = [
            KeyValue(key=k, value=f'{x:.4g}' if isinstance(x, float) else str(x))
            for k, x in v.items()
        ]
        if pc.last_refusal:
            st.values.append(KeyValue(key='prefix_last_refusal', value=pc.last_refusal))
        return st

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

    # ---------------------------------------------------------- estimate budget
    def on_estimate_budget(self, request, response):
        budget = duration_to_s(request.time_budget)
        pipeline = self.pipeline
        if pipeline is None:
            response.ok, response.reason = False, 'the generator is not configured'
            return response
        if not request.prompt.strip():
            response.ok, response.reason = False, 'prompt is empty: nothing to answer'
            return response
        if not budget > 0:
            response.ok, response.reason = False, f'time budget must be positive, got {budget:g} s'
            return response
        if not float(request.min_quality) <= 1.0 or not float(request.max_alpha) < 1.0:
            response.ok = False
            response.reason = (
                f'min_quality must be -1, 0 or in (0, 1] and max_alpha -1 or in [0, 1); got '
                f'{request.min_quality:g} and {request.max_alpha:g}'
            )
            return response
        overrun = request.overrun_policy or self.cfg.overrun_policy
        if overrun not in OVERRUN_POLICIES:
            response.ok = False
            response.reason = (
                f'unknown overrun policy {request.overrun_policy!r}; '
                f'use one of {", ".join(OVERRUN_POLICIES)}'
            )
            return response
        problem = structure_problem(request.json_schema, request.grammar)
        compiled = None
        if not problem:
            try:  # what the pipeline does at submit: the same reason a goal would get
                compiled = self.engine.compile_grammar(request.json_schema, request.grammar)
            except Exception as exc:  # noqa: BLE001 - GrammarError: llguidance's message
                kind = 'JSON schema' if request.json_schema else 'grammar'
                problem = f'invalid {kind}: {safe_reason(exc)}'
        if problem:
            response.ok, response.reason = False, problem
            return response
        # a close's steps are part of the answer (Job.close_tokens)
        close = compiled.close_tokens if compiled is not None and overrun == 'close' else 0
        response.close_tokens = close
        # the text a goal's model reads and its N-hat is predicted from (the server's too)
        prompt = model_prompt(request.prompt, request.json_schema, self.cfg)
        try:
            ids = self.engine.encode(prompt, request.system_prompt or None)
        except Exception as exc:  # noqa: BLE001 - answer with the reason instead of failing
            response.ok, response.reason = False, safe_reason(exc)
            return response
        response.prompt_tokens = n_prompt = len(ids)
        if n_prompt >= self.engine.max_context:
            response.ok = False
            response.reason = (
                f"prompt has {n_prompt} tokens; the model's context is "
                f'{self.engine.max_context} (no room to answer)'
            )
            return response
        asked_at = time.monotonic()
        cached = pipeline.cached_for(ids)  # what the prefix cache holds for it now
        cap = pipeline.n_cap(n_prompt, int(request.max_new_tokens))
        n_hat, fallback, took = cap, True, 0.0
        got = self._predict_length(prompt, cap)
        if got is not None and not got.fallback:
            n_hat, fallback, took = min(int(got.predicted_length), cap), False, got.prediction_s
        est = pipeline.estimate(
            n_prompt,
            budget - (time.monotonic() - asked_at),
            n_hat,
            int(request.max_new_tokens),
            predict_s=took,
            min_quality=float(request.min_quality),
            max_alpha=float(request.max_alpha),
            cached=cached,
            close_tokens=close,
        )
        v, adm = est.verdict, est.admission
        response.cached_tokens, response.prefill_saved_s = est.cached_tokens, est.prefill_saved_s
        if est.limit is not None and est.limit.problem:
            response.ok, response.reason = False, est.limit.problem
            return response
        model = pipeline.time_model()
        from timebill_ros.core.time_estimator import wcet_length

        response.ok, response.reason = True, est.reason
        response.predicted_length, response.fallback = n_hat, fallback
        planned = min(n_hat + close, cap)  # as the pipeline plans a goal: N-hat + close steps
        response.n_hat_w = wcet_length(planned, self.cfg.pessimism_k, cap)
        response.wcet_s = model.wcet_s(
            n_prompt, 0.0, planned, self.cfg.pessimism_k, cap, predict_s=took, cached=cached
        )
        response.alpha, response.wcet_at_alpha_s = v.alpha, v.total_s
        response.verdict, response.feasible = v.status, v.feasible and adm.admit
        if est.quality_refusal:
            response.verdict, response.feasible = 'exceeds_quality_floor', False
        if est.limit is not None:
            response.alpha_limit, response.quality_floor = est.limit.alpha_limit, est.limit.floor
        response.expected_quality = est.expected_quality
        response.guaranteed = est.guaranteed
        response.admissible, response.queued_ahead = adm.admit, adm.ahead
        response.queue_ahead_s, response.admission_reason = float(adm.ahead_s), adm.reason
        return response

    # ----------------------------------------------------------------- priming
    def on_prime(self, request, response):
        """Prime a standing context into the prefix cache; wait for it (or ``timeout_s``)."""
        pipeline, engine = self.pipeline, self.engine
        response.prime_id = request.prime_id
        if pipeline is None or engine is None:
            response.reason = NOT_ACTIVE.format(state='not configured')
            return response
        if not self._active:
            response.reason = NOT_ACTIVE.format(state=self.state_label)
            return response
        timeout = float(request.timeout_s)
        if math.isnan(timeout) or timeout < 0:
            response.reason = f'timeout_s must be >= 0 (0: wait until done), got {timeout:g}'
            return response
        try:
            ids = engine.encode_prefix(request.context, request.system_prompt or None)
        except Exception as exc:  # noqa: BLE001 - answer with the reason instead of failing
            response.reason = safe_reason(exc)
            return response
        response.prime_id = prime_id = request.prime_id or prime_id_for(ids)
        response.context_tokens = len(ids)
        future = pipeline.prime(ids, prime_id)
        done, _ = concurrent.futures.wait(
            [future], timeout=timeout if 0 < timeout < math.inf else None
        )
        pc = engine.prefix_cache
        if future in done:
            got = future.result()
            response.ok, response.reason, response.fit = got.ok, got.reason, got.fit
            response.context_tokens = got.context_tokens or len(ids)
            response.cached_tokens, response.seconds = got.cached_tokens, got.seconds
        else:
            response.cached_tokens = pc.holds().get(prime_id, 0) if pc is not None else 0
            response.reason = (
                f'still priming after {timeout:g} s ({response.cached_tokens} of {len(ids)} '
                f'tokens cached so far); it goes on between goals, release {prime_id!r} to stop it'
            )
        response.cache_mb_held = pc.bytes_held / 2**20 if pc is not None else 0.0
        self.get_logger().info(f'prime {prime_id}: {response.reason}')
        return response

    def on_release_prime(self, request, response):
        """Stop holding a primed context; its blocks stay cached until room is needed."""
        pipeline = self.pipeline
        if pipeline is None:
            response.reason = NOT_ACTIVE.format(state='not configured')
            return response
        if not request.prime_id:
            response.reason = 'prime_id is empty: say which primed context to release'
            return response
        pc = pipeline.prefix_cache
        held = pc is not None and request.prime_id in pc.holds()
        response.released_blocks = n = pipeline.release(request.prime_id)
        response.ok = held or n > 0
        response.reason = (
            f'released {n} block(s) of {request.prime_id!r}; they stay cached until room is needed'
            if response.ok
            else f'nothing is held under {request.prime_id!r} (never primed, already released, '
            f'or released before it was primed)'
        )
        return response

    def _predict_length(self, prompt: str, cap: int):
        """N̂ from the predictor node, or None when it is down or slower than PREDICT_TIMEOUT_S."""
        if not self._predict.service_is_ready():
            return None
        future = self._predict.call_async(PredictLength.Request(prompt=prompt, n_cap=cap))
        if wait_first(future, timeout_s=PREDICT_TIMEOUT_S) is None:
            self._predict.remove_pending_request(future)
            return None
        return future.result()


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
    return run_node(node, num_threads=GOAL_THREADS)  # one waiting thread per held goal


if __name__ == '__main__':
    sys.exit(main())
