"""
End goals whose client left: a crashed planner's goal would hold the model until its deadline.

Two signs, both read from the ROS graph (no message from the client is needed, it may be dead):

* a goal that named its client (``client_node``, set by our typed client) ends when that node
  leaves the graph;
* any other goal (``ros2 action send_goal``, another client library) ends when its client's
  DDS participant left the graph. rclpy does not hand a goal's sender to the server, so the
  action server publishes its send_goal service events (service introspection, ROS 2 Jazzy+):
  each names the goal and the sending client's gid, whose first 12 bytes are its participant.
  Where no event came (or the middleware does not name service endpoints ``rr/...Reply``) the
  goal ends when no client of the action is left at all (``_action/get_result`` has none).

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
SEND_GOAL = f'{ACTION_TIMED_INFERENCE}/_action/send_goal'
KEEP_SENDERS = 1024  # goal -> sender entries kept, oldest dropped first


@dataclass(eq=False)
class ServedGoal:
    """A goal the server is serving: its client, its stop signal, its generator goal."""

    request_id: str
    accepted_s: float  # ROS time of acceptance
    inner: object = None  # the generator's goal handle, once it accepted
    stop: Optional[Any] = None  # an rclpy Future, completed with a reason to abort the goal
    generator: str = ''  # the generator it was dispatched to (several: config generators)
    generator_pid: int = 0  # heartbeat pid when the goal was dispatched
    dispatched: bool = False  # handed to the generator
    client_node: str = ''  # the goal's client, when it named itself
    accepted_mono: float = 0.0  # time.monotonic() at acceptance


class OrphanWatch:
    """Look the server's goals' clients up in the graph; stop a goal whose client is gone."""

    def __init__(self, node, goals: dict, stop):
        from timebill_ros.action import TimedInference

        self.node, self.goals, self.stop = node, goals, stop
        self._next = 0.0
        self.seen: set = set()  # request ids whose client was in the graph once
        self.senders: dict = {}  # request id -> the sending participant's gid prefix
        # the DDS topic of the send_goal replies: a client's reader of them is in its participant
        name = node.resolve_topic_name(SEND_GOAL, only_expand=True).lstrip('/')
        self._replies = f'rr/{name}Reply'
        node.create_subscription(
            TimedInference.Impl.SendGoalService.Event,
            f'{SEND_GOAL}/_service_event',
            self._on_event,
            10,
        )

    @staticmethod
    def introspect(action_server, clock) -> None:
        """Have ``action_server`` publish its service events with contents (the goal ids)."""
        from rclpy.qos import qos_profile_system_default
        from rclpy.service_introspection import ServiceIntrospectionState

        action_server.configure_introspection(
            clock, qos_profile_system_default, ServiceIntrospectionState.CONTENTS
        )

    def _on_event(self, event) -> None:
        from service_msgs.msg import ServiceEventInfo

        if event.info.event_type != ServiceEventInfo.REQUEST_RECEIVED or not event.request:
            return
        rid = bytes(event.request[0].goal_id.uuid).hex()
        self.senders[rid] = bytes(bytearray(event.info.client_gid))[:12]
        while len(self.senders) > KEEP_SENDERS:
            self.senders.pop(next(iter(self.senders)))

    def _participants(self):
        """Return the gid prefixes of the participants that read send_goal replies, or None."""
        infos = self.node.get_subscriptions_info_by_topic(self._replies, no_mangle=True)
        return {bytes(bytearray(i.endpoint_gid))[:12] for i in infos} or None

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
        participants = self._participants() if unnamed else None
        for g in named:
            if g.client_node in present:
                self.seen.add(g.request_id)
            else:
                self._gone(g, now, f'the client {g.client_node} left the ROS graph',
                           f'the client {g.client_node} is not in the ROS graph')
        for g in unnamed:
            sender = self.senders.get(g.request_id)
            if sender is not None and participants is not None:
                if sender in participants:
                    self.seen.add(g.request_id)
                else:
                    self._gone(g, now, f'its client (participant {sender.hex()}) left the ROS '
                               f'graph', f'its client (participant {sender.hex()}) is not in '
                               f'the ROS graph')
            elif clients:
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
