"""
Writing GGUF files from float weights: the tests' and benchmarks' checkpoints of any shape.

gguf-py 0.19 quantises Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 but not the K-quants most downloads use, so
Q4_K and Q6_K are quantised here (simple min/max per sub-block, not llama.cpp's search: for
timing and layout checks, not for quality). ``q4_k_m`` mixes types the way llama.cpp's Q4_K_M
does: Q6_K for the output (or the tied embedding), for ``attn_v`` and ``ffn_down`` in the first
and last eighth of the layers and every third between, Q4_K elsewhere, F32 norms and biases.
Where a row is not a whole number of 256-weight superblocks, llama.cpp falls back to Q5_0 /
Q8_0; here the fallback is Q4_1 / Q8_0 (``Q4_1`` keeps the int4 path the thing a benchmark
measures). Tensors are written one at a time: a writer never holds the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

QK_K = 256
MIXES = ('q4_k_m', 'q4_k', 'q4_0', 'q4_1', 'q5_0', 'q6_k', 'q8_0', 'f16', 'f32')


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Return the little-endian bytes of ``t`` [..., n] as uint8 [..., n · itemsize]."""
    return t.contiguous().view(torch.uint8).reshape(*t.shape[:-1], -1)


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


def quantize_q4_k(w: torch.Tensor) -> np.ndarray:
    """Quantise [N, K] (K a multiple of 256) to Q4_K superblocks, uint8 [N, K/256 · 144]."""
    x = w.detach().float().reshape(w.shape[0], -1, 8, 32)
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)
    scale, low = (hi - lo) / 15, -lo  # per sub-block: w ≈ scale·q − low, q in 0..15
    d, dmin = (scale.amax(-1) / 63).half(), (low.amax(-1) / 63).half()
    sc = _div(scale, d.float()[..., None]).round().clamp(0, 63)
    mn = _div(low, dmin.float()[..., None]).round().clamp(0, 63)
    step, off = d.float()[..., None] * sc, dmin.float()[..., None] * mn
    q = _div(x + off[..., None], step[..., None]).round().clamp(0, 15).to(torch.uint8)
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    packed = torch.cat(
        [
            sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
            mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4),
        ],
        dim=-1,
    )
    qs = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).reshape(*q.shape[:2], 128)
    block = torch.cat([_bytes(d[..., None]), _bytes(dmin[..., None]), packed, qs], dim=-1)
    return block.reshape(w.shape[0], -1).numpy()


def quantize_q6_k(w: torch.Tensor) -> np.ndarray:
    """Quantise [N, K] (K a multiple of 256) to Q6_K superblocks, uint8 [N, K/256 · 210]."""
    x = w.detach().float().reshape(w.shape[0], -1, 16, 16)
    s = x.abs().amax(-1) / 31  # per 16 weights: w ≈ s·q, q in -31..31
    d = (s.amax(-1) / 127).half()
    sc = _div(s, d.float()[..., None]).round().clamp(0, 127)
    q = _div(x, (d.float()[..., None] * sc)[..., None]).round().clamp(-32, 31)
    q = (q + 32).to(torch.uint8).reshape(*x.shape[:2], 2, 4, 32)  # [half, quarter, 32]
    lo = (q & 15).reshape(*x.shape[:2], 2, 2, 64)  # low 4 bits: [half, 64-element part, 64]
    ql = (lo[:, :, :, 0] | (lo[:, :, :, 1] << 4)).reshape(*x.shape[:2], 128)
    qh = sum(((q[:, :, :, i] >> 4) & 3) << (2 * i) for i in range(4)).reshape(*x.shape[:2], 64)
    scales = sc.to(torch.int8).view(torch.uint8)
    block = torch.cat([ql, qh.to(torch.uint8), scales, _bytes(d[..., None])], dim=-1)
    return block.reshape(w.shape[0], -1).numpy()


def quantize_q4_1(w: torch.Tensor) -> np.ndarray:
    """Quantise [N, K] to Q4_1 blocks (fp16 d, m; nibbles) with the engine's own quantiser."""
    from .weights import quantize_q4_1 as codes

    q, d, m = codes(w)
    g = q.reshape(w.shape[0], -1, 32)
    qs = g[..., :16] | (g[..., 16:] << 4)
    return torch.cat([_bytes(d[..., None]), _bytes(m[..., None]), qs], -1).reshape(
        w.shape[0], -1).numpy()


def quantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """Quantise [N, K] to Q8_0 blocks: fp16 scale (max |w| / 127), 32 int8 codes."""
    x = w.detach().float().reshape(w.shape[0], -1, 32)
    d = (x.abs().amax(-1) / 127).half()
    q = _div(x, d.float()[..., None]).round().clamp(-127, 127).to(torch.int8).view(torch.uint8)
    return torch.cat([_bytes(d[..., None]), q], -1).reshape(w.shape[0], -1).numpy()


def quantize(w: torch.Tensor, qtype) -> np.ndarray:
    """Return ``w`` [N, K] in GGUF type ``qtype``: bytes, or float32/float16 values."""
    from gguf import GGMLQuantizationType as T
    import gguf.quants as gq

    ours = {T.Q4_K: quantize_q4_k, T.Q6_K: quantize_q6_k, T.Q4_1: quantize_q4_1,
            T.Q8_0: quantize_q8_0}  # torch, all cores: gguf-py's numpy ones take minutes at 7B
    if qtype in ours:
        return ours[qtype](w)
    return gq.quantize(w.detach().float().numpy(), qtype)


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, every third."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (
        layer - n_layers // 8) % 3 == 2


def mix_type(mix: str, gguf_name: str, shape: Sequence[int], n_layers: int, tied: bool):
    """Return the GGUF type ``mix`` gives the tensor ``gguf_name`` of ``shape``."""
    from gguf import GGMLQuantizationType as T

    if mix not in MIXES:
        raise ValueError(f'mix must be one of {MIXES}, got {mix!r}')
    if len(shape) < 2 or not gguf_name.endswith('.weight') or 'norm' in gguf_name:
        return T.F32
    if mix != 'q4_k_m':
        qtype = T[mix.upper()]
    else:
        parts = gguf_name.split('.')
        more = parts[0] == 'blk' and parts[2] in ('attn_v', 'ffn_down') and _more_bits(
            int(parts[1]), n_layers)
        head = gguf_name == 'output.weight' or (tied and gguf_name == 'token_embd.weight')
        qtype = T.Q6_K if head or more else T.Q4_K
    if qtype in (T.Q4_K, T.Q6_K) and shape[-1] % QK_K:
        qtype = {T.Q4_K: T.Q4_1, T.Q6_K: T.Q8_0}[qtype]
    return qtype


def _metadata(writer, cfg) -> None:
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    rope = (getattr(cfg, 'rope_parameters', None) or {}).get('rope_theta')
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(rope or getattr(cfg, 'rope_theta', 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)


def copy_tokenizer(writer, source: str | Path) -> None:
    """Copy the tokenizer fields (vocabulary, merges, special ids, chat template) of a GGUF."""
    from gguf import GGUFReader, GGUFValueType

    for key, field in GGUFReader(str(source)).fields.items():
        if not key.startswith('tokenizer.'):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def write_gguf(
    path: str | Path,
    config,
    shapes: Dict[str, Sequence[int]],
    tensor: Callable[[str], torch.Tensor],
    mix: str = 'q4_k_m',
    tokenizer_from: Optional[str | Path] = None,
    reuse: bool = False,
) -> Path:
    """
    Write the HF parameters ``shapes`` ({name: shape}) of a Llama/Qwen2 ``config`` as a GGUF.

    ``tensor(name)`` gives each one (fp32) when it is written, so a random or real model of any
    size is written without being held. Llama's q/k rows are permuted as llama.cpp's converter
    does; a tied head is left out (the loader ties it back). ``reuse``: quantise each (shape,
    type) once and write those bytes for every matrix that has them (random benchmark weights:
    minutes less at 7B). Return ``path``.
    """
    import gguf

    from .gguf_weights import _name_map

    cfg = config.get_text_config(decoder=True)
    arch = cfg.model_type
    to_gguf = _name_map(arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, 'tie_word_embeddings', False))
    plan = []
    for hf, shape in shapes.items():
        if tied and hf == 'lm_head.weight':
            continue
        name = to_gguf(hf)
        if name is None:
            raise ValueError(f'no GGUF name for {hf!r} in {arch}')
        plan.append((hf, name, tuple(shape), mix_type(mix, name, shape, cfg.num_hidden_layers,
                                                      tied)))
    path = Path(path)
    tmp = path.with_name(path.name + '.part')
    writer = gguf.GGUFWriter(tmp, arch)
    _metadata(writer, cfg)
    if tokenizer_from is not None:
        copy_tokenizer(writer, tokenizer_from)
    else:
        for key in ('bos_token_id', 'eos_token_id'):
            if isinstance(getattr(cfg, key, None), int):
                writer.add_uint32(f'tokenizer.ggml.{key}', getattr(cfg, key))
    for hf, name, shape, qtype in plan:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * size
        writer.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    memo: Dict[tuple, np.ndarray] = {}
    for hf, name, shape, qtype in plan:
        if (shape, qtype) in memo:
            writer.write_tensor_data(memo[shape, qtype])
            continue
        w = tensor(hf).detach().float().reshape(shape)
        kind = name.split('.')[-2] if name.count('.') >= 2 else ''
        if arch == 'llama' and kind in ('attn_q', 'attn_k'):
            heads = cfg.num_attention_heads if kind == 'attn_q' else cfg.num_key_value_heads
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2)
            w = w.reshape(shape)
        data = w.numpy() if qtype == gguf.GGMLQuantizationType.F32 else quantize(
            w.reshape(-1, shape[-1]), qtype)
        data = np.ascontiguousarray(data)
        if reuse and len(shape) > 1:
            memo[shape, qtype] = data
        writer.write_tensor_data(data)
    writer.close()
    tmp.replace(path)
    return path


def write_model_gguf(model, path: str | Path, mix: str = 'q4_k_m', **kw) -> Path:
    """Write an in-memory HF model's parameters as a GGUF (tests: a small random model)."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith('inv_freq')}
    return write_gguf(path, model.config, {k: v.shape for k, v in state.items()},
                      state.__getitem__, mix, **kw)
