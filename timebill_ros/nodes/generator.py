"""timebill_generator: owns the model; prefill → take the estimate → solve α → evict → decode.

It serves the internal ``timebill/generate`` action for the server. Prefill starts as soon as
a goal arrives; meanwhile the predictor's ``Estimate`` for the same request id arrives on
``timebill/estimates``. After prefill the node waits at most ``estimate_slack_s`` for it, and
without one plans with N̂ = N_max (the conservative fallback), so a dead or slow predictor
costs eviction, never a deadline. One model, one goal at a time: later goals wait (QUEUED) in an
earliest-deadline-first queue (``core.scheduler.EdfQueue``); queued time counts against each
goal's budget. Overrun policy ``skip-next``: a late goal runs on to its end, and the goals that
waited meanwhile are skipped (REJECTED, with the reason).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from typing import Optional, Tuple

import rclpy
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node

from timebill_ros.action import Generate
from timebill_ros.core.budget import solve_alpha_after_prefill
from timebill_ros.core.engine import Engine, GenerationRequest
from timebill_ros.core.online_estimator import OnlineTimeModel
from timebill_ros.core.replan import Replanner
from timebill_ros.core.scheduler import EXECUTOR_THREADS, EdfQueue
from timebill_ros.msg import Estimate
from timebill_ros.nodes.common import (ACTION_GENERATE, ACTION_QOS, CHANNEL_QOS, TOPIC_ESTIMATES, declare_config,
                                       effective_n_max, load_time_model, read_config, ros_now_s, run_node,
                                       s_to_duration, safe_reason, time_to_s, to_monotonic, uuid_hex)

R = Generate.Result
F = Generate.Feedback
KEEP_ESTIMATES = 256


class _Job:
    """Per-goal bookkeeping shared between the execute thread and the cancel callback."""

    def __init__(self):
        self.cancel = threading.Event()
        self.tokens = 0  # tokens so far (updated by on_token)
        self.tokens_at_cancel: Optional[int] = None


def _trim_heap() -> None:
    """Hand memory freed by a finished goal (its KV buffers) back to the OS."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False  # not glibc: nothing to do


_LIBC = None


class GeneratorNode(Node):
    def __init__(self):
        super().__init__("timebill_generator")
        declare_config(self)
        self.cfg = read_config(self)
        self.engine = Engine.from_config(self.cfg)
        self.time_model, source = load_time_model(self.cfg, log=self.get_logger().warning,
                                                  running_key=self.engine.profile_key())
        self.queue = EdfQueue()
        # all model work runs on one thread: the executor grows a thread per waiting goal, and each
        # thread that ran torch keeps its per-thread memory (a 500-goal soak grew RSS 12 % without this)
        from concurrent.futures import ThreadPoolExecutor

        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="timebill_model")
        # online recalibration: the fitted model rescaled from served requests (forgetting 0.95)
        self.online = OnlineTimeModel(self.time_model)
        self._drift: list = []
        from diagnostic_msgs.msg import DiagnosticArray

        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_status = None  # the last online-estimator status, republished once a second
        self.create_timer(1.0, self._publish_diagnostics)
        self._estimates: "OrderedDict[str, Tuple[Estimate, float]]" = OrderedDict()
        self._estimates_cv = threading.Condition()
        self._jobs: dict[str, _Job] = {}
        group = ReentrantCallbackGroup()
        self.estimate_sub = self.create_subscription(Estimate, TOPIC_ESTIMATES, self.on_estimate, CHANNEL_QOS,
                                                     callback_group=group)
        self.action_server = ActionServer(self, Generate, ACTION_GENERATE, execute_callback=self.execute,
                                          goal_callback=self.on_goal, cancel_callback=self.on_cancel,
                                          callback_group=group, **ACTION_QOS)
        self.get_logger().info(f"ready: model {self.cfg.model}, press {self.cfg.press}, timing model from {source}")

    # ----------------------------------------------------------------- callbacks
    def on_estimate(self, msg: Estimate) -> None:
        with self._estimates_cv:
            self._estimates[msg.request_id] = (msg, ros_now_s(self))
            while len(self._estimates) > KEEP_ESTIMATES:
                self._estimates.popitem(last=False)
            self._estimates_cv.notify_all()

    def on_goal(self, goal: Generate.Goal) -> GoalResponse:
        return GoalResponse.ACCEPT if goal.request.input_ids else GoalResponse.REJECT

    def on_cancel(self, goal_handle) -> CancelResponse:
        job = self._jobs.get(uuid_hex(goal_handle.goal_id))
        if job is not None:
            job.tokens_at_cancel = job.tokens
            job.cancel.set()
        return CancelResponse.ACCEPT

    def wait_estimate(self, request_id: str, until_monotonic: float) -> Optional[Tuple[Estimate, float]]:
        with self._estimates_cv:
            while request_id not in self._estimates:
                left = until_monotonic - time.monotonic()
                if left <= 0:
                    return None
                self._estimates_cv.wait(left)
            return self._estimates.pop(request_id)

    # ------------------------------------------------------------------- execute
    def execute(self, goal_handle) -> Generate.Result:
        rid = uuid_hex(goal_handle.goal_id)
        job = self._jobs.setdefault(rid, _Job())
        if goal_handle.is_cancel_requested:  # canceled before this thread registered the job
            job.tokens_at_cancel = 0
            job.cancel.set()
        try:
            return self._run(goal_handle, goal_handle.request.request, job)
        except Exception as exc:  # noqa: BLE001 - the server gets a reason, the node stays up
            self.get_logger().error(f"request {rid[:8]} failed: {safe_reason(exc)}")
            result = R(status=R.STATUS_ABORTED, reason=f"generator error: {safe_reason(exc)}")
            goal_handle.abort()
            return result
        finally:
            self._jobs.pop(rid, None)
            _trim_heap()

    def _run(self, goal_handle, req, job: _Job) -> Generate.Result:
        cfg, engine = self.cfg, self.engine
        accepted_s, deadline_s = time_to_s(req.accepted_at), time_to_s(req.deadline)
        rel = lambda: ros_now_s(self) - accepted_s  # noqa: E731 - seconds since the server accepted
        result = R(estimate_received_s=-1.0, prompt_tokens=len(req.input_ids))
        feedback = F(stage=F.STAGE_QUEUED)

        def send_feedback(stage: int) -> None:
            feedback.stage = stage
            feedback.tokens_so_far = job.tokens
            feedback.time_remaining = s_to_duration(max(deadline_s - ros_now_s(self), 0.0))
            goal_handle.publish_feedback(feedback)

        send_feedback(F.STAGE_QUEUED)
        if not self.queue.acquire(req.request_id, to_monotonic(deadline_s, self), job.cancel.is_set):
            skipped = self.queue.skipped(req.request_id)
            if skipped:
                result.status, result.reason = R.STATUS_REJECTED, skipped
                result.finished_at_s = result.total_s = rel()
                goal_handle.succeed()
                return result
            return self._finish_canceled(goal_handle, result, rel, "canceled while queued")
        overran = False
        policy = req.overrun_policy or cfg.overrun_policy
        try:
            ids = [int(t) for t in req.input_ids]
            max_new = int(req.max_new_tokens) or cfg.max_new_tokens
            # --- infeasible at any α (queued too long, or prefill alone outlasts the budget)? Then
            # do not spend a prefill that cannot finish in time: end now, before the deadline.
            left = deadline_s - ros_now_s(self)
            time_model = self.online.model()
            predicted_prefill = time_model.prefill_s(len(ids))
            if left <= 0 or predicted_prefill > left:
                return self._finish_infeasible(goal_handle, result, rel, (
                    f"not started: predicted prefill {predicted_prefill:.2f} s > {max(left, 0):.2f} s left before "
                    f"the deadline; no eviction ratio can help"))
            # --- prefill (the predictor works in parallel) ---
            send_feedback(F.STAGE_PREFILL)
            result.prefill_start_s = rel()
            started_mono = to_monotonic(accepted_s, self)
            state = self.on_model_thread(engine.prefill, ids, capacity=min(engine.max_context, len(ids) + max_new + 1),
                                   started_at=started_mono)
            result.prefill_end_s = rel()
            result.prefill_s = state.prefill_s
            if job.cancel.is_set():
                return self._finish_canceled(goal_handle, result, rel, "canceled during prefill")
            # --- the estimate: already here, or wait at most the slack ---
            got = self.wait_estimate(req.request_id, time.monotonic() + cfg.estimate_slack_s)
            n_cap = effective_n_max(cfg, max_new, len(ids), engine.max_context)
            if got is not None:
                estimate, received_s = got
                result.estimate_received_s = received_s - accepted_s
                n_hat, result.estimate_fallback = min(int(estimate.predicted_length), n_cap), False
            else:
                n_hat, result.estimate_fallback = n_cap, True
            # --- α: the least eviction whose WCET fits what is left of the budget ---
            verdict = solve_alpha_after_prefill(
                time_model, budget_s=deadline_s - accepted_s, elapsed_s=max(rel(), 0.0), n_prompt=len(ids),
                n_hat=n_hat, prefill_s=state.prefill_s, k=cfg.pessimism_k, n_max=n_cap, alpha_max=cfg.alpha_max)
            alpha = verdict.alpha
            if alpha > 0:
                self.on_model_thread(engine.evict, state, alpha)
            result.alpha, result.predicted_length = alpha, n_hat
            result.wcet_s = verdict.total_s
            feedback.alpha, feedback.predicted_length = alpha, n_hat
            # --- decode to the deadline ---
            result.decode_start_s = rel()
            send_feedback(F.STAGE_DECODING)

            def on_token(step: int, token_id: int, text: str) -> None:
                job.tokens = step + 1
                feedback.partial_text = text
                send_feedback(F.STAGE_DECODING)

            skip_next = policy == "skip-next"  # runs on past the deadline; the queue skips the waiting goals
            # re-planning during decode: steps slower than estimated or an answer longer than N̂
            # make the Replanner evict more, so the answer can still finish by the deadline
            replan = None if skip_next else Replanner(
                state.cache, time_model, to_monotonic(deadline_s, self), n_hat=max(n_hat, 1), n_cap=n_cap,
                n_prompt=len(ids), alpha_max=cfg.alpha_max, n_sink=cfg.n_sink, then=on_token)
            out = self.on_model_thread(engine.decode, state, GenerationRequest(
                input_ids=ids, max_new_tokens=max_new, deadline=None if skip_next else to_monotonic(deadline_s, self),
                overrun="truncate" if skip_next else policy, on_token=replan or on_token, cancel=job.cancel))
            if replan is not None and replan.events:
                ev = replan.events
                self.get_logger().info(f"request {req.request_id[:8]}: re-planned {len(ev)} time(s) during decode, "
                                       f"KV {ev[0].kv_before} -> {ev[-1].kv_after}: {ev[0].reason}")
            if skip_next and out.completed:
                out.deadline_met = ros_now_s(self) <= deadline_s
                overran = not out.deadline_met
        finally:
            self.queue.release(req.request_id, overran=overran,
                               reason=f"skipped: goal {req.request_id[:8]} overran its deadline "
                                      f"(overrun policy skip-next) while this goal waited")
        result.finished_at_s = rel()
        self._recalibrate(len(ids), state.prefill_s, out.kv_after, out.decode_step_s)
        result.text, result.completed, result.deadline_met = out.text, out.completed, out.deadline_met
        result.tokens_generated, result.kv_before, result.kv_after = out.tokens_generated, out.kv_before, out.kv_after
        result.decode_s = out.decode_s
        result.total_s = result.finished_at_s
        if out.stop_reason == "cancelled":
            steps = out.tokens_generated - (job.tokens_at_cancel or 0)
            return self._finish_canceled(goal_handle, result, rel,
                                         f"canceled: stopped {steps} decode step(s) after the cancel request")
        slack = deadline_s - accepted_s - result.finished_at_s
        why = "" if verdict.status == "met" else f"; solver: {verdict.status}: {verdict.reason}"
        if replan is not None and replan.events:
            why += (f"; re-planned {len(replan.events)} time(s) during decode (KV {replan.events[0].kv_before} -> "
                    f"{replan.events[-1].kv_after})")
        if out.completed and out.deadline_met:
            result.status = R.STATUS_SUCCEEDED
            result.reason = f"finished ({out.stop_reason}) {slack:.2f} s before the deadline"
        elif out.completed:
            result.status = R.STATUS_DEADLINE_MISSED
            result.reason = f"finished ({out.stop_reason}) {-slack:.2f} s after the deadline{why}"
        elif (req.overrun_policy or cfg.overrun_policy) == "truncate":
            result.status = R.STATUS_TRUNCATED
            result.reason = f"truncated at the deadline after {out.tokens_generated} tokens{why}"
        else:
            result.status = R.STATUS_KILLED
            result.reason = f"killed at the deadline after {out.tokens_generated} tokens (overrun policy kill){why}"
        goal_handle.succeed()
        return result

    def on_model_thread(self, fn, *args, **kwargs):
        return self._model_thread.submit(fn, *args, **kwargs).result()

    def _recalibrate(self, n_prompt: int, prefill_s: float, kv_after: int, step_s) -> None:
        """Feed one served request to the online estimator; warn when it leaves the fit's band."""
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

        self.online.observe_prefill(n_prompt, prefill_s)
        self.online.observe_decode(kv_after, list(step_s))
        drift = self.online.drift()
        if [d.split(":")[0] for d in drift] != [d.split(":")[0] for d in self._drift]:
            for d in drift:
                self.get_logger().warning(d)
        self._drift = drift
        st = DiagnosticStatus(name="timebill_generator: online estimator", hardware_id="timebill",
                              level=DiagnosticStatus.WARN if drift else DiagnosticStatus.OK,
                              message="; ".join(drift) or "measured times inside the fitted model's band")
        st.values = [KeyValue(key=k, value=f"{v:.4g}" if isinstance(v, float) else str(v))
                     for k, v in self.online.summary().items()]
        self._diag_status = st
        self._publish_diagnostics()

    def _publish_diagnostics(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        if self._diag_status is not None:
            msg = DiagnosticArray(status=[self._diag_status])
            msg.header.stamp = self.get_clock().now().to_msg()
            self._diag_pub.publish(msg)

    def _finish_infeasible(self, goal_handle, result, rel, reason: str) -> Generate.Result:
        """Nothing can be produced in time, whatever the overrun policy: KILLED, with why."""
        result.status, result.reason, result.alpha = R.STATUS_KILLED, reason, self.cfg.alpha_max
        result.finished_at_s = result.total_s = rel()
        goal_handle.succeed()
        return result

    def _finish_canceled(self, goal_handle, result, rel, reason: str) -> Generate.Result:
        result.status, result.reason = R.STATUS_CANCELED, reason
        result.finished_at_s = result.total_s = rel()
        result.text = ""
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return result


def _limit_arenas(n: int = 2) -> None:
    """glibc gives each new thread its own malloc arena (up to 8 per core) and keeps what it
    touched; the executor's pool grows a thread per concurrently waiting goal, so without a cap the
    generator's RSS creeps up with every new thread. M_ARENA_MAX = -8."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, int(n))
    except (OSError, AttributeError):
        pass


def main(args=None) -> int:
    _limit_arenas()
    rclpy.init(args=args)
    try:
        node = GeneratorNode()
    except Exception as exc:  # noqa: BLE001 - one readable line, not a traceback
        print(f"[timebill_generator] cannot start: {safe_reason(exc)}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    return run_node(node, num_threads=EXECUTOR_THREADS)  # queued goals each wait in a thread


if __name__ == "__main__":
    sys.exit(main())
