"""
Reading bags back: messages, and the requests, results and estimates they recorded.

Reading takes the types from the bag (``AnyReader``), so bags written by other builds or by
``ros2 bag record`` are read without our interface files. Requests are recognised by type,
whatever the topic, in every form a bag may hold them (action introspection events, SendGoal
requests, ``msg/Request``, bare goals), deduplicated by goal id; GetResult requests and responses
are paired by (client gid, sequence number). A bag whose writer died is read through a repaired
temporary copy (``recovery``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
import json
import os
from pathlib import Path
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .convert import to_dict, uuid_hex
from .interfaces import PKG, REQUEST_RECEIVED, REQUEST_SENT, TASK_TOPIC
from .recovery import mcap_file, mcap_is_complete, readable_copy


@dataclass
class BagMessage:
    topic: str
    msgtype: str
    stamp_ns: int
    msg: Any  # rosbags dataclass

    def as_dict(self) -> Dict[str, Any]:
        return to_dict(self.msg)


@contextmanager
def open_bag(path: str | os.PathLike):
    """
    Open an ``AnyReader`` on a bag directory or .mcap file, types taken from the bag.

    A bag without footer or metadata (writer killed) is read through a repaired temporary copy,
    so a bag still being recorded is never modified.
    """
    from rosbags.highlevel import AnyReader, AnyReaderError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'bag not found: {path}')
    mcap = mcap_file(path)
    no_metadata = path.is_dir() and not (path / 'metadata.yaml').exists()
    needs_repair = mcap is not None and (not mcap_is_complete(mcap) or no_metadata)
    if not needs_repair:
        target = path if (path.is_file() or (path / 'metadata.yaml').exists()) else mcap
        try:
            reader = AnyReader([target])
            reader.open()
        except AnyReaderError as exc:
            # ros2 stores rosidl's type hash, which counts a .msg `char` as uint8; rosbags
            # recomputes it from the stored text as char and refuses (e.g.
            # service_msgs/ServiceEventInfo in action recordings). The MCAP file itself carries
            # no hashes: read it directly.
            if 'hash mismatch' not in str(exc) or mcap is None or target == mcap:
                raise
            reader = AnyReader([mcap])
            reader.open()
        try:
            yield reader
        finally:
            reader.close()
        return
    with tempfile.TemporaryDirectory(prefix='timebill-bag-') as tmp:
        fixed = Path(tmp) / mcap.name
        readable_copy(mcap, fixed)
        with AnyReader([fixed]) as reader:
            yield reader


def read_messages(
    path: str | os.PathLike, topics: Optional[Sequence[str]] = None
) -> Iterator[BagMessage]:
    with open_bag(path) as reader:
        conns = [c for c in reader.connections if topics is None or c.topic in topics]
        for conn, ts, raw in reader.messages(connections=conns):
            yield BagMessage(conn.topic, conn.msgtype, ts, reader.deserialize(raw, conn.msgtype))


@dataclass
class RecordedRequest:
    """A request to replay, from whichever form the bag holds it in."""

    request_id: str
    stamp_ns: int
    prompt: str
    system_prompt: str = ''
    budget_s: Optional[float] = None  # relative budget; None: no deadline
    max_new_tokens: int = 0
    overrun_policy: str = ''
    # the goal's JSON schema / Lark grammar ('' = free text, or a bag from before the fields).
    # A msg/Request's prompt already has the schema appended (schema_in_prompt); with_schema is
    # idempotent, so sending it again with its schema does not append it twice.
    json_schema: str = ''
    grammar: str = ''
    task: Optional[Dict[str, Any]] = None  # references / metric, when the bag came from make-tasks
    source: str = ''  # msgtype it was read from


def _duration_s(d: Any) -> float:
    return float(d.sec) + float(d.nanosec) * 1e-9


def _goal_request(goal_id: str, goal: Any, stamp_ns: int, source: str) -> RecordedRequest:
    budget = None
    if hasattr(goal, 'time_budget') and _duration_s(goal.time_budget) > 0:
        budget = _duration_s(goal.time_budget)
    elif hasattr(goal, 'deadline') and _duration_s(goal.deadline) > 0:
        # absolute deadline: from recording time
        budget = max(_duration_s(goal.deadline) - stamp_ns * 1e-9, 0.0)
    return RecordedRequest(
        request_id=goal_id,
        stamp_ns=stamp_ns,
        prompt=goal.prompt,
        system_prompt=getattr(goal, 'system_prompt', ''),
        budget_s=budget,
        max_new_tokens=int(getattr(goal, 'max_new_tokens', 0)),
        overrun_policy=getattr(goal, 'overrun_policy', ''),
        json_schema=getattr(goal, 'json_schema', '') or '',
        grammar=getattr(goal, 'grammar', '') or '',
        source=source,
    )


def _extract(m: BagMessage, index: int) -> List[RecordedRequest]:
    msg = m.msg
    if hasattr(msg, 'info') and hasattr(msg, 'request') and isinstance(msg.request, list):
        # service event
        if int(msg.info.event_type) not in (REQUEST_SENT, REQUEST_RECEIVED) and not msg.request:
            return []
        return [
            _goal_request(uuid_hex(r.goal_id), r.goal, m.stamp_ns, m.msgtype)
            for r in msg.request
            if hasattr(r, 'goal')
        ]
    if hasattr(msg, 'goal_id') and hasattr(msg, 'goal'):  # SendGoal_Request
        return [_goal_request(uuid_hex(msg.goal_id), msg.goal, m.stamp_ns, m.msgtype)]
    if hasattr(msg, 'prompt') and hasattr(msg, 'request_id') and hasattr(msg, 'accepted_at'):
        # msg/Request
        budget = None
        if _duration_s(msg.deadline) > 0:
            budget = max(_duration_s(msg.deadline) - _duration_s(msg.accepted_at), 0.0)
        return [
            RecordedRequest(
                request_id=msg.request_id,
                stamp_ns=m.stamp_ns,
                prompt=msg.prompt,
                system_prompt=msg.system_prompt,
                budget_s=budget,
                max_new_tokens=int(msg.max_new_tokens),
                overrun_policy=msg.overrun_policy,
                json_schema=getattr(msg, 'json_schema', '') or '',
                grammar=getattr(msg, 'grammar', '') or '',
                source=m.msgtype,
            )
        ]
    if hasattr(msg, 'prompt') and hasattr(msg, 'time_budget'):  # a bare Goal
        return [_goal_request(f'goal-{index:06d}', msg, m.stamp_ns, m.msgtype)]
    return []


def read_requests(path: str | os.PathLike) -> List[RecordedRequest]:
    """
    Return every recorded request in time order, deduplicated by id.

    Client and server may both log a request. Recognised by type, whatever the topic:
    ``*_SendGoal_Event`` / ``*_SendGoal_Request`` (ros2 action recording or ours),
    ``timebill_ros/msg/Request`` (the predictor topic), a bare ``*_Goal``. Task metadata on
    ``/timebill/tasks`` is attached by goal id.
    """
    reqs: Dict[str, RecordedRequest] = {}
    tasks: Dict[str, Dict[str, Any]] = {}
    for i, m in enumerate(read_messages(path)):
        if m.topic == TASK_TOPIC or (
            m.msgtype == 'std_msgs/msg/String' and m.topic.endswith('/tasks')
        ):
            try:
                t = json.loads(m.msg.data)
                tasks[str(t.get('goal_id') or t.get('id'))] = t
            except (ValueError, AttributeError):
                pass
            continue
        for r in _extract(m, i):
            reqs.setdefault(r.request_id, r)
    out = sorted(reqs.values(), key=lambda r: r.stamp_ns)
    for r in out:
        r.task = tasks.get(r.request_id)
    return out


def read_results(path: str | os.PathLike) -> Dict[str, Dict[str, Any]]:
    """
    Goal id (32 hex) -> {"status": GoalStatus code, "result": dict, "stamp_ns"}.

    ros2 logs a GetResult request and its response as separate events sharing (client_gid,
    sequence_number); ours holds both in one. Either way they are paired here.
    """
    pending: Dict[Tuple[bytes, int], str] = {}
    responses: Dict[Tuple[bytes, int], Tuple[Any, int]] = {}
    out: Dict[str, Dict[str, Any]] = {}
    for m in read_messages(path):
        msg = m.msg
        if not (m.msgtype.endswith('_GetResult_Event') and hasattr(msg, 'info')):
            continue
        key = (bytes(to_dict(msg.info.client_gid)), int(msg.info.sequence_number))
        if msg.request:
            pending[key] = uuid_hex(msg.request[0].goal_id)
        if msg.response:
            responses[key] = (msg.response[0], m.stamp_ns)
        if key in pending and key in responses:
            resp, ns = responses.pop(key)
            out[pending.pop(key)] = {
                'status': int(resp.status),
                'result': to_dict(resp.result),
                'stamp_ns': ns,
            }
    return out


def read_estimates(path: str | os.PathLike) -> List[Dict[str, Any]]:
    return [
        dict(m.as_dict(), stamp_ns=m.stamp_ns)
        for m in read_messages(path)
        if m.msgtype == f'{PKG}/msg/Estimate'
    ]
