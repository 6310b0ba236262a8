"""
What makes a TimedInference goal servable, checked before any compute is spent on it.

Each refusal is an ``InvalidGoal`` whose message is the reason the planner reads. A ROS string
cannot carry a NUL byte (the middleware cuts the text there), so the typed client refuses such
prompts before sending; everything else is checked here.
"""

from __future__ import annotations

import json
import math
from typing import List, Tuple
import unicodedata

from timebill_ros.core.config import OVERRUN_POLICIES
from timebill_ros.nodes.ros_time import duration_to_s, time_to_s
from timebill_ros.nodes.spin import safe_reason

MAX_BUDGET_S = (
    86400.0  # a budget or deadline further away than a day is a mistake, not a real-time goal
)
MAX_CHARS_PER_TOKEN = (
    16  # prompts longer than this many characters per context token are refused untokenized
)
INT32_MAX = 2**31 - 1


class InvalidGoal(ValueError):
    """A goal that cannot be served; the message is the reason the client reads."""


def model_prompt(prompt: str, json_schema: str, cfg) -> str:
    """
    Return the text the model reads and the length predictor predicts from.

    The goal's prompt, its JSON schema appended when ``schema_in_prompt`` (core.structured): the
    server encodes it, and the predictor and EstimateBudget see the same text.
    """
    if not json_schema or not cfg.schema_in_prompt:
        return prompt
    from timebill_ros.core.structured import with_schema  # torch: not at the node's import

    return with_schema(prompt, json_schema)


def structure_problem(json_schema: str, grammar: str) -> str:
    """
    Say what is wrong with a goal's schema/grammar fields that needs no grammar engine ('' if ok).

    llguidance, in the generator, judges the rest (the pipeline rejects with its message); this
    only spares a round trip for text that is not JSON at all, or both fields at once.
    """
    if json_schema and grammar:
        return 'give a json_schema or a grammar, not both'
    if json_schema:
        try:
            json.loads(json_schema)
        except json.JSONDecodeError as exc:
            return f'invalid JSON schema: the JSON schema is not JSON: {exc}'
    return ''


def validate_goal(goal, accepted_s: float, cfg, tokenizer) -> Tuple[float, List[int], str, int]:
    """
    Return (absolute deadline, token ids, overrun policy, max_new_tokens) or raise InvalidGoal.

    The token ids are those of ``model_prompt`` (the schema appended when ``schema_in_prompt``).
    """
    json_schema, grammar = getattr(goal, 'json_schema', ''), getattr(goal, 'grammar', '')
    prompt = model_prompt(goal.prompt, json_schema, cfg)
    chars = len(prompt) + len(goal.system_prompt)
    if chars > MAX_CHARS_PER_TOKEN * tokenizer.max_context:
        raise InvalidGoal(
            f'prompt is {chars} characters: far beyond the '
            f"model's context of {tokenizer.max_context} tokens"
        )
    if not goal.prompt.strip():
        raise InvalidGoal('prompt is empty: nothing to answer')
    if not any(ch.isprintable() and not ch.isspace() for ch in goal.prompt):
        raise InvalidGoal(
            'prompt is empty: it has no visible characters (only control/format characters)'
        )
    for field_name, text in (('prompt', goal.prompt), ('system_prompt', goal.system_prompt)):
        bad = next(
            (ch for ch in text if unicodedata.category(ch) == 'Cc' and ch not in '\t\n\r'), None
        )
        if bad is not None:
            raise InvalidGoal(
                f'{field_name} contains the control character U+{ord(bad):04X}: refusing it'
            )
    b = goal.time_budget
    if b.nanosec >= 1_000_000_000:
        raise InvalidGoal(f'time_budget is malformed: nanosec {b.nanosec} >= 1e9')
    if b.sec >= INT32_MAX:
        raise InvalidGoal(
            'time_budget is infinite (Duration max): give a finite budget in seconds'
        )
    budget = duration_to_s(b)
    if budget < 0:
        raise InvalidGoal(f'time_budget must be positive, got {budget:g} s')
    if budget > MAX_BUDGET_S:
        raise InvalidGoal(
            f'time_budget {budget:g} s is longer than {MAX_BUDGET_S:g} s: not a real-time budget'
        )
    if goal.deadline.nanosec >= 1_000_000_000:
        raise InvalidGoal(f'deadline is malformed: nanosec {goal.deadline.nanosec} >= 1e9')
    has_deadline = goal.deadline.sec != 0 or goal.deadline.nanosec != 0
    if budget == 0 and not has_deadline:
        raise InvalidGoal('no time budget: set time_budget > 0 s or an absolute deadline')
    deadline = accepted_s + budget if budget > 0 else math.inf
    if has_deadline:
        absolute = time_to_s(goal.deadline)
        if absolute <= accepted_s:
            raise InvalidGoal(
                f'deadline is in the past ({accepted_s - absolute:.3f} s before acceptance)'
            )
        if absolute - accepted_s > MAX_BUDGET_S and budget == 0:
            raise InvalidGoal(
                f'deadline is {absolute - accepted_s:.0f} s away, more than {MAX_BUDGET_S:g} s: '
                f'not a real-time deadline'
            )
        deadline = min(deadline, absolute)
    overrun = goal.overrun_policy or cfg.overrun_policy
    if overrun not in OVERRUN_POLICIES:
        raise InvalidGoal(
            f'unknown overrun policy {goal.overrun_policy!r}; '
            f'use one of {", ".join(OVERRUN_POLICIES)}'
        )
    problem = structure_problem(json_schema, grammar)
    if problem:
        raise InvalidGoal(problem)
    q, a = float(goal.min_quality), float(goal.max_alpha)
    if math.isnan(q) or q > 1.0:
        raise InvalidGoal(
            f'min_quality must be -1 (server default), 0 (no floor) or an accuracy in (0, 1], '
            f'got {q:g}'
        )
    if math.isnan(a) or a >= 1.0:
        raise InvalidGoal(f'max_alpha must be -1 (no cap) or in [0, 1), got {a:g}')
    max_new = int(goal.max_new_tokens) or cfg.max_new_tokens
    if max_new > tokenizer.max_context:
        raise InvalidGoal(
            f"max_new_tokens {max_new} exceeds the model's context of {tokenizer.max_context} "
            f'tokens'
        )
    try:
        ids = tokenizer.encode(prompt, goal.system_prompt)
    except Exception as exc:  # noqa: BLE001
        raise InvalidGoal(f'cannot tokenize the prompt: {safe_reason(exc)}') from exc
    if len(ids) >= tokenizer.max_context:
        raise InvalidGoal(
            f"prompt has {len(ids)} tokens; the model's context is "
            f'{tokenizer.max_context} (no room to answer)'
        )
    return deadline, ids, overrun, max_new
