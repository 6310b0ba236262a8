"""
The engine's text side: prompts to token ids and back, grammars, and a request's checks.

Everything here happens before any compute (or after it, for the answer's text): the chat
template, the ids a shared context primes, the grammar compiler over the tokenizer's vocabulary,
and the checks that refuse a request the engine cannot serve.
"""

from __future__ import annotations

import math
import time
from typing import List, Optional, Sequence

from .config import OVERRUN_POLICIES
from .errors import (
    DeadlinePassedError,
    EmptyPromptError,
    InvalidRequestError,
    PromptTooLongError,
)
from .eviction import check_alpha
from .generation import GenerationRequest
from .structured import Compiled, GrammarError, Grammars


class PromptInput:
    """
    Tokenizing and request checks, mixed into ``Engine``.

    Uses the engine's tokenizer, chat_template, model (its vocabulary size), eos_ids,
    max_context and ``_grammars`` (None until first used).
    """

    def encode(self, prompt: str, system_prompt: Optional[str] = None) -> List[int]:
        if prompt is None or not str(prompt).strip():
            raise EmptyPromptError('prompt is empty: nothing to answer')
        if self.tokenizer is None:
            raise InvalidRequestError(
                'this engine has no tokenizer: pass input_ids instead of a prompt'
            )
        tok = self.tokenizer
        if self.chat_template and getattr(tok, 'chat_template', None):
            msgs = [{'role': 'system', 'content': system_prompt}] if system_prompt else []
            msgs.append({'role': 'user', 'content': prompt})
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, 'keys'):
                ids = ids['input_ids']
        else:
            text = f'{system_prompt}\n\n{prompt}' if system_prompt else prompt
            ids = tok(text)['input_ids']
        return list(ids)

    def encode_prefix(self, context: str, system_prompt: Optional[str] = None) -> List[int]:
        """
        Token ids a goal whose prompt starts with ``context`` shares with every such goal.

        The chat template wraps the prompt (a user turn and its closing tokens), so the ids of
        ``context`` alone would end in the template's closing tokens, which a goal with a
        question after the context does not have. Here the template is rendered around a marker
        and cut there: the ids up to where the context text ends.
        """
        if context is None or not str(context).strip():
            raise EmptyPromptError('context is empty: nothing to prime')
        tok = self.tokenizer
        if tok is None:
            raise InvalidRequestError('this engine has no tokenizer: prime with input_ids')
        if not (self.chat_template and getattr(tok, 'chat_template', None)):
            text = f'{system_prompt}\n\n{context}' if system_prompt else context
            return list(tok(text)['input_ids'])
        marker = '\u2063TIMEBILL_PRIME_MARK\u2063'
        msgs = [{'role': 'system', 'content': system_prompt}] if system_prompt else []
        msgs.append({'role': 'user', 'content': context + marker})
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        head = text[: text.index(marker)]
        return list(tok(head, add_special_tokens=False)['input_ids'])

    @property
    def grammars(self) -> Grammars:
        """Return the grammar compiler for this tokenizer and vocabulary (built on first use)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise GrammarError('structured answers need the tokenizer')
            cfg = self.model.config.get_text_config(decoder=True)
            self._grammars = Grammars(self.tokenizer, cfg.vocab_size, sorted(self.eos_ids))
        return self._grammars

    def compile_grammar(self, json_schema: str = '', grammar: str = '') -> Optional[Compiled]:
        """Compile a goal's schema or grammar; ``GrammarError`` says why one does not."""
        return self.grammars.compile_grammar(json_schema, grammar)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ''
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def _request_ids(self, request: GenerationRequest) -> List[int]:
        if request.input_ids is not None:
            ids = [int(t) for t in request.input_ids]
            if not ids:
                raise EmptyPromptError('input_ids is empty: nothing to answer')
            return ids
        return self.encode(request.prompt, request.system_prompt)

    def check_request(self, request: GenerationRequest) -> None:
        """Reject what cannot be served before spending any compute on it."""
        if request.overrun not in OVERRUN_POLICIES:
            raise InvalidRequestError(
                f'unknown overrun policy {request.overrun!r}; use one of {OVERRUN_POLICIES}'
            )
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            raise InvalidRequestError(
                f'max_new_tokens must be a positive integer, got {request.max_new_tokens!r}'
            )
        if request.alpha is not None:
            check_alpha(request.alpha)
        if request.deadline is not None:
            if isinstance(request.deadline, float) and math.isnan(request.deadline):
                raise InvalidRequestError('deadline is NaN')
            now = time.monotonic()
            if request.deadline <= now:
                raise DeadlinePassedError(
                    f'deadline already passed {now - request.deadline:.3f} s ago'
                )

    def check_length(self, n_prompt: int) -> None:
        if n_prompt >= self.max_context:
            raise PromptTooLongError(
                f"prompt has {n_prompt} tokens; the model's "
                f'context is {self.max_context} (no room to answer)'
            )
