"""
Long-context benchmark tasks with references, built from data that ships in wheels.

Hub datasets (LongBench …) are unreachable here, so the tasks are assembled from
``fanoutqa`` (multi-hop questions, their decompositions and short sub-answers) and
``chatterbot-corpus`` (question → answer pairs), the way LongBench's synthetic tasks are:

- ``passkey``  — a number planted in repetitive filler (LongBench/Landmark passkey retrieval);
- ``needle``   — a code phrase planted in natural distractor text (needle in a haystack);
- ``qa``       — one answering passage among many distractor passages;
- ``multihop`` — a fanoutqa question whose sub-answers are spread among distractor notes.

Prompt lengths are measured with the target tokenizer (a ``count_tokens`` callable, usually
``Engine.encode`` with the chat template), and the context is grown by binary search to the
largest size that fits the target. Everything is deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
import json
import random
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .corpora import (
    answer_text, chatterbot_pairs, decomposition, fanout_facts, fanout_questions
)

KINDS = ('passkey', 'needle', 'qa', 'multihop')
METRIC_OF = {'passkey': 'contains', 'needle': 'contains', 'qa': 'token_f1', 'multihop': 'rouge_l'}
MAX_NEW_TOKENS_OF = {'passkey': 32, 'needle': 32, 'qa': 48, 'multihop': 96}
SYSTEM_PROMPT = 'You answer questions about the given text. Answer briefly, using only the text.'

CountTokens = Callable[[str], int]


@dataclass
class Task:
    # `id`, as in the task files and the recorded bags
    id: str  # noqa: A003
    kind: str
    prompt: str
    references: List[str]
    metric: str
    n_tokens: int  # prompt length as the target model sees it (count_tokens)
    max_new_tokens: int
    system_prompt: str = ''
    meta: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'Task':
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# --------------------------------------------------------------------------------- fitting length
def _fit(build: Callable[[int], str], target: int, count_tokens: CountTokens) -> Tuple[str, int]:
    """
    Largest unit count whose prompt has ≤ target tokens: doubling, then binary search.

    Few tokenizer calls (≈ 2·log2 of the unit count) even for 8k-token prompts.
    """
    best = build(1)
    best_n = count_tokens(best)
    if best_n > target:
        raise ValueError(
            f'target of {target} tokens is too small: the shortest prompt already has {best_n}'
        )
    lo, hi = 1, 2
    while True:  # grow until a count overshoots
        prompt = build(hi)
        n = count_tokens(prompt)
        if n > target:
            break
        lo, best, best_n, hi = hi, prompt, n, hi * 2
    hi -= 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        prompt = build(mid)
        n = count_tokens(prompt)
        if n <= target:
            lo, best, best_n = mid, prompt, n
        else:
            hi = mid - 1
    return best, best_n


class _Pool:
    """Distractor units in a seeded order, reshuffled each time the pool runs out."""

    def __init__(self, units: Sequence[str], rng: random.Random):
        self.units, self.rng, self.out = list(units), rng, []  # type: ignore[var-annotated]

    def take(self, n: int) -> List[str]:
        while len(self.out) < n:
            pool = list(self.units)
            self.rng.shuffle(pool)
            self.out.extend(pool)
        return self.out[:n]


# ----------------------------------------------------------------------------------- task kinds
_FILLER = (
    'The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.'
)
_PLACES = (
    'Oslo',
    'Lagos',
    'Lima',
    'Hanoi',
    'Perth',
    'Quito',
    'Tunis',
    'Riga',
    'Nairobi',
    'Osaka',
    'Porto',
    'Denver',
    'Cork',
    'Dakar',
    'Split',
    'Leeds',
)
_THINGS = (
    'warehouse',
    'charging dock',
    'loading bay',
    'pharmacy',
    'server room',
    'greenhouse',
    'workshop',
    'depot',
)
_WORDS = (
    'amber',
    'silver',
    'violet',
    'copper',
    'crimson',
    'ivory',
    'olive',
    'cobalt',
    'scarlet',
    'golden',
)
_ANIMALS = (
    'falcon',
    'otter',
    'badger',
    'heron',
    'lynx',
    'walrus',
    'gecko',
    'marmot',
    'puffin',
    'viper',
)


def _passkey(rng: random.Random, target: int, count: CountTokens) -> Tuple[str, List[str], dict]:
    key = str(rng.randint(10000, 99999))
    depth = rng.random()
    needle = f'The pass key is {key}. Remember it. {key} is the pass key.'
    head = (
        'There is an important pass key hidden inside a lot of irrelevant '
        'text. Find it and memorize it. I will quiz you about the pass key.\n\n'
    )
    tail = '\n\nWhat is the pass key? Reply with the number only.'

    def build(n: int) -> str:
        units = [_FILLER] * n
        units.insert(round(depth * n), needle)
        return head + ' '.join(units) + tail

    prompt, n_tok = _fit(build, target, count)
    return prompt, [key], {'depth': round(depth, 3)}


def _needle(rng: random.Random, target: int, count: CountTokens) -> Tuple[str, List[str], dict]:
    place, thing = rng.choice(_PLACES), rng.choice(_THINGS)
    code = f'{rng.choice(_WORDS)} {rng.choice(_ANIMALS)}'
    depth = rng.random()
    needle = f'The secret code for the {place} {thing} is {code}.'
    hay = [a for _, a in chatterbot_pairs()] + [f'{q} {a}.' for _, q, a in fanout_facts()]
    units = _Pool(hay, rng)
    tail = f'\n\nWhat is the secret code for the {place} {thing}? Reply with the code only.'

    def build(n: int) -> str:
        body = units.take(n)
        body.insert(round(depth * n), needle)
        return 'Read the text below.\n\n' + ' '.join(body) + tail

    prompt, _ = _fit(build, target, count)
    return prompt, [code], {'depth': round(depth, 3), 'needle': needle}


def _qa(rng: random.Random, target: int, count: CountTokens) -> Tuple[str, List[str], dict]:
    facts = fanout_facts()
    gold_qid, question, answer = facts[rng.randrange(len(facts))]
    distractors = [f'Question: {q} Answer: {a}.' for qid, q, a in facts if qid != gold_qid]
    distractors += [f'Question: {q} Answer: {a}' for q, a in chatterbot_pairs()]
    units = _Pool(distractors, rng)
    gold = f'Question: {question} Answer: {answer}.'
    depth = rng.random()
    tail = (
        f'\n\nUsing the passages above, answer this question: {question}\nAnswer in a few words.'
    )

    def build(n: int) -> str:
        body = units.take(n)
        body.insert(round(depth * n), gold)
        return (
            'Here are some passages.\n\n'
            + '\n'.join(f'Passage {i + 1}: {p}' for i, p in enumerate(body))
            + tail
        )

    prompt, _ = _fit(build, target, count)
    return prompt, [answer], {'depth': round(depth, 3), 'question': question}


@lru_cache(maxsize=1)
def _multihop_pool() -> Tuple[dict, ...]:
    """Fanoutqa questions small enough to answer in a short paragraph."""
    out = []
    for q in fanout_questions():
        subs = decomposition(q)
        ans = answer_text(q['answer'])
        if 2 <= len(subs) <= 8 and 1 <= len(ans.split()) <= 40:
            out.append(q)
    return tuple(out)


def _multihop(rng: random.Random, target: int, count: CountTokens) -> Tuple[str, List[str], dict]:
    pool = _multihop_pool()
    q = pool[rng.randrange(len(pool))]
    notes = [f'Q: {sq} A: {answer_text(a)}.' for sq, a in decomposition(q)]
    others = [
        f'Q: {sq} A: {answer_text(a)}.'
        for o in fanout_questions()
        if o['id'] != q['id']
        for sq, a in decomposition(o)
        if len(answer_text(a).split()) <= 30
    ]
    units = _Pool(others, rng)
    slots = sorted(rng.random() for _ in notes)
    tail = (
        f'\n\nUsing the notes above, answer this question: {q["question"]}\n'
        'Give every part of the answer, as a short list.'
    )

    def build(n: int) -> str:
        body = units.take(n)
        for frac, note in sorted(zip(slots, notes), reverse=True):
            body.insert(round(frac * n), note)
        return 'Here are some research notes.\n\n' + '\n'.join(body) + tail

    prompt, _ = _fit(build, target, count)
    return (
        prompt,
        [answer_text(q['answer'])],
        {'fanoutqa_id': q['id'], 'question': q['question'], 'n_hops': len(notes)},
    )


_BUILDERS = {'passkey': _passkey, 'needle': _needle, 'qa': _qa, 'multihop': _multihop}


def make_task(
    kind: str,
    target_tokens: int,
    count_tokens: CountTokens,
    seed: int = 0,
    index: int = 0,
    system_prompt: str = SYSTEM_PROMPT,
) -> Task:
    """Make a task of ``kind`` whose prompt (with ``system_prompt``) fits ``target_tokens``."""
    if kind not in _BUILDERS:
        raise ValueError(f'unknown task kind {kind!r}; use one of {KINDS}')
    rng = random.Random(f'timebill-{seed}-{kind}-{target_tokens}-{index}')
    prompt, refs, meta = _BUILDERS[kind](
        rng, target_tokens, lambda p: count_tokens(p, system_prompt)
    )
    n_tok = count_tokens(prompt, system_prompt)
    meta.update(target_tokens=target_tokens, seed=seed)
    return Task(
        id=f'{kind}-{target_tokens}-{seed}-{index}',
        kind=kind,
        prompt=prompt,
        references=refs,
        metric=METRIC_OF[kind],
        n_tokens=n_tok,
        max_new_tokens=MAX_NEW_TOKENS_OF[kind],
        system_prompt=system_prompt,
        meta=meta,
    )


def build_tasks(
    count_tokens: CountTokens,
    lengths: Iterable[int] = (1024, 2048, 4096, 7680),
    kinds: Iterable[str] = KINDS,
    per_kind: int = 1,
    seed: int = 0,
    system_prompt: str = SYSTEM_PROMPT,
) -> List[Task]:
    """Every kind at every target length, ``per_kind`` each, in a fixed order."""
    return [
        make_task(kind, int(n), count_tokens, seed=seed, index=i, system_prompt=system_prompt)
        for n in lengths
        for kind in kinds
        for i in range(per_kind)
    ]


def retrieval_tasks(
    count_tokens: CountTokens,
    lengths: Iterable[int],
    kinds: Optional[str] = None,
    per_kind: int = 1,
    seed: int = 0,
    max_new_tokens: int = 0,
) -> List[Task]:
    """
    Build the retrieval groups as ``timebill eval`` and ``timebill make-tasks`` both do.

    ``kinds`` is the command line's comma-separated list (None: every kind); answers are capped
    at ``max_new_tokens`` (0: each kind's own cap), so both commands build the same tasks.
    """
    chosen = [k.strip() for k in kinds.split(',')] if kinds else list(KINDS)
    tasks = build_tasks(count_tokens, lengths=lengths, kinds=chosen, per_kind=per_kind, seed=seed)
    return cap_answers(tasks, max_new_tokens)


def cap_answers(tasks: List[Task], max_new_tokens: int) -> List[Task]:
    """Cap every task's max_new_tokens at ``max_new_tokens`` (0: leave them); return them."""
    if max_new_tokens:
        for t in tasks:
            t.max_new_tokens = min(t.max_new_tokens, max_new_tokens)
    return tasks


def counter_for(engine) -> CountTokens:
    """Prompt length as the engine will prefill it (chat template and system prompt included)."""
    return lambda prompt, system_prompt=None: len(engine.encode(prompt, system_prompt or None))


def word_counter(prompt: str, system_prompt: Optional[str] = None) -> int:
    """Whitespace tokens: a tokenizer-free stand-in for tests."""
    return len(prompt.split()) + len((system_prompt or '').split())


def save_tasks(tasks: Sequence[Task], path: str) -> None:
    with open(path, 'w') as fh:
        for t in tasks:
            fh.write(json.dumps(t.to_dict()) + '\n')


def load_tasks(path: str) -> List[Task]:
    with open(path) as fh:
        return [Task.from_dict(json.loads(line)) for line in fh if line.strip()]
