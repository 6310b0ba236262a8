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

import math
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .aggregate import evaluate
from .policies import Trace
from .runs import group_of, json_valid, PromptResult, Run, run_key, schema_of, SweepConfig
from .scoring import score as score_answer
from .tasks import Task


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
        from ..job import Job

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
                        res.close_runs[run_key(pol, b)] = self._close_run(res, base, b, run(0.0))
                    elif pol.replan:
                        res.replan_runs[run_key(pol, b)] = self._decode(
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
