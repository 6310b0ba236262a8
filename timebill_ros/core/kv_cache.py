"""
A KV cache that writes new entries in place instead of re-concatenating the whole cache.

transformers' ``DynamicLayer.update`` does ``torch.cat([keys, new])`` every token, copying
the full cache each step; at 8k tokens that copy costs as much as the attention itself.
Here each layer owns a buffer sized for prompt + answer and hands the model views of its
first ``length`` entries. Eviction compacts the kept entries to the front of the buffer.

The buffer may hold 16-bit keys/values (config ``kv_dtype``): half the bytes per cached token.
New entries are rounded as they are written; the engine's C++ attention reads them as they are,
other readers (prefill's sdpa, the presses' scores) widen what they read (``attention.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

KV_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def kv_dtype(name: str) -> torch.dtype:
    """Return the torch dtype of a ``kv_dtype`` setting; refuse any other name."""
    if name not in KV_DTYPES:
        raise ValueError(f'kv_dtype must be one of {", ".join(KV_DTYPES)}, got {name!r}')
    return KV_DTYPES[name]


class PreallocatedLayer(DynamicLayer):
    """
    One layer's keys/values in a buffer of ``capacity`` positions (grows ×2 if outrun).

    ``dtype``: what the buffer stores (None: the dtype of the first keys written).
    """

    def __init__(self, capacity: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.capacity = int(capacity)
        self.dtype = dtype
        self.length = 0
        self._kbuf = self._vbuf = None

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        self.device = key_states.device
        cap = max(self.capacity, key_states.shape[-2])
        dtype = self.dtype or key_states.dtype
        self._kbuf = key_states.new_empty((b, h, cap, d), dtype=dtype)
        self._vbuf = value_states.new_empty((b, h, cap, value_states.shape[-1]), dtype=dtype)
        self.is_initialized = True

    def _grow(self, needed: int):
        cap = max(needed, 2 * self._kbuf.shape[-2])
        for name in ('_kbuf', '_vbuf'):
            old = getattr(self, name)
            new = old.new_empty(old.shape[:2] + (cap,) + old.shape[3:])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if end > self._kbuf.shape[-2]:
            self._grow(end)
        self._kbuf[:, :, self.length:end] = key_states
        self._vbuf[:, :, self.length:end] = value_states
        self.length = end
        self.keys = self._kbuf[:, :, :end]
        self.values = self._vbuf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only ``indices`` ([B, H, n]) of the current entries, packed to the front."""
        n = indices.shape[-1]
        idx = indices.unsqueeze(-1)
        for buf in (self._kbuf, self._vbuf):
            kept = buf[:, :, : self.length].gather(2, idx.expand(-1, -1, -1, buf.shape[-1]))
            buf[:, :, :n] = kept
        self.length = n
        self.keys = self._kbuf[:, :, :n]
        self.values = self._vbuf[:, :, :n]

    def fill_random(self, length: int, like: torch.Tensor, generator=None) -> None:
        """
        Cache ``length`` entries of standard-normal values, for timing decode steps.

        They are written, not just allocated: reading never-written buffers is cheaper than
        reading a real cache (untouched pages all map to one zero page).
        """
        if not self.is_initialized:
            self.lazy_initialization(like, like)
        if length > self._kbuf.shape[-2]:
            self._grow(length)
        self._kbuf[:, :, :length].normal_(generator=generator)
        self._vbuf[:, :, :length].normal_(generator=generator)
        self.length = length
        self.keys = self._kbuf[:, :, :length]
        self.values = self._vbuf[:, :, :length]

    def crop(self, max_length: int) -> None:
        self.length = min(self.length, max_length)
        self.keys = self._kbuf[:, :, : self.length]
        self.values = self._vbuf[:, :, : self.length]

    def clone(self) -> 'PreallocatedLayer':
        other = PreallocatedLayer(self.capacity, self.dtype)
        if self.is_initialized:
            other.device = self.device
            other._kbuf = self._kbuf.clone()
            other._vbuf = self._vbuf.clone()
            other.is_initialized = True
            other.length = self.length
            other.keys = other._kbuf[:, :, : other.length]
            other.values = other._vbuf[:, :, : other.length]
        return other


def make_cache(
    num_layers: int, capacity: int, preallocate: bool = True, dtype: Optional[torch.dtype] = None
) -> Cache:
    """
    Make a cache for one request: preallocated (default) or transformers' DynamicCache.

    ``dtype`` (preallocated only): what it stores; None: what the model writes.
    """
    if preallocate:
        return Cache(layers=[PreallocatedLayer(capacity, dtype) for _ in range(num_layers)])
    if dtype is not None:
        raise ValueError("a KV dtype other than the model's needs the preallocated cache")
    return DynamicCache()


def keep_entries(cache: Cache, per_layer_indices) -> None:
    """Apply an eviction decision (one index tensor per layer) to either cache kind."""
    for layer, idx in zip(cache.layers, per_layer_indices):
        if isinstance(layer, PreallocatedLayer):
            layer.keep(idx)
        else:
            gidx = idx.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, gidx).contiguous()
            layer.values = layer.values.gather(2, gidx).contiguous()


def clone_cache(cache: Cache) -> Cache:
    """Independent copy, so one prefill can serve several eviction policies."""
    layers = []
    for layer in cache.layers:
        if isinstance(layer, PreallocatedLayer):
            layers.append(layer.clone())
        else:
            new = DynamicLayer()
            if layer.is_initialized:
                new.lazy_initialization(layer.keys, layer.values)
                new.keys, new.values = layer.keys.clone(), layer.values.clone()
            layers.append(new)
    return Cache(layers=layers)
