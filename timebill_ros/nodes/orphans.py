"""
End goals whose client left: a crashed planner's goal would hold the model until its deadline.

Two signs, both read from the ROS graph (no message from the client is needed, it may be dead):

* a goal that named its client (``client_node``, set by our typed client) ends when that node
  leaves the graph;
* any other goal (``ros2 action send_goal``, another client library) ends when no client of the
  action is left at all: the action's ``_action/get_result`` service has no client.

DDS removes a killed process from the graph when its participant lease runs out (Fast DDS: 20 s
by default), so this bounds how long an orphan can hold the queue, not its deadline. A client
just created may not be in the graph yet when its goal arrives (discovery announces it on its
own topic): one not seen is given ``DISCOVERY_S``.
"""

from __future__ import annotations

from dataclasses import dataclass
import time
from typing import Any, Optional

from timebill_ros.nodes.qos import ACTION_TIMED_INFERENCE

CHECK_S = 0.5  # how often goals' clients are looked up in the ROS graph
DISCOVERY_S = 5.0  # a client not in the graph this long after acceptance is taken as gone
RESULT_SERVICE = f'{ACTION_TIMED_INFERENCE}/_action/get_result'


@dataclass(eq=False)
class ServedGoal:
    """A goal the server is serving: its client, its stop signal, its generator goal."""

    request_id: str
    accepted_s: float  # ROS time of acceptance
    inner: object = None  # the generator's goal handle, once it accepted
    stop: Optional[Any] = None  # an rclpy Future, completed with a reason to abort the goal
    generator_pid: int = 0  # heartbeat pid when the goal was dispatched
    dispatched: bool = False  # handed to the generator
    client_node: str = ''  # the goal's client, when it named itself
    accepted_mono: float = 0.0  # time.monotonic() at acceptance


class OrphanWatch:
    """Look the server's goals' clients up in the graph; stop a goal whose client is gone."""

    def __init__(self, node, goals: dict, stop):
        self.node, self.goals, self.stop = node, goals, stop
        self._next = 0.0
        self.seen: set = set()  # request ids whose client was in the graph once

    def check(self) -> None:
        goals = list(self.goals.values())
        # clients not seen yet are looked up every tick: a planner can send a goal and crash
        # within one check period, and an unseen client cannot be noticed leaving
        unseen = any(g.request_id not in self.seen for g in goals)
        now = time.monotonic()
        if not goals or (not unseen and now < self._next):
            return
        self._next = now + CHECK_S
        named = [g for g in goals if g.client_node]
        unnamed = [g for g in goals if not g.client_node and g.dispatched]
        present = set()
        if named:
            present = {
                (ns.rstrip('/') + '/' + name)
                for name, ns in self.node.get_node_names_and_namespaces()
            }
        clients = self.node.count_clients(RESULT_SERVICE) if unnamed else 0
        for g in named:
            if g.client_node in present:
                self.seen.add(g.request_id)
            else:
                self._gone(g, now, f'the client {g.client_node} left the ROS graph',
                           f'the client {g.client_node} is not in the ROS graph')
        for g in unnamed:
            if clients:
                self.seen.add(g.request_id)
            else:
                self._gone(g, now, f'no client of {RESULT_SERVICE} is left in the ROS graph',
                           f'no client of {RESULT_SERVICE} is in the ROS graph')
        self.seen &= {g.request_id for g in goals}

    def _gone(self, g, now: float, left: str, never: str) -> None:
        if g.request_id in self.seen:
            self.stop(g, left)
        elif g.accepted_mono and now - g.accepted_mono > DISCOVERY_S:
            self.stop(g, f'{never} {DISCOVERY_S:g} s after its goal was accepted (it left, or '
                         f'never was)')
