"""
Sign of life of every managed node, for the lifecycle manager (and the generator's for the server).

Each node publishes ``Heartbeat`` on ``<node>/heartbeat`` every ``heartbeat_s`` from a timer,
whatever its lifecycle state and whatever it is doing (a long prefill included): the manager
tells "busy" from "gone" by the heartbeat stopping, and "restarted" by a new pid. The publisher
is a plain one on purpose: liveness is not a lifecycle output, an inactive node still lives.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from timebill_ros.msg import Heartbeat
from timebill_ros.nodes.qos import HEARTBEAT_QOS


def heartbeat_topic(node_name: str) -> str:
    """Return the (relative) topic ``node_name`` beats on: it follows the system's namespace."""
    return f'{node_name}/heartbeat'


class HeartbeatSender:
    """
    Publish the node's pid, lifecycle state and last error every ``period_s``.

    ``fill`` may add what the node knows beyond that (the generator: queue and time model).
    """

    def __init__(self, node, period_s: float, callback_group=None,
                 fill: Optional[Callable[[Heartbeat], None]] = None):
        self.node = node
        self.state, self.error = 'unconfigured', ''
        self._fill = fill
        self._pub = node.create_publisher(
            Heartbeat, heartbeat_topic(node.get_name()), HEARTBEAT_QOS
        )
        node.create_timer(period_s or 0.25, self.send, callback_group=callback_group)

    def send(self) -> None:
        msg = Heartbeat(
            stamp=self.node.get_clock().now().to_msg(),
            pid=os.getpid(),
            state=self.state,
            error=self.error,
        )
        if self._fill is not None:
            self._fill(msg)
        self._pub.publish(msg)
