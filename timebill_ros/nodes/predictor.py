"""
timebill_predictor: predicts each request's answer length beside the prefill (lifecycle).

configure loads the response-length predictor (RLP) and the tokenizer; cleanup frees them.
The server publishes every dispatched request on ``timebill/requests`` at the moment it hands
the goal to the generator; this node answers with an ``Estimate`` on ``timebill/estimates``
while the generator is still queued or in prefill (TimeBill runs the RLP in parallel with
prefill). It also serves ``timebill/predict_length`` for the generator's EstimateBudget.
Until a trained length predictor exists, N̂ = the answer cap: the documented fallback.
"""

from __future__ import annotations

import gc
import sys
import time

import rclpy
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from timebill_ros.core.calibration import time_model_for
from timebill_ros.core.pipeline import answer_cap
from timebill_ros.core.time_estimator import wcet_length
from timebill_ros.msg import Estimate, Request
from timebill_ros.nodes.common import (
    CHANNEL_QOS,
    declare_config,
    PromptTokenizer,
    read_config,
    ros_now_s,
    run_node,
    safe_reason,
    SERVICE_PREDICT_LENGTH,
    time_to_s,
    TOPIC_ESTIMATES,
    TOPIC_REQUESTS,
)
from timebill_ros.srv import PredictLength


class PredictorNode(LifecycleNode):
    def __init__(self):
        super().__init__('timebill_predictor')
        declare_config(self)
        self.cfg = self.lengths = self.tokenizer = self.time_model = None
        self._entities: list = []
        self._group = ReentrantCallbackGroup()

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
            self.get_logger().error(f'configure failed: {safe_reason(exc)}')
            self.cfg = self.lengths = self.tokenizer = None
            return TransitionCallbackReturn.FAILURE
        self._entities = [
            self.create_publisher(Estimate, TOPIC_ESTIMATES, CHANNEL_QOS),
            self.create_subscription(
                Request, TOPIC_REQUESTS, self.on_request, CHANNEL_QOS, callback_group=self._group
            ),
            self.create_service(
                PredictLength,
                SERVICE_PREDICT_LENGTH,
                self.on_predict_length,
                callback_group=self._group,
            ),
        ]
        fallback = getattr(self.lengths, 'meta', None) is None
        self.get_logger().info(
            f'configured: length predictor {"N_max fallback" if fallback else "RLP"}'
        )
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def release(self, exiting: bool = False) -> None:
        """Free the predictor (cleanup, shutdown, SIGINT: ``exiting``, nothing to collect)."""
        pub, sub, srv = self._entities or (None, None, None)
        if pub is not None:
            self.destroy_publisher(pub)
            self.destroy_subscription(sub)
            self.destroy_service(srv)
        self._entities = []
        self.cfg = self.lengths = self.tokenizer = self.time_model = None
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
        wcet = self.time_model.wcet_s(n, 0.0, n_hat, cfg.pessimism_k, cap, predict_s=took)
        pub = self._entities[0] if self._entities else None
        if pub is not None:
            pub.publish(
                Estimate(
                    request_id=req.request_id,
                    stamp=self.get_clock().now().to_msg(),
                    prompt_tokens=n,
                    predicted_length=n_hat,
                    predicted_bucket=bucket,
                    n_hat_w=wcet_length(n_hat, cfg.pessimism_k, cap),
                    fallback=fallback,
                    wcet_s=wcet,
                    prediction_s=took,
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
