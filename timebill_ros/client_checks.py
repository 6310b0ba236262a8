"""
What the typed client refuses before sending: values a ROS message cannot carry as given.

A ``Duration`` has no NaN or infinity and a ROS string ends at a NUL byte; the server cannot
see what was lost, so these are refused here with the reason. Every other rule is the server's
(``core.goal_rules``), which answers with the same words for every client.
"""

from __future__ import annotations

import json
import math
from typing import Optional, Tuple


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
