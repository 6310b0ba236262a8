"""
Weight formats for the engine's Linear layers: fp32, bf16, int8 and int4.

On a CPU a decode step reads every weight once, so the bytes per weight set the step time
(fp32 4, bf16 2, int8 1, int4 0.625 with its scales). The model stays in its own dtype
(fp32 by default: activations, norms, RoPE and the KV cache); only ``nn.Linear`` modules are
swapped for layers that store the weights compactly and cast activations at their boundary, so
the rest of the engine never knows which format runs.

int4 is group-32 asymmetric (a scale and a minimum per 32 weights): exactly GGUF Q4_1's block,
so GGUF 4-bit blocks (Q4_0/Q4_1/Q4_K) become int4 layers without loss (``gguf_weights.py``
reads them); float checkpoints are quantised at load time.
Few-row calls (decode) run the engine's AVX2 kernels (``kernels/``, int16 activations) where
they build, else torch's CPU int4 kernel (fast only with AVX-512 and bf16 inputs). Many-row calls
(prefill) multiply int8-quantised rows by the same Q4_1 blocks or int8 weights (``q4_1_gemm``,
``q8_gemm``: AVX-512 VNNI or AVX2): faster than a dense fp32 (AVX2) or bf16 (AVX-512) GEMM and no
extra memory, so ``prefill_weights='auto'`` keeps no dense copy where those kernels load. A dense
copy stays an explicit option (``bf16``: 2 extra bytes per weight, ``fp32``: 4), and is what
``auto`` keeps where the kernels cannot run (torch's int4 kernel is slow for many rows).
The output head is int8 per channel in the int4 format.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

WEIGHT_FORMATS = ('fp32', 'bf16', 'int8', 'int4')
GROUP = 32  # int4 group size: GGUF Q4_1's block
QUANT_CHUNK = 1 << 22  # weights quantised per step (16 MB of fp32 temporaries)
DENSE_ROWS = 8  # above this many rows: the dense copy if any, else the many-row kernel
# Many-row kernels: a block of 32 activations whose max exceeds this many times its mean |x|
# (an outlier channel sets its int8 scale) is multiplied twice, its rounding residual too
# (~15-bit there). SmolLM2 int4, KL to the fp32 model over 1k tokens: 0.0028 at 8 (~30 % of
# blocks twice), 0.0060 plain int8 (inf), 0.0023 at 0 (every block, ~1.6x the work); the dense
# copies 0.0024 (fp32) and 0.0026 (bf16).
PREFILL_OUTLIER = 8.0
PREFILL_WEIGHTS = ('auto', 'bf16', 'fp32', 'none')
_INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N divisible by 16
_log = logging.getLogger(__name__)
_BF16 = torch.bfloat16


def check_format(fmt: str) -> str:
    """Return ``fmt`` if known, else raise with the allowed spellings."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f'weights must be one of {WEIGHT_FORMATS}, got {fmt!r}')
    return fmt


def prefill_dtype(choice: str = 'auto') -> Optional[torch.dtype]:
    """
    Return the dtype of int4 layers' dense prefill copy for ``choice`` (None: no copy).

    ``auto``: none where the engine's kernels run (their many-row GEMM is the faster prefill),
    else bf16 where the CPU multiplies bf16 natively (AVX512-BF16/AMX), else fp32 (on AVX2 a
    bf16 GEMM is ~5x slower than fp32).
    """
    if choice not in PREFILL_WEIGHTS:
        raise ValueError(f'prefill_weights must be one of {PREFILL_WEIGHTS}, got {choice!r}')
    if choice == 'auto' and _kernels(torch.device('cpu')) is not None:
        choice = 'none'
    elif choice == 'auto':
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        choice = 'bf16' if native else 'fp32'
    return {'bf16': _BF16, 'fp32': torch.float32, 'none': None}[choice]


def effective_format(fmt: str, device: str | torch.device = 'cpu') -> str:
    """
    Return the format that actually runs on ``device``.

    The int4/int8 kernels used here are CPU kernels; on a GPU the dense bf16 weights with
    torch's own kernels are the fast path, so a quantised format falls back to bf16 there.
    """
    check_format(fmt)
    if torch.device(device).type != 'cpu' and fmt in ('int8', 'int4'):
        return 'bf16'
    return fmt


# ----------------------------------------------------------------------------------- layers
class Bf16Linear(nn.Module):
    """Dense bf16 weights in a model that computes in another dtype."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer('weight', weight.detach().to(_BF16).contiguous())
        self.register_buffer('bias', None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(_BF16), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


def _kernels(device: torch.device):
    """Return the engine's AVX2 decode kernels for ``device``, or None (torch's then)."""
    if device.type != 'cpu':
        return None
    from . import kernels

    return kernels.load()


class Int8Linear(nn.Module):
    """
    Symmetric per-output-channel int8 weights.

    Where the engine's kernels run, few rows (decode) take the int16-activation kernel and
    many rows (prefill) the int8-activation GEMM; elsewhere torch's ``_weight_int8pack_mm``
    (bf16 activations).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        w = weight.detach()
        self.out_features, self.in_features = w.shape
        qweight = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        # in row chunks: whole, an output head (vocab x hidden) took two more fp32 copies of
        # itself while quantised (0.8-1 GiB above the held RSS at a 0.5B model's load)
        step = max(1, QUANT_CHUNK // max(1, self.in_features))
        for r0 in range(0, self.out_features, step):
            part = w[r0:r0 + step].to(torch.float32, copy=True)
            s = (part.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
            qweight[r0:r0 + step] = part.div_(s[:, None]).round_().clamp_(-127, 127)
            scale[r0:r0 + step] = s
        self.register_buffer('qweight', qweight)
        self.register_buffer('scale', scale.to(_BF16))
        self.register_buffer('scale32', self.scale.float())
        self.register_buffer('bias', None if bias is None else bias.detach().clone())
        self._kern = _kernels(w.device) if self.in_features % GROUP == 0 else None

    def dequantized(self) -> torch.Tensor:
        """Return the weights the kernel multiplies with, in fp32."""
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self._kern is not None:
            x2 = x2.float().contiguous()
            if x2.shape[0] <= DENSE_ROWS:
                y = self._kern.q8_linear(x2, self.qweight, self.scale32)
            else:
                y = self._kern.q8_gemm(x2, self.qweight, self.scale32, PREFILL_OUTLIER)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(_BF16), self.qweight, self.scale)
        y = y.to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """
    Group-32 asymmetric int4 weights.

    Built from per-group integer codes ``q`` (0..15), scales ``d`` and minima ``m``, weight =
    d·q + m, as in GGUF Q4_1. Stored as Q4_1 blocks for the engine's kernels where they run
    (few rows: int16 activations; many rows: int8 activations as llama.cpp's Q4_1 × Q8_1, a
    residual pass on outlier blocks), else packed for torch's CPU int4 kernel (bf16
    activations). With ``dense`` (a dtype) a dense copy serves calls of many rows (prefill)
    instead.
    """

    def __init__(
        self,
        q: torch.Tensor,
        d: torch.Tensor,
        m: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        dense: Optional[torch.dtype] = None,
    ):
        super().__init__()
        n, k = q.shape
        self.in_features, self.out_features = k, n
        d32, m32 = d.float().reshape(n, k // GROUP), m.float().reshape(n, k // GROUP)
        self._kern = _kernels(q.device)
        if self._kern is not None:
            g = q.to(torch.uint8).reshape(n, k // GROUP, GROUP)
            # GGUF's byte order: low nibbles elements 0..15 of a block, high nibbles 16..31
            blocks = (g[..., : GROUP // 2] | (g[..., GROUP // 2:] << 4)).reshape(n, k // 2)
            self.register_buffer('q4_blocks', blocks.contiguous())
            self.register_buffer('q4_d', d32.contiguous())
            self.register_buffer('q4_m', m32.contiguous())
            self.packed = self.scales_zeros = None
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            # the kernel computes (q - 8)·scale + zero per group: zero = m + 8·d
            sz = torch.stack([d32, m32 + 8 * d32], dim=-1).transpose(0, 1).contiguous()
            self.register_buffer('packed', packed)
            self.register_buffer('scales_zeros', sz.to(_BF16))
        self.register_buffer('bias', None if bias is None else bias.detach().clone())
        w = None
        if dense is not None:
            w = (q.float().reshape(n, -1, GROUP) * d32[..., None] + m32[..., None]).reshape(n, k)
            w = w.to(dense)
        self.register_buffer('dense', w)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias=None, dense=None) -> 'Int4Linear':
        """Quantise float weights per group of 32 the way llama.cpp makes Q4_1."""
        q, d, m = quantize_q4_1(weight)
        return cls(q, d, m, bias, dense)

    def dequantized(self) -> torch.Tensor:
        """Return the weights the int4 kernel multiplies with, in fp32."""
        if self._kern is not None:
            b = self.q4_blocks.reshape(self.out_features, -1, GROUP // 2)
            q = torch.cat([b & 0x0F, b >> 4], dim=-1).float()
            w = q * self.q4_d[..., None] + self.q4_m[..., None]
            return w.reshape(self.out_features, self.in_features)
        eye = torch.eye(self.in_features, dtype=_BF16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, GROUP, self.scales_zeros
        ).float().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.dense is not None and x2.shape[0] > DENSE_ROWS:
            y = F.linear(x2.to(self.dense.dtype), self.dense)
        elif self._kern is not None:
            x2, w = x2.float().contiguous(), (self.q4_blocks, self.q4_d, self.q4_m)
            if x2.shape[0] <= DENSE_ROWS:
                y = self._kern.q4_1_linear(x2, *w)
            else:
                y = self._kern.q4_1_gemm(x2, *w, PREFILL_OUTLIER)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(_BF16).contiguous(), self.packed, GROUP, self.scales_zeros
            )
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_q4_1(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(q, d, m)``: codes [N, K], fp16 scale/min [N, K/32], as GGUF Q4_1 stores them."""
    w = weight.detach().float()
    n, k = w.shape
    g = w.reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    d = ((hi - lo) / 15.0).half()
    m = lo.half()
    inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros_like(lo))
    q = ((g - m.float()[..., None]) * inv[..., None]).round().clamp(0, 15)
    return q.reshape(n, k).to(torch.uint8), d, m


def int4_fits(linear: nn.Linear) -> bool:
    """Tell whether the CPU int4 kernel takes this shape (K in whole groups, N in 16s)."""
    n, k = linear.weight.shape
    return k % GROUP == 0 and n % _INT4_N_MULTIPLE == 0


# ----------------------------------------------------------------------------------- apply
def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def apply_weights(model: nn.Module, fmt: str, prefill_weights: str = 'auto') -> Dict[str, int]:
    """
    Swap the decoder's and head's ``nn.Linear`` layers for ``fmt``; return counts per kind.

    The loaded float weights are quantised; a GGUF checkpoint's own blocks are read by
    ``gguf_weights.load_gguf_model`` instead (no float copy of the model on the way).
    """
    fmt = effective_format(fmt, next(model.parameters()).device)
    dense = prefill_dtype(prefill_weights)
    model._timebill_weights = fmt
    counts: Dict[str, int] = {}
    if fmt == 'fp32':
        return counts
    head = model.get_output_embeddings()
    for path, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        is_head = mod is head
        w, b = mod.weight.data, mod.bias
        if fmt == 'bf16' or (fmt == 'int4' and not is_head and not int4_fits(mod)):
            if w.dtype == _BF16:
                continue
            new, kind = Bf16Linear(w, b), 'bf16'
        elif fmt == 'int8' or is_head:
            new, kind = Int8Linear(w, b), 'int8'
        else:
            new, kind = Int4Linear.quantize(w, b, dense=dense), 'int4 (quantised)'
        _replace(model, path, new)
        counts[kind] = counts.get(kind, 0) + 1
    if fmt in ('int8', 'int4'):
        model.config.tie_word_embeddings = False  # the head is its own module now
    _log.info('weights %s: %s', fmt, counts)
    return counts


def weight_format(model: nn.Module) -> str:
    """Return the format ``apply_weights`` gave ``model`` (its dtype's, if never applied)."""
    fmt = getattr(model, '_timebill_weights', None)
    if fmt:
        return fmt
    return {torch.float32: 'fp32', _BF16: 'bf16'}.get(model.dtype, str(model.dtype))


def weight_bytes(model: nn.Module, decode: bool = True) -> int:
    """
    Bytes of weights read by one decode step (``decode``) or held in memory (not ``decode``).

    A decode step skips the dense prefill copies and reads one embedding row only.
    """
    total, seen = 0, set()
    emb = model.get_input_embeddings()
    for mod in model.modules():
        own = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for name, t in own:
            if t is None or t.data_ptr() in seen:  # a tied head is the embedding
                continue
            if decode and (name == 'dense' or mod is emb):
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    if decode and emb is not None:
        total += emb.weight.shape[1] * emb.weight.element_size()
    return total
