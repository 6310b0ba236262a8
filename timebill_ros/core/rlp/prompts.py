"""
The prompts of the length dataset, and the fixed train/val/test split.

TimeBill's predictor must learn a length that depends on the prompt, so the prompts mix real
questions (``fanoutqa``, ``chatterbot-corpus``; both ship their data in the wheel) with
instruction templates that ask for very different amounts of text. This module builds that
deterministic mix and assigns each prompt a split by hash of its underlying question or topic;
it loads no model, so the CLIs and tests can list prompts and splits cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
import hashlib
import importlib.util
import json
from pathlib import Path
import random
from typing import Callable, Iterable, Iterator, Sequence

SPLITS = ('train', 'val', 'test')


# --------------------------------------------------------------------------- split
def prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:12]


def stable_hash(text: str) -> int:
    """Process-independent hash (Python's ``hash`` is salted per run)."""
    return int(prompt_id(text), 16)


def split_of(group: str, val_frac: float = 0.1, test_frac: float = 0.1) -> str:
    """
    Split by hash of the *group* (the underlying question/topic).

    So one question asked through several templates never sits on both sides of the train/test
    line.
    """
    u = (stable_hash(group) % 10_000) / 10_000
    if u < test_frac:
        return 'test'
    if u < test_frac + val_frac:
        return 'val'
    return 'train'


# --------------------------------------------------------------------------- sources
def _package_dir(module: str) -> Path:
    """Locate a data-only package without importing it (fanoutqa's import pulls spacy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f'package {module!r} is not installed '
            f'(pip install --no-deps {module.replace("_", "-")})'
        )
    return Path(list(spec.submodule_search_locations)[0])


def fanoutqa_questions() -> tuple[list[str], list[str], list[str]]:
    """(multi-hop questions, sub-questions, Wikipedia titles) from the dev and test files."""
    data = _package_dir('fanoutqa') / 'data'
    questions, subs, titles = [], [], []

    def walk(node):
        for d in node.get('decomposition') or []:
            subs.append(d['question'])
            ev = d.get('evidence') or {}
            if ev.get('title'):
                titles.append(ev['title'])
            walk(d)

    for name in ('fanout-final-dev.json', 'fanout-final-test.json'):
        path = data / name
        if not path.is_file():
            continue
        for q in json.loads(path.read_text()):
            questions.append(q['question'])
            walk(q)
            for ev in q.get('necessary_evidence') or []:
                titles.append(ev['title'])
    return _dedupe(questions), _dedupe(subs), _dedupe(titles)


def chatterbot_questions() -> tuple[list[str], list[str]]:
    """(questions, categories) from chatterbot-corpus' English YAML files."""
    import yaml

    root = _package_dir('chatterbot_corpus') / 'data' / 'english'
    qs, cats = [], []
    for path in sorted(root.glob('*.yml')):
        doc = yaml.safe_load(path.read_text()) or {}
        cats.extend(str(c) for c in doc.get('categories') or [])
        for conv in doc.get('conversations') or []:
            if conv and isinstance(conv[0], str) and len(conv[0].split()) >= 2:
                qs.append(conv[0].strip())
    return _dedupe(qs), _dedupe(cats)


def _end(q: str) -> str:
    """Terminate a question so an appended instruction reads as a new sentence."""
    return q if q[-1:] in '.?!' else q + '.'


def _dedupe(items: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for s in items:
        s = ' '.join(str(s).split())
        if s and s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
    return out


# Hand-written task lists (ours, not copied from a dataset) for the code and robot templates.
CODE_TASKS = [
    'reverses a string',
    'checks whether a number is prime',
    'computes the n-th Fibonacci number',
    'merges two sorted lists',
    'counts the words in a text file',
    'removes duplicates from a list',
    'parses a CSV line into fields',
    'finds the largest element in a list',
    'converts Celsius to Fahrenheit',
    'computes the factorial of n',
    'checks whether a string is a palindrome',
    'flattens a nested list',
    'implements binary search',
    'sorts a list with quicksort',
    'computes the GCD of two integers',
    'validates an email address with a regular expression',
    'reads a JSON file and prints its keys',
    'implements a stack class',
    'implements a queue with two stacks',
    'computes the mean and median of a list',
    'transposes a matrix',
    'counts character frequencies in a string',
    'checks whether brackets are balanced',
    'converts a Roman numeral to an integer',
    'generates all permutations of a list',
    'computes the distance between two GPS coordinates',
    'implements a PID controller',
    'rate-limits function calls',
    'implements an LRU cache',
    'performs breadth-first search on a grid',
    'computes the moving average of a sensor signal',
    "implements Dijkstra's shortest path",
    'detects a cycle in a linked list',
    'serialises a binary tree',
    'downsamples a point cloud on a voxel grid',
    "clamps a robot's velocity command",
    'computes odometry from wheel encoder ticks',
    'checks whether a year is a leap year',
    'formats a duration in seconds as h:mm:ss',
    'splits a list into chunks of size k',
]
ROBOT_TASKS = [
    'cross a busy road',
    'pick up a cup from a table',
    'dock at its charging station',
    'open a door',
    'follow a person through a crowd',
    'deliver a parcel to the third floor',
    'avoid a dog on the sidewalk',
    'map an unknown warehouse',
    'recover after losing localisation',
    'hand a tool to a surgeon',
    'inspect a pipe for leaks',
    'stack three boxes',
    'water the plants in a greenhouse',
    'navigate around a wet floor',
    'enter an elevator',
    'sort recycling',
    'fold a towel',
    'detect a fallen elderly person',
    'return to base when the battery is low',
    'park next to a shelf',
    'carry a tray of drinks',
    'patrol a parking lot at night',
    'clean a kitchen counter',
    'greet a visitor at reception',
    'avoid a child running in a hallway',
    'climb a ramp',
    'plan a path through a forest',
    'load a dishwasher',
    'check a solar panel for damage',
    'guide a blind person to a bus stop',
]
STORY_FORMS = [
    'a short story',
    'a story',
    'a long story',
    'a poem',
    'a haiku',
    'a limerick',
    'a fairy tale',
    'a diary entry',
    'a dialogue between two characters',
    'a news report',
]
LANGS = ['Python', 'Python', 'Python', 'C++', 'JavaScript', 'Rust', 'Java', 'Go']
NUM_WORDS = {
    1: 'one', 2: 'two', 3: 'three', 4: 'four', 5: 'five', 6: 'six', 7: 'seven', 8: 'eight',
    9: 'nine', 10: 'ten', 12: 'twelve', 15: 'fifteen', 20: 'twenty',
}


@dataclass
class PromptItem:
    # `id`, as in the label files
    id: str  # noqa: A003
    prompt: str
    source: str  # where the base text came from
    template: str  # which instruction family
    group: str  # split key: the underlying question/topic

    @property
    def split(self) -> str:
        return split_of(self.group)


def build_prompts(n_target: int = 3300, seed: int = 0) -> list[PromptItem]:
    """
    Build a deterministic, shuffled mix of ~``n_target`` prompts with varied answer lengths.

    Shares per template family are fixed; the order is shuffled so any prefix of the labelled
    file is a representative sample (useful while labelling is still running).
    """
    rng = random.Random(seed)
    mq, subs, titles = fanoutqa_questions()
    cq, cats = chatterbot_questions()
    topics = _dedupe(titles + cats)
    rng.shuffle(mq), rng.shuffle(subs), rng.shuffle(cq), rng.shuffle(topics)
    allq = (
        [('fanoutqa', q) for q in mq]
        + [('fanoutqa-sub', q) for q in subs]
        + [('chatterbot', q) for q in cq]
    )
    rng.shuffle(allq)
    qi = iter(_cycle(allq))
    ti = iter(_cycle([('topic', t) for t in topics]))

    def num(options):
        k = rng.choice(options)
        return NUM_WORDS.get(k, str(k)) if rng.random() < 0.5 else str(k)

    families: list[tuple[float, Callable[[], tuple[str, str, str, str]]]] = []

    def fam(share):
        def deco(fn):
            families.append((share, fn))
            return fn

        return deco

    @fam(0.20)
    def raw():
        src, q = next(qi)
        return q, src, 'raw', q

    @fam(0.18)
    def short():
        src, q = next(qi)
        suffix = rng.choice(
            [
                'Answer with one word.',
                'Answer in one word only.',
                'Reply with just the answer, no explanation.',
                'Give only the name.',
                'Answer with a single number or name.',
                'Answer yes or no.',
                'Answer in five words or fewer.',
            ]
        )
        return f'{_end(q)} {suffix}', src, 'short', q

    @fam(0.10)
    def items():
        src, t = next(ti)
        k = num([2, 3, 3, 4, 5, 5, 6, 7, 8, 10, 12, 15, 20])
        what = rng.choice(
            [
                'facts about {t}',
                'questions someone might ask about {t}',
                'keywords related to {t}',
                'reasons why {t} matters',
                'things to know about {t}',
                'bullet points summarising {t}',
            ]
        )
        return f'List {k} {what.format(t=t)}.', src, 'items', t

    @fam(0.12)
    def sentences():
        src, q = next(qi) if rng.random() < 0.6 else next(ti)
        n = num([1, 1, 2, 3, 4, 5, 6, 8, 10])
        body = q if src != 'topic' else f'Describe {q}.'
        form = rng.choice(
            [
                'Answer in {n} sentences.',
                'Explain your answer in {n} sentences.',
                'Use exactly {n} sentences.',
            ]
        )
        return f'{_end(body)} {form.format(n=n)}', src, 'sentences', q

    @fam(0.08)
    def words():
        src, q = next(qi) if rng.random() < 0.5 else next(ti)
        w = rng.choice([5, 10, 20, 30, 50, 75, 100, 150, 200, 300])
        body = q if src != 'topic' else f'Tell me about {q}.'
        return f'{_end(body)} Answer in about {w} words.', src, 'words', q

    @fam(0.08)
    def paragraph():
        src, t = next(ti)
        n = rng.choice([1, 1, 1, 2, 3])
        what = 'a paragraph' if n == 1 else f'{NUM_WORDS[n]} paragraphs'
        verb = rng.choice(['Write', 'Compose', 'Give me'])
        return f'{verb} {what} about {t}.', src, 'paragraph', t

    @fam(0.08)
    def story():
        src, t = next(ti)
        form = rng.choice(STORY_FORMS)
        return f'Write {form} about {t}.', src, 'story', t

    @fam(0.06)
    def code():
        task = rng.choice(CODE_TASKS)
        lang = rng.choice(LANGS)
        extra = rng.choice(
            [
                '',
                '',
                ' Only output the code.',
                ' Explain how it works.',
                ' Include tests.',
                ' Keep it under ten lines.',
            ]
        )
        return f'Write a {lang} function that {task}.{extra}', 'code', 'code', task

    @fam(0.06)
    def robot():
        task = rng.choice(ROBOT_TASKS)
        form = rng.choice(
            [
                'Give step-by-step instructions for a mobile robot to {t}.',
                'In one sentence, what should a robot do to {t}?',
                'What is the single most important safety check before a robot '
                'tries to {t}? One word.',
                'List the sensors a robot needs to {t}.',
                'Write a detailed plan, with contingencies, for a service robot that must {t}.',
                'Can a small wheeled robot {t}? Answer yes or no.',
            ]
        )
        return form.format(t=task), 'robot', 'robot', task

    @fam(0.04)
    def essay():
        src, t = next(ti)
        what = rng.choice(
            [
                'a detailed essay',
                'a long, detailed explanation',
                'a complete guide',
                'an in-depth article',
            ]
        )
        return f'Write {what} about {t}.', src, 'essay', t

    total = sum(s for s, _ in families)
    out, seen = [], set()
    for share, fn in families:
        want = round(n_target * share / total)
        tries = 0
        made = 0
        while made < want and tries < want * 20:
            tries += 1
            prompt, src, tmpl, group = fn()
            pid = prompt_id(prompt)
            if pid in seen:
                continue
            seen.add(pid)
            key = f'{tmpl}|{group}' if tmpl in ('code', 'robot') else group
            out.append(PromptItem(pid, prompt, src, tmpl, key))
            made += 1
    rng.shuffle(out)
    return out


def _cycle(items: Sequence) -> Iterator:
    while True:
        yield from items
