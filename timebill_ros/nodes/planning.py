"""
The generator's planning services: EstimateBudget, Prime and ReleasePrime.

A mixin of ``generator.GeneratorNode``: they read its pipeline, engine and config, so an
estimate is the answer a goal would get (the same goal rules, time model, queue and prefix
cache). The node creates the services on configure; these are their callbacks.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import time

from timebill_ros.core.goal_rules import tokens_problem
from timebill_ros.nodes.ros_time import duration_to_s
from timebill_ros.nodes.spin import safe_reason, wait_first
from timebill_ros.nodes.validation import model_prompt, ros_goal_problem
from timebill_ros.srv import PredictLength

PREDICT_TIMEOUT_S = 2.0  # EstimateBudget: without N̂ by then, plan with the cap (as a goal would)
NOT_ACTIVE = 'the generator is {state}, not active: start timebill_lifecycle_manager first'


def prime_id_for(ids) -> str:
    """Name a primed context by its token ids: the same context gets the same id."""
    digest = hashlib.sha1(b''.join(int(t).to_bytes(4, 'little') for t in ids)).hexdigest()
    return f'p{digest[:12]}'


class PlanningServices:
    """EstimateBudget, Prime and ReleasePrime callbacks of ``GeneratorNode``."""

    def on_estimate_budget(self, request, response):
        budget = duration_to_s(request.time_budget)
        pipeline = self.pipeline
        if pipeline is None:
            response.ok, response.reason = False, 'the generator is not configured'
            return response
        # the goal rules, as a goal gets them (the budget only: a service call has no deadline)
        problem = ros_goal_problem(request, self.cfg, self.engine.max_context)
        overrun = request.overrun_policy or self.cfg.overrun_policy
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
        problem = tokens_problem(n_prompt, self.engine.max_context)
        if problem:
            response.ok, response.reason = False, problem
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
