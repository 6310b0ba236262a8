"""
What one generation passes through: the request, the state after prefill, the result.

Shared by the engine's stages (prefill, evict, decode) and by the pipeline that runs them; plain
data, no model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import threading
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .structured import Compiled


@dataclass
class GenerationRequest:
    prompt: Optional[str] = None
    input_ids: Optional[Sequence[int]] = None
    system_prompt: Optional[str] = None
    max_new_tokens: int = 512
    deadline: Optional[float] = None  # absolute, time.monotonic() seconds
    alpha: Optional[float] = None
    overrun: str = 'kill'
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    on_token: Optional[Callable[[int, int, str], None]] = None  # (step, token_id, text_so_far)
    cancel: Optional[threading.Event] = None
    json_schema: str = ''  # the answer must validate against this JSON schema (text)
    grammar: str = ''  # or match this Lark grammar
    compiled: Optional[Compiled] = None  # either, compiled already (Engine.compile_grammar)


@dataclass
class PrefillState:
    """Everything decode needs after prefill; one prefill can be cloned for several policies."""

    input_ids: List[int]
    cache: object
    logits: torch.Tensor  # last position's logits, [vocab]
    scores: Dict[int, torch.Tensor]
    started_at: float
    prefill_s: float
    kv_before: int
    kv_after: int = 0
    alpha: float = 0.0
    evict_s: float = 0.0
    evicted: bool = False
    chunks: int = 1  # model calls the prefill took
    cached_tokens: int = 0  # prompt tokens copied from the prefix cache instead of computed

    @property
    def n_prompt(self) -> int:
        return len(self.input_ids)


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    completed: bool
    deadline_met: bool
    stop_reason: str  # eos | max_new_tokens | deadline | cancelled | closed (a close ended it)
    alpha: float
    kv_before: int
    kv_after: int
    tokens_generated: int
    prefill_s: float
    evict_s: float
    decode_step_s: List[float]
    total_s: float
    started_at: float
    finished_at: float
    token_times: List[float] = field(default_factory=list)  # monotonic time each token was ready
    valid: Optional[bool] = None  # a structured answer's text is whole and matches (None: free)
    closed_at: Optional[int] = None  # tokens generated when closing began (overrun close)
    mask_s: float = 0.0  # time spent masking logits with the grammar

    @property
    def decode_s(self) -> float:
        return float(sum(self.decode_step_s))
