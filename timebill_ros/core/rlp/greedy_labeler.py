"""
Greedy decoding of many prompts at once, to measure how long the target model's answers are.

The labels must be the lengths the *target* model really produces (chat template, greedy, stop
at EOS, up to a cap), and labelling thousands of prompts on a CPU is the slow part of building
the dataset. This module is that decoder: a continuously refilled batch with a preallocated KV
cache, plus the loop detector that stops rows stuck repeating themselves. It writes no files;
``labelling`` drives it and records the results.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .backbones import chat_ids, left_pad


def _prealloc_layer_class():
    """
    Make a cache layer class with room to grow.

    So decoding does not copy the whole cache every step the way ``DynamicCache``'s ``torch.cat``
    does (it grows in chunks of 64 columns).
    """
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
            return self.keys[:, :, : self.n], self.values[:, :, : self.n]

        def get_seq_length(self):
            return self.n

        def get_mask_sizes(self, query_length):
            return self.n + query_length, 0

    return _Prealloc


def detect_loop(tokens: Sequence[int], span: int = 64, max_period: int = 64) -> bool:
    """
    Tell whether the last tokens are one block repeated back to back.

    Over >= ``span`` tokens and at least 3 times. Greedy decoding of a small model practically
    never leaves such a loop, so the row is stopped and labelled as running to the cap;
    ``timebill dataset`` checks that claim on a sample of looped prompts (``--verify-loops``).
    """
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
    """
    Greedy decoding of many prompts with a pool of ``batch_size`` rows refilled as rows finish.

    Continuous batching, so one looping prompt does not hold a whole batch hostage.

    Rows are left-aligned to a shared right edge; padding columns are masked and each row keeps
    its own RoPE positions. Finished rows are dropped and new prompts prefilled and merged
    whenever at least ``refill_at`` rows are free. Numerically this differs from unbatched greedy
    only by float summation order, which can flip a near-tied argmax now and then (lengths stay
    the target's).
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens: int,
        batch_size: int = 24,
        refill_at: int = 4,
        loop_span: int = 0,
    ):
        self.model, self.tok = model, tokenizer
        self.cap = int(max_new_tokens)
        # >0: stop rows stuck in an exact loop this long (labelled capped)
        self.loop_span = int(loop_span)
        self.looped: set = set()
        self._hist: dict = {}
        self.batch_size = int(batch_size)
        self.refill_at = max(1, min(int(refill_at), self.batch_size))
        eos = model.generation_config.eos_token_id
        if not isinstance(eos, (list, tuple)):
            eos = [eos if eos is not None else tokenizer.eos_token_id]
        self.eos = set(eos)
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)

    def encode(self, prompt: str) -> list[int]:
        return chat_ids(self.tok, prompt)

    def run(
        self, items: Sequence[tuple[str, list[int]]], on_done: Callable[[str, int, bool], None]
    ) -> None:
        """
        Label ``items`` = [(key, prompt_ids)], calling ``on_done(key, n_generated, capped)``.

        ``gen`` counts generated tokens including the pending ``nxt``; a row ends when ``nxt`` is
        EOS (length ``gen - 1``: EOS is not counted) or when ``gen`` reaches the cap
        (length = cap, capped).
        """
        import torch

        queue = list(items)[::-1]  # pop() from the end keeps the given order
        keys: list[str] = []
        alive: list[bool] = []
        lens = gen = mask = cache = nxt = None
        with torch.inference_mode():
            while queue or any(alive):
                n_dead = alive.count(False)
                refill = self.refill_at if queue else max(1, len(alive) // 4)
                if not any(alive) or n_dead >= refill:
                    keep = [i for i, a in enumerate(alive) if a]
                    n_new = min(len(queue), self.batch_size - len(keep))
                    new = [queue.pop() for _ in range(n_new)]
                    keys, lens, gen, mask, cache, nxt = self._merge(
                        keys, lens, gen, mask, cache, nxt, keep, new
                    )
                    alive = [True] * len(keys)
                    self._check(range(len(keys)), keys, alive, gen, nxt, on_done)
                    continue
                B = len(keys)
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
                out = self.model(
                    input_ids=nxt.view(B, 1),
                    attention_mask=mask,
                    position_ids=lens.view(B, 1),
                    cache=cache,
                    use_cache=True,
                )
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
        """
        Drop finished rows, prefill ``new`` prompts, and right-align everything in fresh buffers.

        One copy per tensor; columns that are padding for every row are trimmed.
        """
        import torch
        from transformers.cache_utils import Cache

        if not keep and not new:
            return [], None, None, None, None, None
        Lo, first = 0, 0
        if keep:
            idx = torch.tensor(keep)
            mask, lens, gen, nxt = mask[idx], lens[idx], gen[idx], nxt[idx]
            keys = [keys[i] for i in keep]
            # leading columns that are padding in every kept row
            first = int(mask.float().argmax(1).min())
            mask = mask[:, first:]
            Lo = mask.shape[1]
        else:
            keys, mask = [], torch.zeros(0, 0, dtype=torch.long)
            lens, gen, nxt = (torch.zeros(0, dtype=torch.long),) * 3
        Ln, kv_new = 0, None
        if new:
            Ln = max(len(ids) for _, ids in new)
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
            inp, nm, pos = left_pad([ids for _, ids in new], pad)
            out = self.model(input_ids=inp, attention_mask=nm, position_ids=pos, use_cache=True)
            kv_new = out.cache if getattr(out, 'cache', None) is not None else out.past_key_values
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
