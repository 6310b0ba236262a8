"""
The label file: one JSONL file of target-model lengths, read, rewritten and re-capped here.

A label file starts with a header line ``{"_meta": {...}}`` (model, cap, decoding, the command
that regenerates it) followed by one record per prompt. Reading must survive an interrupted
labelling run (a torn last line), and changing the cap must keep every answer that is still
valid under greedy decoding, so all file access lives in this one module. A label that hit the
cap is kept as ``length = cap`` with ``capped = true``: the target really does run to the cap
on that prompt (small models loop), so for WCET it is a true outcome, not noise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .prompts import split_of

DEFAULT_LABEL_FILE = Path(__file__).resolve().parents[2] / 'data' / 'lengths_smollm2.jsonl'
# structured (JSON-schema) answers of the robot tasks, distilled the same way
# (benchmarks/structured_lengths.py): the predictor trains on both by default
STRUCTURED_LABEL_FILE = DEFAULT_LABEL_FILE.with_name('lengths_smollm2_robot.jsonl')
CAPPED_NOTE = (
    'capped=true: the target did not stop by the cap (length = cap), or it entered an '
    'exact repeating loop that would run to the cap (loop=true). These are real '
    'outcomes, kept as the top class; at inference a prediction in the cap bucket '
    "means 'runs to the limit' and yields N_max."
)
REGENERATE_CMD = (
    'nice -n 15 timebill dataset --model smollm2-135m-instruct --n-prompts 3300 '
    '--limit 3000 --max-new-tokens 512 --loop-span 64 --batch-size 64 --threads 1 '
    '--out timebill_ros/data/lengths_smollm2.jsonl'
)


def load_labels(path: str | os.PathLike = DEFAULT_LABEL_FILE) -> list[dict]:
    """
    Load records ``{id, prompt, length, capped, source, template, group, split}``.

    The header line (``{"_meta": ...}``) is skipped. A torn last line from an interrupted run is
    ignored.
    """
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    with p.open() as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if '_meta' in rec:
                continue
            rec.setdefault('split', split_of(rec.get('group', rec['prompt'])))
            out.append(rec)
    return out


def read_meta(path: str | os.PathLike = DEFAULT_LABEL_FILE) -> dict:
    with Path(path).open() as fh:
        first = fh.readline()
    try:
        return json.loads(first).get('_meta', {})
    except json.JSONDecodeError:
        return {}


def header_line(meta: dict) -> str:
    """Write the first line of a label file."""
    return json.dumps({'_meta': meta}) + '\n'


def update_meta(path: Path, updates: dict) -> None:
    """Rewrite the header line (the file is small) when the labelling settings changed."""
    meta = read_meta(path)
    if all(meta.get(k) == v for k, v in updates.items()):
        return
    meta.update(updates)
    _rewrite(path, meta, load_labels(path))


def _rewrite(path: Path, meta: dict, recs: Sequence[dict]) -> None:
    """
    Replace a label file atomically: header line, then records.

    The split is derived, not stored.
    """
    tmp = path.with_suffix('.tmp')
    with tmp.open('w') as fh:
        fh.write(header_line(meta))
        for r in recs:
            fh.write(
                json.dumps({k: v for k, v in r.items() if k != 'split'}, ensure_ascii=False) + '\n'
            )
    tmp.replace(path)


def extend_cap(path: Path, cap: int, log=print) -> int:
    """
    Raise the cap of an existing label file, dropping only the capped prompts.

    Answers that ended before the old cap are final (greedy decoding stops at the same EOS), so
    only the capped prompts are dropped here, to be labelled again by the caller up to the new
    cap. Rerunning after an interruption resumes.
    """
    meta = read_meta(path)
    old = int(meta.get('max_new_tokens', cap))
    if old >= cap:
        return 0
    recs = load_labels(path)
    keep = [r for r in recs if not r['capped']]
    meta['max_new_tokens'] = cap
    meta['extended_from'] = old
    meta.pop('clamped_from', None)
    meta.pop('loop_check', None)  # it was measured at the old cap
    _rewrite(path, meta, keep)
    log(
        f'[dataset] {path}: cap {old} -> {cap}; '
        f'{len(recs) - len(keep)} capped prompts will be labelled again'
    )
    return len(recs) - len(keep)


def clamp_labels(path: Path, cap: int, log=print) -> None:
    """
    Lower the cap of an existing label file in place.

    Lossless under greedy decoding: a prompt that produced N >= cap tokens would have been cut at
    the cap.
    """
    meta = read_meta(path)
    old = int(meta.get('max_new_tokens', cap))
    if old == cap:
        return
    if old < cap:
        raise ValueError(f'{path} was labelled with cap {old} < {cap}: use extend_cap')
    recs = load_labels(path)
    meta['max_new_tokens'] = cap
    meta['clamped_from'] = old
    for r in recs:
        if r['length'] >= cap:
            r['length'], r['capped'] = cap, True
    _rewrite(path, meta, recs)
    log(f'[dataset] clamped {path} from cap {old} to {cap}')
