"""
The time-budgeted generation engine: prefill → choose α → evict → decode to a deadline.

TimeBill chooses the eviction ratio only once the prefill is done (when the predicted
response length has arrived), so prefill, eviction and decoding are separate calls; ``generate``
chains them. The decode loop is our own: ``model.generate`` cannot continue from an evicted
cache (it derives positions from the cache length).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import kv_cache
from .attention import ATTENTION_NAME, collect as _collect, register_attention
from .config import OVERRUN_POLICIES, TimeBillConfig
from .errors import (
    DeadlinePassedError,
    EmptyPromptError,
    InvalidRequestError,
    PrefillStopped,
    PromptTooLongError,
)
from .eviction import check_alpha, get_press, n_keep, Press
from .fast_decode import FastDecoder
from .prefix_cache import Lease, PrefixCache
from .structured import Compiled, GrammarError, Grammars
from .weights import weight_format


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


@dataclass
class GenerationRequest:
    prompt: Optional[str] = None
    input_ids: Optional[Sequence[int]] = None
    system_prompt: Optional[str] = None
    max_new_tokens: int = 512
    deadline: Optional[float] = None  # absolute, time.monotonic() seconds
    alpha: Optional[float] = None
    overrun: str = 'kill'
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    on_token: Optional[Callable[[int, int, str], None]] = None  # (step, token_id, text_so_far)
    cancel: Optional[threading.Event] = None
    json_schema: str = ''  # the answer must validate against this JSON schema (text)
    grammar: str = ''  # or match this Lark grammar
    compiled: Optional[Compiled] = None  # either, compiled already (Engine.compile_grammar)


@dataclass
class PrefillState:
    """Everything decode needs after prefill; one prefill can be cloned for several policies."""

    input_ids: List[int]
    cache: object
    logits: torch.Tensor  # last position's logits, [vocab]
    scores: Dict[int, torch.Tensor]
    started_at: float
    prefill_s: float
    kv_before: int
    kv_after: int = 0
    alpha: float = 0.0
    evict_s: float = 0.0
    evicted: bool = False
    chunks: int = 1  # model calls the prefill took
    cached_tokens: int = 0  # prompt tokens copied from the prefix cache instead of computed

    @property
    def n_prompt(self) -> int:
        return len(self.input_ids)


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    completed: bool
    deadline_met: bool
    stop_reason: str  # eos | max_new_tokens | deadline | cancelled | closed (a close ended it)
    alpha: float
    kv_before: int
    kv_after: int
    tokens_generated: int
    prefill_s: float
    evict_s: float
    decode_step_s: List[float]
    total_s: float
    started_at: float
    finished_at: float
    token_times: List[float] = field(default_factory=list)  # monotonic time each token was ready
    valid: Optional[bool] = None  # a structured answer's text is whole and matches (None: free)
    closed_at: Optional[int] = None  # tokens generated when closing began (overrun close)
    mask_s: float = 0.0  # time spent masking logits with the grammar

    @property
    def decode_s(self) -> float:
        return float(sum(self.decode_step_s))


class Engine:
    def __init__(
        self,
        model,
        tokenizer=None,
        press: str | Press = 'snapkv',
        chat_template: bool = True,
        preallocate: bool = True,
        model_name: str = '',
        prefix_cache: Optional[PrefixCache] = None,
        **press_options,
    ):
        """
        Wrap a model and tokenizer with a KV press.

        ``press_options`` (window_size, kernel_size, pooling, n_sink) go to the press that
        declares them. ``prefix_cache``: reuse the KV of cached prompt prefixes (None: off).
        """
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.press = press if isinstance(press, Press) else get_press(press, **press_options)
        self.chat_template = chat_template
        self.preallocate = preallocate
        self.model_name = (
            model_name or getattr(model.config, '_name_or_path', '') or model.config.model_type
        )
        cfg = model.config.get_text_config(decoder=True)
        self.num_layers = cfg.num_hidden_layers
        self.max_context = int(getattr(cfg, 'max_position_embeddings', 0) or 2048)
        eos = model.generation_config.eos_token_id
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(
            eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
        )
        register_attention()  # also for presses without scores: the packed decode attention
        model.set_attn_implementation(ATTENTION_NAME)
        self.device = next(model.parameters()).device
        self.weights = weight_format(model)
        self.fast, self.fast_why_not = FastDecoder.for_model(model)
        self.decode_step = 'timebill-avx2' if self.fast is not None else 'transformers'
        self.prefill_chunk: Optional[int] = None  # calibration times prefill as requests run it
        self.prefix_cache = prefix_cache
        self._grammars: Optional[Grammars] = None

    @classmethod
    def from_config(cls, cfg: TimeBillConfig) -> 'Engine':
        from .model import load_model

        model, tok = load_model(
            cfg.model,
            dtype=cfg.dtype,
            device=cfg.device,
            threads=cfg.threads,
            weights=cfg.weights,
            prefill_weights=cfg.prefill_weights,
        )
        engine = cls(
            model,
            tok,
            press=cfg.press,
            chat_template=cfg.chat_template,
            model_name=cfg.model,
            window_size=cfg.window_size,
            kernel_size=cfg.kernel_size,
            pooling=cfg.pooling,
            n_sink=cfg.n_sink,
        )
        engine.prefill_chunk = cfg.prefill_chunk or None
        engine.grammars.warm()  # llguidance's token trie: seconds once here, not in a goal
        if cfg.prefix_cache and cfg.prefix_cache_mb > 0:
            engine.prefix_cache = PrefixCache(cfg.prefix_cache_mb, cfg.prefix_block_tokens)
        return engine

    # ------------------------------------------------------------------ input
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

    # --------------------------------------------------------------- stages
    def _chunk_bounds(
        self, n: int, chunk_tokens: Optional[int], start: int = 0, tail: Optional[int] = None
    ) -> List[int]:
        """
        Return the chunk starts (from ``start``, the first token not cached) plus ``n``.

        Chunks lie on one grid of absolute positions (multiples of ``chunk_tokens``) whatever was
        cached, so a warm prefill runs the cold one's chunks past its first. The last chunk holds
        at least ``tail`` tokens, the press's observation window (a short tail joins the chunk
        before), so window scores come from one model call.
        """
        if start >= n:
            return [n]  # all cached (a prime of whole blocks): nothing to compute
        if chunk_tokens is None or chunk_tokens == 0:
            return [start, n]
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 0:
            raise InvalidRequestError(
                f'chunk_tokens must be a non-negative integer, got {chunk_tokens!r}'
            )
        if tail is None:
            tail = self._tail(self.press)
        first = (start // chunk_tokens + 1) * chunk_tokens
        bounds = [start] + list(range(first, n, chunk_tokens)) + [n]
        while len(bounds) > 2 and bounds[-1] - bounds[-2] < max(tail, 1):
            del bounds[-2]
        return bounds

    def _scorer(self, ids: Sequence[int]) -> Press:
        """Return the press as it scores this prompt (its window may depend on the prompt)."""
        return self.press.for_prompt(ids, self.tokenizer)

    def _tail(self, scorer: Press) -> int:
        """Last prompt tokens a prefill must compute itself: the press reads their queries."""
        if not self.press.needs_scores:
            return 1  # the last token's logits
        return max(int(getattr(scorer, 'window_size', 1) or 1), 1)

    def kv_bytes_per_token(self) -> int:
        """Bytes one prompt token's keys and values take in the cache (all layers)."""
        cfg = self.model.config.get_text_config(decoder=True)
        head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, 'num_key_value_heads', None) or cfg.num_attention_heads
        elem = torch.finfo(self.model.dtype).bits // 8
        return 2 * self.num_layers * kv_heads * head_dim * elem

    def reuse_limit(self, ids: Sequence[int]) -> int:
        """
        Most prompt tokens a warm prefill may take from the prefix cache (0: no cache).

        The press scores the last ``window`` queries against every key, and queries are not
        cached: those tokens are recomputed, so the warm path scores, keeps and answers as
        the cold one.
        """
        if self.prefix_cache is None:
            return 0
        return max(len(ids) - self._tail(self._scorer(ids)), 0)

    def reusable(self, ids: Sequence[int]) -> int:
        """Prompt tokens a prefill of ``ids`` would reuse now (a look-up; pins nothing)."""
        if self.prefix_cache is None:
            return 0
        return self.prefix_cache.peek(ids, self.reuse_limit(ids))

    def acquire_prefix(self, ids: Sequence[int]) -> Lease:
        """Pin the cached prefix a prefill of ``ids`` will reuse (a queued goal's)."""
        if self.prefix_cache is None:
            return Lease(None, [])
        return self.prefix_cache.acquire(ids, self.reuse_limit(ids))

    def _trunk(self):
        """
        Return the decoder without the LM head, for chunks whose logits nobody reads.

        None if the model has no separate trunk; then ``logits_to_keep=1`` keeps the head to one
        position.
        """
        base = getattr(self.model, 'base_model', None)
        return base if base is not None and base is not self.model else None

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: Sequence[int],
        capacity: Optional[int] = None,
        started_at: Optional[float] = None,
        *,
        chunk_tokens: Optional[int] = None,
        should_stop: Optional[Callable[[int, float], Optional[str]]] = None,
        prefix: Optional[Lease] | bool = True,
        prime: Optional[str] = None,
    ) -> PrefillState:
        """
        Run the prompt into a fresh cache, in one pass or in chunks of ``chunk_tokens``.

        Chunks let a deadline or cancel stop a long prefill: ``should_stop(done_tokens,
        elapsed_s)`` (seconds since this call began) is asked before every model call; a non-empty
        answer raises ``PrefillStopped(reason, done_tokens)``. Chunked and one-pass prefills give
        the same cache, logits and press scores (up to float rounding).

        With a prefix cache, the longest cached prefix (``prefix``: a lease pinned earlier, True:
        look it up now, False: cold) is copied in and only the rest is computed; the whole blocks
        computed here are cached for later goals (also when the prefill stops early). ``prime``
        (an id) caches ``input_ids`` as a standing context held until released: no logits, no
        scores.
        """
        ids = list(input_ids)
        if not ids:
            raise EmptyPromptError('input_ids is empty: nothing to answer')
        self.check_length(len(ids))
        t0 = time.monotonic()
        pc = self.prefix_cache if prefix is not False else None
        scorer = self._scorer(ids)
        lease = self._lease(ids, prefix, prime) if pc is not None else None
        cap = capacity or min(self.max_context, len(ids) + 512)
        cache = kv_cache.make_cache(self.num_layers, cap, self.preallocate)
        start = 0
        if lease is not None:
            start = pc.copy_into(lease, cache)
            lease.release()
        bounds = self._chunk_bounds(len(ids), chunk_tokens, start, self._tail(scorer))
        x = torch.tensor([ids], device=self.device)
        scores: Dict[int, torch.Tensor] = {}
        trunk = self._trunk() if len(bounds) > 2 or prime is not None else None
        done = start
        out = None
        try:
            for begin, end in zip(bounds, bounds[1:]):
                if should_stop is not None:
                    reason = should_stop(begin, time.monotonic() - t0)
                    if reason:
                        raise PrefillStopped(str(reason), begin)
                last = end == len(ids) and prime is None
                kw = {}
                if len(bounds) > 2 or begin > 0:  # explicit positions: RoPE never counts the cache
                    kw['position_ids'] = torch.arange(begin, end, device=self.device).unsqueeze(0)
                if last and self.press.needs_scores:
                    _collect.press = scorer
                    _collect.scores = scores
                _collect.chunk = begin > 0
                if last or trunk is None:
                    out = self.model(
                        input_ids=x[:, begin:end],
                        cache=cache,
                        use_cache=True,
                        logits_to_keep=1,
                        **kw,
                    )
                else:
                    trunk(input_ids=x[:, begin:end], cache=cache, use_cache=True, **kw)
                done = end
        finally:
            _collect.press, _collect.chunk = None, False
            # a prime holds its blocks also when all of them were cached already (done == start)
            if pc is not None and (done > start or prime is not None):
                pc.insert(ids, cache, done, hold=prime)
        logits = out.logits[0, -1].float() if out is not None else torch.empty(0)
        dt = time.monotonic() - t0
        return PrefillState(
            input_ids=ids,
            cache=cache,
            logits=logits,
            scores=scores,
            started_at=started_at if started_at is not None else t0,
            prefill_s=dt,
            kv_before=len(ids),
            kv_after=len(ids),
            chunks=len(bounds) - 1,
            cached_tokens=start,
        )

    def _lease(self, ids: List[int], prefix, prime: Optional[str]) -> Lease:
        """Pin the cached prefix to reuse now: at least what ``prefix`` pinned, maybe more."""
        limit = len(ids) if prime is not None else self.reuse_limit(ids)
        lease = self.prefix_cache.acquire(ids, limit)
        if isinstance(prefix, Lease):
            prefix.release()  # the new lease pins at least its blocks (they were pinned)
        return lease

    @torch.inference_mode()
    def evict(self, state: PrefillState, alpha: float) -> PrefillState:
        """
        Keep round((1 − α)·L) prompt entries per layer and head, chosen by the press.

        Also once decoding has begun (α chosen on a late length estimate): the entries of the
        tokens generated since prefill are all kept.
        """
        alpha = check_alpha(alpha)
        if state.evicted:
            raise RuntimeError(
                'this prefill state was already evicted; clone it to try another ratio'
            )
        t0 = time.monotonic()
        length = state.kv_before
        keep = n_keep(length, alpha)
        if keep < length:
            keys = [layer.keys[:, :, :length] for layer in state.cache.layers]
            per_layer = self.press.select(keys, state.scores, keep)
            live = int(state.cache.layers[0].keys.shape[-2])
            if live > length:  # decoding started (a late estimate): generated tokens all stay
                new = torch.arange(length, live, device=per_layer[0].device)
                per_layer = [
                    torch.cat([idx, new.expand(*idx.shape[:2], live - length)], dim=-1)
                    for idx in per_layer
                ]
            kv_cache.keep_entries(state.cache, per_layer)
        state.scores = {}  # no longer needed; free the memory
        state.alpha, state.kv_after, state.evicted = alpha, keep, True
        state.evict_s = time.monotonic() - t0
        return state

    def clone_state(self, state: PrefillState) -> PrefillState:
        return PrefillState(
            input_ids=list(state.input_ids),
            cache=kv_cache.clone_cache(state.cache),
            logits=state.logits.clone(),
            scores={k: v.clone() for k, v in state.scores.items()},
            started_at=state.started_at,
            prefill_s=state.prefill_s,
            kv_before=state.kv_before,
            kv_after=state.kv_after,
            alpha=state.alpha,
            evict_s=state.evict_s,
            evicted=state.evicted,
            chunks=state.chunks,
        )

    def _sampler(self, request: GenerationRequest):
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
        select = self._sampler(request)
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

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """
        Prefill, evict the request's fixed α, decode: one request with no deadline planning.

        A budget's α is chosen by the pipeline (``core.pipeline``), the one path that plans it.
        """
        started = time.monotonic()
        self.check_request(request)
        if request.compiled is None and (request.json_schema or request.grammar):
            # a bad schema fails before any compute
            request.compiled = self.compile_grammar(request.json_schema, request.grammar)
        ids = self._request_ids(request)
        cap = min(self.max_context, len(ids) + request.max_new_tokens + 1)
        state = self.prefill(ids, capacity=cap, started_at=started, prefix=False)
        alpha = request.alpha or 0.0
        if alpha > 0:
            self.evict(state, alpha)
        return self.decode(state, request)
