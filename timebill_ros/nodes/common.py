"""
What the three nodes share: names, QoS, parameters from TimeBillConfig, conversions.

One place for the channel names and QoS so the server, predictor, generator, the typed
client and the bag recorder cannot drift apart. The estimator/predictor glue also lives
here so the nodes call the core through one small function each.
"""

from __future__ import annotations

from dataclasses import fields
import math
import sys
import time
from types import SimpleNamespace
from typing import Optional

from lifecycle_msgs.msg import Transition
from rclpy.duration import Duration
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.time import Time
from timebill_ros.core.config import TimeBillConfig

# --- channel names (relative: they follow the nodes' namespace) --------------------------
ACTION_TIMED_INFERENCE = 'timed_inference'  # planner-facing, on timebill_server
ACTION_GENERATE = 'timebill/generate'  # internal: server -> generator
TOPIC_REQUESTS = 'timebill/requests'  # server -> predictor, published with the generate goal
TOPIC_ESTIMATES = 'timebill/estimates'  # predictor -> generator (and anyone recording)
TOPIC_HEARTBEAT = 'timebill/heartbeat'  # generator -> server: alive (pid), lifecycle state, queue
TOPIC_PREFILL_PLANS = 'timebill/prefill_plans'  # generator -> predictor: cached length per goal
SERVICE_ESTIMATE_BUDGET = 'timebill/estimate_budget'  # planner-facing, on timebill_generator
SERVICE_PREDICT_LENGTH = 'timebill/predict_length'  # generator -> predictor (EstimateBudget)
SERVICE_PRIME = 'timebill/prime'  # planner-facing, on timebill_generator: prefix cache priming
SERVICE_RELEASE_PRIME = 'timebill/release_prime'  # planner-facing, on timebill_generator

# Requests and estimates must not be lost (a lost estimate costs a pessimistic N_max plan), but a
# restarted node must not act on stale ones: reliable, volatile.
CHANNEL_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=50,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
HEARTBEAT_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)

# Action goal/result/cancel services: ROS's default keeps only the last 10 requests, so a burst
# of more than 10 goals (several planners at once) silently loses the rest.
SERVICE_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=256,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
ACTION_QOS = {
    'goal_service_qos_profile': SERVICE_QOS,
    'result_service_qos_profile': SERVICE_QOS,
    'cancel_service_qos_profile': SERVICE_QOS,
}

TRANSITIONS = {
    'configure': Transition.TRANSITION_CONFIGURE,
    'activate': Transition.TRANSITION_ACTIVATE,
    'deactivate': Transition.TRANSITION_DEACTIVATE,
    'cleanup': Transition.TRANSITION_CLEANUP,
    'shutdown': Transition.TRANSITION_UNCONFIGURED_SHUTDOWN,
}

SHUTDOWN_GRACE_S = 2.0  # a node's teardown after SIGINT never takes longer than this
SPIN_WAKE_S = 0.1  # the main thread checks for signals at least this often
N_THREADS = 4  # executor threads of a node whose callbacks never block for long
# Goals held at once by the server and the generator (queued + running); each holds one executor
# thread while it waits (blocked on an event, not polling), so this also sizes their executors.
GOAL_THREADS = 128 + 8


# --- parameters ---------------------------------------------------------------------------
from timebill_ros.nodes.parameters import declare_config  # noqa: E402, F401 - nodes import it here


def read_config(node) -> TimeBillConfig:
    """Read the node's parameters as a validated TimeBillConfig (ValueError with a reason)."""
    values = {f.name: node.get_parameter(f.name).value for f in fields(TimeBillConfig)}
    return TimeBillConfig.from_mapping(values)


# --- time (rclpy's Time/Duration; seconds as float at the edges) ---------------------------
def duration_to_s(d) -> float:
    return Duration.from_msg(d).nanoseconds * 1e-9


def s_to_duration(seconds: float):
    if not math.isfinite(seconds):
        raise ValueError(f'a duration must be finite, got {seconds}')
    return Duration(nanoseconds=int(round(seconds * 1e9))).to_msg()


def time_to_s(t) -> float:
    return Time.from_msg(t).nanoseconds * 1e-9


def s_to_time(seconds: float):
    return Time(nanoseconds=int(round(seconds * 1e9))).to_msg()


def ros_now_s(node) -> float:
    """ROS clock (system time by default): comparable across processes on one machine."""
    return node.get_clock().now().nanoseconds * 1e-9


def to_monotonic(ros_time_s: float, node) -> float:
    """Map an absolute ROS time to time.monotonic(), the clock the pipeline runs on."""
    return time.monotonic() + (ros_time_s - ros_now_s(node))


def uuid_hex(uuid_msg) -> str:
    return bytes(uuid_msg.uuid).hex()


def copy_fields(src, dst, skip=()):
    """
    Copy same-named fields.

    Generate and TimedInference results share them, and ``core.outcome.Outcome`` uses the same
    names (its ``status`` is a name: see ``to_result``).
    """
    names = set(dst.get_fields_and_field_types()) - set(skip)
    src_names = (
        src.get_fields_and_field_types()
        if hasattr(src, 'get_fields_and_field_types')
        else vars(src)
    )
    for name in src_names:
        if name in names:
            value, kind = getattr(src, name), type(getattr(dst, name))
            setattr(dst, name, kind(value) if kind in (bool, int, float, str) else value)
    return dst


def to_result(outcome, result_type):
    """Make an action result from a pipeline ``Outcome``."""
    result = copy_fields(outcome, result_type(), skip=('status',))
    result.status = status_code(outcome.status, result_type)
    return result


# --- tokenizer without the model (server and predictor) -----------------------------------
class PromptTokenizer:
    """
    The target model's tokenizer and context size, without loading its weights.

    Encoding goes through ``Engine.encode`` so the chat template is applied exactly as the
    generator would apply it.
    """

    def __init__(self, cfg: TimeBillConfig):
        from timebill_ros.core.model import resolve_model_path
        from transformers import AutoConfig, AutoTokenizer

        target, extra = resolve_model_path(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(target, **extra)
        mcfg = AutoConfig.from_pretrained(target, **extra)
        text = mcfg.get_text_config(decoder=True) if hasattr(mcfg, 'get_text_config') else mcfg
        self.max_context = int(getattr(text, 'max_position_embeddings', 0) or 2048)
        self._encoder = SimpleNamespace(tokenizer=self.tokenizer, chat_template=cfg.chat_template)

    def encode(self, prompt: str, system_prompt: str = '') -> list[int]:
        from timebill_ros.core.engine import Engine

        return Engine.encode(self._encoder, prompt, system_prompt or None)


def run_node(node, num_threads: int = N_THREADS) -> int:
    """
    Spin ``node`` until SIGINT/SIGTERM, release it, and end the process at once with 0.

    Spinning happens in the main thread: an executor left running in a daemon thread at exit
    can abort the process (see the ROS-from-pip notes). After the model and the DDS entities
    are released nothing is left worth the interpreter's slow teardown (seconds with torch
    loaded, past launch's SIGTERM window on a busy machine), so the process leaves with
    ``os._exit``; a second signal during the release (a terminal's Ctrl-C reaches launch and
    the node both) is ignored instead of killing the node half-way with exit code -2.
    """
    import os
    import signal
    import threading

    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    executor = MultiThreadedExecutor(num_threads=num_threads)
    executor.add_node(node)
    code = 0

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # Python-level handlers and a bounded wait: a configured node was seen to miss rclpy's own
    # SIGINT wake-up and sleep in rcl_wait forever; the main thread now runs the handler within
    # SPIN_WAKE_S whatever a library did to the C-level handler.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        while node.context.ok():
            executor.spin_once(timeout_sec=SPIN_WAKE_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except BaseException as exc:  # noqa: BLE001 - say why, then still release
        print(f'[{node.get_name()}] executor failed: {safe_reason(exc)}', file=sys.stderr)
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

        def overdue():
            print(f'[{node.get_name()}] teardown took over {SHUTDOWN_GRACE_S:g} s; leaving now',
                  file=sys.stderr, flush=True)
            os._exit(code)

        # whatever hangs in the teardown (a DDS call on a loaded machine), launch's window holds
        watchdog = threading.Timer(SHUTDOWN_GRACE_S, overdue)
        watchdog.daemon = True
        watchdog.start()
        release = getattr(node, 'release', None)
        if release is not None:
            try:
                release(exiting=True)
            except Exception as exc:  # noqa: BLE001
                print(f'[{node.get_name()}] release failed: {exc}', file=sys.stderr)
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def wait_first(*futures, timeout_s: Optional[float] = None):
    """
    Block this (executor) thread until one of the rclpy ``futures`` is done, and return it.

    None on timeout. An event, not a polling loop.

    Execute callbacks block on this instead of being coroutines: rclpy (Kilted) re-runs every
    pending coroutine task on every executor wake, so a hundred awaiting goals cost a hundred
    resumptions per feedback message, and results came back seconds late under load.
    """
    import threading

    done = threading.Event()
    for f in futures:
        f.add_done_callback(lambda _f: done.set())
    done.wait(timeout_s)
    return next((f for f in futures if f.done()), None)


def status_code(name: str, result_type) -> int:
    """Map a status name from core.outcome.STATUS_NAMES to the action's STATUS_* constant."""
    return int(getattr(result_type, f'STATUS_{name.upper()}'))


def status_name(code: int) -> str:
    from timebill_ros.core.outcome import STATUS_NAMES

    return STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else str(code)


def safe_reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
