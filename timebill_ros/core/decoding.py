"""
The decode loop: one token a step until EOS, the token cap, the deadline or a cancel.

Our own loop, not ``model.generate``: that cannot continue from an evicted cache (it derives
positions from the cache length). Each step's token is chosen greedily or sampled, masked by a
grammar where the goal has one, and its text streamed to the caller.
"""

from __future__ import annotations

import math
import time
from typing import Callable, List

import torch

from .fast_decode import FastDecoder
from .generation import GenerationRequest, GenerationResult, PrefillState


class TextStream:
    """
    The answer's text so far, decoding only the tokens since the last whole character.

    Decoding the whole answer every token costs O(n) per step; here each step decodes a few
    tokens. A byte-level token can end inside a UTF-8 character (the text then ends in U+FFFD):
    such tokens wait for the next. The previous span is decoded with the new one so that
    tokenizers whose pieces depend on their left neighbour (leading spaces) get it right.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.text = ''
        self._prefix = self._read = 0

    def add(self, token_id: int) -> str:
        """Append one token; return the text of all complete characters so far."""
        self.ids.append(int(token_id))
        if self.tokenizer is None:
            return ''
        dec = self.tokenizer.decode
        before = dec(self.ids[self._prefix:self._read], skip_special_tokens=True)
        now = dec(self.ids[self._prefix:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith('\ufffd'):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self.text


def sampler(request: GenerationRequest) -> Callable[[torch.Tensor], int]:
    """Return how ``request`` picks a token from logits: argmax, or seeded top-p sampling."""
    if not request.do_sample:
        return lambda logits: int(torch.argmax(logits))
    gen = torch.Generator(device='cpu')
    gen.manual_seed(request.seed if request.seed is not None else torch.seed())
    temp, top_p = max(float(request.temperature), 1e-5), float(request.top_p)

    def sample(logits):
        probs = torch.softmax(logits.float().cpu() / temp, dim=-1)
        if top_p < 1.0:
            sp, si = probs.sort(descending=True)
            cut = sp.cumsum(0) - sp > top_p
            sp[cut] = 0
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

    return sample


class DecodeLoop:
    """
    The engine's decode side, mixed into ``Engine``.

    Uses the engine's model, device, tokenizer, eos_ids, max_context, fast (the C++ step or
    None), grammars, compile_grammar and decode_text.
    """

    @torch.inference_mode()
    def decode(self, state: PrefillState, request: GenerationRequest) -> GenerationResult:
        """
        Decode until EOS, max_new_tokens, the deadline or cancellation.

        The loop stops *before* a step whose expected finish (last step's duration) lies past
        the deadline, so an answer is never more than one step late and usually on time. With
        a schema or grammar every step's logits are masked to what it allows, and the answer
        ends the moment it is complete. Under overrun ``close`` the decoder starts closing the
        structure when the time left covers only the steps that needs (``structured``).
        """
        if not state.evicted:
            state.alpha, state.kv_after = 0.0, state.kv_before
        select = sampler(request)
        compiled = request.compiled
        if compiled is None and (request.json_schema or request.grammar):
            compiled = self.compile_grammar(request.json_schema, request.grammar)
        grammar = self.grammars.constraint(compiled) if compiled is not None else None
        closes = grammar is not None and request.overrun == 'close'
        max_new = min(request.max_new_tokens, self.max_context - state.n_prompt)
        deadline = request.deadline if request.deadline is not None else math.inf
        cancel = request.cancel
        cache = state.cache
        tokens: List[int] = []
        times: List[float] = []
        steps: List[float] = []
        masking = [0.0]
        pos = state.n_prompt
        step = self.stepper(cache)
        stream = TextStream(self.tokenizer) if request.on_token else None

        def choose(logits: torch.Tensor) -> int:
            if grammar is None:
                return select(logits)
            t0 = time.monotonic()
            grammar.mask(logits)
            masking[0] += time.monotonic() - t0
            tok = select(logits)
            grammar.accept(tok)
            return tok

        tok = choose(state.logits.clone() if grammar is not None else state.logits)
        tokens.append(tok)
        times.append(time.monotonic())
        if request.on_token:
            request.on_token(0, tok, stream.add(tok))
        stop = None
        closed_at = None
        last_step = slow = 0.0
        while stop is None:
            if tok in self.eos_ids or (grammar is not None and grammar.done):
                stop = 'closed' if closed_at is not None else 'eos'
            elif len(tokens) >= max_new:
                stop = 'max_new_tokens'
            elif cancel is not None and cancel.is_set():
                stop = 'cancelled'
            elif time.monotonic() + last_step > deadline:
                stop = 'deadline'
            if stop:
                break
            if closes and closed_at is None:
                need = (compiled.close_tokens + 1) * slow
                room = max_new - len(tokens)
                if time.monotonic() + need > deadline or room <= compiled.close_tokens:
                    grammar.closing, closed_at = True, len(tokens)
            t0 = time.monotonic()
            tok = choose(step(tok, pos))
            t1 = time.monotonic()
            last_step = t1 - t0
            # a close plans on the recent worst token period (hooks included), decaying
            slow = max(slow * 0.9, t1 - times[-1])
            steps.append(last_step)
            pos += 1
            tokens.append(tok)
            times.append(t1)
            if request.on_token:
                request.on_token(len(tokens) - 1, tok, stream.add(tok))
        finished = time.monotonic()
        completed = stop in ('eos', 'max_new_tokens')
        if grammar is not None and stop == 'max_new_tokens' and not grammar.valid:
            completed = False  # the cap cut a structured answer: not an answer
        deadline_met = completed and finished <= deadline
        text = self.decode_text(tokens)
        if not completed and stop != 'closed' and (
            stop == 'cancelled' or request.overrun == 'kill'
        ):
            text = ''
        return GenerationResult(
            text=text,
            token_ids=tokens,
            completed=completed,
            deadline_met=deadline_met,
            stop_reason=stop,
            alpha=state.alpha,
            kv_before=state.kv_before,
            kv_after=state.kv_after,
            tokens_generated=len(tokens),
            prefill_s=state.prefill_s,
            evict_s=state.evict_s,
            decode_step_s=steps,
            total_s=finished - state.started_at,
            started_at=state.started_at,
            finished_at=finished,
            token_times=times,
            valid=(grammar.valid and bool(text)) if grammar is not None else None,
            closed_at=closed_at,
            mask_s=masking[0],
        )

    def stepper(self, cache) -> Callable[[int, int], torch.Tensor]:
        """
        Return ``step(token, pos)`` for ``cache``: one decode step, the logits [vocab].

        Chosen once per decode: the C++ step (``fast_decode``) where the model and cache allow
        it, else transformers' forward on two reused one-element inputs.
        """
        if self.fast is not None and FastDecoder.takes(cache):
            return lambda token, pos: self.fast.step(token, pos, cache)
        ids = torch.empty((1, 1), dtype=torch.long, device=self.device)
        at = torch.empty((1, 1), dtype=torch.long, device=self.device)

        def step(token: int, pos: int) -> torch.Tensor:
            ids.fill_(token)
            at.fill_(pos)
            out = self.model(input_ids=ids, cache=cache, use_cache=True, position_ids=at)
            return out.logits[0, -1]

        return step

    @torch.inference_mode()
    def step(self, token: int, pos: int, cache) -> torch.Tensor:
        """One decode step of ``token`` at ``pos`` on ``cache`` (see ``stepper``)."""
        return self.stepper(cache)(token, pos)
