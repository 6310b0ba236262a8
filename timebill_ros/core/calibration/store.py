"""
The calibration profile and where it is kept: one file per setup, keyed and key-checked.

Timings only hold for the model, dtype, device, thread count and library versions they
were measured with, so a profile carries that key (``profile_key`` of an engine, or
``key_from_config`` without one) and is refused for any other setup.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import hashlib
import json
from pathlib import Path
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..config import cache_dir
from ..errors import ProfileMismatchError
from ..time_estimator import ExecutionTimeModel

PROFILE_VERSION = 1
STATISTICS = ('min', 'median')


@dataclass
class Measurement:
    n: int  # prompt length (prefill) or KV length (decode)
    samples: List[float]  # seconds, warm-up runs excluded
    held_out: bool = False
    cached: int = 0  # warm prefill: prompt tokens copied from the prefix cache (0: cold)

    def value(self, statistic: str = 'min') -> float:
        return summarize(self.samples, statistic)


def summarize(samples: Sequence[float], statistic: str = 'min') -> float:
    """
    Reduce the repeats to one number per length.

    ``min`` by default: on a shared machine interference only ever adds time, so the minimum is
    the reproducible cost of the work; the median drifts with whatever else runs. Pessimism k,
    not the statistic, buys the safety margin.
    """
    if statistic not in STATISTICS:
        raise ValueError(f'statistic must be one of {STATISTICS}, got {statistic!r}')
    if not samples:
        raise ValueError('no samples')
    return float(np.min(samples) if statistic == 'min' else np.median(samples))


@dataclass
class Profile:
    key: Dict[str, str]
    model: ExecutionTimeModel
    statistic: str
    prefill: List[Measurement]
    decode: List[Measurement]
    mape: Dict[str, float]  # held-out points only, percent
    fit_mape: Dict[str, float]  # fit points (how well the curve shape matches, not accuracy)
    flops_ratios: Dict[str, float] = field(default_factory=dict)
    fitted_ratios: Dict[str, float] = field(default_factory=dict)
    repeats: int = 0
    decode_repeats: int = 0
    warmup: int = 0
    created: str = ''
    duration_s: float = 0.0
    # 1-min load at start and end: was the machine shared?
    load_avg: List[float] = field(default_factory=list)
    # warm prefills (prefix cache), fitted as d, e in ``model``; empty: not measured (d = 2a)
    warm: List[Measurement] = field(default_factory=list)
    warm_note: str = ''  # how (d, e) came about when the plain least squares was not kept

    def to_dict(self) -> dict:
        d = asdict(self)
        d['model'] = self.model.to_dict()
        d['version'] = PROFILE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'Profile':
        d = dict(d)
        version = d.pop('version', None)
        if version != PROFILE_VERSION:
            raise ValueError(
                f'profile format version {version} is not '
                f'{PROFILE_VERSION}: re-run `timebill calibrate`'
            )
        d['model'] = ExecutionTimeModel.from_dict(d['model'])
        d['prefill'] = [Measurement(**m) for m in d['prefill']]
        d['decode'] = [Measurement(**m) for m in d['decode']]
        d['warm'] = [Measurement(**m) for m in d.get('warm') or []]
        return cls(**d)


def default_profile_path(key: Mapping[str, str]) -> Path:
    """``<cache>/profiles/<model>-<dtype>-<device>-t<threads>-<hash of the whole key>.json``."""
    digest = hashlib.sha1(
        json.dumps({k: str(v) for k, v in key.items()}, sort_keys=True).encode()
    ).hexdigest()[:10]
    model = re.sub(r'[^A-Za-z0-9._-]+', '_', Path(str(key.get('model', 'model'))).name or 'model')
    name = (
        f'{model}-{key.get("dtype", "")}-{key.get("device", "")}-t{key.get("threads", "")}'
        f'-{digest}.json'
    )
    return cache_dir() / 'profiles' / re.sub(r'[^A-Za-z0-9._-]+', '_', name)


def check_key(
    profile_key: Mapping[str, str], running_key: Mapping[str, str], source: str = ''
) -> None:
    """Refuse a profile measured for another setup, naming every field that differs."""
    fields = sorted(set(profile_key) | set(running_key))
    diffs = [
        f'{f}: profile {profile_key.get(f, "<missing>")!r} '
        f'vs engine {running_key.get(f, "<missing>")!r}'
        for f in fields
        if str(profile_key.get(f, '<missing>')) != str(running_key.get(f, '<missing>'))
    ]
    if diffs:
        where = f' {source}' if source else ''
        raise ProfileMismatchError(
            f'timing profile{where} was measured for a different '
            f'setup ({"; ".join(diffs)}); its timings do not '
            f'hold for this engine: run `timebill calibrate` with this configuration'
        )


def save_profile(profile: Profile, path: Optional[Path] = None) -> Path:
    path = Path(path) if path else default_profile_path(profile.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(json.dumps(profile.to_dict(), indent=1))
    tmp.replace(path)
    return path


def load_profile(path: Path | str, running_key: Optional[Mapping[str, str]] = None) -> Profile:
    """Read a profile; with ``running_key``, refuse it unless it was measured for that setup."""
    path = Path(path)
    profile = Profile.from_dict(json.loads(path.read_text()))
    if running_key is not None:
        check_key(profile.key, running_key, source=str(path))
    return profile


def load_profile_for(running_key: Mapping[str, str], path: Optional[Path | str] = None) -> Profile:
    """Load this engine's profile: ``path`` (config ``profile_path``) or the keyed default."""
    path = Path(path).expanduser() if path else default_profile_path(running_key)
    if not path.is_file():
        raise FileNotFoundError(
            f'no timing profile at {path} for this setup: run `timebill calibrate` first'
        )
    return load_profile(path, running_key)


def profile_key(engine) -> Dict[str, str]:
    """Return the setup ``engine`` runs: what its timings, and so its profile, hold for."""
    import torch
    import transformers

    return {
        'model': str(engine.model_name),
        'dtype': str(engine.model.dtype).replace('torch.', ''),
        'device': str(engine.device),
        'threads': str(torch.get_num_threads()),
        'torch': torch.__version__,
        'transformers': transformers.__version__,
        'press': engine.press.name,
        'preallocate': str(engine.preallocate),
        'weights': engine.weights,
        'decode_step': engine.decode_step,
        **_kv_key(str(getattr(engine, 'kv_dtype', engine.model.dtype)).replace('torch.', '')),
    }


def _kv_key(kv_dtype: str) -> Dict[str, str]:
    """
    Name a 16-bit KV cache in the key (its attention reads other bytes: other timings).

    An fp32 cache adds nothing, so the profiles measured before ``kv_dtype`` existed keep their
    key and file.
    """
    return {} if kv_dtype == 'float32' else {'kv_dtype': kv_dtype}


def key_from_config(cfg) -> Dict[str, str]:
    """
    Return the key ``profile_key(Engine.from_config(cfg))`` will have, without the model.

    Lets a process that holds no engine (the predictor node) find and check the profile.
    """
    import torch
    import transformers

    from ..fast_decode import decode_step_name
    from ..model import DTYPES
    from ..weights import effective_format

    device = str(torch.device(cfg.device))
    if device == 'cuda':  # parameters live on an indexed device
        device = 'cuda:0'
    return {
        'model': str(cfg.model),
        'dtype': DTYPES.get(cfg.dtype, cfg.dtype),
        'device': device,
        'threads': str(cfg.threads if cfg.threads > 0 else torch.get_num_threads()),
        'torch': torch.__version__,
        'transformers': transformers.__version__,
        'press': str(cfg.press),
        'preallocate': 'True',
        'weights': effective_format(cfg.weights, device),
        'decode_step': decode_step_name(cfg.model, cfg.weights, device),
        **_kv_key(cfg.kv_dtype),
    }


def load_time_model(
    cfg, running_key: Optional[Mapping[str, str]] = None
) -> Optional[ExecutionTimeModel]:
    """
    Load the calibrated ETE for ``cfg`` (key-checked); None when no profile was ever written.

    A profile that exists but was measured for another setup raises ProfileMismatchError.
    """
    key = dict(running_key) if running_key is not None else key_from_config(cfg)
    path = Path(cfg.profile_path).expanduser() if cfg.profile_path else default_profile_path(key)
    if not path.is_file():
        return None
    return load_profile(path, key).model


# Coefficients fitted to SmolLM2-135M, fp32, on the
# project's 2-core CPU while it was busy (load ~7,
# 1 thread): pessimistic on purpose; used only until `timebill calibrate` writes a profile.
FALLBACK_TIME_MODEL = {'a': 4.9e-7, 'b': 2.7e-3, 'c': 0.08, 'p': 1.15e-5, 'q': 0.10}


def time_model_for(cfg, running_key: Optional[Mapping[str, str]] = None, log=print):
    """
    Return (model, source) for every user of a time model, saying why.

    The calibrated, key-checked profile ("profile"), else the built-in pessimistic coefficients
    ("fallback").
    """
    try:
        model = load_time_model(cfg, running_key)
        if model is not None:
            return model, 'profile'
        log(
            'no timing profile for this setup (run `timebill '
            'calibrate`); using built-in SmolLM2/CPU coefficients'
        )
    except Exception as exc:  # noqa: BLE001 - a stale profile must not take a node down
        log(f'timing profile unusable: {exc}; using built-in SmolLM2/CPU coefficients')
    return ExecutionTimeModel.from_dict(FALLBACK_TIME_MODEL), 'fallback'
