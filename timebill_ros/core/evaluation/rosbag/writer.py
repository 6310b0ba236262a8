"""
Recording bags: a crash-safe MCAP writer and the server's goal/estimate/result recorder.

Goals and results are recorded as ros2 records actions (action introspection, Jazzy+):
``<action>/_action/send_goal/_service_event`` and ``.../get_result/_service_event``, so a bag
from ``ros2 bag record`` and one of ours are read by the same code, and each result carries its
goal id. Nothing is lost on a crash: rosbags buffers messages in 1 MiB chunks and writes the
index only on close, whereas this writer writes every message unchunked, straight to the file,
and flushes it (``recovery`` makes such a bag readable again). ``write_request_bag`` builds the
goal bags that ``make-tasks`` hands to ``replay``.
"""

from __future__ import annotations

from functools import lru_cache
import json
import os
from pathlib import Path
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple
import uuid as uuidlib

from .convert import build_msg, stamp_fields, to_dict, uuid_bytes, uuid_hex
from .interfaces import (
    ACTION,
    DEFAULT_ACTION_NAME,
    DEFAULT_ESTIMATE_TOPIC,
    GOAL_STATUS,
    message_definition,
    PKG,
    REQUEST_RECEIVED,
    RESPONSE_SENT,
    TASK_TOPIC,
    typestore,
)


def _ns(stamp_ns: Optional[int]) -> int:
    """``stamp_ns`` as an int, or now when it is None."""
    return int(stamp_ns) if stamp_ns is not None else time.time_ns()


@lru_cache(maxsize=1)
def _flushing_mcap_writer():
    """
    Rosbags' MCAP storage writer, but every record goes to the file at once and is flushed.

    Messages are written unchunked (valid MCAP); a killed process leaves a file whose complete
    records are all readable (see :func:`recover`). ``close`` writes rosbags' summary and footer.
    """
    from rosbags.rosbag2 import storage_mcap as sm

    class FlushingMcapWriter(sm.McapWriter):
        fsync = False

        def _sync(self) -> None:
            self.bio.flush()
            if self.fsync:
                os.fsync(self.bio.fileno())

        def add_msgtype(self, connection) -> None:
            is_msg = connection.msgdef.format == sm.MessageDefinitionFormat.MSG
            fmt = 'ros2msg' if is_msg else 'ros2idl'
            self.schemas.append(
                sm.Schema(len(self.schemas) + 1, connection.msgtype, fmt, connection.msgdef.data)
            )
            sm.write_schema(self.bio, self.schemas[-1])
            self._sync()

        def add_connection(self, connection, offered_qos_profiles: str) -> None:
            meta = sm.BytesIO()
            sm.write_string(meta, 'offered_qos_profiles')
            sm.write_string(meta, offered_qos_profiles)
            self.channels.append(
                sm.Channel(
                    connection.id,
                    connection.msgtype,
                    connection.topic,
                    connection.ext.serialization_format,
                    meta.getvalue(),
                )
            )
            self.channel_stats[connection.id] = 0
            sm.write_channel(self.bio, self.channels[-1], self.schemas)
            self._sync()

        def write(self, connection, timestamp: int, data) -> None:
            self.message_start_time = min(timestamp, self.message_start_time)
            self.message_end_time = max(timestamp, self.message_end_time)
            self.channel_stats[connection.id] += 1
            rec = sm.BytesIO()
            sm.write_uint16(rec, connection.id)
            sm.write_uint32(rec, 0)
            sm.write_uint64(rec, timestamp)
            sm.write_uint64(rec, timestamp)
            rec.write(data)
            sm.write_record(self.bio, 0x05, rec)
            self._sync()

    return FlushingMcapWriter


class BagWriter:
    """
    A rosbag2 MCAP bag, written message by message.

    It is readable up to the last message after a crash.
    """

    def __init__(self, path: str | os.PathLike, store=None, fsync: bool = False):
        from rosbags.rosbag2 import StoragePlugin, Writer

        class _Writer(Writer):
            STORAGE_PLUGINS = {StoragePlugin.MCAP: _flushing_mcap_writer()}

        self.path = Path(path)
        self.store = store or typestore()
        self._writer = _Writer(self.path, version=9, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._writer.storage.fsync = fsync
        self._conns: Dict[Tuple[str, str], Any] = {}
        self._last_ns = 0

    def _stamp(self, stamp_ns: Optional[int]) -> int:
        """Non-decreasing timestamps: an unindexed MCAP file must be read in order."""
        self._last_ns = max(_ns(stamp_ns), self._last_ns)
        return self._last_ns

    def write(self, topic: str, msgtype: str, value: Any, stamp_ns: Optional[int] = None) -> int:
        key = (topic, msgtype)
        if key not in self._conns:
            self._conns[key] = self._writer.add_connection(
                topic,
                msgtype,
                msgdef=message_definition(self.store, msgtype),
                rihs01=self.store.hash_rihs01(msgtype),
            )
        msg = build_msg(self.store, msgtype, value)
        ns = self._stamp(stamp_ns)
        self._writer.write(self._conns[key], ns, self.store.serialize_cdr(msg, msgtype))
        return ns

    def close(self) -> None:
        if self._writer.storage is not None:
            self._writer.close()

    def __enter__(self) -> 'BagWriter':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BagRecorder:
    """
    What the server records: every goal, estimate and result.

    In ros2's action-introspection form. Call from the server's callbacks with plain dicts (or
    rclpy messages):
        rec = BagRecorder(cfg.record_bag)
        rec.record_goal(goal_id, {"prompt": ..., "time_budget": 2.5, ...})   # on acceptance
        rec.record_estimate({"request_id": ..., "predicted_length": ..., ...})
        rec.record_result(goal_id, {"text": ..., "status": ..., ...}, status="succeeded")
        rec.close()   # on shutdown; a crash loses nothing already recorded
    Thread-safe: the server's callbacks run on several executor threads.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        action_name: str = DEFAULT_ACTION_NAME,
        estimate_topic: str = DEFAULT_ESTIMATE_TOPIC,
        fsync: bool = False,
        store=None,
    ):
        import threading

        self.action_name = action_name.rstrip('/')
        self.estimate_topic = estimate_topic
        self._lock = threading.Lock()
        self._seq = 0
        self._gid = list(uuidlib.uuid4().bytes)  # this recorder stands in for the client gid
        self.writer = BagWriter(path, store=store, fsync=fsync)
        self.path = self.writer.path

    @property
    def goal_topic(self) -> str:
        return f'{self.action_name}/_action/send_goal/_service_event'

    @property
    def result_topic(self) -> str:
        return f'{self.action_name}/_action/get_result/_service_event'

    def _info(self, event_type: int, stamp_ns: int) -> Dict[str, Any]:
        self._seq += 1
        return {
            'event_type': event_type,
            'stamp': stamp_fields(stamp_ns),
            'client_gid': self._gid,
            'sequence_number': self._seq,
        }

    def record_goal(
        self, goal_id: Any, goal: Any, stamp_ns: Optional[int] = None, accepted: bool = True
    ) -> None:
        """One event holding the SendGoal request (id + goal) and the server's response."""
        ns = _ns(stamp_ns)
        goal = to_dict(goal) if not isinstance(goal, Mapping) else dict(goal)
        with self._lock:
            self.writer.write(
                self.goal_topic,
                f'{PKG}/action/{ACTION}_SendGoal_Event',
                {
                    'info': self._info(REQUEST_RECEIVED, ns),
                    'request': [{'goal_id': {'uuid': uuid_bytes(goal_id)}, 'goal': goal}],
                    'response': [{'accepted': accepted, 'stamp': stamp_fields(ns)}],
                },
                ns,
            )

    def record_estimate(self, estimate: Any, stamp_ns: Optional[int] = None) -> None:
        with self._lock:
            self.writer.write(self.estimate_topic, f'{PKG}/msg/Estimate', estimate, stamp_ns)

    def record_result(
        self, goal_id: Any, result: Any, status: Any = 'succeeded', stamp_ns: Optional[int] = None
    ) -> None:
        """One event holding the GetResult request (goal id) and response (status + result)."""
        ns = _ns(stamp_ns)
        code = GOAL_STATUS[status] if isinstance(status, str) else int(status)
        with self._lock:
            self.writer.write(
                self.result_topic,
                f'{PKG}/action/{ACTION}_GetResult_Event',
                {
                    'info': self._info(RESPONSE_SENT, ns),
                    'request': [{'goal_id': {'uuid': uuid_bytes(goal_id)}}],
                    'response': [{'status': code, 'result': result}],
                },
                ns,
            )

    def record_task(self, task: Mapping[str, Any], stamp_ns: Optional[int] = None) -> None:
        """
        Record benchmark metadata (references, metric) for replay to score against.

        As std_msgs/String JSON.
        """
        with self._lock:
            self.writer.write(
                TASK_TOPIC, 'std_msgs/msg/String', {'data': json.dumps(dict(task))}, stamp_ns
            )

    def close(self) -> None:
        with self._lock:
            self.writer.close()

    def __enter__(self) -> 'BagRecorder':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_request_bag(
    path: str | os.PathLike,
    requests: Sequence[Mapping[str, Any]],
    action_name: str = DEFAULT_ACTION_NAME,
    start_ns: Optional[int] = None,
    period_s: float = 0.0,
) -> Path:
    """
    Write a bag of goals to replay (``make-tasks``).

    Each request may carry a ``task`` dict to score with. ``period_s`` spaces the goals'
    timestamps, so ``replay --pace recorded`` releases them periodically.
    """
    start = int(start_ns if start_ns is not None else time.time_ns())
    with BagRecorder(path, action_name=action_name) as rec:
        for i, r in enumerate(requests):
            r = dict(r)
            task = r.pop('task', None)
            gid = (
                r.pop('goal_id', None)
                or uuidlib.uuid5(
                    uuidlib.NAMESPACE_URL, f'timebill-task-{i}-{r.get("prompt", "")[:64]}'
                ).hex
            )
            ns = start + int(i * period_s * 1e9)
            if task is not None:
                rec.record_task(dict(task, goal_id=uuid_hex(gid)), ns)
            rec.record_goal(gid, r, ns)
    return Path(path)
