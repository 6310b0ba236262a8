"""
timebill_lifecycle_manager: brings the TimeBill nodes up and down in order, and back after a crash.

nav2's lifecycle_manager pattern, as a lifecycle node of its own so the standard services drive
the whole system (``ros2 lifecycle set /timebill_lifecycle_manager configure``; the typed
client's ``startup()``): its configure configures ``node_names`` in order (predictor, generator,
server: the server accepts goals last), activate activates them in that order, deactivate and
cleanup go in reverse. A node that fails a transition fails the manager's with that node's
reason (its heartbeat's ``error``), and the nodes already configured are cleaned up again.
``autostart`` configures and activates at start, as ``ros2 launch`` wants.

Liveness comes from each node's heartbeat (``<node>/heartbeat``), no polling: a heartbeat that
stops for ``liveness_timeout_s`` is logged as a lost node; a heartbeat with a new pid
in state ``unconfigured`` is a restarted process, and with ``bring_back_restarted`` the manager
takes it to the system's state. A node cleaned up by hand (same pid) is left as it is.
The server serves goals only; it aborts the goals of a lost generator by that heartbeat itself.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional

from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import ParameterDescriptor
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from timebill_ros.msg import Heartbeat
from timebill_ros.nodes.heartbeat import heartbeat_topic
from timebill_ros.nodes.qos import HEARTBEAT_QOS, TRANSITIONS
from timebill_ros.nodes.spin import N_THREADS, run_node, safe_reason, wait_first

RECONCILE_S = 5.0  # a live node short of the system's state is brought back this often

NAME = 'timebill_lifecycle_manager'
# bring-up order: the predictor answers the server's requests, the generator serves them, and the
# server accepts goals last (so it never accepts one the others cannot take)
NODE_NAMES = ['timebill_predictor', 'timebill_generator', 'timebill_server']
BEFORE = {'configure': 'unconfigured', 'activate': 'inactive', 'deactivate': 'active',
          'cleanup': 'inactive'}
PARAMETERS = {
    'node_names': (NODE_NAMES, 'managed lifecycle nodes, in bring-up order'),
    'autostart': (True, 'configure and activate the managed nodes when the manager starts'),
    'bring_back_restarted': (
        True, 'a managed node that restarts (new pid, unconfigured) is taken to the state of the '
        'system again'),
    'liveness_timeout_s': (5.0, 'no heartbeat from a managed node this long: it is reported lost'),
    'configure_timeout_s': (300.0, "one node's configure may take this long (loading a model)"),
    'transition_timeout_s': (
        10.0, "one node's activate, deactivate or cleanup may take this long"),
}


class LifecycleManager(LifecycleNode):
    def __init__(self):
        super().__init__(NAME)
        for name, (default, text) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=text))
        value = lambda name: self.get_parameter(name).value  # noqa: E731
        self.nodes = list(value('node_names'))
        self.liveness_s = float(value('liveness_timeout_s'))
        self.configure_s = float(value('configure_timeout_s'))
        self.transition_s = float(value('transition_timeout_s'))
        self.bring_back = bool(value('bring_back_restarted'))
        self.want = 'unconfigured'  # the state the manager holds the system in
        self.beats: dict[str, Heartbeat] = {}
        self.beat_at: dict[str, float] = {}  # time.monotonic() of each node's last heartbeat
        self.lost: set = set()
        self._retried: dict[str, float] = {}  # node -> time.monotonic() of the last reconcile
        self._beat_cv = threading.Condition()
        self._lock = threading.Lock()  # one transition of the system at a time
        group = ReentrantCallbackGroup()
        self._peers = {
            (node, srv): self.create_client(t, f'{node}/{srv}', callback_group=group)
            for node in self.nodes
            for srv, t in (('change_state', ChangeState), ('get_state', GetState))
        }
        for node in self.nodes:
            self.create_subscription(
                Heartbeat, heartbeat_topic(node), lambda msg, n=node: self._on_beat(n, msg),
                HEARTBEAT_QOS, callback_group=group,
            )
        self.create_timer(1.0, self._check_liveness, callback_group=group)
        if value('autostart'):
            # a one-shot timer in its own group: the transitions wait on services this executor
            # answers, so they must not run in the thread that would answer them
            self._autostart = self.create_timer(
                0.0, self._startup, callback_group=MutuallyExclusiveCallbackGroup()
            )

    # ------------------------------------------------------------------ lifecycle
    def _startup(self) -> None:
        self._autostart.cancel()
        self.destroy_timer(self._autostart)
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._system('configure', self.nodes, undo='cleanup')

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = self._system('activate', self.nodes, undo='deactivate')
        return super().on_activate(state) if result == TransitionCallbackReturn.SUCCESS else result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._system('deactivate', self.nodes[::-1])
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._system('cleanup', self.nodes[::-1])
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.want == 'active':
            self._system('deactivate', self.nodes[::-1])
        if self.want in ('active', 'inactive'):
            self._system('cleanup', self.nodes[::-1])
        return TransitionCallbackReturn.SUCCESS

    def _system(self, transition: str, order: list, undo: str = '') -> TransitionCallbackReturn:
        """Take ``order`` through ``transition``; on a failure undo the ones done, say why."""
        with self._lock:
            done = []
            for node in order:
                problem = self._drive(node, transition)
                if problem:
                    self.get_logger().error(f'{transition} failed: {problem}')
                    for back in reversed(done if undo else []):
                        self._drive(back, undo)
                    return TransitionCallbackReturn.FAILURE
                done.append(node)
            self.want = {'configure': 'inactive', 'activate': 'active', 'deactivate': 'inactive',
                         'cleanup': 'unconfigured'}[transition]
            self.get_logger().info(f'{transition}: {", ".join(order)} {self.want}')
            return TransitionCallbackReturn.SUCCESS

    def _drive(self, node: str, transition: str) -> str:
        """Take one node through ``transition`` unless it is past it already; '' or why not."""
        timeout = self.configure_s if transition == 'configure' else self.transition_s
        state = self._state(node, min(timeout, 10.0))
        if state is None:
            return f'{node} is not running (no lifecycle service within {min(timeout, 10.0):g} s)'
        if state != BEFORE[transition]:
            return ''  # already there (a node brought back, or driven by hand)
        req = ChangeState.Request()
        req.transition.id = TRANSITIONS[transition]
        future = self._peers[(node, 'change_state')].call_async(req)
        if wait_first(future, timeout_s=timeout) is None:
            return f'{node} did not {transition} within {timeout:g} s'
        if future.result().success:
            return ''
        # the failed node sent a heartbeat with its error before it answered: wait for it
        with self._beat_cv:
            self._beat_cv.wait_for(lambda: self._error(node), timeout=1.0)
        why = self._error(node)
        return f'{node} failed to {transition}' + (f': {why}' if why else ' (see its log)')

    def _error(self, node: str) -> str:
        beat = self.beats.get(node)
        return beat.error if beat is not None else ''

    def _state(self, node: str, timeout_s: float) -> Optional[str]:
        client = self._peers[(node, 'get_state')]
        if not client.wait_for_service(timeout_sec=timeout_s):
            return None
        future = client.call_async(GetState.Request())
        if wait_first(future, timeout_s=timeout_s) is None:
            return None
        return future.result().current_state.label

    # ------------------------------------------------------------------ liveness
    def _on_beat(self, node: str, msg: Heartbeat) -> None:
        before = self.beats.get(node)
        with self._beat_cv:
            self.beats[node], self.beat_at[node] = msg, time.monotonic()
            self._beat_cv.notify_all()
        if node in self.lost:
            self.lost.discard(node)
            self.get_logger().info(f'{node} is back (pid {msg.pid}, {msg.state})')
        restarted = before is not None and before.pid != msg.pid
        if restarted and msg.state == 'unconfigured' and self.want != 'unconfigured':
            self.get_logger().warning(
                f'{node} restarted (pid {before.pid} -> {msg.pid}) and is unconfigured'
                + (f': bringing it back to {self.want}' if self.bring_back else '')
            )
            if self.bring_back:
                threading.Thread(
                    target=self._bring_back, args=(node,), name='timebill_bring_back', daemon=True
                ).start()

    def _bring_back(self, node: str) -> None:
        """Take a restarted node to the system's state, in the same order as at bring-up."""
        try:
            with self._lock:
                steps = {'inactive': ['configure'], 'active': ['configure', 'activate']}
                for transition in steps.get(self.want, []):
                    problem = self._drive(node, transition)
                    if problem:
                        self.get_logger().error(f'could not bring {node} back: {problem}')
                        return
                self.get_logger().info(f'{node} brought back to {self.want}')
        except Exception as exc:  # noqa: BLE001 - supervision must never take the manager down
            self.get_logger().error(f'bringing {node} back failed: {safe_reason(exc)}')

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for node, at in list(self.beat_at.items()):
            silent = now - at
            if silent > self.liveness_s and node not in self.lost:
                self.lost.add(node)
                pid = self.beats[node].pid
                self.get_logger().error(
                    f'lost {node} (pid {pid}): no heartbeat for {silent:.1f} s'
                )
        self._reconcile(now)

    def _reconcile(self, now: float) -> None:
        """
        Bring back a live node still short of the system's state (a bring-back that timed out).

        Not while the system itself is in transition, not a node whose configure failed (its
        heartbeat carries the error: retrying would only repeat it), and each node at most once
        every ``RECONCILE_S``.
        """
        if not self.bring_back or self.want == 'unconfigured' or self._lock.locked():
            return
        behind = {'inactive': ('unconfigured',), 'active': ('unconfigured', 'inactive')}
        for node, beat in list(self.beats.items()):
            fresh = now - self.beat_at.get(node, 0.0) < self.liveness_s
            if (fresh and not beat.error and beat.state in behind.get(self.want, ())
                    and now - self._retried.get(node, -RECONCILE_S) >= RECONCILE_S):
                self._retried[node] = now
                self.get_logger().warning(
                    f'{node} is {beat.state}, the system is {self.want}: bringing it back'
                )
                threading.Thread(
                    target=self._bring_back, args=(node,), name='timebill_bring_back', daemon=True
                ).start()


def main(args=None) -> int:
    rclpy.init(args=args)
    return run_node(LifecycleManager(), num_threads=N_THREADS)


if __name__ == '__main__':
    sys.exit(main())
