"""
How a request ended: one record for the node's action result, the CLI and the benchmarks.

Field names match ``TimedInference.Result`` so the nodes copy them by name; times on the
timeline are seconds since the request was accepted (-1: that stage never happened).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Any, List, Optional

# The one table of status names, in the order of the action's STATUS_* constants.
STATUS_NAMES = (
    'succeeded',
    'truncated',
    'killed',
    'deadline_missed',
    'canceled',
    'aborted',
    'rejected',
)
ANSWERED = ('succeeded', 'truncated')  # statuses that carry an answer for the planner


@dataclass
class Outcome:
    status: str
    reason: str = ''
    text: str = ''
    completed: bool = False
    deadline_met: bool = False
    valid: bool = False  # the text is a whole answer: matches the goal's schema, or completed
    structured: bool = False  # the goal had a JSON schema or grammar
    alpha: float = 0.0
    expected_quality: float = -1.0  # the press's measured accuracy at ``alpha`` (-1: no curve)
    alpha_limit: float = -1.0  # the most eviction the goal's quality floor allowed
    predicted_length: int = 0
    estimate_fallback: bool = False
    wcet_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed
    prefill_saved_s: float = 0.0  # prefill seconds the cache saved, by the time model
    tokens_generated: int = 0
    kv_before: int = 0
    kv_after: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    prefill_start_s: float = -1.0
    prefill_end_s: float = -1.0
    estimate_received_s: float = -1.0
    decode_start_s: float = -1.0
    finished_at_s: float = 0.0
    verdict: Optional[Any] = None  # the solver's BudgetVerdict, when it chose α
    replans: List[Any] = field(default_factory=list)
    result: Optional[Any] = None  # the engine's GenerationResult (token ids and times)

    @property
    def status_code(self) -> int:
        return STATUS_NAMES.index(self.status)

    def summary(self) -> dict:
        """Return the plain fields (for JSON reports)."""
        skip = ('verdict', 'replans', 'result')
        return {k: v for k, v in self.__dict__.items() if k not in skip}


def classify(
    stop_reason: str, completed: bool, finished: float, deadline: float, overrun: str, tokens: int
) -> tuple:
    """(status, reason) of a decode that ended: the one table of how runs end."""
    slack = deadline - finished
    if stop_reason == 'cancelled':
        return 'canceled', f'canceled: stopped after {tokens} token(s)'
    if completed and slack >= 0:
        when = '' if math.isinf(deadline) else f' {slack:.3f} s before the deadline'
        return 'succeeded', f'finished ({stop_reason}){when}'
    if completed:
        return 'deadline_missed', f'finished ({stop_reason}) {-slack:.3f} s after the deadline'
    if stop_reason == 'closed':
        return 'truncated', (
            f'closed early before the deadline: a valid, shorter answer of {tokens} tokens '
            f'(overrun policy close)'
        )
    if stop_reason == 'max_new_tokens':
        return ('truncated' if overrun in ('truncate', 'close') else 'killed'), (
            f'the answer reached max_new_tokens ({tokens}) before its schema was complete'
        )
    if overrun in ('truncate', 'close'):
        return 'truncated', f'truncated at the deadline after {tokens} tokens'
    return 'killed', f'killed at the deadline after {tokens} tokens (overrun policy kill)'
