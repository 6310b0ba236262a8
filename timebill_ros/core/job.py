"""
A request as a caller builds it, and what the pipeline answers before and around it.

``Job`` is what the generator node, ``timebill generate``, replay and the sweep hand to
``core.pipeline.Pipeline``; ``BudgetEstimate`` and ``PrimeResult`` are what they read back.
Kept apart from the pipeline so the length sources (``core.lengths``) and the callers need not
import the queue and its threads to name a job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
import threading
from typing import Any, Callable, List, Optional

from .budget import BudgetVerdict
from .quality import QualityLimit
from .scheduler import Admission


def answer_cap(n_max: int, max_new_tokens: int, n_prompt: int, max_context: int) -> int:
    """Longest answer possible: N_max, the request's max_new_tokens and the context all cap it."""
    return max(1, min(int(n_max), int(max_new_tokens), max(int(max_context) - int(n_prompt), 1)))


@dataclass(eq=False)
class Job:
    """One request. ``deadline`` and ``accepted_at`` are on the pipeline's clock."""

    request_id: str
    input_ids: List[int]
    deadline: float = math.inf
    max_new_tokens: int = 0  # 0: the config's default
    overrun: str = ''  # '' = config default; kill | truncate | close | skip-next
    prompt: str = ''
    system_prompt: str = ''
    accepted_at: Optional[float] = None
    alpha: Optional[float] = None  # a fixed eviction ratio; None: the solver's (TimeBill)
    k: Optional[float] = None  # pessimism; None: the config's
    replan: bool = True  # re-plan during decode when behind (never under skip-next)
    min_quality: float = -1.0  # expected-accuracy floor: -1 the config's default, 0 none
    max_alpha: float = -1.0  # most eviction the goal allows: -1 no cap beyond the floor
    cancel: threading.Event = field(default_factory=threading.Event)
    on_stage: Optional[Callable[['Job', str], None]] = None  # queued | prefill | decoding
    on_token: Optional[Callable[[int, int, str], None]] = None  # (step, token id, text so far)
    tokens: int = 0  # tokens so far (feedback)
    tokens_at_cancel: Optional[int] = None
    alpha_used: float = 0.0
    n_hat: int = 0
    cached: int = 0  # prompt tokens the prefix cache holds for it (pinned from submit on)
    lease: Optional[Any] = None  # the pin (core.prefix_cache.Lease)
    json_schema: str = ''  # the answer must validate against this JSON schema (text)
    grammar: str = ''  # or match this Lark grammar
    compiled: Optional[Any] = None  # either, compiled at submit (core.structured.Compiled)

    @property
    def n_prompt(self) -> int:
        return len(self.input_ids)

    @property
    def close_tokens(self) -> int:
        """Return the steps a close may need; the α plan and the WCET count them (0: no close)."""
        if self.overrun != 'close' or self.compiled is None:
            return 0
        return self.compiled.close_tokens


@dataclass
class BudgetEstimate:
    """What the pipeline would do with a budget, asked before sending the goal."""

    verdict: BudgetVerdict
    admission: Admission
    guaranteed: bool  # the worst case fits even if every job ahead runs to its deadline
    n_cap: int
    reason: str
    limit: Optional[QualityLimit] = None  # the eviction the goal's quality floor allows
    expected_quality: float = -1.0  # measured accuracy at the verdict's α (-1: no curve)
    quality_refusal: str = ''  # non-empty: the goal would be refused for its quality floor
    cached_tokens: int = 0  # prompt tokens the prefix cache holds now
    prefill_saved_s: float = 0.0  # the prefill seconds that saves, by the time model


@dataclass
class PrimeResult:
    """What priming a standing context did."""

    prime_id: str
    ok: bool
    reason: str
    context_tokens: int = 0  # tokens of the context (chat template's head included)
    cached_tokens: int = 0  # of them, held in the prefix cache now (whole blocks)
    seconds: float = 0.0  # model time spent priming (0: it was cached already)
    fit: bool = False  # every whole block fits the memory bound


__all__ = ['answer_cap', 'BudgetEstimate', 'Job', 'PrimeResult']
