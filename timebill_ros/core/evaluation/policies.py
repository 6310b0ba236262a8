"""
Eviction policies and overrun strategies compared by the benchmark (the paper's Fig. 7).

Policies choose the KV eviction ratio α for one request:
- ``vanilla``      α = 0, killed at the deadline;
- ``alpha=<a>``    a fixed α (the paper's fixed-ratio baselines);
- ``truncate``     α = 0, stopped at the deadline and the partial text kept
                 (``generate(max_time=…)``);
- ``close``        α = 0, overrun policy close: near the deadline a structured answer is
                 closed (open strings, arrays, objects) into a valid shorter one;
- ``timebill``     α from the solver: smallest α whose WCET (k·N̂ tokens) fits the budget.

Overrun strategies decide what a late job does to a sequence of jobs released every T seconds
(each job's deadline is the next release, as in periodic real-time tasks):
- ``kill``       the late job is stopped at its deadline: no answer (score 0); the next job
                 starts on time.
- ``skip-next``  the late job runs to the end and delivers its answer late (scored, but not
                 counted as completed); every job released while it runs is skipped (score 0).
A job is *completed* when it finished (EOS or max_new_tokens) by its deadline, under both.

Each run is measured once and judged for every budget from its token times, with the
pipeline's own rules and status names (``pipeline.classify``: succeeded, truncated, killed,
deadline_missed; a goal skip-next skips is rejected, as the pipeline does). Runs whose outcome
depends on the deadline itself (TimeBill's α, re-planning, close) are made at that deadline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

OVERRUNS = ('kill', 'skip-next')
FIXED_ALPHAS = (0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class Policy:
    name: str
    kind: str  # fixed | truncate | close | timebill
    alpha: float = 0.0  # fixed and truncate
    k: float = 5.0  # timebill
    alpha_max: float = 0.95  # timebill
    replan: bool = False  # timebill: re-solve during decode and evict more when behind

    @property
    def budget_dependent(self) -> bool:
        """Tell whether a run depends on the budget (TimeBill's α, close): one run per budget."""
        return self.kind in ('timebill', 'close')

    @property
    def overruns(self) -> tuple:
        """List the overrun strategies; truncate and close are their own (at the deadline)."""
        return (self.kind,) if self.kind in ('truncate', 'close') else OVERRUNS

    def label(self, overrun: str = '') -> str:
        own = not overrun or overrun in ('truncate', 'close')
        return self.name if own else f'{self.name}/{overrun}'


def vanilla() -> Policy:
    return Policy('vanilla', 'fixed', 0.0)


def fixed(alpha: float) -> Policy:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f'alpha must be in [0, 1), got {alpha}')
    return vanilla() if alpha == 0 else Policy(f'alpha={alpha:g}', 'fixed', float(alpha))


def truncate() -> Policy:
    return Policy('truncate', 'truncate', 0.0)


def close() -> Policy:
    """Return α = 0 with overrun close: a structured answer is closed valid at the deadline."""
    return Policy('close', 'close', 0.0)


def timebill(k: float = 5.0, alpha_max: float = 0.95) -> Policy:
    if k < 1:
        raise ValueError(f'pessimism k must be >= 1, got {k}')
    name = 'timebill' if (k, alpha_max) == (5.0, 0.95) else f'timebill(k={k:g})'
    return Policy(name, 'timebill', 0.0, float(k), float(alpha_max))


def timebill_replan(k: float = 5.0, alpha_max: float = 0.95) -> Policy:
    """
    Make TimeBill plus re-planning during decode, against the paper's one-shot eviction.

    It evicts more when steps run slow or the answer outgrows N̂ (``core/replan.py``).
    """
    return dataclasses.replace(
        timebill(k, alpha_max), name=timebill(k, alpha_max).name + '+replan', replan=True
    )


def standard_policies(
    k: float = 5.0, alpha_max: float = 0.95, alphas: Sequence[float] = FIXED_ALPHAS
) -> List[Policy]:
    """
    Return the issue's line-up of policies.

    Vanilla, fixed α ∈ {0.25, 0.5, 0.75, 0.95}, truncate, close, TimeBill, and TimeBill with
    re-planning during decode.
    """
    return [
        vanilla(),
        *(fixed(a) for a in alphas),
        truncate(),
        close(),
        timebill(k, alpha_max),
        timebill_replan(k, alpha_max),
    ]


def parse_policy(text: str) -> Policy:
    """``vanilla`` | ``truncate`` | ``timebill`` | ``timebill:k=3`` | ``alpha=0.5`` | ``0.5``."""
    t = text.strip().lower()
    if t in ('vanilla', 'none'):
        return vanilla()
    if t == 'truncate':
        return truncate()
    if t == 'close':
        return close()
    if t == 'timebill+replan':
        return timebill_replan()
    if t.startswith('timebill'):
        k = 5.0
        if ':' in t:
            key, _, val = t.split(':', 1)[1].partition('=')
            if key.strip() != 'k':
                raise ValueError(f'unknown timebill option {key!r}; use timebill:k=<number>')
            k = float(val)
        return timebill(k)
    return fixed(float(t.split('=', 1)[1] if t.startswith('alpha') else t))


# ------------------------------------------------------------------------------ job sequences
@dataclass
class Trace:
    """
    One request's measured run under one policy, to the end (seconds from its release).

    A run is measured once and judged for every budget from its token times; the status each
    budget gives is the one the generator's pipeline would report (``pipeline.classify``), so
    the benchmark and the node share one set of rules and status names.
    """

    task_id: str
    finish_s: float  # when its last token was ready (prefill + eviction + decode)
    completed: bool  # stopped at EOS or max_new_tokens with a whole answer (not cut short)
    score: float  # score of the full answer
    first_token_s: float = 0.0
    token_times_s: List[float] = field(default_factory=list)
    partial_score: Optional[Callable[[float], float]] = (
        None  # score of the text ready by t (truncate)
    )
    stop_reason: str = ''  # the engine's: eos | max_new_tokens | deadline | closed
    valid: Optional[bool] = None  # structured answers: the whole answer matches its schema
    partial_valid: Optional[Callable[[float], bool]] = None  # ... the text ready by t
    status: str = ''  # a run judged at its own deadline (close): the pipeline's status


@dataclass
class JobOutcome:
    task_id: str
    release_s: float
    status: str  # the pipeline's: succeeded | truncated | killed | deadline_missed | rejected
    completed: bool  # finished by its deadline
    score: float
    finish_s: float = math.nan  # relative to release; NaN if never started
    late_s: float = 0.0  # how far past the deadline it ran / would have run
    valid: Optional[bool] = None  # structured: the answer delivered parses and matches
    reason: str = ''

    def to_dict(self) -> dict:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in self.__dict__.items()
        }


def _judge(t: Trace, release: float, budget_s: float, overrun: str) -> JobOutcome:
    """Judge one trace at one deadline by the pipeline's rules (``classify``)."""
    from ..outcome import classify

    on_time = t.completed and t.finish_s <= budget_s
    if on_time or overrun == 'skip-next':  # skip-next runs on to the end
        status, reason = classify(
            t.stop_reason or ('eos' if t.completed else 'deadline'),
            t.completed,
            t.finish_s,
            budget_s,
            overrun,
            len(t.token_times_s),
        )
        answered = status in ('succeeded', 'deadline_missed')
        return JobOutcome(
            t.task_id, release, status, on_time, t.score if answered else 0.0, t.finish_s,
            max(t.finish_s - budget_s, 0.0), t.valid if answered else None, reason,
        )
    ready = [x for x in t.token_times_s if x <= budget_s]
    if overrun == 'truncate' and ready:
        status, reason = classify('deadline', False, budget_s, budget_s, 'truncate', len(ready))
        return JobOutcome(
            t.task_id, release, status, False,
            t.partial_score(budget_s) if t.partial_score else 0.0, ready[-1],
            t.finish_s - budget_s, t.partial_valid(budget_s) if t.partial_valid else None,
            reason,
        )
    status, reason = classify('deadline', False, budget_s, budget_s, 'kill', len(ready))
    return JobOutcome(
        t.task_id, release, status, False, 0.0, budget_s, t.finish_s - budget_s, None, reason
    )


def run_kill(traces: Sequence[Trace], budget_s: float) -> List[JobOutcome]:
    """Every job starts at its release; a late one is stopped at its deadline and scores 0."""
    return [_judge(t, i * budget_s, budget_s, 'kill') for i, t in enumerate(traces)]


def run_skip_next(traces: Sequence[Trace], budget_s: float) -> List[JobOutcome]:
    """Let a late job run on and score it; jobs released before it ends are rejected unrun."""
    out: List[JobOutcome] = []
    busy_until = 0.0
    for i, t in enumerate(traces):
        release = i * budget_s
        if release < busy_until - 1e-12:  # the pipeline's skip-next drains the queue
            out.append(JobOutcome(
                t.task_id, release, 'rejected', False, 0.0,
                reason='skipped: the goal before it overran its deadline (overrun skip-next)',
            ))
            continue
        busy_until = release + t.finish_s
        out.append(_judge(t, release, budget_s, 'skip-next'))
    return out


def run_truncate(traces: Sequence[Trace], budget_s: float) -> List[JobOutcome]:
    """Stop decoding at the deadline; whatever text is ready is the answer (none: killed)."""
    return [_judge(t, i * budget_s, budget_s, 'truncate') for i, t in enumerate(traces)]


def run_own_deadline(traces: Sequence[Trace], budget_s: float) -> List[JobOutcome]:
    """Take runs made at this very deadline (overrun close) with the status the pipeline gave."""
    out = []
    for i, t in enumerate(traces):
        answered = t.status in ('succeeded', 'truncated', 'deadline_missed')
        out.append(JobOutcome(
            t.task_id, i * budget_s, t.status, t.status == 'succeeded',
            t.score if answered else 0.0, t.finish_s, max(t.finish_s - budget_s, 0.0),
            t.valid if answered else None,
        ))
    return out


RUNNERS = {
    'kill': run_kill,
    'skip-next': run_skip_next,
    'truncate': run_truncate,
    'close': run_own_deadline,
}


def simulate(traces: Sequence[Trace], budget_s: float, overrun: str) -> List[JobOutcome]:
    try:
        return RUNNERS[overrun](traces, budget_s)
    except KeyError:
        raise ValueError(
            f'unknown overrun strategy {overrun!r}; use one of {sorted(RUNNERS)}'
        ) from None


# ------------------------------------------------------------------------ confidence intervals
CI_RESAMPLES = 2000
CI_LEVEL = 0.95


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable = np.mean,
    n_resamples: int = CI_RESAMPLES,
    level: float = CI_LEVEL,
    seed: int = 0,
) -> Tuple[float, float]:
    """
    Percentile bootstrap interval of ``stat`` over jobs: how much a number owes to its prompts.

    ``stat`` is called as ``stat(matrix, axis=1)`` on all resamples at once (numpy reductions
    work). Under Kill/Skip-Next the jobs of one row are not fully independent (a late job makes
    Skip-Next skip the next ones), so resampling jobs is the usual approximation, not exact.
    The fixed seed keeps a report reproducible.
    """
    v = np.asarray(values, dtype=float).ravel()
    n = v.size
    if n == 0:
        return (math.nan, math.nan)
    if n == 1:
        x = float(stat(v[None, :], axis=1)[0])
        return (x, x)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    boot = stat(v[idx], axis=1)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(boot, [tail, 1.0 - tail])
    return (float(lo), float(hi))


def outcome_cis(completed: Sequence[float], scores: Sequence[float], seed: int = 0) -> dict:
    """Return the CIs of completion rate and average score (also for outcomes read from JSON)."""
    return {
        'completion_ci': list(bootstrap_ci(completed, seed=seed)),
        'score_ci': list(bootstrap_ci(scores, seed=seed)),
    }


def summarize(outcomes: Sequence[JobOutcome]) -> dict:
    """
    Score jobs on the paper's two axes: completion rate and average score, with bootstrap CIs.

    Plus how late the late ones were.
    """
    n = len(outcomes)
    late = sorted(o.late_s for o in outcomes if o.late_s > 0)
    counts = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    answered = [o for o in outcomes if o.valid is not None]
    return {
        'jobs': n,
        # structured answers: of the answers delivered, how many parse and match the schema
        'valid_rate': (
            sum(bool(o.valid) for o in answered) / len(answered) if answered else math.nan
        ),
        'answered': len(answered),
        'completion_rate': sum(o.completed for o in outcomes) / n if n else math.nan,
        'avg_score': sum(o.score for o in outcomes) / n if n else math.nan,
        **outcome_cis([o.completed for o in outcomes], [o.score for o in outcomes]),
        'statuses': counts,
        'late_count': len(late),
        'late_s_median': late[len(late) // 2] if late else 0.0,
        'late_s_max': late[-1] if late else 0.0,
    }
