"""
Eviction policies and overrun strategies compared by the benchmark (the paper's Fig. 7).

Policies choose the KV eviction ratio α for one request:
- ``vanilla``      α = 0, killed at the deadline;
- ``alpha=<a>``    a fixed α (the paper's fixed-ratio baselines);
- ``truncate``     α = 0, stopped at the deadline and the partial text kept
                 (``generate(max_time=…)``);
- ``timebill``     α from the solver: smallest α whose WCET (k·N̂ tokens) fits the budget.

Overrun strategies decide what a late job does to a sequence of jobs released every T seconds
(each job's deadline is the next release, as in periodic real-time tasks):
- ``kill``       the late job is stopped at its deadline: no answer (score 0); the next job
                 starts on time.
- ``skip-next``  the late job runs to the end and delivers its answer late (scored, but not
                 counted as completed); every job released while it runs is skipped (score 0).
A job is *completed* when it finished (EOS or max_new_tokens) by its deadline, under both.
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
    kind: str  # fixed | truncate | timebill
    alpha: float = 0.0  # fixed and truncate
    k: float = 5.0  # timebill
    alpha_max: float = 0.95  # timebill
    replan: bool = False  # timebill: re-solve during decode and evict more when behind

    @property
    def budget_dependent(self) -> bool:
        """Only TimeBill's α depends on the budget; the others run once per prompt."""
        return self.kind == 'timebill'

    @property
    def overruns(self) -> tuple:
        """List the overrun strategies; truncation has none: it stops at the deadline."""
        return ('truncate',) if self.kind == 'truncate' else OVERRUNS

    def label(self, overrun: str = '') -> str:
        return self.name if not overrun or overrun == 'truncate' else f'{self.name}/{overrun}'


def vanilla() -> Policy:
    return Policy('vanilla', 'fixed', 0.0)


def fixed(alpha: float) -> Policy:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f'alpha must be in [0, 1), got {alpha}')
    return vanilla() if alpha == 0 else Policy(f'alpha={alpha:g}', 'fixed', float(alpha))


def truncate() -> Policy:
    return Policy('truncate', 'truncate', 0.0)


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

    Vanilla, fixed α ∈ {0.25, 0.5, 0.75, 0.95}, truncate, TimeBill, and TimeBill with re-planning
    during decode.
    """
    return [
        vanilla(),
        *(fixed(a) for a in alphas),
        truncate(),
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
class Job:
    """One request's run under one policy, measured once to the end (seconds from its release)."""

    task_id: str
    finish_s: float  # when its last token was ready (prefill + eviction + decode)
    completed: bool  # stopped at EOS or max_new_tokens (not cut short)
    score: float  # score of the full answer
    first_token_s: float = 0.0
    token_times_s: List[float] = field(default_factory=list)
    partial_score: Optional[Callable[[float], float]] = (
        None  # score of the text ready by t (truncate)
    )


@dataclass
class JobOutcome:
    task_id: str
    release_s: float
    status: str  # completed | killed | late | skipped | truncated | empty
    completed: bool  # finished by its deadline
    score: float
    finish_s: float = math.nan  # relative to release; NaN if never started
    late_s: float = 0.0  # how far past the deadline it ran / would have run

    def to_dict(self) -> dict:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in self.__dict__.items()
        }


def run_kill(jobs: Sequence[Job], budget_s: float) -> List[JobOutcome]:
    """Every job starts at its release; a late one is stopped at its deadline and scores 0."""
    out = []
    for i, j in enumerate(jobs):
        on_time = j.completed and j.finish_s <= budget_s
        out.append(
            JobOutcome(
                j.task_id,
                i * budget_s,
                'completed' if on_time else 'killed',
                on_time,
                j.score if on_time else 0.0,
                j.finish_s if on_time else budget_s,
                0.0 if on_time else j.finish_s - budget_s,
            )
        )
    return out


def run_skip_next(jobs: Sequence[Job], budget_s: float) -> List[JobOutcome]:
    """Let a late job run on and score it; jobs released before it ends are skipped (score 0)."""
    out: List[JobOutcome] = []
    busy_until = 0.0
    for i, j in enumerate(jobs):
        release = i * budget_s
        if release < busy_until - 1e-12:
            out.append(JobOutcome(j.task_id, release, 'skipped', False, 0.0))
            continue
        on_time = j.completed and j.finish_s <= budget_s
        busy_until = release + j.finish_s
        out.append(
            JobOutcome(
                j.task_id,
                release,
                'completed' if on_time else 'late',
                on_time,
                j.score,
                j.finish_s,
                max(j.finish_s - budget_s, 0.0),
            )
        )
    return out


def run_truncate(jobs: Sequence[Job], budget_s: float) -> List[JobOutcome]:
    """Stop decoding at the deadline; whatever text is ready is the answer."""
    out = []
    for i, j in enumerate(jobs):
        if j.completed and j.finish_s <= budget_s:
            out.append(JobOutcome(j.task_id, i * budget_s, 'completed', True, j.score, j.finish_s))
            continue
        ready = [t for t in j.token_times_s if t <= budget_s]
        if not ready:  # prefill alone ran past the deadline: nothing to show
            out.append(
                JobOutcome(
                    j.task_id, i * budget_s, 'empty', False, 0.0, budget_s, j.finish_s - budget_s
                )
            )
            continue
        score = j.partial_score(budget_s) if j.partial_score else 0.0
        out.append(
            JobOutcome(
                j.task_id,
                i * budget_s,
                'truncated',
                False,
                score,
                ready[-1],
                j.finish_s - budget_s,
            )
        )
    return out


RUNNERS = {'kill': run_kill, 'skip-next': run_skip_next, 'truncate': run_truncate}


def simulate(jobs: Sequence[Job], budget_s: float, overrun: str) -> List[JobOutcome]:
    try:
        return RUNNERS[overrun](jobs, budget_s)
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
    return {
        'jobs': n,
        'completion_rate': sum(o.completed for o in outcomes) / n if n else math.nan,
        'avg_score': sum(o.score for o in outcomes) / n if n else math.nan,
        **outcome_cis([o.completed for o in outcomes], [o.score for o in outcomes]),
        'statuses': counts,
        'late_count': len(late),
        'late_s_median': late[len(late) // 2] if late else 0.0,
        'late_s_max': late[-1] if late else 0.0,
    }
