"""
Which generator of several should serve a goal: the deadline first, then quality (ROS-free).

Serving routers spread requests over replicas by load or by KV-cache affinity; none knows a
deadline. Here each generator is seen through what its heartbeat says -- the time model it plans
with (online scale applied), the seconds of work it holds, the standing contexts it has primed --
and the goal is ranked on every one of them by TimeBill's own rule: the smallest eviction ratio
that still meets the deadline there (the highest expected answer quality), with the goal's
worst-case length (``max_new_tokens``: N̂ is predicted in parallel and not known yet). Ties go
to the generator that already holds the goal's context (prefill saved), then to the least busy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import List, Sequence

from .budget import solve_alpha
from .time_estimator import ExecutionTimeModel


@dataclass
class Member:
    """One generator as the dispatcher sees it (from its last heartbeat)."""

    name: str
    model: ExecutionTimeModel
    busy_s: float = 0.0  # work it holds (queued + running), seconds by its own model
    queued: int = 0
    holds_context: bool = False  # it has primed (or recently served) this goal's context
    cached_tokens: int = 0  # prompt tokens it would take from its prefix cache (if known)
    inflight: int = 0  # goals this dispatcher has sent it and not seen end (fresher than a beat)
    active: bool = True  # its last beat said active (one activated a moment ago may not yet)


@dataclass
class Choice:
    """How one member would serve the goal."""

    name: str
    feasible: bool  # the goal's worst case fits behind its work at some α ≤ the cap
    alpha: float  # the eviction it would need (the cap when infeasible)
    start_s: float  # when it could start (seconds from now)
    end_s: float  # its worst-case end (seconds from now) at that α
    holds_context: bool = False
    inflight: int = 0
    active: bool = True
    reasons: List[str] = field(default_factory=list)

    def sort_key(self):
        """Order: active; feasible; least eviction; context; earliest end; fewest in flight."""
        return (not self.active, not self.feasible, round(self.alpha, 3), not self.holds_context,
                round(self.end_s, 3), self.inflight, self.name)


def rank(
    members: Sequence[Member],
    left_s: float,
    n_prompt: int,
    max_new: int,
    alpha_cap: float,
) -> List[Choice]:
    """
    Rank ``members`` for a goal with ``left_s`` seconds to its deadline, best first.

    ``max_new``: the most tokens it may generate (its worst case, steps at k = 1);
    ``alpha_cap``: the most eviction it allows (its quality floor, or α_max).
    """
    out = []
    for m in members:
        start = max(float(m.busy_s), 0.0)
        budget = left_s - start
        cached = min(int(m.cached_tokens), max(n_prompt - 1, 0))
        if budget <= 0:
            out.append(Choice(m.name, False, alpha_cap, start, math.inf, m.holds_context,
                              m.inflight, m.active,
                              [f'{m.name}: busy {start:.2f} s, past the deadline']))
            continue
        v = solve_alpha(
            m.model,
            budget,
            n_prompt,
            max(int(max_new), 1),
            k=1.0,
            n_max=max(int(max_new), 1),
            alpha_max=alpha_cap,
            cached=cached,
        )
        out.append(
            Choice(
                m.name,
                v.status == 'met',
                float(v.alpha),
                start,
                start + float(v.total_s),
                m.holds_context,
                m.inflight,
                m.active,
                [f'{m.name}: {v.status} at α={v.alpha:.2f} after {start:.2f} s of its work'],
            )
        )
    return sorted(out, key=Choice.sort_key)
