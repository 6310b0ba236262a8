"""
What the budget × policy sweep measures: one run per decode, one result per prompt.

Kept apart from the measuring (``sweep``) and the aggregating (``aggregate``) so both read the
same records without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import json
import statistics
from typing import Dict, List, Optional, Sequence

from .policies import Policy, standard_policies
from .tasks import Task


@dataclass
class Run:
    """One decode from a prompt's prefill at one kept-KV length, to EOS or max_new_tokens."""

    alpha: float
    kv_after: int
    evict_s: float
    decode_step_s: List[float]
    token_ids: List[int]
    token_offsets_s: List[float]  # when each token was ready, seconds after decoding began
    stop_reason: str
    text: str
    score: float
    valid: Optional[bool] = None  # structured: the whole answer parses and matches
    status: str = ''  # runs made at a deadline (close): the pipeline's status there
    closed_at: Optional[int] = None  # close: tokens when closing began

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def summary(self) -> dict:
        steps = sorted(self.decode_step_s)
        return {
            'alpha': self.alpha,
            'kv_after': self.kv_after,
            'tokens': self.n_tokens,
            'stop_reason': self.stop_reason,
            'score': self.score,
            'valid': self.valid,
            'status': self.status,
            'closed_at': self.closed_at,
            'evict_s': self.evict_s,
            'decode_s': sum(steps),
            'step_s_median': statistics.median(steps) if steps else 0.0,
            'step_s_p10': steps[len(steps) // 10] if steps else 0.0,
            'step_s_p90': steps[(len(steps) * 9) // 10] if steps else 0.0,
            'text': self.text,
        }


@dataclass
class PromptResult:
    task: Task
    input_ids: List[int]
    n_prompt: int
    prefill_s: float
    n_hat: float
    predict_s: float
    predictor_source: str
    runs: Dict[int, Run] = field(default_factory=dict)  # kept-KV length -> run
    timebill_alpha: Dict[str, float] = field(default_factory=dict)  # "k|budget" -> alpha
    # "k|budget" -> run that re-planned to that deadline
    replan_runs: Dict[str, Run] = field(default_factory=dict)
    close_runs: Dict[str, Run] = field(default_factory=dict)  # "budget" -> run closed at it
    verdicts: Dict[str, dict] = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens its prefill took from the prefix cache


@dataclass
class SweepConfig:
    budgets: Dict[str, List[float]]  # group -> budgets (s)
    policies: List[Policy] = field(default_factory=standard_policies)
    ks: Sequence[float] = tuple(range(1, 9))
    # group -> budget for the k sweep (default: middle)
    k_budget: Dict[str, float] = field(default_factory=dict)
    alpha_max: float = 0.95
    n_max: int = 8192


def group_of(task: Task) -> str:
    """Tasks are compared within a group (workload and prompt length): one budget axis each."""
    size = str(task.meta.get('target_tokens', task.n_tokens))
    return f'robot-{size}' if task.kind.startswith('robot') else size


def run_key(pol: Policy, budget_s: float) -> str:
    """Key of a run made for one policy at one budget (re-planned or closed at its deadline)."""
    return f'{pol.k:g}|{budget_s:.6f}'


def schema_of(task: Task) -> str:
    """Return the JSON schema a task's answer must match ('' for free text)."""
    return str(task.meta.get('json_schema') or '')


def json_valid(text: str) -> bool:
    """Tell whether ``text`` parses as JSON (the grammar guarantees the rest of the schema)."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return bool(text.strip())
