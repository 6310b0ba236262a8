"""
Structured answers: a JSON schema or grammar enforced token by token, and closing on time.

A planner parses what it gets; a malformed answer is as useless to it as none. The grammar
engine is llguidance (what llama.cpp uses): measured on this CPU (benchmarks/bench_grammar.py)
its mask costs 0.3–0.7 ms per token against 0.08–0.35 ms for xgrammar, both under 5 % of a
decode step, and it has no dependencies where xgrammar pulls in triton (~1 GB); it also takes
Lark grammars and regexes at no extra cost. Nothing here is a grammar engine of our own.

``Grammars`` (one per engine) compiles a goal's schema or grammar against the target's
tokenizer; ``Constraint`` (one per decode) masks the logits the decode step hands back, accepts
the chosen token and says when the answer is complete.

**Closing** (overrun policy ``close``): when the time left is only enough for a few more steps,
the decoder stops adding content and steers to a short valid completion instead of being cut:
among the tokens the grammar allows it takes the end of the answer if allowed, else a token made
only of closing characters (``"``, ``]``, ``}`` — the longest, closing the most at once), else
the model's choice (content the schema requires, e.g. a required field). Which characters
close is read off the JSON text so far (``JsonNesting``: open strings and brackets — not a
grammar, the grammar engine still masks every step), so a ``}`` inside a string is never taken
for a close. The answer stays valid; it is shorter, and its status is ``truncated`` with
``valid`` true.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import math
import threading
from typing import List, Optional, Sequence

import numpy as np
import torch

from .errors import TimeBillError

CLOSERS = set('"]}')


class JsonNesting:
    """The open strings and brackets of a JSON text, fed piece by piece."""

    def __init__(self):
        self.stack: List[str] = []
        self.in_string = False
        self._escape = False

    def feed(self, text: str) -> None:
        """Advance over ``text``."""
        for ch in text:
            if self.in_string:
                if self._escape:
                    self._escape = False
                elif ch == '\\':
                    self._escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in '[{':
                self.stack.append(ch)
            elif ch in ']}' and self.stack:
                self.stack.pop()

    def closing(self) -> str:
        """Return the characters that close everything open, innermost first."""
        tail = ''.join(']' if b == '[' else '}' for b in reversed(self.stack))
        return ('"' if self.in_string else '') + tail


class GrammarError(TimeBillError, ValueError):
    """The goal's schema or grammar does not compile (the library's message says why)."""


@dataclass(frozen=True)
class Compiled:
    """A goal's grammar in llguidance's form, checked against the tokenizer."""

    grammar: str  # llguidance's grammar (JSON), what a matcher is built from
    kind: str  # json_schema | lark
    depth: int  # most nested brackets the answer can need (schemas; 2 for others)

    @property
    def close_tokens(self) -> int:
        """Return the steps a close needs at most: one per open bracket and string, and the end."""
        return self.depth + 2


def schema_depth(schema) -> int:
    """Return how many brackets a JSON value of ``schema`` can nest (bounded at 16)."""

    def walk(node, d: int) -> int:
        if d >= 16 or not isinstance(node, dict):
            return d
        best = d
        kind = node.get('type')
        nests = kind in ('array', 'object') or 'items' in node or 'properties' in node
        inner = d + 1 if nests else d
        for key in ('items', 'additionalProperties', 'contains'):
            if isinstance(node.get(key), dict):
                best = max(best, walk(node[key], inner))
        for key in ('properties', 'patternProperties', '$defs', 'definitions'):
            for sub in (node.get(key) or {}).values():
                best = max(best, walk(sub, inner))
        for key in ('anyOf', 'oneOf', 'allOf', 'prefixItems'):
            for sub in node.get(key) or []:
                best = max(best, walk(sub, inner if key == 'prefixItems' else d))
        return max(best, inner)

    return walk(schema, 0)


class Grammars:
    """Compile schemas and grammars for one tokenizer; build a ``Constraint`` per decode."""

    def __init__(self, tokenizer, n_vocab: int, eos_ids: Sequence[int]):
        self._hf = tokenizer
        self.n_vocab = int(n_vocab)
        self.eos_ids = list(eos_ids)
        self._tok = None
        self._closers: Optional[dict] = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        """Return llguidance's view of the tokenizer, built once (0.6 s for 49k tokens)."""
        with self._lock:
            if self._tok is None:
                import llguidance.hf

                self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.n_vocab)
            return self._tok

    def warm(self) -> None:
        """Build the tokenizer view, token trie and JSON lexer (once, seconds), not in goals."""
        schema = '{"type":"object","properties":{"a":{"type":"array","items":{"type":"string"}}}}'
        self.constraint(self.compile_grammar(schema)).mask(torch.zeros(self.n_vocab))
        self.closers()

    def token_text(self, token: int) -> str:
        """Return one token's text (for the JSON nesting a close reads)."""
        return self._hf.decode([int(token)]) if token < len(self._hf) else ''

    def closers(self) -> dict:
        """Return ``{text: token}`` for the tokens made only of ``" ] }`` (a close takes them)."""
        with self._lock:
            if self._closers is None:
                found: dict = {}
                for i in range(min(self.n_vocab, len(self._hf))):
                    text = self._hf.decode([i])
                    if text and set(text) <= CLOSERS and text not in found:
                        found[text] = i
                self._closers = found
            return self._closers

    def compile_grammar(self, json_schema: str = '', grammar: str = '') -> Optional[Compiled]:
        """
        Compile a goal's JSON schema (text) or Lark grammar; None if it has neither.

        Raises ``GrammarError`` with the library's message for one that does not compile.
        """
        import llguidance

        if json_schema and grammar:
            raise GrammarError('give a JSON schema or a grammar, not both')
        if not json_schema and not grammar:
            return None
        if json_schema:
            try:
                schema = json.loads(json_schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f'the JSON schema is not JSON: {exc}') from None
            if not isinstance(schema, (dict, bool)):
                raise GrammarError('a JSON schema is an object (or true/false)')
            text = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={'whitespace_flexible': False}
            )
            kind, depth = 'json_schema', schema_depth(schema)
        else:
            text = llguidance.LLMatcher.grammar_from_lark(grammar)
            kind, depth = 'lark', 2
        error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, self.tokenizer)
        if error:
            raise GrammarError(f'{kind.replace("_", " ")} rejected by llguidance: '
                               + '; '.join(messages))
        return Compiled(text, kind, depth)

    def constraint(self, compiled: Compiled) -> 'Constraint':
        """Return a fresh matcher state for one decode of ``compiled``."""
        return Constraint(self, compiled)


class Constraint:
    """One decode's grammar state: mask the logits, accept tokens, close on request."""

    def __init__(self, grammars: Grammars, compiled: Compiled):
        import llguidance

        self.compiled = compiled
        self.grammars = grammars
        self.matcher = llguidance.LLMatcher(grammars.tokenizer, compiled.grammar)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        words = (grammars.n_vocab + 31) // 32
        self._bits = np.full(words, -1, dtype=np.int32)  # the library writes the mask here
        self._neg = np.full(words * 32, -np.inf, dtype=np.float32)
        self.closing = False  # steering to the shortest completion (overrun policy close)
        self.nesting = JsonNesting() if compiled.kind == 'json_schema' else None
        self.mask_s: List[float] = []

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """
        Set the logits of tokens the grammar forbids here to -inf (in place); return them.

        The bitmask is unpacked with numpy (~0.07 ms for 49k tokens): llguidance's own torch
        helper is a ``torch.compile`` kernel that compiles on first use (~0.3 s, a C++ compiler
        at run time) and recompiles under inference mode.
        """
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        n = min(logits.shape[-1], self._neg.shape[0])
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder='little')[:n].view(bool)
        if logits.shape[-1] > n:
            logits[n:] = float('-inf')
        cpu32 = logits.device.type == 'cpu' and logits.dtype == torch.float32
        if cpu32 and logits.is_contiguous():
            np.copyto(logits[:n].numpy(), self._neg[:n], where=~allowed)
        else:  # a GPU or 16-bit target
            logits[:n].masked_fill_(~torch.from_numpy(allowed).to(logits.device), float('-inf'))
        if self.closing:
            self._steer_close(logits)
        return logits

    def _steer_close(self, logits: torch.Tensor) -> None:
        """Keep only the allowed tokens that end the answer soonest (see the module doc)."""
        n = logits.shape[-1]
        eos = [i for i in self.grammars.eos_ids if i < n and math.isfinite(float(logits[i]))]
        pick = eos[0] if eos else None
        if pick is None and self.nesting is not None:
            want = self.nesting.closing()
            best = ''
            for text, tok in self.grammars.closers().items():
                if (len(text) > len(best) and want.startswith(text) and tok < n
                        and math.isfinite(float(logits[tok]))):
                    best, pick = text, tok
        if pick is None:
            return  # content the grammar requires (or no JSON to read): the model's choice
        keep = logits[pick].clone()
        logits.fill_(float('-inf'))
        logits[pick] = keep

    def accept(self, token: int) -> bool:
        """Advance by ``token``; False if the grammar rejects it (cannot happen after mask)."""
        if self.nesting is not None:
            self.nesting.feed(self.grammars.token_text(token))
        return bool(self.matcher.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """Tell whether the answer is complete: the grammar allows nothing but its end."""
        return bool(self.matcher.is_stopped())

    @property
    def valid(self) -> bool:
        """Tell whether the text so far is a whole answer of the grammar."""
        return bool(self.matcher.is_accepting() or self.matcher.is_stopped())


SCHEMA_HINT = 'Answer with JSON only, matching this JSON schema: '


def with_schema(prompt: str, json_schema: str) -> str:
    """
    Return the prompt the model and the length predictor see for a schema goal.

    The grammar guarantees the form, but a model writes better content when it is told the
    form, and the length predictor can only see the request if it is in the text it reads (the
    schema, an item count). Both get this same text. A long enum is left out of the text (the
    grammar still enforces every value). Idempotent: a prompt that already ends with this
    schema's text (a recorded ``Request.prompt``, replayed) is returned unchanged.
    """
    if not json_schema:
        return prompt
    try:
        compact = json.dumps(_shorten_enums(json.loads(json_schema)), separators=(',', ':'))
    except json.JSONDecodeError:
        compact = json_schema  # the pipeline rejects it with the reason
    suffix = f'\n{SCHEMA_HINT}{compact}'
    return prompt if prompt.endswith(suffix) else prompt + suffix


def _shorten_enums(node, over: int = 12):
    """
    Drop a long enum (a scene's object ids, say) from the schema a model reads.

    The grammar enforces every value; a model shown a few of them copies those instead of
    reading the scene (measured on the robot tasks), and all of them cost prompt tokens.
    """
    if isinstance(node, dict):
        out = {k: _shorten_enums(v, over) for k, v in node.items()}
        enum = node.get('enum')
        if isinstance(enum, list) and len(enum) > over:
            del out['enum']
            out.setdefault('type', 'string')
        return out
    if isinstance(node, list):
        return [_shorten_enums(v, over) for v in node]
    return node


__all__ = [
    'Compiled',
    'Constraint',
    'GrammarError',
    'Grammars',
    'schema_depth',
    'with_schema',
]
