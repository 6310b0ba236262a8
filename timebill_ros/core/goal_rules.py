"""
The value rules of a goal, written once: what a planner may ask for, and why a request is refused.

The generator's action (``nodes/validation.py``), its EstimateBudget service and the pipeline's
``submit`` all call these, so a goal is refused for the same reason, in the same words, wherever
it is checked. Plain Python on plain values: the ROS message checks (malformed ``Duration``,
NUL bytes) stay with the node. Every function returns the reason the planner reads, '' if fine.
"""

from __future__ import annotations

import json
import math
from typing import Optional
import unicodedata

from .config import OVERRUN_POLICIES

# a budget or deadline further away than a day is a mistake, not a real-time goal
MAX_BUDGET_S = 86400.0
# prompts longer than this many characters per context token are refused untokenized
MAX_CHARS_PER_TOKEN = 16


def prompt_problem(prompt: str, system_prompt: str = '', max_context: int = 0) -> str:
    """Refuse a prompt that is empty, invisible, holds control characters or cannot fit."""
    chars = len(prompt) + len(system_prompt)
    if max_context and chars > MAX_CHARS_PER_TOKEN * max_context:
        return (
            f'prompt is {chars} characters: far beyond the '
            f"model's context of {max_context} tokens"
        )
    if not prompt.strip():
        return 'prompt is empty: nothing to answer'
    if not any(ch.isprintable() and not ch.isspace() for ch in prompt):
        return 'prompt is empty: it has no visible characters (only control/format characters)'
    for field_name, text in (('prompt', prompt), ('system_prompt', system_prompt)):
        bad = next(
            (ch for ch in text if unicodedata.category(ch) == 'Cc' and ch not in '\t\n\r'), None
        )
        if bad is not None:
            return f'{field_name} contains the control character U+{ord(bad):04X}: refusing it'
    return ''


def time_problem(budget_s: float, deadline_in_s: Optional[float] = None) -> str:
    """
    Refuse a budget or deadline no real-time goal has.

    ``budget_s``: the relative budget (0: none); ``deadline_in_s``: seconds from acceptance to
    the goal's absolute deadline (None: it has none). One of the two must be set.
    """
    budget = float(budget_s)
    if math.isnan(budget):
        return 'time_budget is NaN: give a budget in seconds'
    if budget < 0:
        return f'time_budget must be positive, got {budget:g} s'
    if budget > MAX_BUDGET_S:
        return (
            f'time_budget {budget:g} s is longer than {MAX_BUDGET_S:g} s: not a real-time budget'
        )
    if deadline_in_s is None:
        if budget == 0:
            return 'no time budget: set time_budget > 0 s or an absolute deadline'
        return ''
    away = float(deadline_in_s)
    if math.isnan(away):
        return 'the deadline is NaN'
    if away <= 0:
        return f'deadline is in the past ({-away:.3f} s before acceptance)'
    if away > MAX_BUDGET_S and budget == 0:
        return (
            f'deadline is {away:.0f} s away, more than {MAX_BUDGET_S:g} s: '
            f'not a real-time deadline'
        )
    return ''


def quality_problem(min_quality: float, max_alpha: float) -> str:
    """
    Refuse quality wishes outside their ranges.

    ``min_quality``: -1 the server's default floor, 0 no floor, else an accuracy in (0, 1];
    ``max_alpha``: -1 no cap, else an eviction ratio in [0, 1) (1 would evict every entry).
    """
    q, a = float(min_quality), float(max_alpha)
    if not (q == -1.0 or 0.0 <= q <= 1.0):
        return (
            f'min_quality must be -1 (server default), 0 (no floor) or an accuracy in (0, 1], '
            f'got {q:g}'
        )
    if not (a == -1.0 or 0.0 <= a < 1.0):
        return f'max_alpha must be -1 (no cap) or in [0, 1), got {a:g}'
    return ''


def overrun_problem(overrun: str) -> str:
    """Refuse an overrun policy that is not one of ``OVERRUN_POLICIES`` (pass the resolved one)."""
    if overrun not in OVERRUN_POLICIES:
        return f'unknown overrun policy {overrun!r}; use one of {", ".join(OVERRUN_POLICIES)}'
    return ''


def structure_problem(json_schema: str, grammar: str) -> str:
    """
    Say what is wrong with a goal's schema/grammar fields that needs no grammar engine.

    llguidance, in the engine, judges the rest (the pipeline refuses with its message); this
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


def length_problem(max_new_tokens: int, max_context: int) -> str:
    """Refuse an answer length the model's context cannot hold (0: the server default)."""
    n = int(max_new_tokens)
    if n < 0:
        return f'max_new_tokens must be >= 0 (0: the server default), got {n}'
    if max_context and n > max_context:
        return f"max_new_tokens {n} exceeds the model's context of {max_context} tokens"
    return ''


def tokens_problem(n_prompt: int, max_context: int) -> str:
    """Refuse a tokenized prompt that is empty or leaves no room for an answer."""
    if n_prompt <= 0:
        return 'the prompt has no tokens: nothing to answer'
    if n_prompt >= max_context:
        return (
            f"prompt has {n_prompt} tokens; the model's context is "
            f'{max_context} (no room to answer)'
        )
    return ''


def goal_problem(
    prompt: str,
    system_prompt: str = '',
    *,
    max_context: int = 0,
    budget_s: Optional[float] = None,
    deadline_in_s: Optional[float] = None,
    overrun: str = 'kill',
    json_schema: str = '',
    grammar: str = '',
    min_quality: float = -1.0,
    max_alpha: float = -1.0,
    max_new_tokens: int = 0,
) -> str:
    """
    Return why a goal cannot be served, before it is tokenized ('' if it can).

    ``budget_s`` None skips the time rules (a caller holding an absolute deadline checks it);
    ``overrun`` is the resolved policy (the goal's, or the server default); ``max_new_tokens``
    the resolved length (0: not checked). After tokenizing, ``tokens_problem`` is the last rule.
    """
    return (
        prompt_problem(prompt, system_prompt, max_context)
        or (time_problem(budget_s, deadline_in_s) if budget_s is not None else '')
        or overrun_problem(overrun)
        or structure_problem(json_schema, grammar)
        or quality_problem(min_quality, max_alpha)
        or length_problem(max_new_tokens, max_context)
    )


__all__ = [
    'MAX_BUDGET_S',
    'MAX_CHARS_PER_TOKEN',
    'goal_problem',
    'length_problem',
    'overrun_problem',
    'prompt_problem',
    'quality_problem',
    'structure_problem',
    'time_problem',
    'tokens_problem',
]
