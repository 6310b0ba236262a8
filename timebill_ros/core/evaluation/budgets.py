"""
Time budgets for the sweep, per prompt group: over the window where decoding decides.

Budgets where every policy completes, or none can, do not tell policies apart; these rules put
the budget axis where they differ, from the timing profile or from a measured pass.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from .runs import group_of
from .tasks import Task


def choose_budgets(
    time_model,
    tasks: Sequence[Task],
    count: int,
    alpha_max: float = 0.95,
    n_hat: Optional[Callable[[Task], float]] = None,
    cached: Optional[Callable[[Task], int]] = None,
    answer_tokens: Optional[Callable[[Task], int]] = None,
) -> Dict[str, List[float]]:
    """
    Per length group, budgets over the window where decoding decides, from the profile.

    Without ``answer_tokens`` (the retrieval groups, as before): from 90 % of the shortest
    predicted prefill (nothing can finish) to 1.5 × the slowest predicted vanilla run of
    max_new_tokens. With it: from the slowest prefill (warm: ``cached`` tokens are not
    computed) plus four decode steps — every prefill is done, a few tokens fit — to 1.2 × the
    slowest predicted vanilla run of ``answer_tokens`` (a typical answer completes). Evenly
    spaced.
    """
    groups: Dict[str, List[Task]] = {}
    for t in tasks:
        groups.setdefault(group_of(t), []).append(t)
    out = {}
    for g, ts in groups.items():
        if answer_tokens is None:
            lo = 0.9 * min(time_model.prefill_s(t.n_tokens) for t in ts)
            hi = 1.5 * max(
                time_model.prefill_s(t.n_tokens)
                + time_model.decode_s(t.n_tokens, 0.0, t.max_new_tokens)
                for t in ts
            )
        else:
            def pre(t: Task) -> float:
                return time_model.prefill_s(t.n_tokens, cached(t) if cached else 0)

            lo = max(pre(t) + time_model.decode_s(t.n_tokens, 0.0, 4) for t in ts)
            hi = 1.2 * max(
                pre(t) + time_model.decode_s(t.n_tokens, 0.0, min(answer_tokens(t),
                                                                  t.max_new_tokens))
                for t in ts
            )
            hi = max(hi, 1.5 * lo)
        if count == 1:
            out[g] = [round(hi, 2)]
        else:
            out[g] = [round(lo + (hi - lo) * i / (count - 1), 2) for i in range(count)]
    return out


def measured_budgets(
    tasks: Sequence[Task], rows: Sequence[dict], count: int
) -> Dict[str, List[float]]:
    """
    Per group, budgets over the decode window as measured (the ``answerable`` pass).

    From the slowest prefill plus four decode steps (a few tokens fit) to 1.1 × the slowest
    vanilla run (every answer completes), evenly spaced. Measured, because a profile's warm
    prefill and a short answer's decode are where its prediction is least certain, and the
    window is a second wide.
    """
    by_id = {r['task_id']: r for r in rows}
    groups: Dict[str, List[dict]] = {}
    for t in tasks:
        if t.id in by_id:
            groups.setdefault(group_of(t), []).append(by_id[t.id])
    out = {}
    for g, rs in groups.items():
        lo = max(r['prefill_s'] + 4 * r['step_s'] for r in rs)
        hi = max(1.1 * max(r['finish_s'] for r in rs), 1.2 * lo)
        n = max(count, 1)
        out[g] = [round(lo + (hi - lo) * i / max(n - 1, 1), 2) for i in range(n)]
    return out
