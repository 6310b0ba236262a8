"""
GGUF checkpoints read straight into the engine's weight layouts, one tensor at a time.

The skeleton of the model is built from its transformers config with its parameters on the
``meta`` device (no memory); every tensor is then read from the file on its own (``pread``, not
a mapping: mapped pages count in the process's RSS as long as the mapping lives), converted, and
either becomes a weights-format layer (``weights.py``) or fills an embedding / norm / bias.
So loading never holds more than the converted model plus one tensor's temporaries.

What each GGUF type becomes (``weights: int4``; ``int8``: every Linear is per-row int8):

- Q4_0, Q4_1, Q4_K: ``Int4Linear`` exactly (per-32 scale d and minimum m in fp32: Q4_K's d·sc
  and −dmin·mn, Q4_0's d and −8·d); zero error vs gguf-py's dequantisation.
- Q5_0, Q5_1, Q5_K, Q6_K, Q8_0: ``Int8Linear``, which has one (bf16) scale per row: the blocks
  are dequantised and requantised, error < row max / 127 (a 4-bit layout would lose more).
- F32, F16, BF16: quantised as ``apply_weights`` does for a float checkpoint.

The output head is int8 per row in both formats, as in ``apply_weights``. Any other type (Q2_K,
Q3_K, IQ*, ...) is refused with the tensor's name. llama.cpp stores Llama's q/k rows permuted
for its rotary; they are put back in the HF order as transformers' GGUF loader does.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
import struct
from typing import Dict, NamedTuple, Optional, Tuple

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
import numpy as np
import torch
from torch import nn

from .errors import ModelLoadError
from .weights import (
    Bf16Linear,
    check_format,
    effective_format,
    int4_fits,
    Int4Linear,
    Int8Linear,
    prefill_dtype,
)

FOUR_BIT = {QT.Q4_0, QT.Q4_1, QT.Q4_K}  # these become Int4Linear without any loss
FLOATS = {QT.F32, QT.F16, QT.BF16}  # quantised at load time like a float checkpoint
READABLE = FOUR_BIT | FLOATS | {QT.Q5_0, QT.Q5_1, QT.Q5_K, QT.Q6_K, QT.Q8_0}
_LIBC = ctypes.CDLL(None)  # the process's own C library (malloc_trim where it is glibc)
# architectures whose GGUF tensors need nothing beyond Llama's q/k un-permutation (transformers
# rewrites others' tensors: Gemma's norms, GPT-2's fused qkv, ...): only these are read here
STREAMED = ('llama', 'qwen2')


# ----------------------------------------------------------------------------------- reading
class TensorInfo(NamedTuple):
    """One tensor of a GGUF file: its type, shape (rows first, as torch), bytes and offset."""

    name: str
    qtype: object  # a GGMLQuantizationType, or the id of a type gguf-py does not know
    shape: Tuple[int, ...]
    offset: int
    nbytes: int


_SCALARS = dict(enumerate('BbHhIif?')) | {10: 'Q', 11: 'q', 12: 'd'}
_STRING, _ARRAY = 8, 9


class GGUFFile:
    """
    A GGUF file's metadata and tensor index, with each tensor read on demand.

    The header is walked once (array values such as the vocabulary are skipped, not decoded:
    gguf.GGUFReader decodes all of them, seconds for a 150k vocabulary); ``raw`` reads one
    tensor's bytes. Use as a context manager or call ``close``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fields: Dict[str, object] = {}  # scalar and string values (arrays are skipped)
        self.tensors: Dict[str, TensorInfo] = {}
        self._fh = open(self.path, 'rb')
        try:
            with mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                self._parse(mm)
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            self._fh.close()
            raise ModelLoadError(f'{self.path} is not a readable GGUF file: {exc}') from exc

    def _parse(self, mm) -> None:
        if mm[:4] != b'GGUF':
            raise ValueError('no GGUF magic')
        version, n_tensors, n_kv = struct.unpack_from('<IQQ', mm, 4)
        if version < 2:
            raise ValueError(f'GGUF version {version} (2 or later is read)')
        pos = 24

        def string(at):
            (n,) = struct.unpack_from('<Q', mm, at)
            return mm[at + 8: at + 8 + n].decode('utf-8'), at + 8 + n

        def value(vtype, at):
            if vtype in _SCALARS:
                fmt = '<' + _SCALARS[vtype]
                return struct.unpack_from(fmt, mm, at)[0], at + struct.calcsize(fmt)
            if vtype == _STRING:
                return string(at)
            if vtype != _ARRAY:
                raise ValueError(f'unknown metadata value type {vtype}')
            etype, count = struct.unpack_from('<IQ', mm, at)
            at += 12
            if etype in _SCALARS:
                return None, at + count * struct.calcsize('<' + _SCALARS[etype])
            for _ in range(count):  # strings (or nested arrays): walk their lengths only
                at = value(etype, at)[1] if etype != _STRING else at + 8 + int.from_bytes(
                    mm[at: at + 8], 'little')
            return None, at

        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from('<I', mm, pos)
            val, pos = value(vtype, pos + 4)
            if val is not None:
                self.fields[key] = val
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from('<I', mm, pos)
            dims = struct.unpack_from(f'<{n_dims}Q', mm, pos + 4)
            qtype, offset = struct.unpack_from('<IQ', mm, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, qtype, tuple(reversed(dims)), offset))
        align = int(self.fields.get('general.alignment', 32))
        start = (pos + align - 1) // align * align
        for name, qtype, shape, offset in infos:
            try:
                qtype = QT(qtype)
            except ValueError:
                pass  # a type newer than gguf-py: refused when read
            block, size = GGML_QUANT_SIZES.get(qtype, (1, 0))
            nbytes = int(np.prod(shape, dtype=np.int64)) // block * size
            self.tensors[name] = TensorInfo(name, qtype, shape, start + offset, nbytes)

    def __enter__(self) -> 'GGUFFile':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()

    @property
    def architecture(self) -> str:
        """Return ``general.architecture`` (llama, qwen2, ...)."""
        return str(self.fields.get('general.architecture', ''))

    def info(self, name: str) -> TensorInfo:
        """Return the tensor ``name``'s entry; raise ModelLoadError naming the file if absent."""
        if name not in self.tensors:
            raise ModelLoadError(f'{self.path.name} has no tensor {name!r}')
        return self.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """Read one tensor's bytes as uint8 [rows, bytes per row], refusing unread types."""
        info = self.info(name)
        if info.qtype not in READABLE:
            kind = getattr(info.qtype, 'name', f'id {info.qtype}')
            known = ', '.join(sorted(t.name for t in READABLE))
            raise ModelLoadError(
                f'{self.path.name}: tensor {name!r} has GGUF type {kind}, which timebill does '
                f'not read (it reads {known})'
            )
        buf = np.empty(info.nbytes, dtype=np.uint8)
        view, at = memoryview(buf), 0
        while at < info.nbytes:  # one read returns at most ~2 GiB
            got = os.preadv(self._fh.fileno(), [view[at:]], info.offset + at)
            if got <= 0:
                raise ModelLoadError(f'{self.path.name}: tensor {name!r} is cut short')
            at += got
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        return buf.reshape(rows, -1)

    def dequantize(self, name: str) -> torch.Tensor:
        """Return one tensor in fp32 (gguf-py's own dequantisation), in its torch shape."""
        from gguf.quants import dequantize

        info = self.info(name)
        return torch.from_numpy(dequantize(self.raw(name), info.qtype)).reshape(info.shape)

    def int4_blocks(self, name: str) -> Tuple[torch.Tensor, ...]:
        """Return a 4-bit tensor as (codes [N, K] uint8, d [N, K/32], m [N, K/32]); w = d·q + m."""
        parse = {QT.Q4_0: parse_q4_0, QT.Q4_1: parse_q4_1, QT.Q4_K: parse_q4_k}
        return parse[self.info(name).qtype](self.raw(name))


# ------------------------------------------------------------------------- block layouts
def _nibbles(qs: np.ndarray, rows: int) -> torch.Tensor:
    """Split 16-byte groups (low nibbles elements 0..15, high 16..31) into codes [rows, K]."""
    return torch.from_numpy(np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1))


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16)[..., 0]


def parse_q4_1(raw) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Split Q4_1 blocks ([rows, 20·K/32] bytes) into codes [rows, K] and fp16 d, m [rows, K/32].

    A block is 20 bytes: fp16 scale d, fp16 minimum m, then 16 bytes whose low nibbles are
    elements 0..15 and high nibbles 16..31; element = d·q + m.
    """
    raw = np.asarray(raw, dtype=np.uint8)
    blocks = raw.reshape(raw.shape[0], -1, 20)
    d, m = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    return _nibbles(blocks[..., 4:], raw.shape[0]), torch.from_numpy(d), torch.from_numpy(m)


def parse_q4_0(raw) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split Q4_0 blocks (fp16 d, 16 bytes of nibbles; element = d·(q − 8)) as Q4_1: m = −8·d."""
    raw = np.asarray(raw, dtype=np.uint8)
    blocks = raw.reshape(raw.shape[0], -1, 18)
    d = torch.from_numpy(_f16(blocks[..., 0:2]).astype(np.float32))
    return _nibbles(blocks[..., 2:], raw.shape[0]), d, -8.0 * d


def parse_q4_k(raw) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Split Q4_K superblocks into per-32 codes, fp32 scales d·sc and minima −dmin·mn.

    A superblock is 144 bytes for 256 weights: fp16 d and dmin, 12 bytes packing eight 6-bit
    scales sc and mins mn, then 4 × 32 bytes whose low nibbles are sub-block 2j and high nibbles
    sub-block 2j+1; element = d·sc·q − dmin·mn. The products are exact in fp32 (11 × 6 bits), so
    ``q·(d·sc) + (−dmin·mn)`` rounds as gguf-py's ``d·sc·q − dmin·mn``: no conversion error.
    """
    raw = np.asarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 144)
    d = _f16(blocks[..., 0:2]).astype(np.float32)[..., None]
    dmin = _f16(blocks[..., 2:4]).astype(np.float32)[..., None]
    lo, hi, mix = blocks[..., 4:8], blocks[..., 8:12], blocks[..., 12:16]
    sc = np.concatenate([lo & 63, (mix & 15) | ((lo >> 2) & 48)], axis=-1)
    mn = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 2) & 48)], axis=-1)
    qs = blocks[..., 16:].reshape(rows, -1, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(rows, -1)
    scale = (d * sc.astype(np.float32)).reshape(rows, -1)
    low = -(dmin * mn.astype(np.float32)).reshape(rows, -1)
    return torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(low)


def _llama_unpermute(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order for rotary (the inverse of its converter's ``permute``)."""
    rest = x.shape[1:]
    return x.reshape(n_head, x.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(x.shape)


# ------------------------------------------------------------------------------ loading
def streams(path: str | Path) -> bool:
    """Tell whether this reader takes the GGUF at ``path`` (its architecture is in STREAMED)."""
    with GGUFFile(path) as gf:
        return gf.architecture in STREAMED


def _name_map(arch: str, n_layers: int):
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise ModelLoadError(f'GGUF architecture {arch!r} is unknown to gguf-py')
    tmap = gguf.get_tensor_name_map(by_name[arch], n_layers)
    return lambda hf: tmap.get_name(hf, try_suffixes=('.weight', '.bias'))


class _Source:
    """A GGUF file seen through HF parameter names, with rows in the HF order."""

    def __init__(self, gf: GGUFFile, cfg):
        if gf.architecture not in STREAMED:
            raise ModelLoadError(f'{gf.path.name}: architecture {gf.architecture!r} is not read '
                                 f'tensor by tensor (only {", ".join(STREAMED)})')
        self.gf, self.cfg = gf, cfg
        self.gguf_name = _name_map(gf.architecture, cfg.num_hidden_layers)
        self.permuted = gf.architecture == 'llama'  # as transformers' LlamaTensorProcessor

    def name(self, hf: str) -> str:
        g = self.gguf_name(hf)
        if g is None or g not in self.gf.tensors:
            raise ModelLoadError(f'{self.gf.path.name} has no tensor for {hf!r} (looked for {g})')
        return g

    def _rows(self, gname: str, t: torch.Tensor) -> torch.Tensor:
        kind = gname.split('.')[-2] if gname.count('.') >= 2 else ''
        if not self.permuted or kind not in ('attn_q', 'attn_k'):
            return t
        heads = self.cfg.num_attention_heads
        if kind == 'attn_k':
            heads = getattr(self.cfg, 'num_key_value_heads', None) or heads
        return _llama_unpermute(t, heads)

    def tensor(self, gname: str, dtype=torch.float32) -> torch.Tensor:
        return self._rows(gname, self.gf.dequantize(gname)).to(dtype)

    def blocks(self, gname: str) -> Tuple[torch.Tensor, ...]:
        return tuple(self._rows(gname, t) for t in self.gf.int4_blocks(gname))


def _linear(src: _Source, gname: str, mod: nn.Linear, bias, fmt: str, dense, is_head: bool,
            w: Optional[torch.Tensor] = None):
    """Return (the layer that replaces ``mod``, its kind) for the GGUF tensor ``gname`` (``w``)."""
    qtype = src.gf.info(gname).qtype
    tag = f'gguf {qtype.name}'
    if fmt == 'int4' and not is_head and int4_fits(mod) and qtype in FOUR_BIT:
        return Int4Linear(*src.blocks(gname), bias=bias, dense=dense), f'int4 ({tag})'
    w = src.tensor(gname) if w is None else w
    if fmt == 'fp32':
        mod.weight = nn.Parameter(w.to(mod.weight.dtype), requires_grad=False)
        mod.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return mod, 'fp32'
    if fmt == 'bf16' or (fmt == 'int4' and not is_head and not int4_fits(mod)):
        return Bf16Linear(w, bias), 'bf16'
    if fmt == 'int4' and not is_head and qtype in FLOATS:
        return Int4Linear.quantize(w, bias, dense=dense), 'int4 (quantised)'
    return Int8Linear(w, bias), f'int8 ({tag})'


def _release() -> None:
    """Give freed heap back to the OS after a tensor (glibc keeps it: the RSS would grow 4x)."""
    trim = getattr(_LIBC, 'malloc_trim', None)
    if trim is not None:
        trim(0)


def _fill_linear(model, src: _Source, path: str, mod: nn.Linear, fmt, dense, emb_path) -> str:
    """Put the layer for the Linear at ``path`` in its place; return its kind."""
    is_head = mod is model.get_output_embeddings()
    hf, w = f'{path}.weight', None
    if is_head and src.gguf_name(hf) not in src.gf.tensors:  # tied to the embedding
        hf, w = f'{emb_path}.weight', model.get_input_embeddings().weight.detach().float()
    bias = None
    if mod.bias is not None:
        bias = src.tensor(src.name(f'{path}.bias'), mod.bias.dtype)
    new, kind = _linear(src, src.name(hf), mod, bias, fmt, dense, is_head, w)
    parent, _, attr = path.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return kind


def load_gguf_model(
    path: str | Path,
    config,
    fmt: str = 'int4',
    prefill_weights: str = 'auto',
    dtype: torch.dtype = torch.float32,
    device: str = 'cpu',
) -> Tuple[nn.Module, Dict[str, int]]:
    """
    Build the model ``config`` describes and fill it from the GGUF at ``path``, tensor by tensor.

    Return ``(model, counts of layer kinds)`` in eval mode; the model is what ``load_model``
    would give after ``apply_weights(model, fmt)``. The config's tensors must all be in the file
    (the head may be tied to the embedding); an unread type raises ModelLoadError naming it.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    fmt = effective_format(check_format(fmt), device)
    dense = prefill_dtype(prefill_weights) if fmt == 'int4' else None
    with init_empty_weights():  # parameters on meta: nothing allocated; buffers (RoPE) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    counts: Dict[str, int] = {}
    emb = model.get_input_embeddings()
    with GGUFFile(path) as gf:
        src = _Source(gf, model.config.get_text_config(decoder=True))
        mods = dict(model.named_modules())
        emb_path = next(p for p, m in mods.items() if m is emb)
        for name in sorted(mods, key=lambda p: mods[p] is not emb):  # embedding first (a tied
            mod = mods[name]  # head is made from it)
            if isinstance(mod, nn.Linear):
                kind = _fill_linear(model, src, name, mod, fmt, dense, emb_path)
                counts[kind] = counts.get(kind, 0) + 1
            for pname, p in list(mod.named_parameters(recurse=False)):
                if p.is_meta and not isinstance(mod, nn.Linear):
                    t = src.tensor(src.name(f'{name}.{pname}' if name else pname), p.dtype)
                    setattr(mod, pname, nn.Parameter(t.reshape(p.shape), requires_grad=False))
            _release()
    if fmt == 'fp32' and getattr(model.config, 'tie_word_embeddings', False):
        model.tie_weights()
    elif fmt != 'fp32':
        model.config.tie_word_embeddings = False  # the head is its own module now
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f'{Path(path).name} left {len(left)} tensors unfilled: {left[:4]}')
    model._timebill_weights = fmt
    return model.to(device).eval(), counts
