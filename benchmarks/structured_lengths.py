#!/usr/bin/env python3
"""
Distil the target's structured-answer lengths for the length predictor (robot JSON tasks).

The length predictor was trained on free-text prompts; a JSON answer's length follows the
request (the schema, an item or step count), which it had never seen. This serves robot tasks
on *training* seeds (the evaluation uses seed 0) the way the generator does — scene primed,
schema in the prompt, grammar on, greedy, no deadline — and writes the lengths the target
really produced as labels (the same record format as ``data/lengths_smollm2.jsonl``; the prompt
is the text the predictor reads: the question with its schema appended).

    python benchmarks/structured_lengths.py --seeds 1-5 \
        --out timebill_ros/data/lengths_smollm2_robot.jsonl

Then ``timebill train-predictor`` trains on both label files (its default).
Last line: ``labels=N mean_length=… capped=…``.

``--mae results/eval/results.json --checkpoints A,B`` compares predictors instead: N̂ of each
checkpoint for the evaluation's served prompts against the lengths the target produced there,
MAE per workload (structured vs free text). Last line: ``mae <name>=structured/free …``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
import statistics
import sys
import time


def _seeds(text: str):
    if '-' in text:
        lo, hi = text.split('-')
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(',')]


def compare(results_path: str, checkpoints) -> int:
    """Print each predictor's MAE on the evaluation's served prompts, by workload."""
    from timebill_ros.core.evaluation.robot_tasks import build_robot_tasks
    from timebill_ros.core.evaluation.tasks import build_tasks, KINDS
    from timebill_ros.core.rlp.predictor import LengthPredictor
    from timebill_ros.core.structured import with_schema

    from timebill_ros.core.config import TimeBillConfig
    from timebill_ros.core.engine import Engine
    from timebill_ros.core.evaluation.tasks import counter_for

    res = json.loads(Path(results_path).read_text())
    meta = res['meta']
    actual = {x['task_id']: x['actual'] for x in res['estimator']['lengths']}
    count = counter_for(Engine.from_config(TimeBillConfig()))  # the tokenizer the eval used
    w = meta['workload']
    tasks = {}
    if w.get('scenes'):
        tasks.update({t.id: t for t in build_robot_tasks(
            count, sizes=tuple(w['scenes']), per_kind=w['robot_per_kind'], seed=meta['seed'])})
    if w.get('lengths'):
        tasks.update({t.id: t for t in build_tasks(
            count, lengths=tuple(w['lengths']), kinds=w['kinds'] or KINDS,
            per_kind=w['per_kind'], seed=meta['seed'])})
        for t in tasks.values():
            if w.get('max_new_tokens') and not t.meta.get('json_schema'):
                t.max_new_tokens = min(t.max_new_tokens, w['max_new_tokens'])
    rows = []
    for ck in checkpoints:
        pred = LengthPredictor.load(ck)
        err = {'structured': [], 'free': []}
        for tid, n in actual.items():
            t = tasks.get(tid)
            if t is None:
                continue
            schema = t.meta.get('json_schema', '')
            text = with_schema(t.prompt, schema)
            n_hat = min(float(pred.predict(text).n_hat), t.max_new_tokens)
            err['structured' if schema else 'free'].append(abs(n_hat - n))
        rows.append((Path(ck).name, {k: (statistics.mean(v) if v else float('nan'), len(v))
                                     for k, v in err.items()}))
    print(f'{"checkpoint":<24} {"structured MAE (n)":>20} {"free-text MAE (n)":>20}')
    for name, e in rows:
        print(f'{name:<24} {e["structured"][0]:>14.1f} ({e["structured"][1]:>3}) '
              f'{e["free"][0]:>14.1f} ({e["free"][1]:>3})')
    print('mae ' + ' '.join(f'{name}={e["structured"][0]:.1f}/{e["free"][0]:.1f}'
                            for name, e in rows))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--seeds', type=_seeds, default=_seeds('1-5'))
    ap.add_argument('--sizes', default='1024,2048')
    ap.add_argument('--per-kind', type=int, default=3)
    ap.add_argument('--out', default='timebill_ros/data/lengths_smollm2_robot.jsonl')
    ap.add_argument('--mae', help="an evaluation's results.json: compare --checkpoints on it")
    ap.add_argument('--checkpoints', default='', help='predictor checkpoint dirs, comma-separated')
    args = ap.parse_args(argv)
    if args.mae:
        return compare(args.mae, [c for c in args.checkpoints.split(',') if c])

    from timebill_ros.core.config import TimeBillConfig
    from timebill_ros.core.engine import Engine
    from timebill_ros.core.evaluation.robot_tasks import build_robot_tasks
    from timebill_ros.core.evaluation.tasks import counter_for
    from timebill_ros.core.generation import GenerationRequest
    from timebill_ros.core.rlp.label_io import header_line
    from timebill_ros.core.structured import with_schema

    cfg = TimeBillConfig()
    eng = Engine.from_config(cfg)
    sizes = tuple(int(x) for x in args.sizes.split(','))
    records, t0 = [], time.monotonic()
    tasks = [t for s in args.seeds
             for t in build_robot_tasks(counter_for(eng), sizes=sizes, per_kind=args.per_kind,
                                        seed=s)]
    primed = set()
    for i, t in enumerate(tasks):
        if t.meta['scene_id'] not in primed:  # as a planner would: the scene once
            eng.prefill(eng.encode_prefix(t.meta['context'], t.system_prompt),
                        prime=t.meta['scene_id'])
            primed.add(t.meta['scene_id'])
        prompt = with_schema(t.prompt, t.meta['json_schema'])
        ids = eng.encode(prompt, t.system_prompt)
        state = eng.prefill(ids, capacity=len(ids) + t.max_new_tokens + 1)
        res = eng.decode(state, GenerationRequest(
            input_ids=ids, max_new_tokens=t.max_new_tokens, json_schema=t.meta['json_schema']))
        n = res.tokens_generated - (1 if res.token_ids[-1] in eng.eos_ids else 0)
        records.append({
            'id': hashlib.sha1(prompt.encode()).hexdigest()[:12],
            'prompt': prompt,
            'length': n,
            'capped': res.stop_reason == 'max_new_tokens',
            'source': t.kind,
            'template': 'json-schema',
            'group': f'{t.meta["scene_id"]}-{t.kind}',  # one scene's questions share a split
            'prompt_tokens': len(ids),
            'valid': res.valid,
        })
        print(f'[labels] {i + 1}/{len(tasks)} {t.id}: {n} tokens ({res.stop_reason}); '
              f'{time.monotonic() - t0:.0f}s', file=sys.stderr, flush=True)
    meta = {
        'model': cfg.model,
        'max_new_tokens': 512,
        'decoding': 'greedy, chat template, JSON schema enforced (llguidance), stop when the '
                    'answer is complete',
        'length_unit': 'generated tokens, EOS not counted',
        'command': 'python benchmarks/structured_lengths.py ' + ' '.join(argv or sys.argv[1:]),
        'tasks': 'robot JSON tasks (core/evaluation/robot_tasks.py), training seeds '
                 f'{args.seeds} (the evaluation uses seed 0), scenes {list(sizes)} tokens',
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open('w') as fh:
        fh.write(header_line(meta))
        for r in records:
            fh.write(json.dumps(r) + '\n')
    lengths = [r['length'] for r in records]
    print(f'labels={len(records)} mean_length={statistics.mean(lengths):.1f} '
          f'capped={sum(r["capped"] for r in records)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
