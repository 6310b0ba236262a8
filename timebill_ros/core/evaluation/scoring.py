"""
Answer scoring: exact match, containment, token F1 and ROUGE-L against reference answers.

Normalisation follows SQuAD (lower-case, drop punctuation and English articles, collapse
whitespace) so that "The pass key is 71432." and "71432" compare on content, not formatting.
With several references a prediction gets its best score, as in SQuAD and LongBench.
"""

from __future__ import annotations

from collections import Counter
import re
import string
from typing import Callable, Dict, List, Sequence, Union

_PUNCT = set(string.punctuation) | {'“', '”', '‘', '’', '–', '—', '…'}
_ARTICLES = re.compile(r'\b(a|an|the)\b')

Refs = Union[str, Sequence[str]]


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, collapse whitespace (SQuAD's rule)."""
    text = (text or '').lower()
    text = ''.join(' ' if ch in _PUNCT else ch for ch in text)  # "well-known" -> "well known"
    text = _ARTICLES.sub(' ', text)
    return ' '.join(text.split())


def tokens(text: str) -> List[str]:
    return normalize_answer(text).split()


def _refs(references: Refs) -> List[str]:
    if isinstance(references, str):
        return [references]
    refs = [str(r) for r in references]
    if not refs:
        raise ValueError('at least one reference answer is needed to score')
    return refs


def exact_match(prediction: str, references: Refs) -> float:
    """1.0 when the normalised prediction equals a normalised reference."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _refs(references)))


def contains(prediction: str, references: Refs) -> float:
    """
    1.0 when a reference occurs in the prediction as whole tokens ("71432" not in "714321").

    Retrieval tasks (passkey, needle) are judged this way: a chat model wraps the answer in a
    sentence, and what matters is whether it recovered the planted fact.
    """
    pred = tokens(prediction)
    for ref in _refs(references):
        r = tokens(ref)
        if not r:
            if not pred:
                return 1.0
            continue
        n = len(r)
        if any(pred[i:i + n] == r for i in range(len(pred) - n + 1)):
            return 1.0
    return 0.0


def _f1(pred: List[str], ref: List[str]) -> float:
    if not pred or not ref:
        return float(pred == ref)  # both empty: agree; one empty: nothing in common
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def token_f1(prediction: str, references: Refs) -> float:
    """Compute SQuAD token F1: harmonic mean of bag-of-tokens precision and recall."""
    pred = tokens(prediction)
    return max(_f1(pred, tokens(r)) for r in _refs(references))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programme, two rows)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, references: Refs, beta: float = 1.0) -> float:
    """
    Compute ROUGE-L F-measure (Lin 2004) on normalised tokens.

    β = 1 weighs precision and recall equally.
    """
    pred = tokens(prediction)
    best = 0.0
    for ref in _refs(references):
        r = tokens(ref)
        if not pred or not r:
            best = max(best, float(pred == r))
            continue
        lcs = lcs_length(pred, r)
        if lcs == 0:
            continue
        p, rec = lcs / len(pred), lcs / len(r)
        best = max(best, (1 + beta**2) * p * rec / (rec + beta**2 * p))
    return best


METRICS: Dict[str, Callable[[str, Refs], float]] = {
    'exact_match': exact_match,
    'contains': contains,
    'token_f1': token_f1,
    'rouge_l': rouge_l,
}


def _json_metric(name: str) -> Callable[[str, Refs], float]:
    def fn(prediction: str, references: Refs) -> float:
        from .robot_grading import score_json  # it imports this module

        return score_json(name, prediction, _refs(references))

    fn.__name__ = name
    return fn


# structured robot answers (robot_tasks): references[0] is the ground truth as JSON
for _name in ('json_set_f1', 'json_plan', 'json_record'):
    METRICS[_name] = _json_metric(_name)


def score(metric: str, prediction: str, references: Refs) -> float:
    """Score one answer with the named metric, in [0, 1]."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f'unknown metric {metric!r}; use one of {sorted(METRICS)}') from None
    return fn(prediction, references)
