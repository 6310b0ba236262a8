"""
One configuration schema for the core, the CLI and the ROS nodes.

The YAML file is in ROS 2 parameter style (``/**: ros__parameters:``) so the same file
feeds ``launch_ros`` and the project's own runner; the core reads the same keys
without ROS. Every field has a default that runs on a 2-core CPU machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
import os
from pathlib import Path
from typing import Any, List, Mapping

# How a goal that cannot finish by its deadline ends: kill (stopped, no text), truncate (the text
# so far), skip-next (it runs on; goals that waited meanwhile are skipped). The one spelling.
OVERRUN_POLICIES = ('kill', 'truncate', 'close', 'skip-next')
DEFAULT_MODEL = 'smollm2-135m-instruct'
KV_DTYPES = ('float32', 'float16', 'bfloat16')  # config kv_dtype (core.kv_cache.KV_DTYPES)


def cache_dir() -> Path:
    """
    Where converted weights, profiles and checkpoints live (never in git).

    ``TIMEBILL_CACHE`` overrides; the Makefile points it at the repo's ignored ``.cache/``.
    """
    env = os.environ.get('TIMEBILL_CACHE')
    path = Path(env) if env else Path.home() / '.cache' / 'timebill_ros'
    return path.expanduser().resolve()


@dataclass
class TimeBillConfig:
    # --- target model -----------------------------------------------------
    model: str = DEFAULT_MODEL  # alias, HF directory, .gguf file, or hub id
    dtype: str = 'float32'
    # Linear-layer weights: fp32 | bf16 | int8 | int4 (core/weights.py); int8/int4 run as bf16 on
    # a GPU. int4 reads 0.6 bytes per weight instead of 4: decode ~3x faster on a CPU.
    weights: str = 'int4'
    # int4 prefill: auto (no dense copy where the engine's kernels run, else a bf16 one on
    # AVX512-BF16/AMX or fp32) | bf16 | fp32 (a dense copy beside the int4 blocks) | none
    prefill_weights: str = 'auto'
    device: str = 'cpu'
    # what the KV cache stores: float32 | float16 | bfloat16. 16 bits halve the bytes per cached
    # token (SmolLM2: 46 -> 23 KB); the C++ decode attention reads them as they are
    kv_dtype: str = 'float32'
    threads: int = 2  # torch intra-op threads; 0 = leave torch's default
    max_new_tokens: int = 512
    chat_template: bool = True  # instruct models get their chat template
    # --- eviction ---------------------------------------------------------
    # chunkkv: best area under accuracy vs α on 60 long-context tasks (docs/QUALITY.md)
    press: str = 'chunkkv'
    window_size: int = 64
    kernel_size: int = 5
    pooling: str = 'avg'  # snapkv vote pooling: avg (kvpress) or max (keeps whole spans)
    n_sink: int = 4  # streaming_llm attention sinks
    # --- answer quality under eviction (core/quality.py) ----------------------
    quality_profile: str = ''  # empty: the packaged config/quality_profile.json
    # default floor: the measured accuracy at this α (no curve: at most this α); >= alpha_max: off
    quality_floor_alpha: float = 0.5
    # --- time estimator / solver ------------------------------------------
    pessimism_k: float = 5.0
    alpha_max: float = 0.95
    profile_path: str = ''  # empty: <cache>/profiles/<key>.json
    overrun_policy: str = 'kill'
    # --- response length predictor ----------------------------------------
    bucket_size: int = 16
    num_buckets: int = 512
    predictor_backbone: str = 'minilm'
    predictor_checkpoint: str = ''  # empty: <cache>/predictor/<backbone>
    predictor_max_prompt_tokens: int = 256  # prompt compression N_p
    predictor_device: str = (
        ''  # empty: the target's ``device`` (the paper runs its 0.5B predictor on the GPU)
    )
    # --- prefix KV cache (core/prefix_cache.py) -------------------------------
    prefix_cache: bool = True  # reuse the KV of cached prompt prefixes (standing contexts)
    # memory bound of the cached KV (MB): SmolLM2 fp32 holds 46 KB per token, so 2048 MB keeps
    # ~45k tokens (five 8k-token scenes); a 7B model's 16-bit KV ~57 KB per token
    prefix_cache_mb: float = 2048.0
    prefix_block_tokens: int = 64  # tokens per cached block (the granularity of a hit)
    # --- structured answers (core/structured.py) ------------------------------
    # append the goal's JSON schema to its prompt (core.structured.with_schema): the model and
    # the length predictor both see the form asked for; the grammar enforces it either way
    schema_in_prompt: bool = True
    # --- ROS plumbing -----------------------------------------------------
    prefill_chunk: int = (
        256  # prompt tokens per prefill chunk (deadline/cancel checked between); 0 = one pass
    )
    estimate_slack_s: float = 0.05  # generator waits this long past prefill for an estimate
    # a later estimate: decoding starts with nothing evicted and α is chosen when it arrives, or
    # after this long (at most a quarter of the time left) with N̂ = the cap; 0: plan at once
    estimate_defer_s: float = 1.0
    # EstimateBudget says guaranteed only if the worst case ends this long before the deadline:
    # the result's way back to the planner through loaded processes (measured up to ~0.5 s)
    guarantee_margin_s: float = 0.5
    peer_timeout_s: float = (
        5.0  # server: no generator heartbeat this long -> abort its goals with a reason
    )
    heartbeat_s: float = 0.25  # generator heartbeat period (liveness, pid, queue)
    # goals one node holds at once (queued + running); more are refused ("queue full"). Each
    # held goal waits in an executor thread of the server and of the generator, so this also
    # sizes their executors (spin.goal_threads)
    max_goals: int = 32
    # --- several generators behind one server (core.fleet, nodes.fleet) ----
    # the generator nodes the server dispatches to (same namespace); each may have its own
    # section in the params file (threads, model)
    generators: List[str] = field(default_factory=lambda: ['timebill_generator'])
    # a generator silent this long has lost its goals when another can take them over (they are
    # re-dispatched if their deadline allows); alone, peer_timeout_s applies
    failover_after_s: float = 0.75
    record_bag: str = ''  # empty: do not record

    @property
    def n_max(self) -> int:
        return self.bucket_size * self.num_buckets

    def validate(self) -> 'TimeBillConfig':
        if self.overrun_policy not in OVERRUN_POLICIES:
            raise ValueError(
                f'overrun_policy must be one of {OVERRUN_POLICIES}, got {self.overrun_policy!r}'
            )
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(
                f'kv_dtype must be one of {", ".join(KV_DTYPES)}, got {self.kv_dtype!r}'
            )
        if self.pooling not in ('avg', 'max'):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")
        if not 0.0 <= self.alpha_max < 1.0:
            raise ValueError(f'alpha_max must be in [0, 1), got {self.alpha_max}')
        if not 0.0 <= self.quality_floor_alpha < 1.0:
            raise ValueError(
                f'quality_floor_alpha must be in [0, 1), got {self.quality_floor_alpha}'
            )
        if self.pessimism_k < 1.0:
            raise ValueError(f'pessimism_k must be >= 1, got {self.pessimism_k}')
        if self.guarantee_margin_s < 0:
            raise ValueError(f'guarantee_margin_s must be >= 0, got {self.guarantee_margin_s}')
        if not self.prefix_cache_mb >= 0:
            raise ValueError(f'prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}')
        if self.prefix_block_tokens < 1:
            raise ValueError(f'prefix_block_tokens must be >= 1, got {self.prefix_block_tokens}')
        if not self.estimate_defer_s >= 0:
            raise ValueError(f'estimate_defer_s must be >= 0, got {self.estimate_defer_s}')
        if not self.generators or len(set(self.generators)) != len(self.generators):
            raise ValueError(f'generators must name distinct nodes, got {self.generators}')
        if not 0 < self.failover_after_s <= self.peer_timeout_s:
            raise ValueError(
                f'failover_after_s must be in (0, peer_timeout_s={self.peer_timeout_s:g}], '
                f'got {self.failover_after_s}'
            )
        if self.prefill_chunk < 0:
            raise ValueError(f'prefill_chunk must be >= 0, got {self.prefill_chunk}')
        for name in (
            'bucket_size', 'num_buckets', 'window_size', 'kernel_size', 'max_new_tokens',
            'max_goals',
        ):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        return self

    # --- (de)serialisation -------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> 'TimeBillConfig':
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f'unknown config keys: {", ".join(unknown)}')
        cfg = cls()
        for key, value in values.items():
            default = getattr(cfg, key)
            setattr(cfg, key, type(default)(value) if default is not None else value)
        return cfg.validate()

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, node: str = '/**') -> 'TimeBillConfig':
        """Read the ``ros__parameters`` of ``node`` (and of ``/**``) from a ROS 2 params file."""
        import yaml

        with open(path) as fh:
            doc = yaml.safe_load(fh) or {}
        merged: dict[str, Any] = {}
        for section in ('/**', node):
            merged.update((doc.get(section) or {}).get('ros__parameters', {}) or {})
        return cls.from_mapping(merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> 'TimeBillConfig':
        return dataclasses.replace(self, **changes).validate()


def default_config_path() -> Path:
    """Find the packaged ``config/timebill.yaml`` (source tree or colcon share dir)."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / 'config' / 'timebill.yaml']
    prefix = os.environ.get('AMENT_PREFIX_PATH', '')
    for p in prefix.split(os.pathsep):
        if p:
            candidates.append(Path(p) / 'share' / 'timebill_ros' / 'config' / 'timebill.yaml')
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]
