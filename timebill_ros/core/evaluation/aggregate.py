"""
Aggregate a sweep's runs into what the report shows.

Every budget is judged from the runs already measured (``sweep``): each policy's jobs are put on
the request's timeline and simulated under each overrun strategy; the k sweep, the estimator's
error on the served requests and the timing spread come from the same runs.
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, List, Sequence

from .policies import Policy, simulate, summarize, timebill, Trace
from .runs import group_of, PromptResult, run_key, schema_of


def policy_jobs(
    sweeper, results: Sequence[PromptResult], pol: Policy, budget_s: float
) -> List[Trace]:
    """Put each prompt's run for ``pol`` at ``budget_s`` on its timeline (``Sweeper.trace``)."""
    traces = []
    for res in results:
        if pol.kind == 'close':
            traces.append(sweeper.trace(res, 0.0, False, res.close_runs[run_key(pol, budget_s)]))
            continue
        alpha = (
            sweeper.timebill_alpha(res, budget_s, pol.k, pol.alpha_max)
            if pol.budget_dependent
            else pol.alpha
        )
        run = res.replan_runs[run_key(pol, budget_s)] if pol.replan else None
        traces.append(sweeper.trace(res, alpha, pol.budget_dependent, run))
    return traces


def evaluate(sweeper, results: Sequence[PromptResult]) -> dict:
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


def prompt_summary(sweeper, r: PromptResult) -> dict:
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


def estimator_errors(sweeper, results: Sequence[PromptResult]) -> dict:
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
