"""Response-length dataset: prompts from shipped data, labels distilled from the target model.

TimeBill's predictor learns the lengths the *target* model really produces, so the labels come
from running that model (chat template, greedy, stop at EOS, up to a cap). Prompts mix real
questions (``fanoutqa``, ``chatterbot-corpus``; both ship their data in the wheel) with instruction
templates that ask for very different amounts of text, so the length depends on the prompt.

A label that hit the cap is kept as ``length = cap`` with ``capped = true``: the target really does
run to the cap on that prompt (small models loop), so for WCET it is a true outcome, not noise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

DEFAULT_LABEL_FILE = Path(__file__).resolve().parents[1] / "data" / "lengths_smollm2.jsonl"
SPLITS = ("train", "val", "test")
CAPPED_NOTE = ("capped=true: the target did not stop by the cap (length = cap), or it entered an exact repeating "
               "loop that would run to the cap (loop=true). These are real outcomes, kept as the top class; "
               "at inference a prediction in the cap bucket means 'runs to the limit' and yields N_max.")
REGENERATE_CMD = ("nice -n 15 timebill dataset --model smollm2-135m-instruct --n-prompts 3300 --limit 3000 "
                  "--max-new-tokens 512 --loop-span 64 --batch-size 64 --threads 1 "
                  "--out timebill_ros/data/lengths_smollm2.jsonl")


# --------------------------------------------------------------------------- split
def stable_hash(text: str) -> int:
    """Process-independent hash (Python's ``hash`` is salted per run)."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:12], 16)


def prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


def split_of(group: str, val_frac: float = 0.1, test_frac: float = 0.1) -> str:
    """Fixed split by hash of the *group* (the underlying question/topic), so one question asked
    through several templates never sits on both sides of the train/test line."""
    u = (stable_hash(group) % 10_000) / 10_000
    if u < test_frac:
        return "test"
    if u < test_frac + val_frac:
        return "val"
    return "train"


# --------------------------------------------------------------------------- sources
def _package_dir(module: str) -> Path:
    """Locate a data-only package without importing it (fanoutqa's import pulls spacy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed (pip install --no-deps {module.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def fanoutqa_questions() -> tuple[list[str], list[str], list[str]]:
    """(multi-hop questions, sub-questions, Wikipedia titles) from the dev and test files."""
    data = _package_dir("fanoutqa") / "data"
    questions, subs, titles = [], [], []

    def walk(node):
        for d in node.get("decomposition") or []:
            subs.append(d["question"])
            ev = d.get("evidence") or {}
            if ev.get("title"):
                titles.append(ev["title"])
            walk(d)

    for name in ("fanout-final-dev.json", "fanout-final-test.json"):
        path = data / name
        if not path.is_file():
            continue
        for q in json.loads(path.read_text()):
            questions.append(q["question"])
            walk(q)
            for ev in q.get("necessary_evidence") or []:
                titles.append(ev["title"])
    return _dedupe(questions), _dedupe(subs), _dedupe(titles)


def chatterbot_questions() -> tuple[list[str], list[str]]:
    """(questions, categories) from chatterbot-corpus' English YAML files."""
    import yaml

    root = _package_dir("chatterbot_corpus") / "data" / "english"
    qs, cats = [], []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text()) or {}
        cats.extend(str(c) for c in doc.get("categories") or [])
        for conv in doc.get("conversations") or []:
            if conv and isinstance(conv[0], str) and len(conv[0].split()) >= 2:
                qs.append(conv[0].strip())
    return _dedupe(qs), _dedupe(cats)


def _end(q: str) -> str:
    """Terminate a question so an appended instruction reads as a new sentence."""
    return q if q[-1:] in ".?!" else q + "."


def _dedupe(items: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for s in items:
        s = " ".join(str(s).split())
        if s and s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
    return out


# Hand-written task lists (ours, not copied from a dataset) for the code and robot templates.
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the n-th Fibonacci number",
    "merges two sorted lists", "counts the words in a text file", "removes duplicates from a list",
    "parses a CSV line into fields", "finds the largest element in a list", "converts Celsius to Fahrenheit",
    "computes the factorial of n", "checks whether a string is a palindrome", "flattens a nested list",
    "implements binary search", "sorts a list with quicksort", "computes the GCD of two integers",
    "validates an email address with a regular expression", "reads a JSON file and prints its keys",
    "implements a stack class", "implements a queue with two stacks", "computes the mean and median of a list",
    "transposes a matrix", "counts character frequencies in a string", "checks whether brackets are balanced",
    "converts a Roman numeral to an integer", "generates all permutations of a list",
    "computes the distance between two GPS coordinates", "implements a PID controller",
    "rate-limits function calls", "implements an LRU cache", "performs breadth-first search on a grid",
    "computes the moving average of a sensor signal", "implements Dijkstra's shortest path",
    "detects a cycle in a linked list", "serialises a binary tree", "downsamples a point cloud on a voxel grid",
    "clamps a robot's velocity command", "computes odometry from wheel encoder ticks",
    "checks whether a year is a leap year", "formats a duration in seconds as h:mm:ss",
    "splits a list into chunks of size k",
]
ROBOT_TASKS = [
    "cross a busy road", "pick up a cup from a table", "dock at its charging station", "open a door",
    "follow a person through a crowd", "deliver a parcel to the third floor", "avoid a dog on the sidewalk",
    "map an unknown warehouse", "recover after losing localisation", "hand a tool to a surgeon",
    "inspect a pipe for leaks", "stack three boxes", "water the plants in a greenhouse",
    "navigate around a wet floor", "enter an elevator", "sort recycling", "fold a towel",
    "detect a fallen elderly person", "return to base when the battery is low", "park next to a shelf",
    "carry a tray of drinks", "patrol a parking lot at night", "clean a kitchen counter",
    "greet a visitor at reception", "avoid a child running in a hallway", "climb a ramp",
    "plan a path through a forest", "load a dishwasher", "check a solar panel for damage",
    "guide a blind person to a bus stop",
]
STORY_FORMS = ["a short story", "a story", "a long story", "a poem", "a haiku", "a limerick",
               "a fairy tale", "a diary entry", "a dialogue between two characters", "a news report"]
LANGS = ["Python", "Python", "Python", "C++", "JavaScript", "Rust", "Java", "Go"]
NUM_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
             9: "nine", 10: "ten", 12: "twelve", 15: "fifteen", 20: "twenty"}


@dataclass
class PromptItem:
    id: str
    prompt: str
    source: str  # where the base text came from
    template: str  # which instruction family
    group: str  # split key: the underlying question/topic

    @property
    def split(self) -> str:
        return split_of(self.group)


def build_prompts(n_target: int = 3300, seed: int = 0) -> list[PromptItem]:
    """A deterministic, shuffled mix of ~``n_target`` prompts with widely different answer lengths.

    Shares per template family are fixed; the order is shuffled so any prefix of the labelled
    file is a representative sample (useful while labelling is still running).
    """
    rng = random.Random(seed)
    mq, subs, titles = fanoutqa_questions()
    cq, cats = chatterbot_questions()
    topics = _dedupe(titles + cats)
    rng.shuffle(mq), rng.shuffle(subs), rng.shuffle(cq), rng.shuffle(topics)
    allq = [("fanoutqa", q) for q in mq] + [("fanoutqa-sub", q) for q in subs] + [("chatterbot", q) for q in cq]
    rng.shuffle(allq)
    qi = iter(_cycle(allq))
    ti = iter(_cycle([("topic", t) for t in topics]))

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
        return q, src, "raw", q

    @fam(0.18)
    def short():
        src, q = next(qi)
        suffix = rng.choice(["Answer with one word.", "Answer in one word only.", "Reply with just the answer, no explanation.",
                             "Give only the name.", "Answer with a single number or name.", "Answer yes or no.",
                             "Answer in five words or fewer."])
        return f"{_end(q)} {suffix}", src, "short", q

    @fam(0.10)
    def items():
        src, t = next(ti)
        k = num([2, 3, 3, 4, 5, 5, 6, 7, 8, 10, 12, 15, 20])
        what = rng.choice(["facts about {t}", "questions someone might ask about {t}", "keywords related to {t}",
                           "reasons why {t} matters", "things to know about {t}", "bullet points summarising {t}"])
        return f"List {k} {what.format(t=t)}.", src, "items", t

    @fam(0.12)
    def sentences():
        src, q = next(qi) if rng.random() < 0.6 else next(ti)
        n = num([1, 1, 2, 3, 4, 5, 6, 8, 10])
        body = q if src != "topic" else f"Describe {q}."
        form = rng.choice(["Answer in {n} sentences.", "Explain your answer in {n} sentences.", "Use exactly {n} sentences."])
        return f"{_end(body)} {form.format(n=n)}", src, "sentences", q

    @fam(0.08)
    def words():
        src, q = next(qi) if rng.random() < 0.5 else next(ti)
        w = rng.choice([5, 10, 20, 30, 50, 75, 100, 150, 200, 300])
        body = q if src != "topic" else f"Tell me about {q}."
        return f"{_end(body)} Answer in about {w} words.", src, "words", q

    @fam(0.08)
    def paragraph():
        src, t = next(ti)
        n = rng.choice([1, 1, 1, 2, 3])
        what = "a paragraph" if n == 1 else f"{NUM_WORDS[n]} paragraphs"
        verb = rng.choice(["Write", "Compose", "Give me"])
        return f"{verb} {what} about {t}.", src, "paragraph", t

    @fam(0.08)
    def story():
        src, t = next(ti)
        form = rng.choice(STORY_FORMS)
        return f"Write {form} about {t}.", src, "story", t

    @fam(0.06)
    def code():
        task = rng.choice(CODE_TASKS)
        lang = rng.choice(LANGS)
        extra = rng.choice(["", "", " Only output the code.", " Explain how it works.", " Include tests.",
                            " Keep it under ten lines."])
        return f"Write a {lang} function that {task}.{extra}", "code", "code", task

    @fam(0.06)
    def robot():
        task = rng.choice(ROBOT_TASKS)
        form = rng.choice(["Give step-by-step instructions for a mobile robot to {t}.",
                           "In one sentence, what should a robot do to {t}?",
                           "What is the single most important safety check before a robot tries to {t}? One word.",
                           "List the sensors a robot needs to {t}.",
                           "Write a detailed plan, with contingencies, for a service robot that must {t}.",
                           "Can a small wheeled robot {t}? Answer yes or no."])
        return form.format(t=task), "robot", "robot", task

    @fam(0.04)
    def essay():
        src, t = next(ti)
        what = rng.choice(["a detailed essay", "a long, detailed explanation", "a complete guide", "an in-depth article"])
        return f"Write {what} about {t}.", src, "essay", t

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
            out.append(PromptItem(pid, prompt, src, tmpl, f"{tmpl}|{group}" if tmpl in ("code", "robot") else group))
            made += 1
    rng.shuffle(out)
    return out


def _cycle(items: Sequence) -> Iterator:
    while True:
        yield from items


# --------------------------------------------------------------------------- label file IO
def load_labels(path: str | os.PathLike = DEFAULT_LABEL_FILE) -> list[dict]:
    """Records ``{id, prompt, length, capped, source, template, group, split}``; the header line
    (``{"_meta": ...}``) is skipped. A torn last line from an interrupted run is ignored."""
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
            if "_meta" in rec:
                continue
            rec.setdefault("split", split_of(rec.get("group", rec["prompt"])))
            out.append(rec)
    return out


def read_meta(path: str | os.PathLike = DEFAULT_LABEL_FILE) -> dict:
    with Path(path).open() as fh:
        first = fh.readline()
    try:
        return json.loads(first).get("_meta", {})
    except json.JSONDecodeError:
        return {}


# --------------------------------------------------------------------------- labelling
def _prealloc_layer_class():
    """A cache layer with room to grow, so decoding does not copy the whole cache every step the
    way ``DynamicCache``'s ``torch.cat`` does (it grows in chunks of 64 columns)."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class _Prealloc(DynamicLayer):
        def __init__(self, keys, values, n):
            super().__init__()
            self.keys, self.values, self.n = keys, values, n
            self.device = keys.device
            self.is_initialized = True

        def update(self, k, v, *args, **kwargs):
            q = k.shape[-2]
            if self.n + q > self.keys.shape[-2]:
                grow = max(q, 64)
                z = self.keys.new_zeros(*self.keys.shape[:2], grow, self.keys.shape[-1])
                self.keys = torch.cat([self.keys, z], -2)
                self.values = torch.cat([self.values, z.clone()], -2)
            self.keys[:, :, self.n:self.n + q] = k
            self.values[:, :, self.n:self.n + q] = v
            self.n += q
            return self.keys[:, :, :self.n], self.values[:, :, :self.n]

        def get_seq_length(self):
            return self.n

        def get_mask_sizes(self, query_length):
            return self.n + query_length, 0

    return _Prealloc


def detect_loop(tokens: Sequence[int], span: int = 64, max_period: int = 64) -> bool:
    """True when the last tokens are one block repeated back to back over >= ``span`` tokens (and
    at least 3 times). Greedy decoding of a small model practically never leaves such a loop, so
    the row is stopped and labelled as running to the cap; ``timebill dataset`` checks that claim
    on a sample of looped prompts (``--verify-loops``)."""
    n = len(tokens)
    for p in range(1, max_period + 1):
        reps = max(3, -(-span // p))
        if reps * p > n:
            break
        block = tokens[n - p:]
        if all(tokens[n - (r + 1) * p:n - r * p] == block for r in range(1, reps)):
            return True
    return False


class ContinuousGreedyLabeler:
    """Greedy decoding of many prompts with a pool of ``batch_size`` rows that is refilled as rows
    finish (continuous batching), so one looping prompt does not hold a whole batch hostage.

    Rows are left-aligned to a shared right edge; padding columns are masked and each row keeps its
    own RoPE positions. Finished rows are dropped and new prompts prefilled and merged whenever at
    least ``refill_at`` rows are free. Numerically this differs from unbatched greedy only by float
    summation order, which can flip a near-tied argmax now and then (lengths stay the target's).
    """

    def __init__(self, model, tokenizer, max_new_tokens: int, batch_size: int = 24, refill_at: int = 4,
                 loop_span: int = 0):
        self.model, self.tok = model, tokenizer
        self.cap = int(max_new_tokens)
        self.loop_span = int(loop_span)  # >0: stop rows stuck in an exact loop this long (labelled capped)
        self.looped: set = set()
        self._hist: dict = {}
        self.batch_size = int(batch_size)
        self.refill_at = max(1, min(int(refill_at), self.batch_size))
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos if eos is not None else tokenizer.eos_token_id])
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)

    def encode(self, prompt: str) -> list[int]:
        msgs = [{"role": "user", "content": prompt}]
        ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def run(self, items: Sequence[tuple[str, list[int]]], on_done: Callable[[str, int, bool], None]) -> None:
        """Label ``items`` = [(key, prompt_ids)]; call ``on_done(key, n_generated, capped)`` per prompt.

        ``gen`` counts generated tokens including the pending ``nxt``; a row ends when ``nxt`` is EOS
        (length ``gen - 1``: EOS is not counted) or when ``gen`` reaches the cap (length = cap, capped).
        """
        import torch

        queue = list(items)[::-1]  # pop() from the end keeps the given order
        keys: list[str] = []
        alive: list[bool] = []
        lens = gen = mask = cache = nxt = None
        with torch.inference_mode():
            while queue or any(alive):
                n_dead = alive.count(False)
                if not any(alive) or n_dead >= (self.refill_at if queue else max(1, len(alive) // 4)):
                    keep = [i for i, a in enumerate(alive) if a]
                    new = [queue.pop() for _ in range(min(len(queue), self.batch_size - len(keep)))]
                    keys, lens, gen, mask, cache, nxt = self._merge(keys, lens, gen, mask, cache, nxt, keep, new)
                    alive = [True] * len(keys)
                    self._check(range(len(keys)), keys, alive, gen, nxt, on_done)
                    continue
                B = len(keys)
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
                out = self.model(input_ids=nxt.view(B, 1), attention_mask=mask, position_ids=lens.view(B, 1),
                                 cache=cache, use_cache=True)
                lens = lens + 1
                nxt = out.logits[:, -1].argmax(-1)
                gen = gen + 1
                self._check([i for i in range(B) if alive[i]], keys, alive, gen, nxt, on_done)

    def _check(self, rows, keys, alive, gen, nxt, on_done):
        for i in rows:
            tok, g, key = int(nxt[i]), int(gen[i]), keys[i]
            if tok in self.eos:
                alive[i] = False
                self._hist.pop(key, None)
                on_done(key, g - 1, False)
            elif g >= self.cap:
                alive[i] = False
                self._hist.pop(key, None)
                on_done(key, self.cap, True)
            elif self.loop_span:
                h = self._hist.setdefault(key, [])
                h.append(tok)
                if g % 8 == 0 and detect_loop(h, self.loop_span):
                    alive[i] = False
                    self._hist.pop(key, None)
                    self.looped.add(key)
                    on_done(key, self.cap, True)

    def _merge(self, keys, lens, gen, mask, cache, nxt, keep, new):
        """Drop finished rows, prefill ``new`` prompts, and right-align everything in fresh buffers
        (one copy per tensor; columns that are padding for every row are trimmed)."""
        import torch
        from transformers.cache_utils import Cache

        if not keep and not new:
            return [], None, None, None, None, None
        Lo, first = 0, 0
        if keep:
            idx = torch.tensor(keep)
            mask, lens, gen, nxt = mask[idx], lens[idx], gen[idx], nxt[idx]
            keys = [keys[i] for i in keep]
            first = int(mask.float().argmax(1).min())  # leading columns that are padding in every kept row
            mask = mask[:, first:]
            Lo = mask.shape[1]
        else:
            keys, mask, lens, gen, nxt = [], torch.zeros(0, 0, dtype=torch.long), *(torch.zeros(0, dtype=torch.long),) * 3
        Ln, kv_new = 0, None
        if new:
            Ln = max(len(ids) for _, ids in new)
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
            inp = torch.full((len(new), Ln), pad, dtype=torch.long)
            nm = torch.zeros((len(new), Ln), dtype=torch.long)
            for r, (_, ids) in enumerate(new):
                inp[r, Ln - len(ids):] = torch.tensor(ids)
                nm[r, Ln - len(ids):] = 1
            out = self.model(input_ids=inp, attention_mask=nm, position_ids=(nm.cumsum(1) - 1).clamp(min=0),
                             use_cache=True)
            kv_new = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            nxt = torch.cat([nxt, out.logits[:, -1].argmax(-1)])
            lens = torch.cat([lens, nm.sum(1)])
            gen = torch.cat([gen, torch.ones(len(new), dtype=torch.long)])
            keys = keys + [k for k, _ in new]
        Lm = max(Lo, Ln)
        nk, B = len(keep), len(keys)
        full = torch.zeros(B, Lm, dtype=torch.long)
        if nk:
            full[:nk, Lm - Lo:] = mask
        if new:
            full[nk:, Lm - Ln:] = nm
        layers = []
        Layer = _prealloc_layer_class()
        ref = cache.layers if keep else kv_new.layers
        for li in range(len(ref)):
            src = ref[li]
            shape = (B, src.keys.shape[1], Lm + 64, src.keys.shape[-1])
            K = src.keys.new_zeros(shape)
            V = src.values.new_zeros(shape)
            if nk:
                old = cache.layers[li]
                K[:nk, :, Lm - Lo:Lm] = old.keys[idx, :, first:old.n]
                V[:nk, :, Lm - Lo:Lm] = old.values[idx, :, first:old.n]
            if new:
                K[nk:, :, Lm - Ln:Lm] = kv_new.layers[li].keys
                V[nk:, :, Lm - Ln:Lm] = kv_new.layers[li].values
            layers.append(Layer(K, V, Lm))
        return keys, lens, gen, full, Cache(layers=layers), nxt


def label_file(out_path: str | os.PathLike, model_spec: str, items: Sequence[PromptItem], max_new_tokens: int,
               batch_size: int, threads: int = 1, limit: int | None = None, loop_span: int = 0, log=print) -> int:
    """Label ``items`` with the target model, appending to ``out_path`` (JSONL; resumable: ids
    already in the file are skipped). Returns how many records the file holds afterwards."""
    import torch

    from .model import load_model

    out = Path(out_path)
    if limit is not None:
        items = list(items)[:limit]  # a prefix of the shuffled list: deterministic and representative
    if out.is_file():
        if int(read_meta(out).get("max_new_tokens", max_new_tokens)) < max_new_tokens:
            extend_cap(out, max_new_tokens, log)
        clamp_labels(out, max_new_tokens, log)
        _update_meta(out, {"command": REGENERATE_CMD, "loop_span": loop_span, "capped": CAPPED_NOTE})
    done = {r["id"] for r in load_labels(out)}
    todo = [it for it in items if it.id not in done]
    if not todo:
        log(f"[dataset] {out}: all {len(items)} prompts already labelled")
        return len(done)
    model, tok = load_model(model_spec, threads=threads)
    if threads:
        torch.set_num_threads(threads)
    lab = ContinuousGreedyLabeler(model, tok, max_new_tokens, batch_size, loop_span=loop_span)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file() or out.stat().st_size == 0:
        meta = {"model": model_spec, "max_new_tokens": max_new_tokens, "decoding": "greedy, chat template, stop at EOS",
                "length_unit": "generated tokens, EOS not counted", "command": REGENERATE_CMD,
                "loop_span": loop_span, "capped": CAPPED_NOTE,
                "transformers": _version("transformers"), "torch": torch.__version__}
        out.write_text(json.dumps({"_meta": meta}) + "\n")
    # the file may end in a torn line after a kill: start on a fresh line
    with out.open("rb+") as fh:
        fh.seek(0, 2)
        if fh.tell() > 0:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
    by_id = {it.id: it for it in todo}
    enc = [(it.id, lab.encode(it.prompt)) for it in todo]  # keep the shuffled order
    n_prompt = {k: len(ids) for k, ids in enc}
    t0 = time.perf_counter()
    state = {"n": 0, "tokens": 0}
    bar = _Progress(len(todo), log)
    with out.open("a") as fh:
        def on_done(key, n, capped):
            it = by_id[key]
            rec = {"id": it.id, "prompt": it.prompt, "length": n, "capped": capped, "source": it.source,
                   "template": it.template, "group": it.group, "prompt_tokens": n_prompt[key]}
            if key in lab.looped:
                rec["loop"] = True
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            state["n"] += 1
            state["tokens"] += n
            bar.update(state["n"], state["tokens"] / max(1e-9, time.perf_counter() - t0))

        lab.run(enc, on_done)
    bar.close()
    log(f"[dataset] labelled {state['n']} prompts, {state['tokens']} tokens in {time.perf_counter() - t0:.0f}s")
    return len(load_labels(out))


def verify_loops(path: str | os.PathLike, model_spec: str, n: int = 32, batch_size: int = 32, threads: int = 1,
                 log=print) -> dict:
    """Decode ``n`` loop-stopped prompts to the cap without loop detection and count how many
    really ran to the cap; the result is stored in the file's header (``loop_check``)."""
    from .model import load_model

    path = Path(path)
    meta = read_meta(path)
    looped = sorted((r for r in load_labels(path) if r.get("loop")), key=lambda r: r["id"])[:n]
    if not looped:
        return {"n": 0}
    model, tok = load_model(model_spec, threads=threads)
    lab = ContinuousGreedyLabeler(model, tok, int(meta["max_new_tokens"]), batch_size, loop_span=0)
    got = {}
    t0 = time.perf_counter()
    lab.run([(r["id"], lab.encode(r["prompt"])) for r in looped], lambda k, m, c: got.__setitem__(k, (m, c)))
    result = {"n": len(looped), "reached_cap": sum(c for _, c in got.values()),
              "stopped_early_lengths": sorted(m for m, c in got.values() if not c),
              "seconds": round(time.perf_counter() - t0, 1)}
    _update_meta(path, {"loop_check": result})
    log(f"[dataset] loop check: {result}")
    return result


def _update_meta(path: Path, updates: dict) -> None:
    """Rewrite the header line (the file is small) when the labelling settings changed."""
    meta = read_meta(path)
    if all(meta.get(k) == v for k, v in updates.items()):
        return
    meta.update(updates)
    _rewrite(path, meta, load_labels(path))


def _rewrite(path: Path, meta: dict, recs: Sequence[dict]) -> None:
    """Replace a label file atomically (header line, then records; the split is derived, not stored)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        fh.write(json.dumps({"_meta": meta}) + "\n")
        for r in recs:
            fh.write(json.dumps({k: v for k, v in r.items() if k != "split"}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def extend_cap(path: Path, cap: int, log=print) -> int:
    """Raise the cap of an existing label file: answers that ended before the old cap are final
    (greedy decoding stops at the same EOS), so only the capped prompts are dropped here, to be
    labelled again by the caller up to the new cap. Rerunning after an interruption resumes."""
    meta = read_meta(path)
    old = int(meta.get("max_new_tokens", cap))
    if old >= cap:
        return 0
    recs = load_labels(path)
    keep = [r for r in recs if not r["capped"]]
    meta["max_new_tokens"] = cap
    meta["extended_from"] = old
    meta.pop("clamped_from", None)
    meta.pop("loop_check", None)  # it was measured at the old cap
    _rewrite(path, meta, keep)
    log(f"[dataset] {path}: cap {old} -> {cap}; {len(recs) - len(keep)} capped prompts will be labelled again")
    return len(recs) - len(keep)


def clamp_labels(path: Path, cap: int, log=print) -> None:
    """Lower the cap of an existing label file in place. Lossless under greedy decoding: a prompt
    that produced N >= cap tokens would have been cut at the cap."""
    meta = read_meta(path)
    old = int(meta.get("max_new_tokens", cap))
    if old == cap:
        return
    if old < cap:
        raise ValueError(f"{path} was labelled with cap {old} < {cap}: use extend_cap")
    recs = load_labels(path)
    meta["max_new_tokens"] = cap
    meta["clamped_from"] = old
    for r in recs:
        if r["length"] >= cap:
            r["length"], r["capped"] = cap, True
    _rewrite(path, meta, recs)
    log(f"[dataset] clamped {path} from cap {old} to {cap}")


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
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        msg = f"[{bar}] {n}/{self.total} {tok_s:.0f} tok/s eta {eta / 60:.1f} min"
        if self.tty:
            print("\r" + msg, end="", file=sys.stderr, flush=True)
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
        return "?"
