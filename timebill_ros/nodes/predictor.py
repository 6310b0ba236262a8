"""
timebill_predictor: predicts each request's answer length beside the prefill (lifecycle).

configure loads the response-length predictor (RLP) and the tokenizer; cleanup frees them.
The server publishes every dispatched request on ``timebill/requests`` at the moment it hands
the goal to the generator; this node answers with an ``Estimate`` on ``timebill/estimates``
while the generator is still queued or in prefill (TimeBill runs the RLP in parallel with
prefill). It also serves ``timebill/predict_length`` for the generator's EstimateBudget.
Until a trained length predictor exists, N̂ = the answer cap: the documented fallback.

The Estimate's WCET is priced with the time model the generator plans with now (its heartbeat
carries it, online scale applied; the offline profile only until the first heartbeat), and with
the prefill the generator will really run: when the generator
admits a goal it publishes the goal's cached prompt length (its prefix cache) on
``timebill/prefill_plans``. An estimate whose plan has not arrived yet is held back for at
most ``PLAN_WAIT_S`` (without holding a thread), then goes out with ``cached_tokens = 0``.
Estimates go out on a lifecycle publisher: an inactive predictor publishes nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
import gc
import sys
import threading
import time
from typing import Optional

import rclpy
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from timebill_ros.core.calibration.store import time_model_for
from timebill_ros.core.job import answer_cap
from timebill_ros.core.time_estimator import ExecutionTimeModel, wcet_length
from timebill_ros.msg import Estimate, Heartbeat, PrefillPlan, Request
from timebill_ros.nodes.heartbeat import heartbeat_topic, HeartbeatSender
from timebill_ros.nodes.parameters import declare_config, read_config
from timebill_ros.nodes.qos import (
    CHANNEL_QOS,
    HEARTBEAT_QOS,
    SERVICE_PREDICT_LENGTH,
    TOPIC_ESTIMATES,
    TOPIC_PREFILL_PLANS,
    TOPIC_REQUESTS,
)
from timebill_ros.nodes.ros_time import ros_now_s, time_to_s
from timebill_ros.nodes.spin import run_node, safe_reason
from timebill_ros.nodes.tokenizer import PromptTokenizer
from timebill_ros.srv import PredictLength

KEEP_PLANS = 256  # prefill plans kept by request id (a plan may arrive before its request)
PLAN_WAIT_S = 0.2  # an estimate waits at most this long for its goal's prefill plan
SWEEP_S = 0.05  # how often estimates whose plan is overdue are sent with cached = 0


@dataclass
class _Held:
    """An estimate computed before its goal's prefill plan arrived."""

    req: Request
    n_hat: int
    bucket: int
    fallback: bool
    took: float
    cap: int
    until: float  # time.monotonic() after which it goes out without a plan


class PrefillPlans:
    """
    The generator's ``PrefillPlan`` per request id, and the estimates waiting for one.

    Thread-safe. ``take`` returns the plan, or parks the estimate; a plan that arrives later
    hands its parked estimate back from ``put``; ``overdue`` hands back those whose wait is up.
    """

    def __init__(self, keep: int = KEEP_PLANS):
        self._lock = threading.Lock()
        self._plans: 'OrderedDict[str, PrefillPlan]' = OrderedDict()
        self._held: 'OrderedDict[str, _Held]' = OrderedDict()
        self._keep = keep

    def put(self, plan: PrefillPlan) -> Optional[_Held]:
        with self._lock:
            held = self._held.pop(plan.request_id, None)
            if held is None:
                self._plans[plan.request_id] = plan
                while len(self._plans) > self._keep:
                    self._plans.popitem(last=False)
            return held

    def take(self, held: _Held) -> Optional[PrefillPlan]:
        """Return the request's plan if it is here (removed), else park ``held`` and None."""
        with self._lock:
            plan = self._plans.pop(held.req.request_id, None)
            if plan is None:
                self._held[held.req.request_id] = held
                while len(self._held) > self._keep:
                    self._held.popitem(last=False)
            return plan

    def overdue(self, now: float) -> list:
        with self._lock:
            late = [h for h in self._held.values() if h.until <= now]
            for h in late:
                del self._held[h.req.request_id]
            return late

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self._held.clear()


class PredictorNode(LifecycleNode):
    def __init__(self):
        super().__init__('timebill_predictor')
        declare_config(self)
        self.cfg = self.lengths = self.tokenizer = self.time_model = None
        self._entities: list = []
        self._group = ReentrantCallbackGroup()
        self._plans = PrefillPlans()
        self.create_timer(SWEEP_S, self._send_overdue, callback_group=self._group)
        self.alive = HeartbeatSender(
            self, float(self.get_parameter('heartbeat_s').value), self._group
        )
        self.generator_model = None  # the generator's time model, from its heartbeat
        self.create_subscription(
            Heartbeat, heartbeat_topic('timebill_generator'), self._on_generator_beat,
            HEARTBEAT_QOS, callback_group=self._group,
        )

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from timebill_ros.core.length_predictor import load_length_predictor

        try:
            self.cfg = read_config(self)
            log = self.get_logger().warning
            self.tokenizer = PromptTokenizer(self.cfg)
            self.time_model, _ = time_model_for(self.cfg, log=log)
            self.lengths = load_length_predictor(self.cfg, logger=log)
        except Exception as exc:  # noqa: BLE001 - a failed configure says why
            self.alive.error = f'configure failed: {safe_reason(exc)}'
            self.get_logger().error(self.alive.error)
            self.cfg = self.lengths = self.tokenizer = None
            self.alive.send()  # before the answer: the lifecycle manager quotes it
            return TransitionCallbackReturn.FAILURE
        self.alive.state, self.alive.error = 'inactive', ''
        self._entities = [
            self.create_lifecycle_publisher(Estimate, TOPIC_ESTIMATES, CHANNEL_QOS),
            self.create_subscription(
                Request, TOPIC_REQUESTS, self.on_request, CHANNEL_QOS, callback_group=self._group
            ),
            self.create_service(
                PredictLength,
                SERVICE_PREDICT_LENGTH,
                self.on_predict_length,
                callback_group=self._group,
            ),
            self.create_subscription(
                PrefillPlan,
                TOPIC_PREFILL_PLANS,
                self.on_plan,
                CHANNEL_QOS,
                callback_group=self._group,
            ),
        ]
        fallback = getattr(self.lengths, 'meta', None) is None
        self.get_logger().info(
            f'configured: length predictor {"N_max fallback" if fallback else "RLP"}'
        )
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.alive.state = 'active'
        return super().on_activate(state)  # enables the estimates publisher

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.alive.state = 'inactive'
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def release(self, exiting: bool = False) -> None:
        """Free the predictor (cleanup, shutdown, SIGINT: ``exiting``, nothing to collect)."""
        pub, sub, srv, plans = self._entities or (None, None, None, None)
        if pub is not None:
            self.destroy_lifecycle_publisher(pub)
            self.destroy_subscription(sub)
            self.destroy_service(srv)
            self.destroy_subscription(plans)
        self._entities = []
        self._plans.clear()
        self.cfg = self.lengths = self.tokenizer = self.time_model = None
        self.alive.state = 'unconfigured'
        if not exiting:
            gc.collect()

    # ----------------------------------------------------------------- predicting
    def predict(self, prompt: str, cap: int):
        """(N̂ ≤ cap, bucket, fallback, seconds the prediction took)."""
        t0 = time.monotonic()
        p = self.lengths.predict(prompt)
        fallback = getattr(p, 'source', 'model') == 'fallback'
        n_hat = cap if fallback else min(int(p.n_hat), cap)
        return n_hat, int(getattr(p, 'bucket', 0)), fallback, time.monotonic() - t0

    def on_request(self, req: Request) -> None:
        lengths, cfg = self.lengths, self.cfg
        if lengths is None or time_to_s(req.deadline) <= ros_now_s(self):
            return  # not configured, or nobody waits for it any more
        n = len(req.input_ids)
        cap = answer_cap(
            cfg.n_max, req.max_new_tokens or cfg.max_new_tokens, n, self.tokenizer.max_context
        )
        n_hat, bucket, fallback, took = self.predict(req.prompt, cap)
        held = _Held(req, n_hat, bucket, fallback, took, cap, time.monotonic() + PLAN_WAIT_S)
        plan = self._plans.take(held)
        if plan is not None:
            self._publish(held, plan)
        # else: parked until its plan arrives (on_plan) or PLAN_WAIT_S is up (_send_overdue)

    def on_plan(self, plan: PrefillPlan) -> None:
        held = self._plans.put(plan)
        if held is not None:
            self._publish(held, plan)

    def _send_overdue(self) -> None:
        for held in self._plans.overdue(time.monotonic()):
            self._publish(held, None)

    def _on_generator_beat(self, msg: Heartbeat) -> None:
        self.generator_model = ExecutionTimeModel(*msg.time_model) if msg.time_model else None

    def _publish(self, held: _Held, plan: Optional[PrefillPlan]) -> None:
        """Send the estimate; its WCET with the plan's cached prompt length (0: no plan)."""
        cfg, model = self.cfg, self.generator_model or self.time_model
        pub = self._entities[0] if self._entities else None
        if pub is None or cfg is None or model is None:
            return
        n = len(held.req.input_ids)
        cached = min(int(plan.cached_tokens), n) if plan is not None else 0
        wcet = model.wcet_s(
            n, 0.0, held.n_hat, cfg.pessimism_k, held.cap, predict_s=held.took, cached=cached
        )
        pub.publish(
            Estimate(
                request_id=held.req.request_id,
                stamp=self.get_clock().now().to_msg(),
                prompt_tokens=n,
                predicted_length=held.n_hat,
                predicted_bucket=held.bucket,
                n_hat_w=wcet_length(held.n_hat, cfg.pessimism_k, held.cap),
                fallback=held.fallback,
                wcet_s=wcet,
                cached_tokens=cached,
                prediction_s=held.took,
            )
        )

    def on_predict_length(self, request, response):
        if self.lengths is None:
            response.fallback, response.predicted_length = True, request.n_cap
            return response
        n_hat, bucket, fallback, took = self.predict(request.prompt, max(int(request.n_cap), 1))
        response.predicted_length, response.predicted_bucket = n_hat, bucket
        response.fallback, response.prediction_s = fallback, took
        return response


def main(args=None) -> int:
    rclpy.init(args=args)
    node = PredictorNode()
    return run_node(node)


if __name__ == '__main__':
    sys.exit(main())
