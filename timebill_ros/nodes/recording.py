"""
Recording a server's goals, estimates and results to a rosbag2 MCAP bag (``record_bag``).

The bag is what ``timebill replay`` and the evaluation read; it stays readable after a crash.
Losing the recording must not lose a goal: a failed write is logged, the goal goes on.
"""

from __future__ import annotations

from pathlib import Path
import time

from timebill_ros.msg import Estimate
from timebill_ros.nodes.qos import ACTION_TIMED_INFERENCE, CHANNEL_QOS, TOPIC_ESTIMATES
from timebill_ros.nodes.spin import safe_reason


class GoalRecording:
    """A bag under ``folder`` (a timestamped name) that ``record`` writes to, from any thread."""

    def __init__(self, node, folder: str):
        from timebill_ros.core.evaluation.bags import BagRecorder

        self._node = node
        path = Path(folder).expanduser() / time.strftime('timebill_%Y%m%d_%H%M%S')
        self._recorder = BagRecorder(path, action_name='/' + ACTION_TIMED_INFERENCE)
        self._estimates = node.create_subscription(
            Estimate,
            TOPIC_ESTIMATES,
            lambda msg: self.record('record_estimate', msg),
            CHANNEL_QOS,
        )
        self.path = self._recorder.path
        node.get_logger().info(f'recording goals, estimates and results to {self.path}')

    def record(self, what: str, *args, **kw) -> None:
        """Call the recorder's ``what`` (record_goal, record_estimate, record_result)."""
        recorder = self._recorder
        if recorder is None:
            return
        try:
            getattr(recorder, what)(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - losing the recording must not lose the goal
            self._node.get_logger().error(f'bag recording failed ({what}): {safe_reason(exc)}')

    def close(self) -> None:
        """Stop listening and close the bag (once)."""
        if self._estimates is not None:
            self._node.destroy_subscription(self._estimates)
            self._estimates = None
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.close()
