"""
Labelling runs: decode prompts with the target model and append their lengths to a file.

``timebill dataset`` labels thousands of prompts over hours, so a run must be resumable (ids
already in the file are skipped, a torn last line is tolerated), show progress in a terminal or
a log, and record in the file's header how it was made. ``verify_loops`` checks the claim behind
loop-stopped labels by decoding a sample of them to the cap. The decoding itself is
``greedy_labeler``; the file format is ``label_io``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import sys
import time
from typing import Sequence

from .greedy_labeler import ContinuousGreedyLabeler
from .label_io import (
    CAPPED_NOTE,
    clamp_labels,
    extend_cap,
    header_line,
    load_labels,
    read_meta,
    REGENERATE_CMD,
    update_meta,
)
from .prompts import PromptItem


def label_file(
    out_path: str | os.PathLike,
    model_spec: str,
    items: Sequence[PromptItem],
    max_new_tokens: int,
    batch_size: int,
    threads: int = 1,
    limit: int | None = None,
    loop_span: int = 0,
    log=print,
) -> int:
    """
    Label ``items`` with the target model, appending to ``out_path``.

    JSONL, resumable: ids already in the file are skipped. Returns how many records the file
    holds afterwards.
    """
    import torch

    from ..model import load_model

    out = Path(out_path)
    if limit is not None:
        # a prefix of the shuffled list: deterministic and representative
        items = list(items)[:limit]
    if out.is_file():
        if int(read_meta(out).get('max_new_tokens', max_new_tokens)) < max_new_tokens:
            extend_cap(out, max_new_tokens, log)
        clamp_labels(out, max_new_tokens, log)
        update_meta(
            out, {'command': REGENERATE_CMD, 'loop_span': loop_span, 'capped': CAPPED_NOTE}
        )
    done = {r['id'] for r in load_labels(out)}
    todo = [it for it in items if it.id not in done]
    if not todo:
        log(f'[dataset] {out}: all {len(items)} prompts already labelled')
        return len(done)
    model, tok = load_model(model_spec, threads=threads)
    if threads:
        torch.set_num_threads(threads)
    lab = ContinuousGreedyLabeler(model, tok, max_new_tokens, batch_size, loop_span=loop_span)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file() or out.stat().st_size == 0:
        meta = {
            'model': model_spec,
            'max_new_tokens': max_new_tokens,
            'decoding': 'greedy, chat template, stop at EOS',
            'length_unit': 'generated tokens, EOS not counted',
            'command': REGENERATE_CMD,
            'loop_span': loop_span,
            'capped': CAPPED_NOTE,
            'transformers': _version('transformers'),
            'torch': torch.__version__,
        }
        out.write_text(header_line(meta))
    # the file may end in a torn line after a kill: start on a fresh line
    with out.open('rb+') as fh:
        fh.seek(0, 2)
        if fh.tell() > 0:
            fh.seek(-1, 2)
            if fh.read(1) != b'\n':
                fh.write(b'\n')
    by_id = {it.id: it for it in todo}
    enc = [(it.id, lab.encode(it.prompt)) for it in todo]  # keep the shuffled order
    n_prompt = {k: len(ids) for k, ids in enc}
    t0 = time.perf_counter()
    state = {'n': 0, 'tokens': 0}
    bar = _Progress(len(todo), log)
    with out.open('a') as fh:

        def on_done(key, n, capped):
            it = by_id[key]
            rec = {
                'id': it.id,
                'prompt': it.prompt,
                'length': n,
                'capped': capped,
                'source': it.source,
                'template': it.template,
                'group': it.group,
                'prompt_tokens': n_prompt[key],
            }
            if key in lab.looped:
                rec['loop'] = True
            fh.write(json.dumps(rec, ensure_ascii=False) + '\n')
            fh.flush()
            state['n'] += 1
            state['tokens'] += n
            bar.update(state['n'], state['tokens'] / max(1e-9, time.perf_counter() - t0))

        lab.run(enc, on_done)
    bar.close()
    log(
        f'[dataset] labelled {state["n"]} prompts, {state["tokens"]} tokens in '
        f'{time.perf_counter() - t0:.0f}s'
    )
    return len(load_labels(out))


def verify_loops(
    path: str | os.PathLike,
    model_spec: str,
    n: int = 32,
    batch_size: int = 32,
    threads: int = 1,
    log=print,
) -> dict:
    """
    Check the loop detector on ``n`` loop-stopped prompts.

    Decode them to the cap without loop detection and count how many really ran to the cap; the
    result is stored in the file's header (``loop_check``).
    """
    from ..model import load_model

    path = Path(path)
    meta = read_meta(path)
    looped = sorted((r for r in load_labels(path) if r.get('loop')), key=lambda r: r['id'])[:n]
    if not looped:
        return {'n': 0}
    model, tok = load_model(model_spec, threads=threads)
    lab = ContinuousGreedyLabeler(model, tok, int(meta['max_new_tokens']), batch_size, loop_span=0)
    got = {}
    t0 = time.perf_counter()
    lab.run(
        [(r['id'], lab.encode(r['prompt'])) for r in looped],
        lambda k, m, c: got.__setitem__(k, (m, c)),
    )
    result = {
        'n': len(looped),
        'reached_cap': sum(c for _, c in got.values()),
        'stopped_early_lengths': sorted(m for m, c in got.values() if not c),
        'seconds': round(time.perf_counter() - t0, 1),
    }
    update_meta(path, {'loop_check': result})
    log(f'[dataset] loop check: {result}')
    return result


class _Progress:
    """A plain-text progress bar that also works in a log file (one line per update interval)."""

    def __init__(self, total: int, log, every_s: float = 15.0):
        self.total, self.log, self.every = total, log, every_s
        self.t0 = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, n: int, tok_s: float):
        now = time.perf_counter()
        if now - self.last < (0.5 if self.tty else self.every) and n < self.total:
            return
        self.last = now
        frac = n / max(1, self.total)
        eta = (now - self.t0) / max(frac, 1e-9) * (1 - frac)
        bar = '#' * int(30 * frac) + '-' * (30 - int(30 * frac))
        msg = f'[{bar}] {n}/{self.total} {tok_s:.0f} tok/s eta {eta / 60:.1f} min'
        if self.tty:
            print('\r' + msg, end='', file=sys.stderr, flush=True)
        else:
            self.log(msg)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001
        return '?'
