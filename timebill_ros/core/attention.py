"""
The engine's attention: one-token decode, chunked prefill, and the press's window scores.

Registered with transformers under ``ATTENTION_NAME``; ``collect`` (thread-local) carries what a
scoring prefill asks of it: the press, the dict its scores go to, whether a chunk follows cached
keys. A 16-bit KV cache (``kv_dtype``) is read as it is by the C++ one-token attention; every
other path widens the cached keys/values to the query's dtype once per call (a prefill chunk).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

ATTENTION_NAME = 'timebill_sdpa'
collect = threading.local()  # the press collecting scores in this thread's prefill, if any


def _attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, plus (during a scoring prefill) the press's window scores for this layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] == 1 and _decode_fast_path(query, key, kwargs):
        return _decode_attention(query, key, value, kwargs.get('scaling')), None
    key, value = _widen(key, query), _widen(value, query)
    press = getattr(collect, 'press', None)
    if press is not None and query.shape[2] > 1:
        collect.scores[module.layer_idx] = press.score(module, _as_full_query(query, key), key)
    if getattr(collect, 'chunk', False) and _chunk_fast_path(query, key, kwargs):
        return _chunk_attention(query, key, value, kwargs.get('scaling')), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _widen(cached: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Return cache entries in the query's dtype (a copy only when the cache is 16-bit)."""
    return cached if cached.dtype == query.dtype else cached.to(query.dtype)


_FLASH_CPU = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)


def _chunk_fast_path(query, key, kwargs) -> bool:
    """
    Attend for what ``Engine.prefill`` sends while ``collect.chunk`` is set, and nothing else.

    That is one unpadded causal chunk after cached keys, on CPU, no dropout, sliding window or
    bias.
    """
    return (
        _FLASH_CPU is not None
        and query.device.type == 'cpu'
        and query.shape[0] == 1
        and 1 < query.shape[2] < key.shape[2]
        and query.shape[1] % key.shape[1] == 0
        and not kwargs.get('dropout')
        and kwargs.get('sliding_window') is None
        and kwargs.get('softcap') is None
        and kwargs.get('position_bias') is None
    )


def _decode_fast_path(query, key, kwargs) -> bool:
    """One unpadded sequence, one new token, plain attention to every cached entry."""
    return (
        query.shape[0] == 1
        and query.shape[1] % key.shape[1] == 0
        and not kwargs.get('dropout')
        and kwargs.get('sliding_window') is None
        and kwargs.get('softcap') is None
        and kwargs.get('position_bias') is None
    )


def _decode_attention(query, key, value, scaling):
    """
    One decode step's attention, the query heads of each KV group packed as rows.

    transformers calls sdpa with ``enable_gqa=True`` here, which torch's CPU kernel runs 8-14×
    slower in bf16 (10-20 % in fp32); as [B, Hkv, Hq/Hkv, D] rows against their own KV head it is
    one plain sdpa call that reads the cache once. No mask: the one new token sees everything.
    """
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    kern = _decode_kernels(query, key, value)
    if kern is not None:
        scale = scaling if scaling is not None else d**-0.5
        q = query.reshape(hq, d).contiguous()
        out = kern.decode_attention(q, key[0], value[0], key.shape[2], scale)
        return out.reshape(b, 1, hq, d)
    packed = query.reshape(b, hkv, hq // hkv, d)
    key, value = _widen(key, query), _widen(value, query)
    out = F.scaled_dot_product_attention(packed, key, value, scale=scaling)
    return out.reshape(b, 1, hq, d)


_KERNEL_KV = (torch.float32, torch.float16, torch.bfloat16)


def _decode_kernels(query, key, value):
    """
    Return the engine's AVX2 kernels if they take this attention.

    That is an fp32 query on the CPU, one sequence, and an fp32, fp16 or bf16 cache.
    """
    if query.device.type != 'cpu' or query.dtype != torch.float32 or query.shape[0] != 1:
        return None
    if key.dtype not in _KERNEL_KV or value.dtype != key.dtype or query.shape[-1] % 8:
        return None
    if key.stride(-1) != 1 or value.stride(-1) != 1 or value.shape[-1] != query.shape[-1]:
        return None
    from . import kernels

    return kernels.load()


def _chunk_attention(query, key, value, scaling):
    """
    Causal attention of a prefill chunk that follows ``past`` cached entries, without a mask.

    Given a mask, CPU sdpa copies every KV head once per query head (``repeat_kv``) and runs a
    chunk in small query blocks: 35-75 % slower than one pass at 4k tokens. Here the cached
    part runs unmasked with the query heads of each KV group stacked along the sequence (no
    copy, big blocks), the chunk's own keys run causal, and the two merge by log-sum-exp.
    """
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    past = key.shape[2] - n
    stacked = query.reshape(b, hkv, (hq // hkv) * n, d)
    o1, l1 = _FLASH_CPU(stacked, key[:, :, :past], value[:, :, :past], scale=scaling)
    o2, l2 = _FLASH_CPU(query, key[:, :, past:], value[:, :, past:], is_causal=True, scale=scaling)
    l1 = l1.reshape(b, hq, n, 1)
    l2 = l2.reshape(b, hq, n, 1)
    top = torch.maximum(l1, l2)
    w1, w2 = (l1 - top).exp_(), (l2 - top).exp_()
    out = (o1.reshape(b, hq, n, -1) * w1 + o2 * w2) / (w1 + w2)
    return out.to(query.dtype).transpose(1, 2).contiguous()


def _as_full_query(query, key):
    """
    Left-pad the last chunk's queries with zeros to the one-pass layout.

    In the last chunk of a chunked prefill the queries cover only that chunk while ``key`` holds
    the whole prompt; presses read ``query.shape[2]`` as the prompt length and use only the last
    ``window_size`` rows (the window lies in the chunk: ``Engine._chunk_bounds`` makes sure).
    """
    missing = key.shape[2] - query.shape[2]
    if missing <= 0:
        return query
    pad = query.new_zeros(query.shape[:2] + (missing, query.shape[3]))
    return torch.cat([pad, query], dim=2)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _attention)
    # else the causal mask silently vanishes
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
