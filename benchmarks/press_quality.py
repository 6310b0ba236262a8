#!/usr/bin/env python
"""
KV presses compared on quality: exact-match accuracy vs eviction ratio α on long prompts.

Tasks come from ``timebill_ros.core.evaluation.longctx_tasks`` (planted facts in licence and
standard-library text, 1k-4k tokens by default). Each candidate is prefilled once, with every
press's scores collected in that one pass; it is answered at α = 0 first and kept only if that
answer is right (the model must be able to answer it before eviction can be blamed). A kept
task is then evicted from a clone of the prefill for every press × α and answered greedily
(at most 16 tokens; decoding stops once the extracted answer can no longer change).

Results are cached per task under ``--out`` (``results/press_quality`` by default; ignored by
git), so an interrupted run continues where it stopped. Writes ``summary.json``, ``table.md``
and ``accuracy.png`` (accuracy vs α, one line per press) with each curve's area (AUC, the
trapezoid over α ∈ [0, 0.95] divided by 0.95: 1.0 = never wrong).

    nice -n 10 .venv/bin/python benchmarks/press_quality.py [--keep 60] [--candidates 160]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import platform
import threading
import time
from typing import Dict, List

from timebill_ros.core.config import TimeBillConfig
from timebill_ros.core.engine import Engine
from timebill_ros.core.evaluation import longctx_tasks as lt
from timebill_ros.core.evaluation.tasks import counter_for
from timebill_ros.core.eviction import get_press, Press
from timebill_ros.core.generation import GenerationRequest
import torch
from tqdm import tqdm

ALPHAS = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95)
# label -> (registry name, options beyond the config's window/kernel/sink)
PRESS_SPECS = {
    'snapkv_avg': ('snapkv', {'pooling': 'avg'}),
    'snapkv_max': ('snapkv', {'pooling': 'max'}),
    'streaming_llm': ('streaming_llm', {}),
    'pyramidkv': ('pyramidkv', {'pooling': 'avg'}),
    'chunkkv': ('chunkkv', {'pooling': 'avg'}),
    'question_window': ('question_window', {'pooling': 'avg'}),
    'ada_layers': ('ada_layers', {'pooling': 'avg'}),
}


class StackedPress(Press):
    """Collect several presses' scores in one prefill (stacked on a new first dimension)."""

    name = 'stacked'
    needs_scores = True

    def __init__(self, presses: List[Press]):
        self.presses = presses
        self.window_size = max(int(getattr(p, 'window_size', 0) or 0) for p in presses)

    def for_prompt(self, input_ids, tokenizer=None):
        return StackedPress([p.for_prompt(input_ids, tokenizer) for p in self.presses])

    def score(self, module, query, key):
        b, h, length = key.shape[0], key.shape[1], key.shape[2]
        out = []
        for p in self.presses:
            s = p.score(module, query, key) if p.needs_scores else None
            out.append(s if s is not None else torch.zeros(b, h, length))
        return torch.stack(out)


def build_presses(cfg: TimeBillConfig, labels: List[str]) -> Dict[str, Press]:
    base = {'window_size': cfg.window_size, 'kernel_size': cfg.kernel_size, 'n_sink': cfg.n_sink}
    return {
        label: get_press(PRESS_SPECS[label][0], **{**base, **PRESS_SPECS[label][1]})
        for label in labels
    }


def answer(engine: Engine, state, task, max_new: int):
    """Decode greedily until the extracted answer is decided (or EOS / ``max_new`` tokens)."""
    stop = threading.Event()

    def on_token(step, tok, text):
        if lt.answer_decided(task.kind, text):
            stop.set()

    req = GenerationRequest(
        input_ids=state.input_ids, max_new_tokens=max_new, on_token=on_token, cancel=stop
    )
    res = engine.decode(state, req)
    text = engine.decode_text(res.token_ids)
    return text, res.tokens_generated


def run_task(engine, presses, task, alphas, max_new, path: Path) -> dict:
    """Prefill once, screen at α = 0, then every press × α; cached in ``path``."""
    rec = json.loads(path.read_text()) if path.is_file() else {}
    ref = task.references[0]
    todo = [
        (label, a)
        for label in presses
        for a in alphas
        if a > 0 and f'{a:g}' not in rec.get('runs', {}).get(label, {})
    ]
    if rec.get('alpha0') and (not rec['alpha0']['correct'] or not todo):
        return rec
    ids = engine.encode(task.prompt, task.system_prompt or None)
    labels = list(presses)
    engine.press = StackedPress([presses[k] for k in labels])
    state = engine.prefill(ids, capacity=len(ids) + max_new + 1)
    stacked = state.scores
    state.scores = {}
    rec.update(
        id=task.id, kind=task.kind, n_tokens=len(ids), reference=ref, prefill_s=state.prefill_s
    )
    if not rec.get('alpha0'):
        text, n = answer(engine, engine.clone_state(state), task, max_new)
        ok = lt.exact_match(task.kind, text, ref)
        rec['alpha0'] = {'text': text, 'tokens': n, 'correct': ok}
        path.write_text(json.dumps(rec))
        if not rec['alpha0']['correct']:
            return rec
    runs = rec.setdefault('runs', {})
    for label, a in todo:
        j = labels.index(label)
        engine.press = presses[label]
        st = engine.clone_state(state)
        st.scores = {i: s[j] for i, s in stacked.items()}
        engine.evict(st, a)
        text, n = answer(engine, st, task, max_new)
        runs.setdefault(label, {})[f'{a:g}'] = {
            'text': text,
            'tokens': n,
            'kv_after': st.kv_after,
            'correct': lt.exact_match(task.kind, text, ref),
        }
        path.write_text(json.dumps(rec))
    return rec


def auc(alphas, acc) -> float:
    """Trapezoid area under accuracy vs α, divided by the α range (1.0 = always right)."""
    area = sum((b - a) * (x + y) / 2 for a, b, x, y in zip(alphas, alphas[1:], acc, acc[1:]))
    return area / (alphas[-1] - alphas[0])


def summarise(records, labels, alphas) -> dict:
    kept = [r for r in records if r.get('alpha0', {}).get('correct')]
    full = [r for r in kept if all(f'{a:g}' in r.get('runs', {}).get(k, {})
                                   for k in labels for a in alphas if a > 0)]
    table = {}
    for label in labels:
        acc = [1.0 if a == 0 else
               sum(r['runs'][label][f'{a:g}']['correct'] for r in full) / max(len(full), 1)
               for a in alphas]
        table[label] = {'accuracy': acc, 'auc': auc(alphas, acc)}
    by_kind: Dict[str, Dict[str, float]] = {}
    for label in labels:
        for kind in sorted({r['kind'] for r in full}):
            rs = [r for r in full if r['kind'] == kind]
            acc = [1.0] + [sum(r['runs'][label][f'{a:g}']['correct'] for r in rs) / len(rs)
                           for a in alphas[1:]]
            by_kind.setdefault(kind, {})[label] = auc(alphas, acc)
    return {'n_tasks': len(full), 'n_screened': len(records), 'n_right_at_0': len(kept),
            'presses': table, 'auc_by_kind': by_kind,
            'kinds': {k: sum(r['kind'] == k for r in full) for k in lt.KINDS},
            'tokens': [min((r['n_tokens'] for r in full), default=0),
                       max((r['n_tokens'] for r in full), default=0)]}


def write_profile(summary, alphas, path: str) -> Path:
    """Ship the curves as the quality profile the pipeline reads (core/quality.py)."""
    from timebill_ros.core.quality import QualityCurve, save_curves

    curves = [
        QualityCurve(
            press=PRESS_SPECS[label][0],
            pooling=PRESS_SPECS[label][1].get('pooling', ''),
            alphas=tuple(alphas),
            accuracy=tuple(p['accuracy']),
            model=summary['model'],
            weights=summary['weights'],
            n_tasks=summary['n_tasks'],
            source=f'benchmarks/press_quality.py ({label}, AUC {p["auc"]:.3f})',
        )
        for label, p in summary['presses'].items()
    ]
    note = (
        f'exact-match accuracy vs alpha on {summary["n_tasks"]} long-context tasks of '
        f'{summary["tokens"][0]}-{summary["tokens"][1]} tokens that the model answers at '
        f'alpha = 0 ({summary["weights"]} weights); regenerate with '
        f'benchmarks/press_quality.py --write-profile'
    )
    return save_curves(curves, path, note)


def markdown(summary, alphas) -> str:
    labels = sorted(summary['presses'], key=lambda k: -summary['presses'][k]['auc'])
    head = '| press | ' + ' | '.join(f'α={a:g}' for a in alphas) + ' | AUC |'
    lines = [head, '|' + '---|' * (len(alphas) + 2)]
    for k in labels:
        p = summary['presses'][k]
        cells = ' | '.join(f'{x:.2f}' for x in p['accuracy'])
        lines.append(f'| {k} | {cells} | {p["auc"]:.3f} |')
    return '\n'.join(lines) + '\n'


def plot(summary, alphas, path: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, p in sorted(summary['presses'].items(), key=lambda kv: -kv[1]['auc']):
        ax.plot(alphas, p['accuracy'], marker='o', label=f'{k} (AUC {p["auc"]:.2f})')
    ax.set_xlabel('eviction ratio α')
    ax.set_ylabel('exact-match accuracy')
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f'SmolLM2-135M-Instruct, {summary["n_tasks"]} tasks '
                 f'({summary["tokens"][0]}-{summary["tokens"][1]} tokens)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--keep', type=int, default=60, help='stop once this many tasks are kept')
    ap.add_argument('--candidates', type=int, default=160, help='candidate tasks to build')
    ap.add_argument('--lengths', default=','.join(map(str, lt.LENGTHS)))
    ap.add_argument('--kinds', default=','.join(lt.KINDS))
    ap.add_argument('--presses', default=','.join(PRESS_SPECS))
    ap.add_argument('--alphas', default=','.join(f'{a:g}' for a in ALPHAS))
    ap.add_argument('--max-new-tokens', type=int, default=lt.MAX_NEW_TOKENS)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, help="torch threads (default: the config's)")
    ap.add_argument('--out', default='results/press_quality')
    ap.add_argument('--summary-only', action='store_true', help='tabulate the cached results')
    ap.add_argument('--write-profile', metavar='PATH',
                    help='also write the curves as the quality profile (config/...json)')
    args = ap.parse_args()
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    labels = args.presses.split(',')
    alphas = [float(a) for a in args.alphas.split(',')]
    lengths = [int(n) for n in args.lengths.split(',')]
    kinds = args.kinds.split(',')
    out = Path(args.out)
    (out / 'tasks').mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    load0 = os.getloadavg()
    cfg = TimeBillConfig()
    if args.threads:
        cfg = cfg.replace(threads=args.threads)
    engine = None if args.summary_only else Engine.from_config(cfg)
    tag = '-'.join(map(str, lengths)) + '-' + '-'.join(kinds)
    cand_path = str(out / f'candidates-seed{args.seed}-{tag}.jsonl')
    if engine is not None:
        tasks, cand_path = lt.load_or_build(counter_for(engine), args.candidates, cand_path,
                                            seed=args.seed, lengths=lengths, kinds=kinds)
    else:
        tasks = lt.load_tasks(cand_path)
    presses = build_presses(cfg, labels)
    records = []
    kept = 0
    bar = tqdm(tasks, desc='tasks', unit='task')
    for task in bar:
        path = out / 'tasks' / f'{task.id}.json'
        if engine is None:
            if not path.is_file():
                continue
            rec = json.loads(path.read_text())
        else:
            rec = run_task(engine, presses, task, alphas, args.max_new_tokens, path)
        records.append(rec)
        kept += bool(rec.get('alpha0', {}).get('correct'))
        bar.set_postfix(kept=kept, screened=len(records))
        if kept >= args.keep:
            break
    summary = summarise(records, labels, alphas)
    summary.update(
        alphas=alphas,
        candidates_needed=len(records),
        model=cfg.model,
        weights=getattr(engine, 'weights', cfg.weights) if engine else cfg.weights,
        prefill_weights=cfg.prefill_weights,
        threads=torch.get_num_threads(),
        window_size=cfg.window_size,
        kernel_size=cfg.kernel_size,
        lengths=lengths,
        run_s=time.time() - t0,
        loadavg_start=load0,
        loadavg_end=os.getloadavg(),
        machine=platform.processor() or platform.machine(),
        max_new_tokens=args.max_new_tokens,
    )
    (out / 'summary.json').write_text(json.dumps(summary, indent=1))
    md = markdown(summary, alphas)
    (out / 'table.md').write_text(md)
    plot(summary, alphas, out / 'accuracy.png')
    if args.write_profile:
        print(f'quality profile: {write_profile(summary, alphas, args.write_profile)}')
    print(md)
    print(json.dumps({k: v for k, v in summary.items() if k != 'presses'}, indent=1))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
