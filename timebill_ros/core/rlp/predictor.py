"""
The length predictor at inference time: backbone + head -> N̂, its checkpoints and fallback.

This is what the ROS node, the replay/evaluate CLIs and the server load: ``LengthPredictor``
(predict, decode, save, load), ``NMaxPredictor`` (the pessimistic fallback when no trained
predictor exists) and ``load_length_predictor``, which picks one of the two from the config and
never raises. Prompts longer than N_p tokens are compressed (head and tail kept), so prediction
time does not grow with the prompt and finishes before the target's prefill. Callers should also
cap N̂ by the request's ``max_new_tokens``: the engine stops there anyway.
"""

from __future__ import annotations

from dataclasses import asdict
import json
import logging
from pathlib import Path
import time
from typing import Optional, Sequence, Union

from .backbones import make_backbone, make_head, top_layer_prefixes
from .buckets import (
    bucket_upper_edge,
    compress_ids,
    HEADS,
    length_to_bucket,
    Prediction,
    PredictorMeta,
)
from ..config import cache_dir, TimeBillConfig

log = logging.getLogger('timebill.length_predictor')


class LengthPredictor:
    """
    Backbone + head: ``predict(prompt)`` -> ``Prediction``.

    Thread-safe for one caller at a time.
    """

    def __init__(self, meta: PredictorMeta, backbone=None, head=None, threads: int = 0):
        import torch

        if meta.head not in HEADS:
            raise ValueError(f'head must be one of {HEADS}, got {meta.head!r}')
        self.meta = meta
        if backbone is None:
            backbone = make_backbone(meta.backbone, threads=threads, layer=meta.feature_layer)
        self.backbone = backbone
        if getattr(self.backbone, 'layer', 0) != meta.feature_layer:
            raise ValueError(
                f'backbone gives layer {getattr(self.backbone, "layer", 0)} but the '
                f'predictor was built for feature_layer={meta.feature_layer}'
            )
        if head is None:
            head = make_head(self.backbone.dim, meta.out_dim, meta.hidden)
        self.head = head
        self.head.eval()
        self.backbone.model.eval()
        self._torch = torch

    # -- features ---------------------------------------------------------
    def prepare(self, prompt: Union[str, Sequence[int]]) -> tuple[list[int], int]:
        """
        Backbone token ids after compression, and the count before it.

        A ``str`` is tokenised with the backbone's tokenizer; a sequence of ints is taken as ids
        *in the backbone's tokenizer* (for a causal-LM backbone equal to the target, the
        target's ids).
        """
        if isinstance(prompt, str):
            ids = self.backbone.tokenize(prompt)
        else:
            ids = [int(t) for t in prompt]
        return compress_ids(ids, self.meta.max_prompt_tokens) if ids else ids, len(ids)

    def features(self, id_lists: Sequence[Sequence[int]], batch_size: int = 32):
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(id_lists), batch_size):
                out.append(self.backbone.forward(id_lists[i:i + batch_size]).float())
        return torch.cat(out) if out else torch.zeros(0, self.backbone.dim)

    # -- decoding ---------------------------------------------------------
    def decode(self, out) -> tuple[list[int], list[int]]:
        """Head outputs -> (N̂ list, 1-based bucket/class list)."""
        m = self.meta
        if m.head == 'buckets':
            if m.bucket_decode == 'median':  # MAE-optimal point of the predicted distribution
                cdf = out.softmax(-1).cumsum(-1)
                labels = ((cdf < 0.5).sum(-1) + 1).clamp(max=m.num_buckets).tolist()
            else:
                labels = (out.argmax(-1) + 1).tolist()
            return [bucket_upper_edge(b, m.bucket_size, m.num_buckets) for b in labels], labels
        if m.head == 'regression':
            vals = (out.squeeze(-1) * m.reg_scale).tolist()
            n = [int(min(max(1, round(v)), m.n_max)) for v in vals]
            return n, [length_to_bucket(v, m.bucket_size, m.num_buckets) for v in n]
        cls = out.argmax(-1).tolist()
        values = m.edge_values or m.edges
        return [int(min(values[c], m.n_max)) for c in cls], [c + 1 for c in cls]

    def predict(self, prompt: Union[str, Sequence[int]]) -> Prediction:
        t0 = time.perf_counter()
        ids, n_in = self.prepare(prompt)
        if not ids:  # an empty prompt still gets an answer; the engine rejects it separately
            ids = [0]
        with self._torch.inference_mode():
            out = self.head(self.backbone.forward([ids]).float())
        n_hat, bucket = self.decode(out)
        n, censored = n_hat[0], False
        m = self.meta
        if m.label_cap and m.head != 'regression' and n >= m.label_cap:
            # the labels only say "ran to the cap": the target would go on to its own limit, so
            # plan for N_max (callers cap it by the request's max_new_tokens)
            n, censored = m.n_max, True
        return Prediction(n, bucket[0], time.perf_counter() - t0, 'model', n_in, censored)

    def predict_many(
        self, prompts: Sequence[Union[str, Sequence[int]]], batch_size: int = 32
    ) -> list[int]:
        """
        Return raw N̂ (bucket upper edges, no censoring), for evaluation.

        Comparable with capped labels.
        """
        ids = [self.prepare(p)[0] or [0] for p in prompts]
        feats = self.features(ids, batch_size)
        with self._torch.inference_mode():
            return self.decode(self.head(feats))[0]

    # -- persistence --------------------------------------------------------
    def save(self, directory: Union[str, Path]) -> Path:
        """Write ``meta.json``, ``head.pt`` and, when fine-tuned, the backbone weights."""
        torch = self._torch
        d = Path(directory)
        tmp = d.with_name(d.name + '.tmp')
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(self.head.state_dict(), tmp / 'head.pt')
        if self.meta.finetuned:
            from safetensors.torch import save_file

            sd = self.backbone.model.state_dict()
            if self.meta.finetune_layers:  # only the trained top layers: the rest is stock
                keep = top_layer_prefixes(self.backbone, self.meta.finetune_layers)
                sd = {k: v for k, v in sd.items() if k.startswith(keep)}
            save_file(
                {k: v.contiguous() for k, v in sd.items()}, str(tmp / 'backbone.safetensors')
            )
        (tmp / 'meta.json').write_text(json.dumps(asdict(self.meta), indent=1))
        if d.exists():
            import shutil

            shutil.rmtree(d)
        tmp.replace(d)
        return d

    @classmethod
    def load(
        cls, directory: Union[str, Path], threads: int = 0, device: str = 'cpu'
    ) -> 'LengthPredictor':
        import torch

        d = Path(directory)
        raw = json.loads((d / 'meta.json').read_text())
        meta = PredictorMeta(
            **{k: v for k, v in raw.items() if k in PredictorMeta.__dataclass_fields__}
        )
        backbone = make_backbone(
            meta.backbone, device=device, threads=threads, layer=meta.feature_layer
        )
        if meta.finetuned:
            from safetensors.torch import load_file

            sd = load_file(str(d / 'backbone.safetensors'))
            if meta.finetune_layers:
                missing, unexpected = backbone.model.load_state_dict(sd, strict=False)
                keep = top_layer_prefixes(backbone, meta.finetune_layers)
                if unexpected or any(k.startswith(keep) for k in missing):
                    raise ValueError(
                        f'{d}: fine-tuned layers do not fit {meta.backbone} at '
                        f'layer {meta.feature_layer}'
                    )
            else:
                backbone.model.load_state_dict(sd)
        head = make_head(backbone.dim, meta.out_dim, meta.hidden)
        head.load_state_dict(torch.load(d / 'head.pt', map_location='cpu'))
        return cls(meta, backbone, head.to(device))


class NMaxPredictor:
    """
    The fallback when no trained predictor exists.

    Always N_max, the safe (pessimistic) bound.
    """

    def __init__(self, n_max: int, reason: str = ''):
        self.n_max = int(n_max)
        self.reason = reason
        self.meta = None

    def predict(self, prompt=None) -> Prediction:
        return Prediction(self.n_max, 0, 0.0, 'fallback', 0)

    def predict_many(self, prompts) -> list[int]:
        return [self.n_max] * len(prompts)


def checkpoint_dir(cfg: TimeBillConfig) -> Path:
    """
    Return ``cfg.predictor_checkpoint`` or ``<cache>/predictor/<backbone>``.

    ``/`` in hub ids becomes ``--``.
    """
    if cfg.predictor_checkpoint:
        return Path(cfg.predictor_checkpoint).expanduser()
    return cache_dir() / 'predictor' / cfg.predictor_backbone.replace('/', '--')


def load_length_predictor(cfg: TimeBillConfig, threads: Optional[int] = None, logger=None):
    """
    Load the trained predictor, or ``NMaxPredictor`` with a logged reason.

    One call for the ROS node and the CLI.
    """
    say = logger or log.warning
    d = checkpoint_dir(cfg)
    if not (d / 'meta.json').is_file():
        reason = (
            f'no trained length predictor at {d} (run `timebill train-predictor`); '
            f'using N_max={cfg.n_max}'
        )
        say(reason)
        return NMaxPredictor(cfg.n_max, reason)
    try:
        pred = LengthPredictor.load(
            d,
            threads=cfg.threads if threads is None else threads,
            device=cfg.predictor_device or cfg.device,
        )
    except Exception as exc:  # noqa: BLE001 - a broken checkpoint must not take the node down
        reason = (
            f'could not load length predictor from {d}: {type(exc).__name__}: {exc}; '
            f'using N_max={cfg.n_max}'
        )
        say(reason)
        return NMaxPredictor(cfg.n_max, reason)
    m = pred.meta
    if (m.bucket_size, m.num_buckets) != (
        cfg.bucket_size,
        cfg.num_buckets,
    ) and m.head == 'buckets':
        say(
            f'predictor at {d} was trained with B={m.bucket_size}, K={m.num_buckets}; config '
            f"says B={cfg.bucket_size}, K={cfg.num_buckets}: using the checkpoint's"
        )
    if cfg.predictor_max_prompt_tokens != m.max_prompt_tokens:
        m.max_prompt_tokens = cfg.predictor_max_prompt_tokens  # N_p is an inference-time choice
    return pred
