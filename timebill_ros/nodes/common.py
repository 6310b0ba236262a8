"""What the three nodes share: names, QoS, parameters from TimeBillConfig, conversions.

One place for the channel names and QoS so the server, predictor, generator, the typed
client and the bag recorder cannot drift apart. The estimator/predictor glue also lives
here so the nodes call the core through one small function each.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import fields
from types import SimpleNamespace
from typing import Callable, Optional, Tuple

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from timebill_ros.core.config import TimeBillConfig

# --- channel names (relative: they follow the nodes' namespace) --------------------------
ACTION_TIMED_INFERENCE = "timed_inference"  # planner-facing, on timebill_server
ACTION_GENERATE = "timebill/generate"  # internal: server -> generator
TOPIC_REQUESTS = "timebill/requests"  # server -> predictor, published with the generate goal
TOPIC_ESTIMATES = "timebill/estimates"  # predictor -> generator (and anyone recording)
SERVICE_ESTIMATE_BUDGET = "timebill/estimate_budget"  # planner-facing, on timebill_predictor

# Requests and estimates must not be lost (a lost estimate costs a pessimistic N_max plan);
# transient-local so a late-joining recorder or a restarted generator still sees the last few.
CHANNEL_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)

# Action goal/result/cancel services: ROS's default keeps only the last 10 requests, so a burst
# of more than 10 goals (several planners at once) silently loses the rest. Keep MAX_PENDING+.
SERVICE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=256, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
ACTION_QOS = dict(goal_service_qos_profile=SERVICE_QOS, result_service_qos_profile=SERVICE_QOS,
                  cancel_service_qos_profile=SERVICE_QOS)

N_THREADS = 8  # executor threads: a blocking execute callback must never starve the others


# --- parameters ---------------------------------------------------------------------------
def declare_config(node) -> None:
    """Declare one ROS parameter per TimeBillConfig field, with the dataclass default."""
    defaults = TimeBillConfig()
    for f in fields(TimeBillConfig):
        if not node.has_parameter(f.name):
            node.declare_parameter(f.name, getattr(defaults, f.name))


def read_config(node) -> TimeBillConfig:
    """The node's parameters as a validated TimeBillConfig (raises ValueError with a reason)."""
    values = {f.name: node.get_parameter(f.name).value for f in fields(TimeBillConfig)}
    return TimeBillConfig.from_mapping(values)


# --- time -------------------------------------------------------------------------------
def duration_to_s(d) -> float:
    return float(d.sec) + float(d.nanosec) * 1e-9


def s_to_duration(seconds: float):
    from builtin_interfaces.msg import Duration

    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be finite, got {seconds}")
    ns = int(round(seconds * 1e9))
    return Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def time_to_s(t) -> float:
    return float(t.sec) + float(t.nanosec) * 1e-9


def s_to_time(seconds: float):
    from builtin_interfaces.msg import Time

    ns = int(round(seconds * 1e9))
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def ros_now_s(node) -> float:
    """ROS clock (system time by default): comparable across processes on one machine."""
    return node.get_clock().now().nanoseconds * 1e-9


def to_monotonic(ros_time_s: float, node) -> float:
    """Map an absolute ROS time to time.monotonic(), which the engine's deadline uses."""
    return time.monotonic() + (ros_time_s - ros_now_s(node))


def uuid_hex(uuid_msg) -> str:
    return bytes(uuid_msg.uuid).hex()


def copy_fields(src, dst):
    """Copy same-named fields (Generate and TimedInference results/feedback share them)."""
    names = set(dst.get_fields_and_field_types())
    for name in src.get_fields_and_field_types():
        if name in names:
            setattr(dst, name, getattr(src, name))
    return dst


# --- tokenizer without the model (server and predictor) -----------------------------------
class PromptTokenizer:
    """The target model's tokenizer and context size, without loading its weights.

    Encoding goes through ``Engine.encode`` so the chat template is applied exactly as the
    generator would apply it.
    """

    def __init__(self, cfg: TimeBillConfig):
        from transformers import AutoConfig, AutoTokenizer

        from timebill_ros.core.model import resolve_model_path

        target, extra = resolve_model_path(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(target, **extra)
        mcfg = AutoConfig.from_pretrained(target, **extra)
        text = mcfg.get_text_config(decoder=True) if hasattr(mcfg, "get_text_config") else mcfg
        self.max_context = int(getattr(text, "max_position_embeddings", 0) or 2048)
        self._encoder = SimpleNamespace(tokenizer=self.tokenizer, chat_template=cfg.chat_template)

    def encode(self, prompt: str, system_prompt: str = "") -> list[int]:
        from timebill_ros.core.engine import Engine

        return Engine.encode(self._encoder, prompt, system_prompt or None)


# --- estimator / length-predictor glue ------------------------------------------------------
# Coefficients fitted to SmolLM2-135M, fp32, on the project's 2-core CPU while it was busy (load ~7,
# 1 thread): pessimistic on purpose; used only until `timebill calibrate` writes a profile.
FALLBACK_TIME_MODEL = dict(a=4.9e-7, b=2.7e-3, c=0.08, p=1.15e-5, q=0.10)


def load_time_model(cfg: TimeBillConfig, log: Callable[[str], None] = print, running_key=None):
    """(ExecutionTimeModel, source): the calibrated, key-checked profile, else the fallback."""
    from timebill_ros.core.calibration import load_time_model as load_calibrated
    from timebill_ros.core.time_estimator import ExecutionTimeModel

    try:
        model = load_calibrated(cfg, running_key)
        if model is not None:
            return model, "profile"
        log("no timing profile for this setup (run `timebill calibrate`); using built-in SmolLM2/CPU coefficients")
    except Exception as exc:  # noqa: BLE001 - a stale profile must not take the node down
        log(f"timing profile unusable: {safe_reason(exc)}; using built-in SmolLM2/CPU coefficients")
    return ExecutionTimeModel.from_dict(FALLBACK_TIME_MODEL), "fallback"


def effective_n_max(cfg: TimeBillConfig, max_new_tokens: int, n_prompt: int, max_context: int) -> int:
    """Longest answer possible: N_max, the request's max_new_tokens and the context all cap it."""
    return max(1, min(cfg.n_max, int(max_new_tokens), max(max_context - n_prompt, 1)))


class LengthPredictor:
    """N̂ for a prompt: the trained RLP when its checkpoint exists, else the documented fallback
    N̂ = N_max (capped by the request's max_new_tokens): plan for the longest possible answer."""

    def __init__(self, cfg: TimeBillConfig, log: Callable[[str], None] = print):
        from timebill_ros.core.length_predictor import load_length_predictor

        self.cfg = cfg
        self.impl = load_length_predictor(cfg, logger=log)
        self.is_fallback = getattr(self.impl, "meta", None) is None

    def predict(self, prompt: str, n_cap: int) -> Tuple[int, int, bool]:
        """(N̂, bucket, fallback) for one prompt; N̂ never exceeds ``n_cap``."""
        if self.is_fallback:
            return n_cap, 0, True
        p = self.impl.predict(prompt)
        return min(int(p.n_hat), n_cap), int(p.bucket), p.source == "fallback"


def run_node(node, num_threads: int = N_THREADS) -> int:
    """Spin ``node`` in a MultiThreadedExecutor until SIGINT/SIGTERM, then release it.

    Spinning happens in the main thread: an executor left running in a daemon thread at exit
    can abort the process (see the ROS-from-pip notes).
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    executor = MultiThreadedExecutor(num_threads=num_threads)
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        release = getattr(node, "release", None)
        if release is not None:
            try:
                release()
            except Exception as exc:  # noqa: BLE001
                print(f"[{node.get_name()}] release failed: {exc}", file=sys.stderr)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def wait_future(future, timeout_s: Optional[float], poll_s: float = 0.01,
                stop: Optional[Callable[[], bool]] = None) -> bool:
    """Block this (executor) thread until ``future`` is done; other threads keep spinning."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while not future.done():
        if stop is not None and stop():
            return False
        if end is not None and time.monotonic() >= end:
            return False
        time.sleep(poll_s)
    return True


def safe_reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__

