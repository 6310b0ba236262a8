"""
rosbag2 (MCAP) recording and reading of TimeBill requests, estimates and results, no ROS needed.

The implementation lives in :mod:`timebill_ros.core.evaluation.rosbag` (interface types, dict
<-> message conversion, the crash-safe writer and recorder, crash recovery, reading); this
module keeps the import path that the server, the CLIs and the tests use, re-exporting the
public names.
"""

from __future__ import annotations

from .rosbag.convert import build_msg, to_dict, uuid_bytes, uuid_hex
from .rosbag.interfaces import (
    ACTION,
    DEFAULT_ACTION_NAME,
    DEFAULT_ESTIMATE_TOPIC,
    GOAL_STATUS,
    interface_definitions,
    interface_root,
    message_definition,
    PKG,
    REQUEST_RECEIVED,
    REQUEST_SENT,
    RESPONSE_RECEIVED,
    RESPONSE_SENT,
    TASK_TOPIC,
    typestore,
)
from .rosbag.reader import (
    BagMessage,
    open_bag,
    read_estimates,
    read_messages,
    read_requests,
    read_results,
    RecordedRequest,
)
from .rosbag.recovery import MAGIC, mcap_is_complete, recover, valid_prefix
from .rosbag.writer import BagRecorder, BagWriter, write_request_bag

__all__ = [
    'ACTION',
    'DEFAULT_ACTION_NAME',
    'DEFAULT_ESTIMATE_TOPIC',
    'GOAL_STATUS',
    'MAGIC',
    'PKG',
    'REQUEST_RECEIVED',
    'REQUEST_SENT',
    'RESPONSE_RECEIVED',
    'RESPONSE_SENT',
    'TASK_TOPIC',
    'BagMessage',
    'BagRecorder',
    'BagWriter',
    'RecordedRequest',
    'build_msg',
    'interface_definitions',
    'interface_root',
    'mcap_is_complete',
    'message_definition',
    'open_bag',
    'read_estimates',
    'read_messages',
    'read_requests',
    'read_results',
    'recover',
    'to_dict',
    'typestore',
    'uuid_bytes',
    'uuid_hex',
    'valid_prefix',
    'write_request_bag',
]
