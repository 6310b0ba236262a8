"""
The engine benchmark's quality guard: does a weight format change what the model answers.

Greedy tokens against fp32 on a few prompts (where they first diverge) and α = 0 task scores
with planted facts, per format (``bench_engine.py --quality``).
"""

from __future__ import annotations

import gc
import statistics

from timebill_ros.core.engine import Engine
from timebill_ros.core.generation import GenerationRequest
from timebill_ros.core.model import load_model


GUARD_PROMPTS = (
    'What is the capital of France?',
    'List three uses of a robot arm in a kitchen.',
    'Explain in two sentences why the sky is blue.',
    'Write a short haiku about a mobile robot.',
    'A robot has 4 wheels and loses one. How many wheels does it have left?',
)


def first_divergence(a, b) -> int:
    """Index of the first differing token; the shorter length if one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else -1  # -1: identical


def quality_guard(formats, new_tokens=64, task_tokens=1024, seeds=(0, 1)):
    """Greedy agreement with fp32 and α = 0 task scores per format (planted facts included)."""
    from timebill_ros.core.evaluation.scoring import score
    from timebill_ros.core.evaluation.tasks import counter_for, make_task

    out, ref_tokens, tasks = {}, None, None
    for fmt in ('fp32',) + tuple(f for f in formats if f != 'fp32'):
        model, tok = load_model(weights=fmt, threads=2)
        engine = Engine(model, tok, press='snapkv')
        if tasks is None:
            count = counter_for(engine)
            tasks = [
                make_task(k, task_tokens, count, seed=s)
                for k in ('passkey', 'needle', 'qa')
                for s in seeds
            ]
        gens = [
            engine.generate(GenerationRequest(prompt=p, max_new_tokens=new_tokens))
            for p in GUARD_PROMPTS
        ]
        toks = [g.token_ids for g in gens]
        if ref_tokens is None:
            ref_tokens = toks
        scores = {}
        for t in tasks:
            r = engine.generate(
                GenerationRequest(
                    prompt=t.prompt, system_prompt=t.system_prompt, max_new_tokens=t.max_new_tokens
                )
            )
            scores[t.id] = score(t.metric, r.text, t.references)
        div = [first_divergence(a, b) for a, b in zip(ref_tokens, toks)]
        out[fmt] = {
            'first_divergence': div,
            'identical': sum(d == -1 for d in div),
            'answers': [g.text for g in gens],
            'task_scores': scores,
            'task_mean': statistics.mean(scores.values()),
        }
        print(
            f'  {fmt}: first divergence {div}, task mean {out[fmt]["task_mean"]:.3f} '
            f'{ {k: round(v, 2) for k, v in scores.items()} }',
            flush=True,
        )
        del engine, model
        gc.collect()
    return out
