"""
What makes a TimedInference goal servable, checked before any compute is spent on it.

The value rules live once, in ``core.goal_rules`` (the pipeline and EstimateBudget call them
too); this module adds only what needs the ROS types: a ``Duration``/``Time`` whose nanosec
is malformed, ``Duration`` max as "infinite", and the tokenizer. Each refusal is an
``InvalidGoal`` whose message is the reason the planner reads. A ROS string cannot carry a NUL
byte (the middleware cuts the text there), so the typed client refuses such prompts before
sending.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

from timebill_ros.core.goal_rules import goal_problem, tokens_problem
from timebill_ros.nodes.ros_time import duration_to_s, time_to_s
from timebill_ros.nodes.spin import safe_reason

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


def duration_problem(duration, name: str = 'time_budget') -> str:
    """Refuse a ``Duration`` no float can stand for: malformed nanosec, or Duration max."""
    if duration.nanosec >= 1_000_000_000:
        return f'{name} is malformed: nanosec {duration.nanosec} >= 1e9'
    if duration.sec >= INT32_MAX:
        return f'{name} is infinite (Duration max): give a finite budget in seconds'
    return ''


def ros_goal_problem(
    goal, cfg, max_context: int, *, deadline_in_s: Optional[float] = None, budget=None
) -> str:
    """
    Return why a goal-like message (a TimedInference goal, an EstimateBudget request) fails.

    The ROS checks of its ``time_budget``, then ``goal_rules.goal_problem`` with the overrun
    policy and answer length resolved against ``cfg`` ('' if it may be served).
    """
    budget = goal.time_budget if budget is None else budget
    problem = duration_problem(budget)
    if problem:
        return problem
    return goal_problem(
        goal.prompt,
        goal.system_prompt,
        max_context=max_context,
        budget_s=duration_to_s(budget),
        deadline_in_s=deadline_in_s,
        overrun=goal.overrun_policy or cfg.overrun_policy,
        json_schema=getattr(goal, 'json_schema', ''),
        grammar=getattr(goal, 'grammar', ''),
        min_quality=float(goal.min_quality),
        max_alpha=float(goal.max_alpha),
        max_new_tokens=int(goal.max_new_tokens) or cfg.max_new_tokens,
    )


def validate_goal(goal, accepted_s: float, cfg, tokenizer) -> Tuple[float, List[int], str, int]:
    """
    Return (absolute deadline, token ids, overrun policy, max_new_tokens) or raise InvalidGoal.

    The token ids are those of ``model_prompt`` (the schema appended when ``schema_in_prompt``).
    """
    problem = duration_problem(goal.time_budget)
    if problem:
        raise InvalidGoal(problem)
    has_deadline = goal.deadline.sec != 0 or goal.deadline.nanosec != 0
    if goal.deadline.nanosec >= 1_000_000_000:
        raise InvalidGoal(f'deadline is malformed: nanosec {goal.deadline.nanosec} >= 1e9')
    if goal.deadline.sec < 0:
        raise InvalidGoal(f'deadline is malformed: sec {goal.deadline.sec} < 0 (before 1970)')
    absolute = time_to_s(goal.deadline) if has_deadline else None
    away = absolute - accepted_s if has_deadline else None
    problem = ros_goal_problem(goal, cfg, tokenizer.max_context, deadline_in_s=away)
    if problem:
        raise InvalidGoal(problem)
    budget = duration_to_s(goal.time_budget)
    deadline = accepted_s + budget if budget > 0 else math.inf
    if absolute is not None:
        deadline = min(deadline, absolute)
    prompt = model_prompt(goal.prompt, getattr(goal, 'json_schema', ''), cfg)
    try:
        ids = tokenizer.encode(prompt, goal.system_prompt)
    except Exception as exc:  # noqa: BLE001
        raise InvalidGoal(f'cannot tokenize the prompt: {safe_reason(exc)}') from exc
    problem = tokens_problem(len(ids), tokenizer.max_context)
    if problem:
        raise InvalidGoal(problem)
    overrun = goal.overrun_policy or cfg.overrun_policy
    return deadline, ids, overrun, int(goal.max_new_tokens) or cfg.max_new_tokens
