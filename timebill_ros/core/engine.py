"""
The time-budgeted generation engine: prefill → choose α → evict → decode to a deadline.

TimeBill chooses the eviction ratio only once the prefill is done (when the predicted
response length has arrived), so prefill, eviction and decoding are separate calls; ``generate``
chains them. This module builds the cache (chunked prefill, prefix reuse, eviction); the text
side is ``prompt_input``, the decode loop ``decoding``, the data they pass ``generation``.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import kv_cache
from .attention import ATTENTION_NAME, collect as _collect, register_attention
from .config import TimeBillConfig
from .decoding import DecodeLoop
from .errors import EmptyPromptError, InvalidRequestError, PrefillStopped
from .eviction import check_alpha, get_press, n_keep, Press
from .fast_decode import FastDecoder, kernel_step_name
from .generation import GenerationRequest, GenerationResult, PrefillState
from .prefix_cache import Lease, PrefixCache
from .prompt_input import PromptInput
from .structured import Grammars
from .weights import weight_format


class Engine(PromptInput, DecodeLoop):
    def __init__(
        self,
        model,
        tokenizer=None,
        press: str | Press = 'snapkv',
        chat_template: bool = True,
        preallocate: bool = True,
        model_name: str = '',
        prefix_cache: Optional[PrefixCache] = None,
        kv_dtype: Optional[str] = None,
        **press_options,
    ):
        """
        Wrap a model and tokenizer with a KV press.

        ``press_options`` (window_size, kernel_size, pooling, n_sink) go to the press that
        declares them. ``prefix_cache``: reuse the KV of cached prompt prefixes (None: off).
        ``kv_dtype`` (float32 | float16 | bfloat16): what the KV cache stores; None: the
        model's dtype.
        """
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.press = press if isinstance(press, Press) else get_press(press, **press_options)
        self.chat_template = chat_template
        self.preallocate = preallocate
        self.kv_dtype = kv_cache.kv_dtype(kv_dtype) if kv_dtype is not None else model.dtype
        if not preallocate and self.kv_dtype != model.dtype:
            raise ValueError(f'kv_dtype {kv_dtype} needs the preallocated cache')
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
        self.decode_step = kernel_step_name() if self.fast is not None else 'transformers'
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
            kv_dtype=cfg.kv_dtype,
        )
        engine.prefill_chunk = cfg.prefill_chunk or None
        engine.grammars.warm()  # llguidance's token trie: seconds once here, not in a goal
        if cfg.prefix_cache and cfg.prefix_cache_mb > 0:
            engine.prefix_cache = PrefixCache(cfg.prefix_cache_mb, cfg.prefix_block_tokens)
        return engine

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
        elem = torch.finfo(self.kv_dtype).bits // 8
        return 2 * self.num_layers * kv_heads * head_dim * elem

    def _cache_dtype(self) -> Optional[torch.dtype]:
        """Return what ``make_cache`` is told to store (None: the model's, as DynamicCache)."""
        return self.kv_dtype if self.preallocate else None

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
        cache = kv_cache.make_cache(self.num_layers, cap, self.preallocate, self._cache_dtype())
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
