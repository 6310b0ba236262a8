"""
Long-context retrieval tasks with planted facts, for comparing KV presses on quality.

The distractor text ships with the system or with Python: the licence texts in
``/usr/share/common-licenses`` and the module docstrings of the Python standard library
(used alone where the licences are missing). Facts are planted in it at seeded depths:

- ``passkey``  — a five-digit pass key (Landmark / LongBench passkey retrieval);
- ``city``     — a secret city (one word out of a fixed list);
- ``colour``   — a magic colour (one word out of a fixed list);
- ``kv``       — four lockers with five-digit codes; the question asks for one (key-value lookup);
- ``twohop``   — "the secret agent is called X" and "X lives in C", with two other residents
  as distractors; the question asks for the agent's city (a multi-fact question).

Scoring is exact match on the extracted answer (``extract_answer``): the first number in the
reply for number answers, the first word of the task's answer list for word answers; the reply
is wrong when that value differs from the reference or none is found. Everything is
deterministic given the seed; ``build_candidates`` makes more tasks than needed, and the
benchmark keeps those the model answers right without eviction.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import random
import re
import sysconfig
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .tasks import _fit, Task

KINDS = ('passkey', 'city', 'colour', 'kv', 'twohop')
LENGTHS = (1024, 2048, 3072, 4096)
MAX_NEW_TOKENS = 16
SYSTEM_PROMPT = 'You answer questions about the given text. Answer briefly, using only the text.'
INTRO = (
    'There is important information hidden inside a long text. Find it and memorize it. '
    'I will quiz you about it.'
)
CITIES = (
    'Oslo', 'Lagos', 'Lima', 'Hanoi', 'Perth', 'Quito', 'Tunis', 'Riga', 'Nairobi', 'Osaka',
    'Porto', 'Denver', 'Dakar', 'Lisbon', 'Cairo', 'Seoul', 'Vienna', 'Madrid', 'Sydney',
    'Toronto',
)
COLOURS = (
    'violet', 'teal', 'amber', 'indigo', 'magenta', 'turquoise', 'maroon', 'olive', 'crimson',
    'beige', 'lavender', 'scarlet',
)
NAMES = ('Marta', 'Jonas', 'Aiko', 'Pedro', 'Leila', 'Tomas', 'Greta', 'Ravi', 'Nadia', 'Omar')
LOCKERS = ('falcon', 'otter', 'badger', 'heron', 'lynx', 'walrus', 'gecko', 'puffin')
_STDLIB_MODULES = (
    'argparse', 'pickle', 'tarfile', 'zipfile', 'subprocess', 'threading', 'logging/__init__',
    'email/message', 'http/client', 'json/__init__', 'csv', 'datetime', 'decimal', 'fractions',
    'heapq', 'inspect', 'pathlib', 'shutil', 'tempfile', 'textwrap', 'typing', 'uuid',
)

CountTokens = Callable[[str, Optional[str]], int]


# ------------------------------------------------------------------------------- distractor text
def _paragraphs(text: str, max_words: int = 60) -> List[str]:
    """Split on blank lines; long paragraphs into runs of sentences of at most ~max_words."""
    out = []
    for block in re.split(r'\n\s*\n', text):
        para = ' '.join(block.split())
        if len(para) < 40:
            continue
        piece: List[str] = []
        for sentence in re.split(r'(?<=[.;:])\s+', para):
            if piece and len(' '.join(piece + [sentence]).split()) > max_words:
                out.append(' '.join(piece))
                piece = []
            piece.append(sentence)
        if piece:
            out.append(' '.join(piece))
    return out


def haystack_documents(licences_dir: str = '/usr/share/common-licenses') -> List[List[str]]:
    """
    Distractor documents as lists of paragraphs, in a fixed order.

    The licence texts (duplicates and symlinks skipped), then standard-library docstrings.
    """
    docs: List[List[str]] = []
    seen = set()
    for path in sorted(glob.glob(os.path.join(licences_dir, '*'))):
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, errors='replace') as fh:
            text = fh.read()
        if text in seen:
            continue
        seen.add(text)
        paras = _paragraphs(text)
        if paras:
            docs.append(paras)
    stdlib = sysconfig.get_paths()['stdlib']
    for mod in _STDLIB_MODULES:
        path = os.path.join(stdlib, mod + '.py')
        if not os.path.isfile(path):
            continue
        with open(path, errors='replace') as fh:
            tree = ast.parse(fh.read())
        parts = [ast.get_docstring(tree) or '']
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                parts.append(ast.get_docstring(node) or '')
        paras = _paragraphs('\n\n'.join(p for p in parts if p))
        if paras:
            docs.append(paras)
    if not docs:
        raise RuntimeError('no distractor text found (licences or Python standard library)')
    return docs


def _stream(docs: Sequence[Sequence[str]], rng: random.Random) -> List[str]:
    """Consecutive paragraphs from a seeded document and offset, continuing through the rest."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    start = rng.randrange(len(docs[order[0]]))
    out = list(docs[order[0]][start:])
    for i in order[1:]:
        out.extend(docs[i])
    out.extend(docs[order[0]][:start])
    return out


# ---------------------------------------------------------------------------------- the answers
_NUMBER = re.compile(r'\d+')


def answer_vocabulary(kind: str) -> Tuple[str, ...]:
    """Word answers a task of ``kind`` can have (empty for number answers)."""
    return {'city': CITIES, 'twohop': CITIES, 'colour': COLOURS}.get(kind, ())


def extract_answer(kind: str, text: str) -> Optional[str]:
    """
    Return the answer a reply gives: its first number, or its first word from the answer list.

    None when the reply holds no such value.
    """
    vocab = answer_vocabulary(kind)
    if not vocab:
        m = _NUMBER.search(text or '')
        return m.group(0) if m else None
    lowered = {w.lower(): w for w in vocab}
    for word in re.findall(r'[A-Za-z]+', text or ''):
        if word.lower() in lowered:
            return lowered[word.lower()]
    return None


def exact_match(kind: str, text: str, reference: str) -> bool:
    """Tell whether the reply's extracted answer equals the reference (case-insensitive)."""
    got = extract_answer(kind, text)
    return got is not None and got.lower() == reference.lower()


def answer_decided(kind: str, text: str) -> bool:
    """
    Whether more tokens can no longer change the extracted answer.

    A number is decided once a non-digit follows it; a word once it appears and is followed by
    a non-letter. Lets a benchmark stop decoding early without changing any score.
    """
    if not answer_vocabulary(kind):
        m = _NUMBER.search(text or '')
        return m is not None and m.end() < len(text)
    vocab = {w.lower() for w in answer_vocabulary(kind)}
    for m in re.finditer(r'[A-Za-z]+', text or ''):
        if m.end() < len(text) and m.group(0).lower() in vocab:
            return True
    return False


# ----------------------------------------------------------------------------------- task kinds
def _code(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _facts(kind: str, rng: random.Random) -> Tuple[List[str], str, str]:
    """Return (facts to plant, question, reference) for one task."""
    if kind == 'passkey':
        key = _code(rng)
        return (
            [f'The pass key is {key}. Remember it. {key} is the pass key.'],
            'What is the pass key? Reply with the number only.',
            key,
        )
    if kind == 'city':
        city = rng.choice(CITIES)
        return (
            [f'Remember this: the secret city is {city}. The secret city is {city}.'],
            'What is the secret city? Reply with the city name only.',
            city,
        )
    if kind == 'colour':
        colour = rng.choice(COLOURS)
        return (
            [f'Remember this: the magic colour is {colour}. The magic colour is {colour}.'],
            'What is the magic colour? Reply with the colour only.',
            colour,
        )
    if kind == 'kv':
        lockers = rng.sample(LOCKERS, 4)
        codes = [_code(rng) for _ in lockers]
        asked = rng.randrange(len(lockers))
        return (
            [f'The code of the {name} locker is {code}.' for name, code in zip(lockers, codes)],
            f'What is the code of the {lockers[asked]} locker? Reply with the number only.',
            codes[asked],
        )
    if kind == 'twohop':
        names = rng.sample(NAMES, 3)
        cities = rng.sample(CITIES, 3)
        facts = [f'The secret agent is called {names[0]}.']
        facts += [f'{name} lives in {city}.' for name, city in zip(names, cities)]
        question = 'In which city does the secret agent live? Reply with the city only.'
        return facts, question, cities[0]
    raise ValueError(f'unknown task kind {kind!r}; use one of {KINDS}')


def make_task(
    kind: str,
    target_tokens: int,
    count_tokens: CountTokens,
    seed: int = 0,
    index: int = 0,
    docs: Optional[Sequence[Sequence[str]]] = None,
    system_prompt: str = SYSTEM_PROMPT,
) -> Task:
    """One task whose prompt (chat template and system prompt included) fits ``target_tokens``."""
    rng = random.Random(f'timebill-longctx-{seed}-{kind}-{target_tokens}-{index}')
    docs = docs if docs is not None else haystack_documents()
    facts, question, ref = _facts(kind, rng)
    stream = _stream(docs, rng)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in facts)
    order = list(range(len(facts)))
    if kind == 'twohop':  # the agent's name and the residents come in a random order
        rng.shuffle(order)
    planted = [facts[i] for i in order]

    def build(n: int) -> str:
        paras = [stream[i % len(stream)] for i in range(n)]
        for depth, fact in sorted(zip(depths, planted), key=lambda p: -p[0]):
            pos = max(0, min(len(paras), round(depth * len(paras))))
            paras.insert(pos, fact)
        return INTRO + '\n\n' + '\n\n'.join(paras) + '\n\n' + question

    prompt, _ = _fit(build, target_tokens, lambda p: count_tokens(p, system_prompt))
    n_tok = count_tokens(prompt, system_prompt)
    return Task(
        id=f'{kind}-{target_tokens}-{seed}-{index}',
        kind=kind,
        prompt=prompt,
        references=[ref],
        metric='exact_match',
        n_tokens=n_tok,
        max_new_tokens=MAX_NEW_TOKENS,
        system_prompt=system_prompt,
        meta={
            'depths': [round(d, 3) for d in depths],
            'target_tokens': target_tokens,
            'seed': seed,
        },
    )


def build_candidates(
    count_tokens: CountTokens,
    n: int,
    lengths: Iterable[int] = LENGTHS,
    kinds: Iterable[str] = KINDS,
    seed: int = 0,
) -> List[Task]:
    """
    Make ``n`` candidate tasks, round-robin over kinds and lengths so any prefix is balanced.

    Candidate i is the same task whatever ``n`` is.
    """
    lengths, kinds = list(lengths), list(kinds)
    docs = haystack_documents()
    out = []
    i = 0
    while len(out) < n:
        index, rest = divmod(i, len(lengths) * len(kinds))
        length = lengths[rest % len(lengths)]
        kind = kinds[(rest // len(lengths) + index) % len(kinds)]
        out.append(make_task(kind, length, count_tokens, seed=seed, index=index, docs=docs))
        i += 1
    return out


def default_path(seed: int = 0) -> str:
    """Where the candidates are cached (an ignored folder: ``<cache>/quality_tasks``)."""
    from ..config import cache_dir

    return str(cache_dir() / 'quality_tasks' / f'candidates-seed{seed}.jsonl')


def save_tasks(tasks: Sequence[Task], path: str) -> None:
    """Write tasks as JSON lines (the folder is made if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as fh:
        for t in tasks:
            fh.write(json.dumps(t.to_dict()) + '\n')
    os.replace(tmp, path)


def load_tasks(path: str) -> List[Task]:
    """Read tasks written by ``save_tasks``."""
    with open(path) as fh:
        return [Task.from_dict(json.loads(line)) for line in fh if line.strip()]


def load_or_build(
    count_tokens: CountTokens, n: int, path: Optional[str] = None, seed: int = 0, **kw
) -> Tuple[List[Task], str]:
    """Return ``n`` candidates from the cache file, building (and caching) them if short."""
    path = path or default_path(seed)
    if os.path.isfile(path):
        tasks = load_tasks(path)
        if len(tasks) >= n:
            return tasks[:n], path
    tasks = build_candidates(count_tokens, n, seed=seed, **kw)
    save_tasks(tasks, path)
    return tasks, path


def summary(tasks: Sequence[Task]) -> Dict[str, object]:
    """Count tasks per kind and give the token-length range."""
    kinds: Dict[str, int] = {}
    for t in tasks:
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
    lengths = [t.n_tokens for t in tasks]
    return {
        'n': len(tasks),
        'kinds': kinds,
        'min_tokens': min(lengths) if lengths else 0,
        'max_tokens': max(lengths) if lengths else 0,
    }
