"""
One decode step of a Llama-family model in one C++ call (int4 weights, AVX2 CPUs).

Through transformers a one-token step of a 30-layer model is ~500 small torch ops and Python
frames: on a 2-core CPU that overhead cost more than the 4-bit matmuls themselves (50 ms per
token where the weights need ~10). ``FastDecoder`` hands the same weights (the ``Int4Linear``
blocks, the int8 head) to the kernel module's ``Decoder`` once, and each step is a single call
that releases the GIL. Prefill, eviction and the cache stay the engine's: the step writes the
new key/value into the layer's preallocated buffer and the cache's lengths advance here.

Models it does not take (another architecture, sliding windows, a dynamic RoPE, weights not
int4, no kernels) keep the transformers forward; ``for_model`` says why.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from .kv_cache import PreallocatedLayer
from .weights import Int4Linear, Int8Linear

_log = logging.getLogger(__name__)
ARCHITECTURES = ('llama', 'qwen2', 'mistral')
_STATIC_ROPE = ('default', 'linear', 'llama3', 'yarn')
_ROPE_BLOCK = 1024  # positions per cached cos/sin table block


def _why_not(model) -> Optional[str]:
    """Return None if ``FastDecoder`` runs ``model`` exactly, else the reason."""
    cfg = model.config.get_text_config(decoder=True)
    if cfg.model_type not in ARCHITECTURES:
        return f'architecture {cfg.model_type!r} (takes {ARCHITECTURES})'
    if next(model.parameters()).device.type != 'cpu' or model.dtype != torch.float32:
        return 'needs an fp32 model on the CPU'
    if getattr(cfg, 'hidden_act', 'silu') != 'silu':
        return f'activation {cfg.hidden_act!r}'
    if getattr(cfg, 'sliding_window', None) and getattr(cfg, 'use_sliding_window', True):
        if cfg.sliding_window < getattr(cfg, 'max_position_embeddings', 0):
            return 'sliding-window attention'
    rope = (getattr(cfg, 'rope_parameters', None) or getattr(cfg, 'rope_scaling', None) or {})
    kind = rope.get('rope_type', rope.get('type', 'default')) if isinstance(rope, dict) else None
    if kind not in _STATIC_ROPE:
        return f'RoPE type {kind!r} (takes {_STATIC_ROPE})'
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                    mlp.up_proj, mlp.down_proj):
            if not isinstance(lin, Int4Linear) or lin._kern is None:
                return f'weights {type(lin).__name__} (needs int4 with the AVX2 kernels)'
        if getattr(attn, 'q_norm', None) is not None or getattr(attn, 'k_norm', None) is not None:
            return 'q/k norms'
    head = model.get_output_embeddings()
    if not isinstance(head, Int8Linear) or head._kern is None or head.bias is not None:
        return f'head {type(head).__name__} (needs the int8 head with the AVX2 kernels)'
    return None


def decode_step_name(model: str, weights: str, device: str) -> str:
    """
    Name the decode step an engine with these settings runs, reading the model's config only.

    ``timebill-<isa>`` (the kernel variant this CPU loads: avx512, avx2) or ``transformers``;
    part of the timing profile's key, so a profile
    measured with one step is never used to time the other.
    """
    from . import kernels
    from .errors import ModelLoadError
    from .model import model_type
    from .weights import effective_format

    if effective_format(weights, device) != 'int4' or kernels.load() is None:
        return 'transformers'
    try:
        fast = model_type(model) in ARCHITECTURES
    except ModelLoadError:
        fast = False  # the engine will not load it either; its own error says why
    return kernel_step_name() if fast else 'transformers'


def kernel_step_name() -> str:
    """Name the C++ step by the kernel variant loaded: its timings differ per ISA."""
    from . import kernels

    info = kernels.origin()
    return f"timebill-{info['isa']}" if info else 'timebill'


class FastDecoder:
    """The C++ one-token step for a model whose weights ``apply_weights`` made int4."""

    def __init__(self, model):
        from . import kernels

        cfg = model.config.get_text_config(decoder=True)
        kern = kernels.load()
        self.model = model
        self.embed = model.get_input_embeddings().weight
        self.rotary = model.model.rotary_emb
        layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            tensors = [n.weight.data for n in norms]
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                        mlp.up_proj, mlp.down_proj):
                bias = lin.bias if lin.bias is not None else torch.empty(0)
                tensors += [lin.q4_blocks, lin.q4_d, lin.q4_m, bias.data.float().contiguous()]
            layers.append(tensors)
        attn0 = model.model.layers[0].self_attn
        head = model.get_output_embeddings()
        self.head_dim = attn0.head_dim
        self._decoder = kern.Decoder(
            layers,
            model.model.norm.weight.data,
            head.qweight,
            head.scale32,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            attn0.head_dim,
            float(cfg.rms_norm_eps),
            float(attn0.scaling),
        )
        self._rope: dict = {}

    @classmethod
    def for_model(cls, model) -> Tuple[Optional['FastDecoder'], Optional[str]]:
        """Return ``(decoder, None)``, or ``(None, why)`` when the model keeps transformers'."""
        from . import kernels

        why = _why_not(model)
        if why is None and kernels.load() is None:
            why = kernels.why_not()
        if why is not None:
            return None, why
        return cls(model), None

    def _cos_sin(self, pos: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the cos/sin rows at ``pos`` from the model's rotary module (cached blocks)."""
        block = pos // _ROPE_BLOCK
        table = self._rope.get(block)
        if table is None:
            ids = torch.arange(block * _ROPE_BLOCK, (block + 1) * _ROPE_BLOCK)[None]
            cos, sin = self.rotary(self.embed[:1][None], ids)
            table = self._rope[block] = (cos[0].float().contiguous(), sin[0].float().contiguous())
        i = pos - block * _ROPE_BLOCK
        return table[0][i], table[1][i]

    @staticmethod
    def takes(cache) -> bool:
        """Tell whether ``cache`` is one this step can append to (the engine's preallocated)."""
        layers = getattr(cache, 'layers', None)
        return bool(layers) and all(
            isinstance(la, PreallocatedLayer) and la.is_initialized for la in layers
        )

    @torch.inference_mode()
    def step(self, token: int, pos: int, cache) -> torch.Tensor:
        """Run ``token`` at position ``pos`` on ``cache``; return the logits [vocab]."""
        layers = cache.layers
        for la in layers:
            if la.length + 1 > la._kbuf.shape[-2]:
                la._grow(la.length + 1)
        cos, sin = self._cos_sin(pos)
        logits = self._decoder.step(
            self.embed[token],
            cos,
            sin,
            [la._kbuf for la in layers],
            [la._vbuf for la in layers],
            [la.length for la in layers],
        )
        for la in layers:
            la.length += 1
            la.keys = la._kbuf[:, :, : la.length]
            la.values = la._vbuf[:, :, : la.length]
        return logits
