"""
The typed client's lifecycle and service calls: readiness, transitions, EstimateBudget, Prime.

A mixin of ``client.TimeBillClient`` (which makes the service clients and spins them); goals
are sent in ``client.py``. Lifecycle calls without a node name go to the lifecycle manager,
which takes every node through the transition in order.
"""

from __future__ import annotations

import math
from typing import Optional

from lifecycle_msgs.srv import ChangeState, GetState
from timebill_ros.client_checks import budget_problem, schema_text, text_problem
from timebill_ros.goal_result import Primed, Released
from timebill_ros.nodes.qos import SERVICE_PRIME, SERVICE_RELEASE_PRIME, TRANSITIONS
from timebill_ros.nodes.ros_time import s_to_duration
from timebill_ros.srv import EstimateBudget, Prime, ReleasePrime


class ServiceCalls:
    """Lifecycle and service calls of ``TimeBillClient`` (needs its clients and ``spin_until``)."""

    # --------------------------------------------------------------- readiness
    def wait_for_lifecycle(self, node: Optional[str] = None, timeout_s: float = 10.0) -> bool:
        client = self._lifecycle_client(GetState, node or self.manager, 'get_state')
        return client.wait_for_service(timeout_s)

    def wait_for_generator(self, timeout_s: float = 10.0) -> bool:
        """Wait until the generator process is up: its lifecycle services answer."""
        return self.wait_for_lifecycle('timebill_generator', timeout_s)

    def wait_for_estimator(self, timeout_s: float = 10.0) -> bool:
        """Wait for the estimate service (served by the configured generator)."""
        return self._estimate.wait_for_service(timeout_sec=timeout_s)

    # --------------------------------------------------------------- lifecycle
    def _lifecycle_client(self, srv_type, node: str, service: str):
        key = (node, service)
        if key not in self._lifecycle:
            # relative: a client in namespace robot1 drives /robot1/<node>
            self._lifecycle[key] = self.create_client(srv_type, f'{node}/{service}')
        return self._lifecycle[key]

    def get_state(self, node: Optional[str] = None, timeout_s: float = 5.0) -> str:
        """Return the node's lifecycle state label ('inactive', 'active', ...), '' if unknown."""
        client = self._lifecycle_client(GetState, node or self.manager, 'get_state')
        if not client.wait_for_service(timeout_sec=timeout_s):
            return ''
        future = client.call_async(GetState.Request())
        return future.result().current_state.label if self.spin_until(future, timeout_s) else ''

    def change_state(
        self, transition: str, node: Optional[str] = None, timeout_s: float = 30.0
    ) -> bool:
        """Trigger a lifecycle transition by name through ``/<node>/change_state``."""
        client = self._lifecycle_client(ChangeState, node or self.manager, 'change_state')
        if not client.wait_for_service(timeout_sec=timeout_s):
            return False
        req = ChangeState.Request()
        req.transition.id = TRANSITIONS[transition]
        future = client.call_async(req)
        return self.spin_until(future, timeout_s) and bool(future.result().success)

    def wait_for_nodes(self, nodes, state: str = 'active', timeout_s: float = 60.0) -> bool:
        """
        Wait until every node in ``nodes`` reports ``state`` (False at ``timeout_s``).

        The manager's own state says what the system was asked to be; a node restarted after a
        crash gets there only when the manager has brought it back.
        """
        end = self.now_s() + timeout_s
        for node in nodes:
            if not self._wait(
                lambda node=node: self.get_state(node, timeout_s=2.0) == state,
                max(end - self.now_s(), 0.0),
            ):
                return False
        return True

    def startup(self, node: Optional[str] = None, timeout_s: float = 30.0) -> bool:
        """Configure (if needed) and activate, like BasicNavigator.lifecycleStartup."""
        state = self.get_state(node, timeout_s)
        if state == 'unconfigured' and not self.change_state('configure', node, timeout_s):
            return False
        if self.get_state(node, timeout_s) == 'inactive' and not self.change_state(
            'activate', node, timeout_s
        ):
            return False
        return self.get_state(node, timeout_s) == 'active'

    # ------------------------------------------------------------------ planning
    def estimate_budget(
        self,
        prompt: str,
        budget_s: float,
        system_prompt: str = '',
        max_new_tokens: int = 0,
        timeout_s: float = 10.0,
        min_quality: float = -1.0,
        max_alpha: float = -1.0,
        schema=None,
        grammar: str = '',
        overrun_policy: str = '',
    ) -> Optional[EstimateBudget.Response]:
        """
        Ask what TimeBill would do with this prompt and budget (None: generator down).

        ``schema`` / ``grammar`` / ``overrun_policy`` as for ``ask``: an invalid schema answers
        ``ok`` false with llguidance's message; under ``close`` the closing steps are counted.
        """
        json_schema, problem = schema_text(schema)
        problem = (
            problem
            or budget_problem(budget_s)
            or text_problem(prompt, system_prompt, json_schema=json_schema, grammar=grammar)
        )
        if problem:
            return EstimateBudget.Response(ok=False, reason=problem)
        if not self._estimate.wait_for_service(timeout_sec=timeout_s):
            return None
        req = EstimateBudget.Request(
            prompt=prompt,
            system_prompt=system_prompt,
            time_budget=s_to_duration(budget_s),
            max_new_tokens=max_new_tokens,
            min_quality=float(min_quality),
            max_alpha=float(max_alpha),
            json_schema=json_schema,
            grammar=grammar or '',
            overrun_policy=overrun_policy or '',
        )
        future = self._estimate.call_async(req)
        return future.result() if self.spin_until(future, timeout_s) else None

    def prime(
        self,
        context: str,
        system_prompt: str = '',
        prime_id: str = '',
        timeout_s: float = 120.0,
        wait_s: float = 10.0,
    ) -> Primed:
        """
        Load a standing context into the generator's prefix KV cache and hold it there.

        Goals whose prompt starts with ``context`` (same ``system_prompt``) then prefill only
        the rest. The generator primes between goals, a prefill chunk at a time; this waits up to
        ``timeout_s`` (0: until done) and says how far it got. ``prime_id`` '' lets the
        generator name it (a hash of the tokens): keep ``Primed.prime_id`` to ``release`` it.
        ``wait_s``: how long to wait for the service to appear.
        """
        problem = text_problem('', system_prompt)
        if not problem and '\x00' in (context or ''):
            problem = (
                f'context contains a NUL byte at character {context.index(chr(0))}: a ROS '
                f'string would silently end there; remove it'
            )
        if not problem and (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, (int, float))
            or not timeout_s >= 0
            or math.isinf(timeout_s)
        ):
            problem = f'timeout_s must be a finite number of seconds >= 0, got {timeout_s!r}'
        if problem:
            return Primed(False, problem, prime_id)
        if not self._prime.wait_for_service(timeout_sec=wait_s):
            return Primed(
                False,
                f'no {SERVICE_PRIME} service within {wait_s:g} s (is timebill_server '
                f'configured?)',
                prime_id,
            )
        req = Prime.Request(
            context=context,
            system_prompt=system_prompt,
            prime_id=prime_id,
            timeout_s=float(timeout_s),
        )
        future = self._prime.call_async(req)
        # the generator answers by timeout_s; the margin covers the way there and back
        if not self.spin_until(future, timeout_s + 30.0 if timeout_s > 0 else None):
            self._prime.remove_pending_request(future)
            return Primed(
                False, f'no answer from {SERVICE_PRIME} within {timeout_s + 30:g} s', prime_id
            )
        r = future.result()
        return Primed(
            ok=bool(r.ok),
            reason=r.reason,
            prime_id=r.prime_id,
            context_tokens=int(r.context_tokens),
            cached_tokens=int(r.cached_tokens),
            seconds=float(r.seconds),
            fit=bool(r.fit),
            cache_mb_held=float(r.cache_mb_held),
        )

    def release(self, prime_id: str, timeout_s: float = 10.0) -> Released:
        """Stop holding a primed context (its blocks stay cached until room is needed)."""
        if not self._release.wait_for_service(timeout_sec=timeout_s):
            return Released(
                False,
                f'no {SERVICE_RELEASE_PRIME} service within {timeout_s:g} s (is '
                f'timebill_server configured?)',
            )
        future = self._release.call_async(ReleasePrime.Request(prime_id=prime_id))
        if not self.spin_until(future, timeout_s):
            self._release.remove_pending_request(future)
            return Released(
                False, f'no answer from {SERVICE_RELEASE_PRIME} within {timeout_s:g} s'
            )
        r = future.result()
        return Released(bool(r.ok), r.reason, int(r.released_blocks))
