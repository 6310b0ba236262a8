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

from .policies import Policy, simulate, standard_policies, summarize, timebill, Trace
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
        self._compiled: Dict[str, object] = {}

    def _job(self, res_or_task, **kw):
        from ..pipeline import Job

        task = getattr(res_or_task, 'task', res_or_task)
        job = Job(
            request_id=task.id,
            input_ids=list(getattr(res_or_task, 'input_ids', [0])),
            prompt=task.prompt,
            max_new_tokens=task.max_new_tokens,
            min_quality=0.0,  # the paper's TimeBill: any α up to α_max, no quality floor
            json_schema=schema_of(task),
            **kw,
        )
        if job.json_schema:  # compiled once per task, as the pipeline does at submit
            if task.id not in self._compiled:
                self._compiled[task.id] = self.engine.compile_grammar(job.json_schema)
            job.compiled = self._compiled[task.id]
        return job

    def prompt_of(self, task: Task) -> str:
        """Return the prompt the generator encodes (the schema appended, as the node does)."""
        from ..structured import with_schema

        if self.pipeline.cfg.schema_in_prompt:
            return with_schema(task.prompt, schema_of(task))
        return task.prompt

    def prime(self, tasks: Sequence[Task]) -> Dict[str, int]:
        """
        Prime each shared context (a robot's standing scene) once, as a planner would.

        Its questions then prefill warm from the prefix cache. Returns scene id -> cached tokens.
        """
        done: Dict[str, int] = {}
        for t in tasks:
            scene = t.meta.get('scene_id')
            context = t.meta.get('context')
            if not scene or not context or scene in done:
                continue
            ids = self.engine.encode_prefix(context, t.system_prompt or None)
            t0 = time.monotonic()
            res = self.pipeline.prime(ids, scene).result()
            done[scene] = res.cached_tokens
            self.log(
                f'[eval] primed scene {scene}: {res.cached_tokens} of {res.context_tokens} tokens '
                f'cached in {time.monotonic() - t0:.1f}s'
            )
        return done

    def answerable(self, tasks: Sequence[Task], min_score: float) -> Tuple[List[Task], dict]:
        """
        Keep the tasks the model answers reasonably at α = 0 with no deadline (score ≥ min).

        A small model cannot answer every question; a task it fails with all the time in the
        world cannot tell policies apart. Each candidate is served once (warm prefill, vanilla
        decode) and scored; returns the kept tasks and what was dropped, by kind.
        """
        from ..outcome import Outcome

        kept, rows = [], []
        for i, t in enumerate(tasks):
            job = self._job(t, accepted_at=time.monotonic())
            job.input_ids = self.engine.encode(self.prompt_of(t), t.system_prompt or None)
            base = self.pipeline.prefill(job, Outcome(status=''))
            run = self._decode(base, t, 0.0)
            rows.append({'task_id': t.id, 'kind': t.kind, 'score': run.score,
                         'valid': run.valid, 'tokens': run.n_tokens,
                         'prefill_s': base.prefill_s,
                         'step_s': statistics.median(run.decode_step_s or [0.0]),
                         'finish_s': base.prefill_s + (run.token_offsets_s or [0.0])[-1]})
            if run.score >= min_score:
                kept.append(t)
            verdict = 'kept' if run.score >= min_score else 'dropped'
            self.log(f'[eval] answerable? {i + 1}/{len(tasks)} {t.id}: score {run.score:.2f} '
                     f'({run.n_tokens} tokens) -> {verdict}')
        kinds = sorted({t.kind for t in tasks})
        return kept, {
            'min_score': min_score,
            'candidates': len(tasks),
            'kept': len(kept),
            'by_kind': {k: [sum(1 for t in kept if t.kind == k),
                            sum(1 for t in tasks if t.kind == k)] for k in kinds},
            'candidates_valid_rate': (
                sum(bool(r['valid']) for r in rows) / len(rows) if rows else math.nan
            ),
            'rows': rows,
        }

    def cached_of(self, task: Task) -> int:
        """Prompt tokens of ``task`` the prefix cache holds now."""
        return self.pipeline.cached_for(self.engine.encode(self.prompt_of(task),
                                                           task.system_prompt or None))

    # -- one prompt -------------------------------------------------------------------
    def measure(self, task: Task) -> PromptResult:
        from ..eviction import n_keep
        from ..outcome import Outcome

        eng = self.engine
        ids = eng.encode(self.prompt_of(task), task.system_prompt or None)
        job = self._job(task, accepted_at=time.monotonic())
        job.input_ids = ids
        # chunked, exactly as the node runs it
        base = self.pipeline.prefill(job, Outcome(status=''))
        t0 = time.monotonic()
        # as the predictor node does: text, N̂ capped below
        pred = self.predictor.predict(self.prompt_of(task))
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
            cached_tokens=int(getattr(base, 'cached_tokens', 0)),
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
                    if pol.kind == 'close':
                        res.close_runs[_key(pol, b)] = self._close_run(res, base, b, run(0.0))
                    elif pol.replan:
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

    def _close_run(self, res: PromptResult, base, budget_s: float, vanilla: Run) -> Run:
        """
        Run overrun close at this budget's deadline (the vanilla run, where it ends in time).

        Closing depends on the deadline itself, so a run that vanilla does not finish in time is
        made again at that deadline, and keeps the status the pipeline gives it there.
        """
        import dataclasses

        finish = res.prefill_s + (vanilla.token_offsets_s[-1] if vanilla.token_offsets_s else 0)
        if vanilla.stop_reason in ('eos', 'max_new_tokens') and finish <= 0.9 * budget_s:
            return dataclasses.replace(vanilla, status='succeeded')
        return self._decode(base, res.task, 0.0, close=(res, budget_s))

    def _decode(self, base, task: Task, alpha: float, replan=None, close=None) -> Run:
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
        elif close is not None:
            res, budget = close
            job = self._job(
                res, deadline=t0 + budget - res.prefill_s, accepted_at=t0, alpha=0.0,
                replan=False, overrun='close',
            )
        else:
            job = self._job(task, alpha=alpha, replan=False, accepted_at=t0)
        job.input_ids = list(base.input_ids)
        served = self.pipeline.decode(
            job, state, Outcome(status=''), n_hat, self.pipeline.n_cap(job),
            stop_at_deadline=close is not None,
        )
        out = served.result
        offsets = [t - t0 for t in out.token_times]
        text = out.text
        return Run(
            valid=out.valid,
            status=served.status if close is not None else '',
            closed_at=out.closed_at,
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

    # -- traces -----------------------------------------------------------------------
    def trace(
        self, res: PromptResult, alpha: float, timebill_policy: bool, run: Optional[Run] = None
    ) -> Trace:
        """Put one run on the request's timeline: what each budget is judged from."""
        from ..eviction import n_keep

        r = run if run is not None else res.runs[n_keep(res.n_prompt, alpha)]
        start = (self.wait_s(res) if timebill_policy else res.prefill_s) + r.evict_s
        times = [start + t for t in r.token_offsets_s]
        task, eng = res.task, self.engine
        structured = bool(schema_of(task))

        def partial_text(t: float, _r=r, _times=times) -> str:
            n = sum(1 for x in _times if x <= t)
            return eng.decode_text(_r.token_ids[:n]) if n else ''

        def partial(t: float) -> float:
            text = partial_text(t)
            return score_answer(task.metric, text, task.references) if text else 0.0

        def partial_valid(t: float) -> Optional[bool]:
            return json_valid(partial_text(t)) if structured else None

        completed = r.stop_reason in ('eos', 'max_new_tokens') and r.valid is not False
        return Trace(
            task_id=task.id,
            finish_s=times[-1] if times else start,
            completed=completed or r.status == 'succeeded',
            score=r.score,
            first_token_s=times[0] if times else start,
            token_times_s=times,
            partial_score=partial,
            stop_reason=r.stop_reason,
            valid=r.valid,
            partial_valid=partial_valid,
            status=r.status,
        )


# ------------------------------------------------------------------------------ evaluating
def _key(pol: Policy, budget_s: float) -> str:
    return f'{pol.k:g}|{budget_s:.6f}'


def schema_of(task: Task) -> str:
    """Return the JSON schema a task's answer must match ('' for free text)."""
    return str(task.meta.get('json_schema') or '')


def json_valid(text: str) -> bool:
    """Tell whether ``text`` parses as JSON (the grammar guarantees the rest of the schema)."""
    import json

    try:
        json.loads(text)
    except ValueError:
        return False
    return bool(text.strip())


def policy_jobs(
    sweeper: Sweeper, results: Sequence[PromptResult], pol: Policy, budget_s: float
) -> List[Trace]:
    traces = []
    for res in results:
        if pol.kind == 'close':
            traces.append(sweeper.trace(res, 0.0, False, res.close_runs[_key(pol, budget_s)]))
            continue
        alpha = (
            sweeper.timebill_alpha(res, budget_s, pol.k, pol.alpha_max)
            if pol.budget_dependent
            else pol.alpha
        )
        run = res.replan_runs[_key(pol, budget_s)] if pol.replan else None
        traces.append(sweeper.trace(res, alpha, pol.budget_dependent, run))
    return traces


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
                    if pol.kind == 'timebill':
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
        'cached_tokens': r.cached_tokens,
        'prefill_s': r.prefill_s,
        'prefill_pred_s': sweeper.model.prefill_s(r.n_prompt, r.cached_tokens),
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
                'structured': bool(schema_of(r.task)),
            }
        )
        for keep, run in sorted(r.runs.items()):
            e = served_errors(
                m, r.n_prompt, run.kv_after, r.prefill_s, run.decode_step_s, r.cached_tokens
            )
            n_out = run.n_tokens
            pre = m.prefill_s(r.n_prompt, r.cached_tokens)
            pred_total = pre + m.decode_s(r.n_prompt, run.alpha, n_out)
            actual_total = r.prefill_s + run.evict_s + sum(run.decode_step_s)
            n_w = wcet_length(
                min(r.n_hat, sweeper.cfg.n_max), 5.0, min(sweeper.cfg.n_max, r.task.max_new_tokens)
            )
            wcet = pre + m.decode_s(r.n_prompt, run.alpha, n_w)
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

    def mae(rows):
        return statistics.mean(abs(x['n_hat'] - x['actual']) for x in rows) if rows else math.nan

    return {
        'lengths': lengths,
        'times': times,
        # the length predictor on each workload: structured (JSON) answers vs free text
        'length_mae_structured': mae([x for x in lengths if x['structured']]),
        'length_mae_free': mae([x for x in lengths if not x['structured']]),
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


def run_sweep(
    engine,
    time_model,
    predictor,
    tasks: Sequence[Task],
    cfg: SweepConfig,
    log: Callable[[str], None] = None,
    config=None,
    sweeper: Optional[Sweeper] = None,
) -> Tuple[Sweeper, List[PromptResult], dict]:
    if sweeper is None:
        sweeper = Sweeper(engine, time_model, predictor, cfg, log, config)
    sweeper.prime(tasks)  # a no-op for scenes primed already
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
