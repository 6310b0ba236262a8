"""
What the server decides about a goal from the generator's heartbeat, before forwarding it.

The heartbeat carries the time model the generator plans with. From it the server refuses a goal
that cannot finish even alone (``hopeless``: saves two round trips through loaded executors)
and knows how long past the deadline an answer may still come (``grace_s``). The generator,
which holds the queue and the prefix cache, decides everything else.
"""

from __future__ import annotations

from timebill_ros.core.scheduler import admission, answer_grace_s
from timebill_ros.core.time_estimator import ExecutionTimeModel


def grace_s(beat, cfg, n_prompt: int, max_new: int, overrun: str) -> float:
    """Return how long past a deadline the generator's answer may take, by its time model."""
    known = beat is not None and beat.time_model
    model = ExecutionTimeModel(*beat.time_model) if known else None
    chunk = (cfg.prefill_chunk if cfg is not None else 0) or 256
    return answer_grace_s(model, chunk, n_prompt, max_new, overrun)


def hopeless(beat, cfg, now: float, n_prompt: int, deadline: float) -> str:
    """
    Say why a goal cannot finish even alone at α_max, by the generator's own time model.

    The generator would refuse it too (its check also counts the goals ahead); answering
    here saves the refusal two round trips through loaded executors. '' when it may fit or
    the generator's model is not known (then the generator decides). ``beat`` is a recent
    heartbeat (the caller's ``Fleet.fresh``).

    The server does not know what the generator's prefix cache holds, so this is a true
    lower bound only in the best case: every prompt token but the last cached
    (``cached = n_prompt - 1``), and also nothing cached, in case the time model prices
    copying cached tokens above computing them. A goal is refused here only when it cannot
    finish either way; the generator, which knows the cache, decides exactly.
    """
    if beat is None or not beat.time_model or cfg is None:
        return ''
    model = ExecutionTimeModel(*beat.time_model)
    best = max(n_prompt - 1, 0)
    verdicts = [
        admission(model, now, deadline, n_prompt, [], None, cfg.alpha_max, cached=c)
        for c in (0, best)
    ]
    if any(v.admit for v in verdicts):
        return ''
    cold, warm = verdicts
    if not best:
        return cold.reason
    return (
        f'{cold.reason}; even with {best} of its {n_prompt} tokens cached it would need '
        f'{warm.own_s:.3f} s'
    )
