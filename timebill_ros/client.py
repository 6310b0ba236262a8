"""
A typed client for planners (in the spirit of nav2_simple_commander's BasicNavigator).

    from timebill_ros.client import TimeBillClient
    with TimeBillClient() as tb:
        tb.wait_until_ready()
        plan = tb.estimate_budget("Is the corridor clear?", budget_s=5)   # before committing
        out = tb.ask("Is the corridor clear?", budget_s=5, on_feedback=print)
        print(out.status_name, out.text, out.deadline_met)
        primed = tb.prime(scene_text)   # a standing context, prefilled once (prefix KV cache)
        out = tb.ask(scene_text + " Is the corridor clear?", budget_s=5)
        print(out.cached_tokens, out.prefill_saved_s)
        tb.release(primed.prime_id)
        out = tb.ask("List three colours.", budget_s=5, overrun_policy="close",
                     schema={"type": "array", "items": {"type": "string"}, "maxItems": 3})
        print(out.valid, out.value)   # the parsed JSON when valid (the grammar saw to it)

Every way a goal can end comes back as one ``Outcome``, including goals the server refused
(``accepted = False``) or that were invalid (``status == STATUS_REJECTED`` with a reason), so
a planner branches on one object instead of catching exceptions. The client is a Node that
spins only while one of its methods waits, like BasicNavigator; use it from one thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import json
import math
from typing import Any, Callable, Optional, Tuple
import uuid

from action_msgs.msg import GoalStatus
from lifecycle_msgs.srv import ChangeState, GetState
import rclpy
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from timebill_ros.action import TimedInference
from timebill_ros.core.outcome import STATUS_NAMES as OUTCOME_STATUS_NAMES
from timebill_ros.nodes.qos import (
    ACTION_QOS,
    ACTION_TIMED_INFERENCE,
    SERVICE_ESTIMATE_BUDGET,
    SERVICE_PRIME,
    SERVICE_RELEASE_PRIME,
    TRANSITIONS,
)
from timebill_ros.nodes.ros_time import s_to_duration, s_to_time
from timebill_ros.srv import EstimateBudget, Prime, ReleasePrime
from unique_identifier_msgs.msg import UUID

R = TimedInference.Result
STATUS_NAMES = dict(enumerate(OUTCOME_STATUS_NAMES))  # code -> name, as the action numbers them
STAGE_NAMES = {
    TimedInference.Feedback.STAGE_QUEUED: 'queued',
    TimedInference.Feedback.STAGE_PREFILL: 'prefill',
    TimedInference.Feedback.STAGE_DECODING: 'decoding',
}


@dataclass
class Outcome:
    """How a goal ended, with the TimeBill numbers (see action/TimedInference.action)."""

    accepted: bool
    status: int
    reason: str
    text: str = ''
    completed: bool = False
    deadline_met: bool = False
    alpha: float = 0.0
    expected_quality: float = -1.0  # the press's measured accuracy at alpha (-1: unknown)
    alpha_limit: float = -1.0  # the most eviction the goal's quality floor allowed
    predicted_length: int = 0
    estimate_fallback: bool = False
    wcet_s: float = 0.0
    prompt_tokens: int = 0
    tokens_generated: int = 0
    kv_before: int = 0
    kv_after: int = 0
    prefill_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens taken from the generator's prefix cache
    prefill_saved_s: float = 0.0  # prefill seconds that saved, by the time model
    decode_s: float = 0.0
    total_s: float = 0.0
    timeline: dict = field(default_factory=dict)  # stage -> seconds since acceptance
    goal_status: int = GoalStatus.STATUS_UNKNOWN
    budget_s: float = math.nan
    goal_id: str = ''
    valid: bool = False  # a whole answer: matches the goal's schema/grammar; free text: completed
    structured: bool = False  # the goal had a JSON schema or grammar
    value: Any = None  # the answer parsed as JSON when structured and valid, else None

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, str(self.status))

    @property
    def ok(self) -> bool:
        """Tell whether a usable answer arrived in time (complete, or truncated by request)."""
        return self.status in (R.STATUS_SUCCEEDED, R.STATUS_TRUNCATED)

    @property
    def estimate_overlapped_prefill(self) -> bool:
        """Tell whether the estimate arrived before prefill finished (TimeBill's parallelism)."""
        t = self.timeline
        return 0 <= t.get('estimate_received', -1) <= t.get('prefill_end', -1)

    @classmethod
    def rejected(cls, reason: str, accepted: bool = False, **kw) -> 'Outcome':
        return cls(accepted=accepted, status=R.STATUS_REJECTED, reason=reason, **kw)

    @classmethod
    def from_result(cls, result: TimedInference.Result, goal_status: int, **kw) -> 'Outcome':
        timeline = {
            name[:-2]: getattr(result, name)
            for name in (
                'dispatch_at_s',
                'prefill_start_s',
                'prefill_end_s',
                'estimate_received_s',
                'decode_start_s',
                'finished_at_s',
            )
        }
        timeline['dispatch'] = timeline.pop('dispatch_at')
        simple = {
            f: getattr(result, f)
            for f in (
                'text',
                'completed',
                'deadline_met',
                'alpha',
                'expected_quality',
                'alpha_limit',
                'predicted_length',
                'estimate_fallback',
                'wcet_s',
                'prompt_tokens',
                'tokens_generated',
                'kv_before',
                'kv_after',
                'prefill_s',
                'cached_tokens',
                'prefill_saved_s',
                'decode_s',
                'total_s',
                'valid',
                'structured',
            )
        }
        if simple['structured'] and simple['valid']:
            kw.setdefault('value', json_value(simple['text']))
        return cls(
            accepted=True,
            status=result.status,
            reason=result.reason,
            timeline=timeline,
            goal_status=goal_status,
            **simple,
            **kw,
        )


@dataclass
class Primed:
    """What priming a standing context did (see srv/Prime.srv)."""

    ok: bool
    reason: str
    prime_id: str = ''
    context_tokens: int = 0  # tokens of the context (the chat template's head included)
    cached_tokens: int = 0  # of them, held in the prefix cache now
    seconds: float = 0.0  # model time spent priming (0: it was cached already)
    fit: bool = False  # every whole block fits the memory bound
    cache_mb_held: float = 0.0  # MB the generator's prefix cache holds now (all contexts)


@dataclass
class Released:
    """What releasing a primed context did (see srv/ReleasePrime.srv)."""

    ok: bool
    reason: str
    released_blocks: int = 0


def budget_problem(budget_s: Optional[float]) -> Optional[str]:
    """Why a float budget cannot even be put on the wire (Duration has no NaN or infinity)."""
    if budget_s is None:
        return None
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)):
        return f'time budget must be a number of seconds, got {budget_s!r}'
    if math.isnan(budget_s):
        return 'time budget is NaN: give a finite number of seconds'
    if math.isinf(budget_s):
        return 'time budget is infinite: give a finite number of seconds'
    return None


def json_value(text: str) -> Any:
    """Return ``text`` parsed as JSON, or None when it is not JSON (a Lark grammar's answer)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def schema_text(schema) -> Tuple[str, Optional[str]]:
    """
    Return (the JSON schema as text, why it cannot be sent or None).

    ``schema`` is None (free text), JSON text, or the schema itself (a dict; true/false).
    Whether it is a valid schema is llguidance's call, in the generator.
    """
    if schema is None or schema == '':
        return '', None
    if isinstance(schema, str):
        return schema, None
    if isinstance(schema, (dict, bool)):
        try:
            return json.dumps(schema), None
        except (TypeError, ValueError) as exc:
            return '', f'the JSON schema cannot be written as JSON: {exc}'
    return '', f'a JSON schema is a dict or JSON text, got {type(schema).__name__}'


def text_problem(prompt: str, system_prompt: str = '', **more: str) -> Optional[str]:
    """Refuse a NUL byte: the middleware would cut a ROS string there."""
    for name, text in (('prompt', prompt), ('system_prompt', system_prompt), *more.items()):
        if '\x00' in (text or ''):
            return (
                f'{name} contains a NUL byte at character {text.index(chr(0))}: a ROS string '
                f'would silently end there; remove it'
            )
    return None


class TimeBillClient(Node):
    """
    Send TimedInference goals, ask EstimateBudget, drive the system's lifecycle.

    Lifecycle calls without a node name go to ``manager`` (timebill_lifecycle_manager), which
    takes every node through the transition in order, as BasicNavigator.lifecycleStartup does.
    """

    def __init__(
        self,
        node_name: str = 'timebill_client',
        server: str = 'timebill_server',
        namespace: str = '',
        context=None,
        manager: str = 'timebill_lifecycle_manager',
    ):
        self._owns_rclpy = context is None and not rclpy.ok()
        if self._owns_rclpy:
            rclpy.init()
        super().__init__(node_name, namespace=namespace, context=context)
        self.server, self.manager = server, manager
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self)
        self._action = ActionClient(self, TimedInference, ACTION_TIMED_INFERENCE, **ACTION_QOS)
        self._estimate = self.create_client(EstimateBudget, SERVICE_ESTIMATE_BUDGET)
        self._prime = self.create_client(Prime, SERVICE_PRIME)
        self._release = self.create_client(ReleasePrime, SERVICE_RELEASE_PRIME)
        self._lifecycle: dict = {}
        self._goal_handle = None
        self._result_future = None
        self._feedback: Optional[TimedInference.Feedback] = None
        self._on_feedback: Optional[Callable] = None
        self._budget_s = math.nan

    # ------------------------------------------------------------------ plumbing
    def spin_until(self, future, timeout_s: Optional[float]) -> bool:
        self._executor.spin_until_future_complete(future, timeout_sec=timeout_s)
        return future.done()

    def now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        end = self.now_s() + timeout_s
        while not predicate():
            if self.now_s() >= end:
                return False
            self._executor.spin_once(timeout_sec=0.05)
        return True

    def close(self) -> None:
        self._executor.shutdown()
        self.destroy_node()
        if self._owns_rclpy:
            rclpy.try_shutdown()

    def __enter__(self) -> 'TimeBillClient':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

    def wait_until_ready(self, timeout_s: float = 60.0) -> bool:
        """Wait until the system is active and the action and estimate service answer."""
        end = self.now_s() + timeout_s
        ok = self.wait_for_lifecycle(timeout_s=timeout_s)
        ok = ok and self._wait(
            lambda: self.get_state(timeout_s=2.0) == 'active', max(end - self.now_s(), 0)
        )
        ok = ok and self._wait(self._action.server_is_ready, max(end - self.now_s(), 0))
        return ok and self.wait_for_estimator(max(end - self.now_s(), 0.1))

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
                f'no {SERVICE_PRIME} service within {wait_s:g} s (is timebill_generator '
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
                f'timebill_generator configured?)',
            )
        future = self._release.call_async(ReleasePrime.Request(prime_id=prime_id))
        if not self.spin_until(future, timeout_s):
            self._release.remove_pending_request(future)
            return Released(
                False, f'no answer from {SERVICE_RELEASE_PRIME} within {timeout_s:g} s'
            )
        r = future.result()
        return Released(bool(r.ok), r.reason, int(r.released_blocks))

    # -------------------------------------------------------------------- goals
    def send_goal(
        self,
        prompt: str,
        budget_s: Optional[float] = None,
        deadline_s: Optional[float] = None,
        system_prompt: str = '',
        max_new_tokens: int = 0,
        overrun_policy: str = '',
        on_feedback: Optional[Callable[[TimedInference.Feedback], None]] = None,
        timeout_s: float = 10.0,
        min_quality: float = -1.0,
        max_alpha: float = -1.0,
        schema=None,
        grammar: str = '',
    ) -> Optional[Outcome]:
        """
        Send a goal; None once accepted, else the refusal as an Outcome.

        Once accepted, poll is_task_complete / get_result. ``deadline_s`` is absolute ROS time in
        seconds. ``min_quality`` (-1: the server's default floor, 0: none) and ``max_alpha`` (-1:
        no cap) bound the eviction the goal accepts. ``schema`` (a dict or JSON text) or
        ``grammar`` (Lark) constrain the answer (see ``ask``).
        """
        self._goal_handle = self._result_future = self._feedback = None
        self._budget_s = budget_s if budget_s is not None else math.nan
        json_schema, problem = schema_text(schema)
        problem = (
            problem
            or budget_problem(budget_s)
            or text_problem(prompt, system_prompt, json_schema=json_schema, grammar=grammar)
        )
        if problem:
            return Outcome.rejected(problem, budget_s=self._budget_s)
        goal = TimedInference.Goal(
            prompt=prompt,
            system_prompt=system_prompt,
            max_new_tokens=max_new_tokens,
            overrun_policy=overrun_policy,
            client_node=self.get_fully_qualified_name(),
            min_quality=float(min_quality),
            max_alpha=float(max_alpha),
            json_schema=json_schema,
            grammar=grammar or '',
        )
        if budget_s is not None:
            goal.time_budget = s_to_duration(budget_s)
            # the budget runs from now, not from when the server gets to accept the goal: a
            # burst of goals can take a while to be accepted, and a promise is kept at the planner
            if budget_s > 0 and math.isfinite(budget_s):  # others: the server says what is wrong
                sent_deadline = self.now_s() + budget_s
                deadline_s = (
                    sent_deadline if deadline_s is None else min(deadline_s, sent_deadline)
                )
        if deadline_s is not None:
            goal.deadline = s_to_time(deadline_s)
        if not self._action.wait_for_server(timeout_sec=timeout_s):
            return Outcome.rejected(
                f'no {ACTION_TIMED_INFERENCE} action server within {timeout_s:g} s '
                f'(is {self.server} configured?)',
                budget_s=self._budget_s,
            )
        self._on_feedback = on_feedback
        goal_id = UUID(uuid=list(uuid.uuid4().bytes))
        future = self._action.send_goal_async(
            goal, feedback_callback=self._feedback_cb, goal_uuid=goal_id
        )
        if not self.spin_until(future, timeout_s):
            return Outcome.rejected(
                f'no answer to the goal request within {timeout_s:g} s', budget_s=self._budget_s
            )
        handle = future.result()
        if not handle.accepted:
            state = self.get_state(self.server, timeout_s=2.0)
            why = (
                f'{self.server} is {state or "unreachable"}, not active'
                if state != 'active'
                else f'{self.server} refused the goal'
            )
            return Outcome.rejected(f'rejected: {why}', budget_s=self._budget_s)
        self._goal_handle = handle
        self._result_future = handle.get_result_async()
        return None

    def _feedback_cb(self, msg) -> None:
        self._feedback = msg.feedback
        if self._on_feedback is not None:
            self._on_feedback(msg.feedback)

    def is_task_complete(self, timeout_s: float = 0.1) -> bool:
        if self._result_future is None:
            return True
        return self.spin_until(self._result_future, timeout_s)

    def get_feedback(self) -> Optional[TimedInference.Feedback]:
        return self._feedback

    def cancel_task(self, timeout_s: float = 5.0) -> bool:
        """Ask the server to cancel the running goal; True if it accepted the request."""
        if self._goal_handle is None:
            return False
        future = self._goal_handle.cancel_goal_async()
        return self.spin_until(future, timeout_s) and len(future.result().goals_canceling) > 0

    def get_result(self, timeout_s: Optional[float] = None) -> Outcome:
        """Wait for the running goal to end and return its Outcome."""
        if self._result_future is None:
            return Outcome.rejected('no goal was sent')
        if not self.spin_until(self._result_future, timeout_s):
            return Outcome(
                accepted=True,
                status=R.STATUS_ABORTED,
                reason=f'no result within {timeout_s:g} s',
                budget_s=self._budget_s,
            )
        response = self._result_future.result()
        return Outcome.from_result(
            response.result,
            response.status,
            budget_s=self._budget_s,
            goal_id=bytes(self._goal_handle.goal_id.uuid).hex(),
        )

    def ask(
        self,
        prompt: str,
        budget_s: Optional[float] = None,
        *,
        deadline_s: Optional[float] = None,
        system_prompt: str = '',
        max_new_tokens: int = 0,
        overrun_policy: str = '',
        on_feedback: Optional[Callable[[TimedInference.Feedback], None]] = None,
        timeout_s: Optional[float] = None,
        min_quality: float = -1.0,
        max_alpha: float = -1.0,
        schema=None,
        grammar: str = '',
    ) -> Outcome:
        """
        Send a goal and wait for its Outcome (``timeout_s`` None: budget + 60 s).

        ``schema``: a JSON schema (a dict or JSON text) the answer must match, enforced token by
        token; the Outcome's ``valid`` says it does and ``value`` holds the parsed JSON.
        ``grammar``: a Lark grammar instead. With ``overrun_policy='close'`` an answer running
        out of time is closed into a shorter valid one (``truncated``, ``valid`` true). An
        invalid schema is ``rejected`` with llguidance's message.
        """
        refused = self.send_goal(
            prompt,
            budget_s,
            deadline_s,
            system_prompt,
            max_new_tokens,
            overrun_policy,
            on_feedback,
            min_quality=min_quality,
            max_alpha=max_alpha,
            schema=schema,
            grammar=grammar,
        )
        if refused is not None:
            return refused
        if timeout_s is None:
            timeout_s = (
                (budget_s or 0.0) + 60.0
                if deadline_s is None
                else max(deadline_s - self.now_s(), 0) + 60
            )
        return self.get_result(timeout_s)
