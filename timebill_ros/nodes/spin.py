"""
How a node process runs: spin until a signal, release, leave at once; and waiting on futures.

A node's executor is sized by what its callbacks block on (``N_THREADS``, ``goal_threads``).
"""

from __future__ import annotations

import sys
from typing import Optional

SHUTDOWN_GRACE_S = 2.0  # a node's teardown after SIGINT never takes longer than this
SPIN_WAKE_S = 0.1  # the main thread checks for signals at least this often
N_THREADS = 4  # executor threads of a node whose callbacks never block for long


def goal_threads(max_goals: int) -> int:
    """
    Size the executor of a node that holds up to ``max_goals`` goals (server, generator).

    Each held goal waits in one executor thread (blocked on an event, not polling: see
    ``wait_first``), and ``N_THREADS`` more keep services, heartbeats and cancels moving while
    every goal waits. rclpy's executor starts a thread only when every started one is busy, so
    an idle node holds a few, not this many (threads per node in docs/BENCHMARKS.md).
    """
    return max(int(max_goals), 1) + N_THREADS


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


def safe_reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
