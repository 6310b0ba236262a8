"""
What a planner gets back from the typed client: ``GoalResult``, ``Primed``, ``Released``.

``GoalResult`` is the TimedInference Result as a planner reads it (core's ``Outcome`` is the
pipeline's own record of a run). ``from_result`` copies every field the Result carries by the
Result's own field list: the stage stamps into ``timeline``, every other field by name, so a
field added to the action reaches the planner or fails ``test_ros_result_fields``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
import json
import math
from typing import Any

from action_msgs.msg import GoalStatus
from timebill_ros.action import TimedInference
from timebill_ros.core.outcome import STATUS_NAMES as OUTCOME_STATUS_NAMES

R = TimedInference.Result
STATUS_NAMES = dict(enumerate(OUTCOME_STATUS_NAMES))  # code -> name, as the action numbers them
STAGE_NAMES = {
    TimedInference.Feedback.STAGE_QUEUED: 'queued',
    TimedInference.Feedback.STAGE_PREFILL: 'prefill',
    TimedInference.Feedback.STAGE_DECODING: 'decoding',
}
# Result stamps (seconds since acceptance) -> GoalResult.timeline keys
TIMELINE = {
    'dispatch_at_s': 'dispatch',
    'prefill_start_s': 'prefill_start',
    'prefill_end_s': 'prefill_end',
    'estimate_received_s': 'estimate_received',
    'decode_start_s': 'decode_start',
    'finished_at_s': 'finished_at',
}


def json_value(text: str) -> Any:
    """Return ``text`` parsed as JSON, or None when it is not JSON (a Lark grammar's answer)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


@dataclass
class GoalResult:
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
    generator: str = ''  # the generator node that served it ('' = refused by the server)
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
    def rejected(cls, reason: str, accepted: bool = False, **kw) -> 'GoalResult':
        return cls(accepted=accepted, status=R.STATUS_REJECTED, reason=reason, **kw)

    @classmethod
    def from_result(cls, result: TimedInference.Result, goal_status: int, **kw) -> 'GoalResult':
        """Copy every field of the Result: stamps into ``timeline``, the rest by name."""
        names = {f.name for f in fields(cls)}
        timeline, simple = {}, {}
        for name in result.get_fields_and_field_types():
            if name in TIMELINE:
                timeline[TIMELINE[name]] = getattr(result, name)
            elif name in names:
                simple[name] = getattr(result, name)
        if simple.get('structured') and simple.get('valid'):
            kw.setdefault('value', json_value(simple['text']))
        return cls(accepted=True, timeline=timeline, goal_status=goal_status, **simple, **kw)


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
