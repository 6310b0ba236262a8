"""
The budget × policy benchmark, run so that it fits on two CPU cores.

Exact savings (shared/notes/evaluation-cost.md), none of which changes a measured outcome:
- **one prefill per prompt.** Its KV cache and attention scores are the same for every policy
  and budget, so each policy decodes from a copy (``Engine.clone_state``).
- **one decode per (prompt, kept-KV length).** A fixed α does not depend on the budget: the
  run goes to the end with every token's timestamp, and each budget is judged from that
  timeline (Kill: met iff finish ≤ T; truncate: the text ready by T). TimeBill's α does depend
  on T, but two budgets (or two k) that keep the same number of entries are the same
  computation — greedy decoding is deterministic — so runs are shared by kept length.
- **one score per run**, reused for every budget that completes it.

A job's clock starts when its request arrives: prefill, then (TimeBill only) waiting for the
length predictor if it is slower than prefill (it runs beside prefill in the server), the
solver, eviction, and the decode steps — all measured here, not estimated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .policies import Job, Policy, simulate, standard_policies, summarize, timebill
from .scoring import score as score_answer
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
    verdicts: Dict[str, dict] = field(default_factory=dict)


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
    """Tasks are compared within a prompt-length group: one budget axis per group."""
    return str(task.meta.get('target_tokens', task.n_tokens))


# ------------------------------------------------------------------------------ measuring
class Sweeper:
    """Holds the engine, timing model and length predictor; measures one prompt at a time."""

    def __init__(
        self,
        engine,
        time_model,
        predictor,
        cfg: SweepConfig,
        log: Callable[[str], None] = None,
        config=None,
    ):
        from ..config import TimeBillConfig
        from ..pipeline import Pipeline

        self.engine, self.model, self.predictor, self.cfg = engine, time_model, predictor, cfg
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        # the generator node's pipeline, without online learning: every policy sees the same model
        config = (config or TimeBillConfig()).replace(alpha_max=cfg.alpha_max)
        self.pipeline = Pipeline(engine, time_model, config, learn=False)

    def _job(self, res_or_task, **kw):
        from ..pipeline import Job

        task = getattr(res_or_task, 'task', res_or_task)
        return Job(
            request_id=task.id,
            input_ids=list(getattr(res_or_task, 'input_ids', [0])),
            prompt=task.prompt,
            max_new_tokens=task.max_new_tokens,
            min_quality=0.0,  # the paper's TimeBill: any α up to α_max, no quality floor
            **kw,
        )

    # -- one prompt -------------------------------------------------------------------
    def measure(self, task: Task) -> PromptResult:
        from ..eviction import n_keep
        from ..outcome import Outcome

        eng = self.engine
        ids = eng.encode(task.prompt, task.system_prompt or None)
        job = self._job(task, accepted_at=time.monotonic())
        job.input_ids = ids
        # chunked, exactly as the node runs it
        base = self.pipeline.prefill(job, Outcome(status=''))
        t0 = time.monotonic()
        # as the predictor node does: text, N̂ capped below
        pred = self.predictor.predict(task.prompt)
        predict_s = time.monotonic() - t0
        # the server caps N̂ the same way
        n_hat = min(float(pred.n_hat), float(task.max_new_tokens))
        res = PromptResult(
            task=task,
            input_ids=ids,
            n_prompt=len(ids),
            prefill_s=base.prefill_s,
            n_hat=n_hat,
            predict_s=float(getattr(pred, 'latency_s', predict_s) or predict_s),
            predictor_source=str(getattr(pred, 'source', 'model')),
        )

        def run(alpha: float) -> Run:
            keep = n_keep(res.n_prompt, alpha)
            if keep not in res.runs:
                res.runs[keep] = self._decode(base, task, alpha)
            return res.runs[keep]

        for pol in self.cfg.policies:
            if not pol.budget_dependent:
                run(pol.alpha)
        group = group_of(task)
        for pol in self.cfg.policies:
            if pol.budget_dependent:
                for b in self.cfg.budgets[group]:
                    # its run depends on the deadline itself: one real run per budget
                    if pol.replan:
                        res.replan_runs[_key(pol, b)] = self._decode(
                            base,
                            task,
                            self.timebill_alpha(res, b, pol.k, pol.alpha_max),
                            replan=(res, b, pol),
                        )
                    else:
                        run(self.timebill_alpha(res, b, pol.k, pol.alpha_max))
        kb = self.k_budget(group)
        for k in self.cfg.ks:
            run(self.timebill_alpha(res, kb, float(k), self.cfg.alpha_max))
        return res

    def k_budget(self, group: str) -> float:
        if group in self.cfg.k_budget:
            return self.cfg.k_budget[group]
        b = self.cfg.budgets[group]
        return b[len(b) // 2]

    def _decode(self, base, task: Task, alpha: float, replan=None) -> Run:
        """
        Decode to the end through the pipeline's decode stage.

        With ``replan=(res, budget, policy)`` the Replanner steers the run to that budget's
        deadline (on the clock the jobs are judged on).
        """
        from ..outcome import Outcome

        eng = self.engine
        state = eng.clone_state(base)
        if alpha > 0:
            eng.evict(state, alpha)
        t0 = time.monotonic()
        n_hat = max(int(replan[0].n_hat), 1) if replan is not None else 1
        if replan is not None:
            res, budget, pol = replan
            job = self._job(
                res,
                deadline=t0 + budget - (self.wait_s(res) + state.evict_s),
                accepted_at=t0,
                replan=True,
            )
        else:
            job = self._job(task, alpha=alpha, replan=False, accepted_at=t0)
        job.input_ids = list(base.input_ids)
        out = self.pipeline.decode(
            job, state, Outcome(status=''), n_hat, self.pipeline.n_cap(job), stop_at_deadline=False
        ).result
        offsets = [t - t0 for t in out.token_times]
        text = out.text
        return Run(
            alpha=out.alpha,
            kv_after=out.kv_after,
            evict_s=out.evict_s,
            decode_step_s=list(out.decode_step_s),
            token_ids=list(out.token_ids),
            token_offsets_s=offsets,
            stop_reason=out.stop_reason,
            text=text,
            score=score_answer(task.metric, text, task.references),
        )

    # -- TimeBill's choice ------------------------------------------------------------
    def wait_s(self, res: PromptResult) -> float:
        """Time before TimeBill can choose α: prefill, or the predictor if it is slower."""
        return max(res.prefill_s, res.predict_s)

    def timebill_alpha(
        self, res: PromptResult, budget_s: float, k: float, alpha_max: float
    ) -> float:
        """α exactly as the generator node's pipeline picks it after this prefill."""
        key = f'{k:g}|{budget_s:.6f}|{alpha_max:g}'
        if key in res.timebill_alpha:
            return res.timebill_alpha[key]
        job = self._job(res, deadline=budget_s, accepted_at=0.0, k=k)
        alpha, v = self.pipeline.plan(job, res.prefill_s, res.n_hat, self.wait_s(res))
        res.timebill_alpha[key] = alpha
        res.verdicts[key] = {
            'status': v.status,
            'alpha': alpha,
            'wcet_s': v.total_s,
            'expected_s': v.expected_total_s,
            'n_wcet': v.n_wcet,
        }
        return alpha

    # -- jobs -------------------------------------------------------------------------
    def job(
        self, res: PromptResult, alpha: float, timebill_policy: bool, run: Optional[Run] = None
    ) -> Job:
        from ..eviction import n_keep

        r = run if run is not None else res.runs[n_keep(res.n_prompt, alpha)]
        start = (self.wait_s(res) if timebill_policy else res.prefill_s) + r.evict_s
        times = [start + t for t in r.token_offsets_s]
        task, eng = res.task, self.engine

        def partial(t: float, _r=r, _times=times) -> float:
            n = sum(1 for x in _times if x <= t)
            return (
                score_answer(task.metric, eng.decode_text(_r.token_ids[:n]), task.references)
                if n
                else 0.0
            )

        return Job(
            task_id=task.id,
            finish_s=times[-1] if times else start,
            completed=r.stop_reason in ('eos', 'max_new_tokens'),
            score=r.score,
            first_token_s=times[0] if times else start,
            token_times_s=times,
            partial_score=partial,
        )


# ------------------------------------------------------------------------------ evaluating
def _key(pol: Policy, budget_s: float) -> str:
    return f'{pol.k:g}|{budget_s:.6f}'


def policy_jobs(
    sweeper: Sweeper, results: Sequence[PromptResult], pol: Policy, budget_s: float
) -> List[Job]:
    jobs = []
    for res in results:
        alpha = (
            sweeper.timebill_alpha(res, budget_s, pol.k, pol.alpha_max)
            if pol.budget_dependent
            else pol.alpha
        )
        run = res.replan_runs[_key(pol, budget_s)] if pol.replan else None
        jobs.append(sweeper.job(res, alpha, pol.budget_dependent, run))
    return jobs


def evaluate(sweeper: Sweeper, results: Sequence[PromptResult]) -> dict:
    """
    Aggregate the runs into what the report shows.

    Completion rate / score per group × policy × overrun × budget, the k sweep, lateness,
    estimator error.
    """
    groups: Dict[str, List[PromptResult]] = {}
    for r in results:
        groups.setdefault(group_of(r.task), []).append(r)
    out: dict = {'groups': {}}
    for g, rs in groups.items():
        budgets = sweeper.cfg.budgets[g]
        table = []
        for pol in sweeper.cfg.policies:
            for b in budgets:
                jobs = policy_jobs(sweeper, rs, pol, b)
                for ov in pol.overruns:
                    outcomes = simulate(jobs, b, ov)
                    row = {
                        'policy': pol.name,
                        'overrun': ov,
                        'budget_s': b,
                        **summarize(outcomes),
                        'outcomes': [o.to_dict() for o in outcomes],
                    }
                    if pol.budget_dependent:
                        row['alphas'] = [
                            sweeper.timebill_alpha(r, b, pol.k, pol.alpha_max) for r in rs
                        ]
                    table.append(row)
        kb = sweeper.k_budget(g)
        ksweep = []
        for k in sweeper.cfg.ks:
            pol = timebill(float(k), sweeper.cfg.alpha_max)
            jobs = policy_jobs(sweeper, rs, pol, kb)
            for ov in pol.overruns:
                k_outcomes = simulate(jobs, kb, ov)
                ksweep.append(
                    {
                        'k': float(k),
                        'overrun': ov,
                        'budget_s': kb,
                        **summarize(k_outcomes),
                        'outcomes': [o.to_dict() for o in k_outcomes],
                        'alphas': [
                            sweeper.timebill_alpha(r, kb, float(k), sweeper.cfg.alpha_max)
                            for r in rs
                        ],
                    }
                )
        out['groups'][g] = {
            'budgets_s': budgets,
            'k_budget_s': kb,
            'n_prompts': len(rs),
            'prompt_tokens': [r.n_prompt for r in rs],
            'table': table,
            'k_sweep': ksweep,
        }
    out['estimator'] = estimator_errors(sweeper, results)
    out['prompts'] = [prompt_summary(sweeper, r) for r in results]
    out['timing_spread'] = timing_spread(results)
    return out


def prompt_summary(sweeper: Sweeper, r: PromptResult) -> dict:
    return {
        'task_id': r.task.id,
        'kind': r.task.kind,
        'group': group_of(r.task),
        'metric': r.task.metric,
        'references': r.task.references,
        'n_prompt': r.n_prompt,
        'prefill_s': r.prefill_s,
        'prefill_pred_s': sweeper.model.prefill_s(r.n_prompt),
        'n_hat': r.n_hat,
        'predict_s': r.predict_s,
        'predictor': r.predictor_source,
        'runs': [run.summary() for _, run in sorted(r.runs.items(), reverse=True)],
        'timebill_verdicts': r.verdicts,
    }


def estimator_errors(sweeper: Sweeper, results: Sequence[PromptResult]) -> dict:
    """Predicted vs actual, on the requests actually served: length (RLP) and time (ETE)."""
    from ..time_estimator import served_errors, wcet_length

    m = sweeper.model
    lengths, times = [], []
    for r in results:
        vanilla_run = r.runs[max(r.runs)]  # largest kept length = α 0
        lengths.append(
            {
                'task_id': r.task.id,
                'n_hat': r.n_hat,
                'actual': vanilla_run.n_tokens,
                'max_new_tokens': r.task.max_new_tokens,
                'source': r.predictor_source,
            }
        )
        for keep, run in sorted(r.runs.items()):
            e = served_errors(m, r.n_prompt, run.kv_after, r.prefill_s, run.decode_step_s)
            n_out = run.n_tokens
            pred_total = m.prefill_s(r.n_prompt) + m.decode_s(r.n_prompt, run.alpha, n_out)
            actual_total = r.prefill_s + run.evict_s + sum(run.decode_step_s)
            n_w = wcet_length(
                min(r.n_hat, sweeper.cfg.n_max), 5.0, min(sweeper.cfg.n_max, r.task.max_new_tokens)
            )
            wcet = m.prefill_s(r.n_prompt) + m.decode_s(r.n_prompt, run.alpha, n_w)
            times.append(
                {
                    'task_id': r.task.id,
                    'alpha': run.alpha,
                    'n_prompt': r.n_prompt,
                    'tokens': n_out,
                    'pred_total_s': pred_total,
                    'actual_total_s': actual_total,
                    'wcet_k5_s': wcet,
                    'within_wcet': actual_total <= wcet,
                    **e,
                }
            )

    def mape(pairs):
        pairs = [(a, p) for a, p in pairs if a > 0]
        return 100.0 * sum(abs(p - a) / a for a, p in pairs) / len(pairs) if pairs else math.nan

    return {
        'lengths': lengths,
        'times': times,
        'length_mae': statistics.mean(abs(x['n_hat'] - x['actual']) for x in lengths)
        if lengths
        else math.nan,
        'length_mae_capped': statistics.mean(
            abs(min(x['n_hat'], x['max_new_tokens']) - x['actual']) for x in lengths
        )
        if lengths
        else math.nan,
        'prefill_mape': mape([(t['prefill_s'], t['prefill_pred_s']) for t in times]),
        'decode_mape': mape([(t['decode_s'], t['decode_pred_s']) for t in times]),
        'total_mape': mape([(t['actual_total_s'], t['pred_total_s']) for t in times]),
        'within_wcet_rate': sum(t['within_wcet'] for t in times) / len(times)
        if times
        else math.nan,
    }


def timing_spread(results: Sequence[PromptResult]) -> dict:
    """
    Report how noisy the measurements were.

    One run per (prompt, kept length); step times vary within it.
    """
    cvs = []
    for r in results:
        for run in r.runs.values():
            s = run.decode_step_s
            if len(s) >= 3:
                cvs.append(statistics.pstdev(s) / statistics.mean(s))
    return {
        'runs_per_prompt_and_alpha': 1,
        'decode_runs': sum(len(r.runs) for r in results),
        'prefills': len(results),
        'step_time_cv_median': statistics.median(cvs) if cvs else math.nan,
        'step_time_cv_max': max(cvs) if cvs else math.nan,
    }


# ------------------------------------------------------------------------------ budgets
def choose_budgets(
    time_model,
    tasks: Sequence[Task],
    count: int,
    alpha_max: float = 0.95,
    n_hat: Optional[Callable[[Task], float]] = None,
) -> Dict[str, List[float]]:
    """
    Per length group, budgets from infeasible to generous, from the calibrated profile.

    Low end: 90 % of the shortest predicted prefill (nothing can finish). High end: 1.5 × the
    slowest predicted vanilla run of max_new_tokens (every answer fits, with room for the noise
    of a shared machine). Evenly spaced.
    """
    groups: Dict[str, List[Task]] = {}
    for t in tasks:
        groups.setdefault(group_of(t), []).append(t)
    out = {}
    for g, ts in groups.items():
        lo = 0.9 * min(time_model.prefill_s(t.n_tokens) for t in ts)
        hi = 1.5 * max(
            time_model.prefill_s(t.n_tokens)
            + time_model.decode_s(t.n_tokens, 0.0, t.max_new_tokens)
            for t in ts
        )
        if count == 1:
            out[g] = [round(hi, 2)]
        else:
            out[g] = [round(lo + (hi - lo) * i / (count - 1), 2) for i in range(count)]
    return out


def run_sweep(
    engine,
    time_model,
    predictor,
    tasks: Sequence[Task],
    cfg: SweepConfig,
    log: Callable[[str], None] = None,
    config=None,
) -> Tuple[Sweeper, List[PromptResult], dict]:
    sweeper = Sweeper(engine, time_model, predictor, cfg, log, config)
    results = []
    t0 = time.monotonic()
    for i, task in enumerate(tasks):
        r = sweeper.measure(task)
        results.append(r)
        sweeper.log(
            f'[eval] {i + 1}/{len(tasks)} {task.id}: {r.n_prompt} tokens, prefill '
            f'{r.prefill_s:.2f}s, '
            f'{len(r.runs)} decode runs, N̂={r.n_hat:g}; elapsed {time.monotonic() - t0:.0f}s'
        )
    return sweeper, results, evaluate(sweeper, results)
