"""timebill_server: the lifecycle node planners talk to (``timed_inference`` action).

configure loads the config and the tokenizer and creates the action server; activate starts
accepting goals; deactivate refuses new goals and aborts running ones with a reason; cleanup
frees everything. Each accepted goal gets its absolute deadline at acceptance, is validated
(invalid goals end as ABORTED with ``status = STATUS_REJECTED`` and a readable reason, since a
ROS 2 goal response carries no reason), then is handed to the predictor (``timebill/requests``
topic) and the generator (internal ``timebill/generate`` action) at the same moment. The
server relays feedback, returns the result, forwards cancels, and aborts a goal whose
generator has gone away for ``peer_timeout_s``.

Admission control (``core.scheduler.admission``): a valid goal that cannot finish even at α_max,
given the goals queued ahead of it under EDF, is rejected at once with the numbers. The server
publishes ``diagnostic_msgs/DiagnosticArray`` on ``/diagnostics`` once a second: deadline-miss
rate, estimator and length-predictor errors, queue length, model state.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from typing import Optional

import rclpy
from rclpy.action import ActionClient, ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from timebill_ros.action import Generate, TimedInference
from timebill_ros.core.scheduler import EXECUTOR_THREADS, GOAL_OVERRUN_POLICIES, MAX_PENDING, Pending, admission
from timebill_ros.msg import Request
from timebill_ros.nodes.common import (ACTION_GENERATE, ACTION_QOS, ACTION_TIMED_INFERENCE, CHANNEL_QOS, TOPIC_ESTIMATES,
                                       TOPIC_REQUESTS,
                                       PromptTokenizer, copy_fields, declare_config, duration_to_s, load_time_model,
                                       read_config,
                                       ros_now_s, run_node, s_to_time, safe_reason, time_to_s, uuid_hex)

R = TimedInference.Result
MAX_BUDGET_S = 86400.0  # a budget or deadline further away than a day is a mistake, not a real-time goal
MAX_CHARS_PER_TOKEN = 16  # prompts longer than this many characters per context token are refused untokenized
INT32_MAX = 2**31 - 1
ABORT_GRACE_S = 2.0  # after a cancel/abort, how long to wait for the generator's partial result


@dataclass
class _Goal:
    request_id: str
    accepted_s: float  # ROS time of acceptance
    abort_reason: Optional[str] = None
    done: threading.Event = None  # type: ignore[assignment]
    deadline: Optional[float] = None  # set once validated (admission control reads it)
    n_prompt: int = 0
    started: bool = False  # the generator reported prefill or decoding

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
        self._action_server = self._requests = None
        # Created once, before any executor spins this node: rclpy's ActionClient registers itself
        # with the node before it has its lock, so creating one in on_configure (while the executor
        # waits on another thread) intermittently crashed the executor ('no attribute _lock').
        self._generator = ActionClient(self, Generate, ACTION_GENERATE, callback_group=ReentrantCallbackGroup(),
                                       **ACTION_QOS)
        self._recorder = self._estimates_sub = None
        self.time_model = None
        self.stats = ServedStats()
        from diagnostic_msgs.msg import DiagnosticArray

        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(1.0, self.publish_diagnostics)

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.cfg = read_config(self)
            self.tokenizer = PromptTokenizer(self.cfg)
            self.time_model, _ = load_time_model(self.cfg, log=self.get_logger().warning)
        except Exception as exc:  # noqa: BLE001 - a failed configure must say why
            self.get_logger().error(f"configure failed: {safe_reason(exc)}")
            self.cfg = self.tokenizer = None
            self.stats.model_state = f"configure failed: {safe_reason(exc)}"
            return TransitionCallbackReturn.FAILURE
        group = ReentrantCallbackGroup()
        self._requests = self.create_publisher(Request, TOPIC_REQUESTS, CHANNEL_QOS)
        self._action_server = ActionServer(
            self, TimedInference, ACTION_TIMED_INFERENCE, execute_callback=self.execute,
            goal_callback=self.on_goal, handle_accepted_callback=self.on_accepted, cancel_callback=self.on_cancel,
            callback_group=group, **ACTION_QOS)
        if self.cfg.record_bag:
            self._start_recording(self.cfg.record_bag)
        self.stats.model_state = "configured"
        self.get_logger().info(f"configured: model {self.cfg.model}, context {self.tokenizer.max_context} tokens")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = True
        self.stats.model_state = "active"
        self.get_logger().info("active: accepting goals")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        self.stats.model_state = "inactive"
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
        if self._action_server is not None:
            self._action_server.destroy()
            self._action_server = None
        if self._requests is not None:
            self.destroy_publisher(self._requests)
            self._requests = None
        if self._estimates_sub is not None:
            self.destroy_subscription(self._estimates_sub)
            self._estimates_sub = None
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            recorder.close()
        self.cfg = self.tokenizer = None
        self.stats.model_state = "unconfigured"

    def _start_recording(self, folder: str) -> None:
        """Record every goal, estimate and result to a rosbag2 MCAP bag (readable after a crash)."""
        from pathlib import Path

        from timebill_ros.core.evaluation.bags import BagRecorder
        from timebill_ros.msg import Estimate

        path = Path(folder).expanduser() / time.strftime("timebill_%Y%m%d_%H%M%S")
        self._recorder = BagRecorder(path, action_name="/" + ACTION_TIMED_INFERENCE)
        self._estimates_sub = self.create_subscription(
            Estimate, TOPIC_ESTIMATES, lambda msg: self._record("record_estimate", msg), CHANNEL_QOS)
        self.get_logger().info(f"recording goals, estimates and results to {self._recorder.path}")

    def _record(self, what: str, *args, **kw) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        try:
            getattr(recorder, what)(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - losing the recording must not lose the goal
            self.get_logger().error(f"bag recording failed ({what}): {safe_reason(exc)}")

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
        self._record("record_goal", goal_handle.goal_id, goal_handle.request)
        goal_handle.execute()

    def on_cancel(self, goal_handle) -> CancelResponse:
        return CancelResponse.ACCEPT

    def validate(self, goal: TimedInference.Goal, accepted_s: float) -> tuple[float, list, str, int]:
        """(absolute deadline, token ids, overrun policy, max_new_tokens) or raise InvalidGoal."""
        cfg = self.cfg
        if len(goal.prompt) + len(goal.system_prompt) > MAX_CHARS_PER_TOKEN * self.tokenizer.max_context:
            raise InvalidGoal(f"prompt is {len(goal.prompt) + len(goal.system_prompt)} characters: far beyond the "
                              f"model's context of {self.tokenizer.max_context} tokens")
        if not goal.prompt.strip():
            raise InvalidGoal("prompt is empty: nothing to answer")
        if not any(ch.isprintable() and not ch.isspace() for ch in goal.prompt):
            raise InvalidGoal("prompt is empty: it has no visible characters (only control/format characters)")
        for field_name, text in (("prompt", goal.prompt), ("system_prompt", goal.system_prompt)):
            bad = next((ch for ch in text if unicodedata.category(ch) == "Cc" and ch not in "\t\n\r"), None)
            if bad is not None:
                raise InvalidGoal(f"{field_name} contains the control character U+{ord(bad):04X}: refusing it")
        b = goal.time_budget
        if b.nanosec >= 1_000_000_000:
            raise InvalidGoal(f"time_budget is malformed: nanosec {b.nanosec} >= 1e9")
        if b.sec >= INT32_MAX:
            raise InvalidGoal("time_budget is infinite (Duration max): give a finite budget in seconds")
        budget = duration_to_s(b)
        if budget < 0:
            raise InvalidGoal(f"time_budget must be positive, got {budget:g} s")
        if budget > MAX_BUDGET_S:
            raise InvalidGoal(f"time_budget {budget:g} s is longer than {MAX_BUDGET_S:g} s: not a real-time budget")
        if goal.deadline.nanosec >= 1_000_000_000:
            raise InvalidGoal(f"deadline is malformed: nanosec {goal.deadline.nanosec} >= 1e9")
        has_deadline = goal.deadline.sec != 0 or goal.deadline.nanosec != 0
        if budget == 0 and not has_deadline:
            raise InvalidGoal("no time budget: set time_budget > 0 s or an absolute deadline")
        deadline = accepted_s + budget if budget > 0 else math.inf
        if has_deadline:
            absolute = time_to_s(goal.deadline)
            if absolute <= accepted_s:
                raise InvalidGoal(f"deadline is in the past ({accepted_s - absolute:.3f} s before acceptance)")
            if absolute - accepted_s > MAX_BUDGET_S and budget == 0:
                raise InvalidGoal(f"deadline is {absolute - accepted_s:.0f} s away, more than {MAX_BUDGET_S:g} s: "
                                  f"not a real-time deadline")
            deadline = min(deadline, absolute)
        overrun = goal.overrun_policy or cfg.overrun_policy
        if overrun not in GOAL_OVERRUN_POLICIES:
            raise InvalidGoal(f"unknown overrun policy {goal.overrun_policy!r}; use one of {', '.join(GOAL_OVERRUN_POLICIES)}")
        max_new = int(goal.max_new_tokens) or cfg.max_new_tokens
        if max_new > self.tokenizer.max_context:
            raise InvalidGoal(f"max_new_tokens {max_new} exceeds the model's context of {self.tokenizer.max_context} "
                              f"tokens")
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
            result = self._execute(goal_handle, ctx)
            self.stats.record(result, self.time_model)
            self._record("record_result", goal_handle.goal_id, result, status=int(goal_handle.status))
            return result
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
        with self._goals_lock:
            held = len(self._goals)
        if held > MAX_PENDING:
            result.status, result.total_s = R.STATUS_REJECTED, rel()
            result.reason = f"queue full: {held - 1} goals are already queued or running (limit {MAX_PENDING}); retry later"
            goal_handle.abort()
            return result
        with self._goals_lock:
            ctx.deadline, ctx.n_prompt = deadline, len(ids)
            pending = [Pending(g.request_id, g.deadline, g.n_prompt, g.started) for g in self._goals.values()
                       if g is not ctx and g.deadline is not None]
        verdict = admission(self.time_model, ros_now_s(self), deadline, len(ids), pending, self.cfg.alpha_max)
        if not verdict.admit:
            self.get_logger().warning(f"goal {ctx.request_id[:8]} rejected by admission control: {verdict.reason}")
            result.status, result.reason, result.total_s = R.STATUS_REJECTED, verdict.reason, rel()
            result.alpha = self.cfg.alpha_max
            goal_handle.abort()
            return result
        goal = goal_handle.request
        request = Request(request_id=ctx.request_id, accepted_at=s_to_time(ctx.accepted_s),
                          deadline=s_to_time(deadline), prompt=goal.prompt, system_prompt=goal.system_prompt,
                          input_ids=ids, max_new_tokens=max_new, overrun_policy=overrun)
        generator = self._generator
        if not generator.server_is_ready() and not generator.wait_for_server(timeout_sec=self.cfg.peer_timeout_s):
            return self._abort(goal_handle, result, rel, f"generator unavailable for {self.cfg.peer_timeout_s:g} s")

        heard = [time.monotonic()]  # last sign of life from the generator for this goal
        stage = [TimedInference.Feedback.STAGE_QUEUED]  # last stage the generator reported

        def relay(feedback_msg) -> None:
            heard[0] = time.monotonic()
            stage[0] = feedback_msg.feedback.stage
            if feedback_msg.feedback.stage != TimedInference.Feedback.STAGE_QUEUED:
                ctx.started = True
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
            if stage[0] == TimedInference.Feedback.STAGE_DECODING and silent > self.cfg.peer_timeout_s:
                # decoding sends feedback every token: this long a silence means the generator died
                inner.cancel_goal_async()
                return self._abort(goal_handle, result, rel, f"lost the generator: no token for {silent:.1f} s "
                                   f"while decoding (process gone?)")
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

    def publish_diagnostics(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        with self._goals_lock:
            goals = list(self._goals.values())
        queued = sum(1 for g in goals if not g.started)
        generator_ok = self.cfg is not None and self._generator.server_is_ready()
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = self.stats.to_status(queued=queued, running=len(goals) - queued, generator_ok=generator_ok,
                                          active=self._active)
        self._diag_pub.publish(msg)

    @staticmethod
    def _wait(future, timeout_s: float):
        end = time.monotonic() + timeout_s
        while not future.done():
            if time.monotonic() > end:
                return None
            time.sleep(0.005)
        return future.result()


class ServedStats:
    """Running figures over served goals, for ``/diagnostics`` (last ``WINDOW`` goals for errors)."""

    WINDOW = 200

    def __init__(self):
        from collections import Counter, deque

        self.lock = threading.Lock()
        self.counts = Counter()
        self.prefill_ape = deque(maxlen=self.WINDOW)
        self.decode_ape = deque(maxlen=self.WINDOW)
        self.length_err = deque(maxlen=self.WINDOW)  # |N̂ - tokens| over completed answers with an estimate
        self.model_state = "unconfigured"

    def record(self, result, time_model) -> None:
        from timebill_ros.core.time_estimator import served_errors

        status = STATUS_NAMES.get(result.status, str(result.status))
        with self.lock:
            self.counts[status] += 1
            if result.status in (R.STATUS_REJECTED, R.STATUS_CANCELED, R.STATUS_ABORTED):
                return
            self.counts["planned"] += 1  # goals the server planned a deadline for and ran
            if not result.deadline_met:
                self.counts["missed"] += 1
            if time_model is not None and result.prefill_s > 0 and result.tokens_generated > 0 and result.decode_s > 0:
                n = int(result.tokens_generated)
                mean = result.decode_s / n
                e = served_errors(time_model, int(result.prompt_tokens), int(result.kv_after), result.prefill_s,
                                  [mean] * n)
                self.prefill_ape.append(e["prefill_ape"])
                self.decode_ape.append(e["decode_ape"])
            if result.completed and not result.estimate_fallback and result.predicted_length > 0:
                self.length_err.append(abs(int(result.predicted_length) - int(result.tokens_generated)))

    def to_status(self, queued: int, running: int, generator_ok: bool, active: bool):
        from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

        def mean(xs):
            return f"{sum(xs) / len(xs):.2f}" if xs else "n/a"

        with self.lock:
            planned, missed = self.counts["planned"], self.counts["missed"]
            rate = missed / planned if planned else 0.0
            kv = lambda k, v: KeyValue(key=k, value=str(v))  # noqa: E731
            deadline = DiagnosticStatus(name="timebill_server: deadlines", hardware_id="timebill")
            deadline.level = DiagnosticStatus.OK if rate <= 0.05 else DiagnosticStatus.WARN
            deadline.message = f"deadline-miss rate {rate:.1%} over {planned} planned goals"
            deadline.values = [kv("deadline_miss_rate", f"{rate:.4f}"), kv("planned_goals", planned),
                               kv("missed_goals", missed)] + [kv(f"goals_{k}", v) for k, v in sorted(self.counts.items())
                                                              if k not in ("planned", "missed")]
            est = DiagnosticStatus(name="timebill_server: estimators", hardware_id="timebill", level=DiagnosticStatus.OK)
            est.message = f"prefill APE {mean(self.prefill_ape)} %, decode APE {mean(self.decode_ape)} %"
            est.values = [kv("prefill_ape_pct_mean", mean(self.prefill_ape)),
                          kv("decode_ape_pct_mean", mean(self.decode_ape)), kv("estimator_samples", len(self.decode_ape)),
                          kv("length_abs_err_tokens_mean", mean(self.length_err)),
                          kv("length_samples", len(self.length_err))]
            queue = DiagnosticStatus(name="timebill_server: queue", hardware_id="timebill", level=DiagnosticStatus.OK)
            queue.message = f"{queued} queued, {running} running"
            queue.values = [kv("queue_length", queued), kv("running", running)]
            model = DiagnosticStatus(name="timebill_server: model", hardware_id="timebill")
            ok = active and generator_ok
            model.level = DiagnosticStatus.OK if ok else (DiagnosticStatus.ERROR if active else DiagnosticStatus.WARN)
            model.message = f"server {self.model_state}; generator {'reachable' if generator_ok else 'unreachable'}"
            model.values = [kv("server_state", self.model_state), kv("generator_reachable", generator_ok)]
            return [deadline, est, queue, model]


STATUS_NAMES = {R.STATUS_SUCCEEDED: "succeeded", R.STATUS_TRUNCATED: "truncated", R.STATUS_KILLED: "killed",
                R.STATUS_DEADLINE_MISSED: "deadline_missed", R.STATUS_CANCELED: "canceled",
                R.STATUS_ABORTED: "aborted", R.STATUS_REJECTED: "rejected"}


def main(args=None) -> int:
    rclpy.init(args=args)
    node = TimeBillServer()
    return run_node(node, num_threads=EXECUTOR_THREADS)  # one thread per held goal (see MAX_PENDING)


if __name__ == "__main__":
    sys.exit(main())
