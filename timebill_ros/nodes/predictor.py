"""timebill_predictor: predicts each request's answer length and WCET, beside the prefill.

The server publishes every accepted request on ``timebill/requests`` at the moment it hands
the goal to the generator; this node answers with an ``Estimate`` on ``timebill/estimates``
while the generator is still in prefill (TimeBill runs the RLP in parallel with prefill).
It also serves ``timebill/estimate_budget`` so a planner can ask before sending a goal.
Until a trained length predictor exists, N̂ = N_max (capped by max_new_tokens): the
documented conservative fallback.

For admission control it follows the generator's queue: requests it saw on
``timebill/requests`` stay pending while the internal generate action reports them active
(``_action/status``) and count as started once their feedback leaves STAGE_QUEUED.
"""

from __future__ import annotations

import math
import sys
import threading
import time

import rclpy
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node

from timebill_ros.core.budget import solve_alpha
from timebill_ros.core.scheduler import Pending, admission
from timebill_ros.core.time_estimator import wcet_length
from timebill_ros.msg import Estimate, Request
from timebill_ros.nodes.common import (ACTION_GENERATE, CHANNEL_QOS, SERVICE_ESTIMATE_BUDGET, TOPIC_ESTIMATES, TOPIC_REQUESTS,
                                       LengthPredictor, PromptTokenizer, declare_config, duration_to_s,
                                       effective_n_max, load_time_model, read_config, ros_now_s, run_node,
                                       safe_reason, time_to_s)
from timebill_ros.srv import EstimateBudget


class PredictorNode(Node):
    def __init__(self):
        super().__init__("timebill_predictor")
        declare_config(self)
        self.cfg = read_config(self)
        log = self.get_logger().warning
        self.tokenizer = PromptTokenizer(self.cfg)
        self.time_model, source = load_time_model(self.cfg, log=log)
        self.lengths = LengthPredictor(self.cfg, log=log)
        group = ReentrantCallbackGroup()
        self.estimates = self.create_publisher(Estimate, TOPIC_ESTIMATES, CHANNEL_QOS)
        self.requests = self.create_subscription(Request, TOPIC_REQUESTS, self.on_request, CHANNEL_QOS,
                                                 callback_group=group)
        self._pending: dict = {}  # request id -> Pending, while the generator holds it
        self._pending_lock = threading.Lock()
        self._active: set = set()  # generate goals the last action status message listed as active
        from action_msgs.msg import GoalStatusArray
        from rclpy.qos import qos_profile_action_status_default

        from timebill_ros.action import Generate

        self.create_subscription(GoalStatusArray, f"{ACTION_GENERATE}/_action/status", self.on_generate_status,
                                 qos_profile_action_status_default, callback_group=group)
        self.create_subscription(Generate.Impl.FeedbackMessage, f"{ACTION_GENERATE}/_action/feedback",
                                 self.on_generate_feedback, 10, callback_group=group)
        self.service = self.create_service(EstimateBudget, SERVICE_ESTIMATE_BUDGET, self.on_estimate_budget,
                                           callback_group=group)
        self.get_logger().info(
            f"ready: length predictor {'N_max fallback' if self.lengths.is_fallback else 'RLP'}, "
            f"timing model from {source}")

    def predict(self, prompt: str, n_prompt: int, max_new_tokens: int):
        """(N̂, bucket, fallback, N̂_W, N cap, WCET at α=0, seconds the prediction took)."""
        t0 = time.monotonic()
        cap = effective_n_max(self.cfg, max_new_tokens or self.cfg.max_new_tokens, n_prompt,
                              self.tokenizer.max_context)
        n_hat, bucket, fallback = self.lengths.predict(prompt, cap)
        n_w = wcet_length(n_hat, self.cfg.pessimism_k, cap)
        took = time.monotonic() - t0
        wcet = self.time_model.wcet_s(n_prompt, 0.0, n_hat, self.cfg.pessimism_k, cap, predict_s=took)
        return n_hat, bucket, fallback, n_w, cap, wcet, took

    def on_generate_status(self, msg) -> None:
        with self._pending_lock:
            self._active = {bytes(s.goal_info.goal_id.uuid).hex() for s in msg.status_list if s.status in (1, 2, 3)}

    def on_generate_feedback(self, msg) -> None:
        rid = bytes(msg.goal_id.uuid).hex()
        if msg.feedback.stage != msg.feedback.STAGE_QUEUED:
            with self._pending_lock:
                if rid in self._pending and not self._pending[rid][0].started:
                    p = self._pending[rid][0]
                    self._pending[rid] = (Pending(p.job_id, p.deadline, p.n_prompt, True), self._pending[rid][1])

    def pending(self) -> list:
        now, mono = ros_now_s(self), time.monotonic()
        with self._pending_lock:
            for rid in [r for r, (_, seen) in self._pending.items() if r not in self._active and seen < mono - 2.0]:
                del self._pending[rid]  # ended (a 2 s grace: a new goal may not be in a status message yet)
            for rid in [r for r, (p, _) in self._pending.items() if p.deadline < now - 60.0]:
                del self._pending[rid]  # long past its deadline: the server has given up on it
            return [p for p, _ in self._pending.values()]

    def on_request(self, req: Request) -> None:
        if time_to_s(req.deadline) <= ros_now_s(self):
            return
        with self._pending_lock:
            self._pending[req.request_id] = (Pending(req.request_id, time_to_s(req.deadline), len(req.input_ids)),
                                             time.monotonic())  # a replayed (transient-local) request whose deadline is gone: nobody waits for it
        n_hat, bucket, fallback, n_w, _, wcet, took = self.predict(req.prompt, len(req.input_ids),
                                                                   req.max_new_tokens)
        msg = Estimate(request_id=req.request_id, stamp=self.get_clock().now().to_msg(),
                       prompt_tokens=len(req.input_ids), predicted_length=n_hat, predicted_bucket=bucket,
                       n_hat_w=n_w, fallback=fallback, wcet_s=wcet, prediction_s=took)
        self.estimates.publish(msg)

    def on_estimate_budget(self, request: EstimateBudget.Request, response: EstimateBudget.Response):
        budget = duration_to_s(request.time_budget)
        if not request.prompt.strip():
            response.ok, response.reason = False, "prompt is empty: nothing to answer"
            return response
        if not math.isfinite(budget) or budget <= 0:
            response.ok, response.reason = False, f"time budget must be positive, got {budget:g} s"
            return response
        try:
            ids = self.tokenizer.encode(request.prompt, request.system_prompt)
        except Exception as exc:  # noqa: BLE001 - answer with the reason instead of failing the call
            response.ok, response.reason = False, safe_reason(exc)
            return response
        n_prompt = len(ids)
        response.prompt_tokens = n_prompt
        if n_prompt >= self.tokenizer.max_context:
            response.ok = False
            response.reason = (f"prompt has {n_prompt} tokens; the model's context is "
                               f"{self.tokenizer.max_context} (no room to answer)")
            return response
        n_hat, _, fallback, n_w, cap, wcet, took = self.predict(request.prompt, n_prompt, request.max_new_tokens)
        verdict = solve_alpha(self.time_model, budget, n_prompt, n_hat, k=self.cfg.pessimism_k, n_max=cap,
                              alpha_max=self.cfg.alpha_max, predict_s=took)
        response.ok = True
        response.reason = verdict.reason
        response.predicted_length, response.n_hat_w, response.fallback = n_hat, n_w, fallback
        response.wcet_s = wcet
        response.alpha = verdict.alpha
        response.wcet_at_alpha_s = verdict.total_s
        response.verdict = verdict.status
        response.feasible = verdict.feasible
        response.guaranteed = verdict.guaranteed
        now = ros_now_s(self)
        adm = admission(self.time_model, now, now + budget, n_prompt, self.pending(), self.cfg.alpha_max)
        response.admissible, response.queued_ahead = adm.admit, adm.ahead
        response.queue_ahead_s, response.admission_reason = float(adm.ahead_s), adm.reason
        return response


def main(args=None) -> int:
    rclpy.init(args=args)
    try:
        node = PredictorNode()
    except Exception as exc:  # noqa: BLE001 - one readable line, not a traceback
        print(f"[timebill_predictor] cannot start: {safe_reason(exc)}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    return run_node(node)


if __name__ == "__main__":
    sys.exit(main())
