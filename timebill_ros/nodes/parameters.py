"""
ROS parameters of the nodes: one per TimeBillConfig field, described, ranged, guarded.

Every node reads its parameters when it is configured. A change while configured would be
silently ignored, so it is refused with the way to apply it (clean up, set, configure again).
"""

from __future__ import annotations

from dataclasses import fields

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from timebill_ros.core.config import TimeBillConfig

# name -> (description, (low, high) or None). Ranges are the ones TimeBillConfig.validate checks.
PARAMETERS = {
    'model': ('target LLM: alias, HF directory, .gguf file or hub id', None),
    'dtype': ('activation dtype of the target model: float32 | bfloat16 | float16', None),
    'weights': ('weight format of the target model: fp32 | bf16 | int8 | int4', None),
    'prefill_weights': (
        'int4 prefill: auto (from the quantised weights where the kernels load) | none | '
        'bf16 | fp32 (a dense copy: more memory)',
        None,
    ),
    'device': ('torch device of the target model: cpu | cuda[:n]', None),
    'kv_dtype': ('what the KV cache stores: float32 | float16 | bfloat16 (half the bytes)', None),
    'threads': ("torch intra-op threads (0: torch's default)", (0, 256)),
    'max_new_tokens': ('answer length cap for goals that ask for 0', (1, 1 << 20)),
    'chat_template': ("wrap prompts in the model's chat template", None),
    'press': ('KV eviction method (snapkv, streaming_llm, ...)', None),
    'window_size': ('SnapKV observation window (last prompt tokens that vote)', (1, 4096)),
    'kernel_size': ('SnapKV vote pooling kernel', (1, 255)),
    'pooling': ('SnapKV vote pooling: avg | max', None),
    'n_sink': ('StreamingLLM attention sinks kept', (0, 4096)),
    'quality_profile': (
        'accuracy-vs-alpha curves JSON (empty: the packaged config/quality_profile.json)',
        None,
    ),
    'quality_floor_alpha': (
        "default quality floor: the press's measured accuracy at this alpha (>= alpha_max: off)",
        (0.0, 0.99),
    ),
    'pessimism_k': ('WCET pessimism: N_W = min(k * N_hat, N_max)', (1.0, 100.0)),
    'alpha_max': ('largest KV eviction ratio the solver may choose', (0.0, 0.99)),
    'profile_path': (
        'timing profile JSON (empty: the cached one for this model and machine)',
        None,
    ),
    'overrun_policy': (
        'default for goals that name none: kill | truncate | close | skip-next', None
    ),
    'bucket_size': ('response-length bucket width in tokens', (1, 65536)),
    'num_buckets': ('response-length buckets (N_max = bucket_size * num_buckets)', (1, 65536)),
    'predictor_backbone': ('response length predictor backbone', None),
    'predictor_checkpoint': ('trained predictor directory (empty: the cached one)', None),
    'predictor_max_prompt_tokens': ('prompt tokens the predictor reads (N_p)', (1, 1 << 20)),
    'predictor_device': ("predictor's torch device (empty: the target's)", None),
    'prefill_chunk': ('prompt tokens per prefill chunk, deadline checked between (0: one pass)',
                      (0, 1 << 20)),
    'estimate_slack_s': ('how long the generator waits past prefill for a length estimate',
                         (0.0, 60.0)),
    'estimate_defer_s': ('still no estimate: decode at alpha 0 and choose alpha when it '
                         'arrives, or after this long with N-hat = the cap (0: plan at once)',
                         (0.0, 60.0)),
    'prefix_cache': ('reuse the KV of cached prompt prefixes (standing contexts)', None),
    'prefix_cache_mb': ('memory bound of the prefix KV cache in MB (0: off)', (0.0, 1e7)),
    'prefix_block_tokens': ('tokens per cached block: the granularity of a prefix hit',
                            (1, 1 << 16)),
    'schema_in_prompt': (
        "append a goal's JSON schema to its prompt: the model and the length predictor see the "
        'form asked for (the grammar enforces it either way)',
        None,
    ),
    'peer_timeout_s': ('no generator heartbeat this long: its goals are aborted', (0.1, 3600.0)),
    'heartbeat_s': ('generator heartbeat period', (0.01, 60.0)),
    'guarantee_margin_s': ('EstimateBudget guarantees only worst cases ending this long before '
                           'the deadline', (0.0, 60.0)),
    'record_bag': ('rosbag2 folder the server records goals and results to (empty: none)', None),
    'max_goals': ('goals held at once (queued + running); sizes the executors', (1, 4096)),
    'generators': ('generator nodes the server dispatches to (several: a fleet)', None),
    'failover_after_s': ('a silent generator loses its goals to another after this long',
                         (0.01, 3600.0)),
}


def descriptor(name: str, default) -> ParameterDescriptor:
    """Describe a parameter for ``ros2 param describe``: what it is, its range, when it applies."""
    text, bounds = PARAMETERS.get(name, ('', None))
    desc = ParameterDescriptor(
        name=name,
        description=text,
        additional_constraints='read at configure; change it while unconfigured',
    )
    if bounds is not None and isinstance(default, float):
        desc.floating_point_range = [FloatingPointRange(from_value=bounds[0], to_value=bounds[1])]
    elif bounds is not None and isinstance(default, int) and not isinstance(default, bool):
        desc.integer_range = [IntegerRange(from_value=bounds[0], to_value=bounds[1], step=1)]
    return desc


def declare_config(node) -> None:
    """
    Declare one parameter per TimeBillConfig field; refuse changes while configured.

    A node counts as configured while its ``cfg`` attribute holds the config it read.
    """
    defaults = TimeBillConfig()
    names = {f.name for f in fields(TimeBillConfig)}
    for name in sorted(names):
        if not node.has_parameter(name):
            default = getattr(defaults, name)
            node.declare_parameter(name, default, descriptor(name, default))

    def guard(params) -> SetParametersResult:
        changed = [p.name for p in params if p.name in names]
        if changed and getattr(node, 'cfg', None) is not None:
            return SetParametersResult(
                successful=False,
                reason=(
                    f'{", ".join(changed)} is read when {node.get_name()} is configured: '
                    f'deactivate and clean up timebill_lifecycle_manager, set it, then configure '
                    f'again'
                ),
            )
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(guard)


def read_config(node) -> TimeBillConfig:
    """Read the node's parameters as a validated TimeBillConfig (ValueError with a reason)."""
    values = {f.name: node.get_parameter(f.name).value for f in fields(TimeBillConfig)}
    return TimeBillConfig.from_mapping(values)
