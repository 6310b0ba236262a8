"""rosbag2 (MCAP) recording and reading of TimeBill requests, estimates and results — no ROS needed.

``rosbag2_py`` is not installable here, so bags are written with the pure-Python ``rosbags``
library; its bags are byte-compatible with ``ros2 bag``. Choices that matter:

- **Types come from our own interface files.** ``msg/*.msg`` and ``action/*.action`` are parsed and registered the way rosidl names them: an action's parts
  become ``timebill_ros/action/TimedInference_Goal`` (``_Result``, ``_Feedback``) and its
  internal services ``_SendGoal_Request/_Response/_Event`` and ``_GetResult_*``.
- **Goals and results are recorded as ros2 records actions** (action introspection, Jazzy+):
  ``<action>/_action/send_goal/_service_event`` and ``.../get_result/_service_event``. So a bag
  from ``ros2 bag record`` and one of ours are read by the same code, and each result carries
  its goal id.
- **Nothing is lost on a crash.** rosbags buffers messages in 1 MiB chunks and writes the
  index only on close; our writer writes every message unchunked, straight to the file, and
  flushes it. A bag whose writer died (no footer, no ``metadata.yaml``) is read by scanning
  its complete records (``recover``), like ``ros2 bag reindex``.
- **Reading takes types from the bag** (``AnyReader``), so bags written by other builds or
  by ``ros2 bag record`` are read without our interface files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
import time
import uuid as uuidlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

PKG = "timebill_ros"
ACTION = "TimedInference"
DEFAULT_ACTION_NAME = "/timed_inference"  # the server's action (nodes/common.py ACTION_TIMED_INFERENCE)
DEFAULT_ESTIMATE_TOPIC = "/timebill/estimates"
TASK_TOPIC = "/timebill/tasks"  # std_msgs/String JSON: the task's references and metric

# action_msgs/GoalStatus values a GetResult response carries
GOAL_STATUS = {"unknown": 0, "accepted": 1, "executing": 2, "canceling": 3, "succeeded": 4, "canceled": 5,
               "aborted": 6}
# service_msgs/ServiceEventInfo.event_type
REQUEST_SENT, REQUEST_RECEIVED, RESPONSE_SENT, RESPONSE_RECEIVED = 0, 1, 2, 3

MAGIC = b"\x89MCAP0\r\n"


# =========================================================================================== types
def interface_root() -> Path:
    """The folder holding ``msg/``, ``action/``: the source tree, else an installed share dir."""
    candidates = [Path(__file__).resolve().parents[3]]
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            candidates.append(Path(prefix) / "share" / PKG)
    for c in candidates:
        if (c / "action" / f"{ACTION}.action").is_file():
            return c
    raise FileNotFoundError(f"cannot find {PKG}'s action/{ACTION}.action (looked in {[str(c) for c in candidates]})")


_FIELD_RE = re.compile(r"^(\s*)([A-Z][A-Za-z0-9_]*)(\s*(?:\[[^\]]*\])?\s+[A-Za-z_])", re.M)


def _qualify(text: str, local_msgs: Sequence[str]) -> str:
    """Bare ``Request`` inside an action/srv means ``timebill_ros/msg/Request`` (rosidl's rule).

    rosbags would resolve it next to the owner (``timebill_ros/action/Request``), so spell it out.
    """
    return _FIELD_RE.sub(lambda m: f"{m.group(1)}{PKG}/{m.group(2)}{m.group(3)}"
                         if m.group(2) in local_msgs else m.group(0), text)


def _split(text: str, parts: int, what: str) -> List[str]:
    sections: List[List[str]] = [[]]
    for line in text.splitlines():
        if line.strip() == "---":
            sections.append([])
        else:
            sections[-1].append(line)
    if len(sections) != parts:
        raise ValueError(f"{what}: expected {parts} sections separated by '---', found {len(sections)}")
    return ["\n".join(s) + "\n" for s in sections]


def interface_definitions(root: Optional[Path] = None) -> Dict[str, str]:
    """msg text per ROS 2 type name, for every message and action part of the package.

    (Services are left out: rosbags names types only under ``msg/`` and ``action/``, and only
    topics are recorded.)
    """
    root = Path(root) if root else interface_root()
    msgs = {p.stem: p.read_text() for p in sorted((root / "msg").glob("*.msg"))}
    local = list(msgs)
    defs = {f"{PKG}/msg/{name}": _qualify(text, local) for name, text in msgs.items()}
    for p in sorted((root / "action").glob("*.action")):
        goal, result, feedback = _split(p.read_text(), 3, str(p))
        a = f"{PKG}/action/{p.stem}"
        defs[f"{a}_Goal"], defs[f"{a}_Result"], defs[f"{a}_Feedback"] = (
            _qualify(goal, local), _qualify(result, local), _qualify(feedback, local))
        defs[f"{a}_SendGoal_Request"] = f"unique_identifier_msgs/UUID goal_id\n{a}_Goal goal\n"
        defs[f"{a}_SendGoal_Response"] = "bool accepted\nbuiltin_interfaces/Time stamp\n"
        defs[f"{a}_GetResult_Request"] = "unique_identifier_msgs/UUID goal_id\n"
        defs[f"{a}_GetResult_Response"] = f"int8 status\n{a}_Result result\n"
        defs[f"{a}_FeedbackMessage"] = f"unique_identifier_msgs/UUID goal_id\n{a}_Feedback feedback\n"
        for svc in ("SendGoal", "GetResult"):
            defs[f"{a}_{svc}_Event"] = (f"service_msgs/ServiceEventInfo info\n{a}_{svc}_Request[<=1] request\n"
                                        f"{a}_{svc}_Response[<=1] response\n")
    return defs


def _type_ref(name: str) -> str:
    """How a field names a type in msg text: ``pkg/Type`` for messages, in full for action parts."""
    pkg, kind, base = name.split("/")
    return f"{pkg}/{base}" if kind == "msg" else name


def message_definition(store, msgtype: str) -> str:
    """The ros2msg text rosbag2 stores for a connection: the type, then each dependency once.

    rosbags' own generator only handles ``pkg/msg/*`` dependencies; action parts nest
    ``pkg/action/*`` types (a SendGoal event holds the Goal), so this walks the fields itself.
    """
    order: List[str] = []

    def text(name: str) -> str:
        consts, fields = store.fielddefs[name]
        lines = [f"{ctype} {cname}={cval}" for cname, ctype, cval in consts]
        for fname, (node, spec) in fields:
            if node == 1:
                typ = spec[0] if spec[0] != "string" or not spec[1] else f"string<={spec[1]}"
                lines.append(f"{typ} {fname}")
                continue
            if node == 2:
                sub, suffix = spec, ""
            else:
                (sub_node, sub_spec), count = spec
                suffix = "[]" if not count else (f"[{count}]" if node == 3 else f"[<={count}]")
                if sub_node == 1:
                    lines.append(f"{sub_spec[0]}{suffix} {fname}")
                    continue
                sub = sub_spec
            if sub not in order:
                order.append(sub)
            lines.append(f"{_type_ref(sub)}{suffix} {fname}")
        return "\n".join(lines) + "\n"

    parts = [text(msgtype)]
    i = 0
    while i < len(order):  # breadth-first; `order` grows while walking
        name = order[i]
        parts.append(f"{'=' * 80}\nMSG: {_type_ref(name)}\n{text(name)}")
        i += 1
    return "".join(parts)


# rosidl hashes a .msg ``char`` as uint8; rosbags hashes it as char, so its ServiceEventInfo (char[16]
# client_gid) gets a type hash that differs from ROS's. Spelled as uint8 it matches the ROS install.
_SERVICE_EVENT_INFO = """uint8 REQUEST_SENT=0
uint8 REQUEST_RECEIVED=1
uint8 RESPONSE_SENT=2
uint8 RESPONSE_RECEIVED=3
uint8 event_type
builtin_interfaces/Time stamp
uint8[16] client_gid
int64 sequence_number
"""


def typestore(root: Optional[Path] = None):
    """A ROS 2 Kilted typestore with the package's interfaces registered (type hashes as ROS computes them)."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    base = get_typestore(Stores.ROS2_KILTED)
    store = get_typestore(Stores.EMPTY)
    types: Dict[str, Any] = {k: v for k, v in base.fielddefs.items() if k != "service_msgs/msg/ServiceEventInfo"}
    types.update(get_types_from_msg(_SERVICE_EVENT_INFO, "service_msgs/msg/ServiceEventInfo"))
    for name, text in interface_definitions(root).items():
        types.update(get_types_from_msg(text, name))
    store.register(types)
    return store


# ================================================================================ dict <-> message
_NP = {"bool": "bool", "byte": "uint8", "char": "uint8", "uint8": "uint8", "int8": "int8", "uint16": "uint16",
       "int16": "int16", "uint32": "uint32", "int32": "int32", "uint64": "uint64", "int64": "int64",
       "float32": "float32", "float64": "float64"}
_PY = {"bool": bool, "string": str, "wstring": str, "float32": float, "float64": float}


def to_dict(msg: Any) -> Any:
    """A rosbags or rclpy message (nested) as plain Python: dicts, lists, numbers, strings."""
    if dataclasses.is_dataclass(msg) and not isinstance(msg, type):
        # rosbags keeps constants (UPPER_CASE) and __msgtype__ as fields; ROS field names are lower case
        return {f.name: to_dict(getattr(msg, f.name)) for f in dataclasses.fields(msg)
                if not f.name.startswith("__") and not f.name.isupper()}
    if hasattr(msg, "get_fields_and_field_types"):  # rclpy message
        return {k: to_dict(getattr(msg, k)) for k in msg.get_fields_and_field_types()}
    if hasattr(msg, "tolist"):
        return msg.tolist()
    if isinstance(msg, (list, tuple)):
        return [to_dict(v) for v in msg]
    if isinstance(msg, bytes):
        return list(msg)
    return msg


def _time_fields(value: Any) -> Dict[str, int]:
    """builtin_interfaces Time/Duration from seconds (float) or {sec, nanosec}."""
    if isinstance(value, Mapping):
        return {"sec": int(value.get("sec", 0)), "nanosec": int(value.get("nanosec", 0))}
    ns = int(round(float(value) * 1e9))
    return {"sec": ns // 1_000_000_000, "nanosec": ns % 1_000_000_000}


def build_msg(store, msgtype: str, value: Any = None):
    """Make a rosbags message from a (partial) dict or an rclpy message; missing fields get ROS defaults."""
    import numpy as np

    if value is not None and not isinstance(value, Mapping):
        if hasattr(value, "__msgtype__"):
            return value
        value = to_dict(value)
    if msgtype in ("builtin_interfaces/msg/Time", "builtin_interfaces/msg/Duration") and value is not None:
        value = _time_fields(value)
    value = dict(value or {})
    _, fields = store.fielddefs[msgtype]
    unknown = set(value) - {name for name, _ in fields}
    if unknown:
        raise ValueError(f"{msgtype} has no field(s) {sorted(unknown)}")
    kwargs = {}
    for name, (node, spec) in fields:
        v = value.get(name)
        if node == 1:  # base type
            typ = spec[0]
            kwargs[name] = _PY.get(typ, int)(v) if v is not None else _PY.get(typ, int)()
        elif node == 2:  # nested message
            kwargs[name] = build_msg(store, spec, v)
        else:  # array (3) / sequence (4)
            (sub_node, sub_spec), count = spec
            items = list(v) if v is not None else []
            if sub_node == 1 and sub_spec[0] in _NP:
                if node == 3 and not items:
                    items = [0] * count
                kwargs[name] = np.array(items, dtype=_NP[sub_spec[0]])
            elif sub_node == 1:
                kwargs[name] = [str(x) for x in items] or ([""] * count if node == 3 else [])
            else:
                kwargs[name] = [build_msg(store, sub_spec, x) for x in items]
    return store.types[msgtype](**kwargs)


def uuid_bytes(goal_id: Any) -> List[int]:
    """Goal id as 16 bytes from a 32-hex string, a UUID, bytes or a list of ints."""
    if isinstance(goal_id, Mapping) and "uuid" in goal_id:
        goal_id = goal_id["uuid"]
    if hasattr(goal_id, "uuid") and not isinstance(goal_id, uuidlib.UUID):
        goal_id = goal_id.uuid
    if isinstance(goal_id, uuidlib.UUID):
        return list(goal_id.bytes)
    if isinstance(goal_id, str):
        return list(uuidlib.UUID(hex=goal_id).bytes)
    b = list(bytes(bytearray(int(x) for x in goal_id)))
    if len(b) != 16:
        raise ValueError(f"a goal id has 16 bytes, got {len(b)}")
    return b


def uuid_hex(goal_id: Any) -> str:
    return bytes(uuid_bytes(goal_id)).hex()


# ========================================================================================== writing
@lru_cache(maxsize=1)
def _flushing_mcap_writer():
    """rosbags' MCAP storage writer, but every record goes to the file at once and is flushed.

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
            fmt = "ros2msg" if connection.msgdef.format == sm.MessageDefinitionFormat.MSG else "ros2idl"
            self.schemas.append(sm.Schema(len(self.schemas) + 1, connection.msgtype, fmt, connection.msgdef.data))
            sm.write_schema(self.bio, self.schemas[-1])
            self._sync()

        def add_connection(self, connection, offered_qos_profiles: str) -> None:
            meta = sm.BytesIO()
            sm.write_string(meta, "offered_qos_profiles")
            sm.write_string(meta, offered_qos_profiles)
            self.channels.append(sm.Channel(connection.id, connection.msgtype, connection.topic,
                                            connection.ext.serialization_format, meta.getvalue()))
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
    """A rosbag2 MCAP bag, written message by message, readable up to the last one after a crash."""

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
        ns = int(stamp_ns) if stamp_ns is not None else time.time_ns()
        self._last_ns = max(ns, self._last_ns)
        return self._last_ns

    def write(self, topic: str, msgtype: str, value: Any, stamp_ns: Optional[int] = None) -> int:
        key = (topic, msgtype)
        if key not in self._conns:
            self._conns[key] = self._writer.add_connection(
                topic, msgtype, msgdef=message_definition(self.store, msgtype), rihs01=self.store.hash_rihs01(msgtype))
        msg = build_msg(self.store, msgtype, value)
        ns = self._stamp(stamp_ns)
        self._writer.write(self._conns[key], ns, self.store.serialize_cdr(msg, msgtype))
        return ns

    def close(self) -> None:
        if self._writer.storage is not None:
            self._writer.close()

    def __enter__(self) -> "BagWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BagRecorder:
    """What the server records: every goal, estimate and result, in ros2's action-introspection form.

    Call from the server's callbacks with plain dicts (or rclpy messages):
        rec = BagRecorder(cfg.record_bag)
        rec.record_goal(goal_id, {"prompt": ..., "time_budget": 2.5, ...})   # on acceptance
        rec.record_estimate({"request_id": ..., "predicted_length": ..., ...})
        rec.record_result(goal_id, {"text": ..., "status": ..., ...}, status="succeeded")
        rec.close()   # on shutdown; a crash loses nothing already recorded
    Thread-safe: the server's callbacks run on several executor threads.
    """

    def __init__(self, path: str | os.PathLike, action_name: str = DEFAULT_ACTION_NAME,
                 estimate_topic: str = DEFAULT_ESTIMATE_TOPIC, fsync: bool = False, store=None):
        import threading

        self.action_name = action_name.rstrip("/")
        self.estimate_topic = estimate_topic
        self._lock = threading.Lock()
        self._seq = 0
        self._gid = list(uuidlib.uuid4().bytes)  # this recorder stands in for the client gid
        self.writer = BagWriter(path, store=store, fsync=fsync)
        self.path = self.writer.path

    @property
    def goal_topic(self) -> str:
        return f"{self.action_name}/_action/send_goal/_service_event"

    @property
    def result_topic(self) -> str:
        return f"{self.action_name}/_action/get_result/_service_event"

    def _info(self, event_type: int, stamp_ns: int) -> Dict[str, Any]:
        self._seq += 1
        return {"event_type": event_type, "stamp": {"sec": stamp_ns // 10**9, "nanosec": stamp_ns % 10**9},
                "client_gid": self._gid, "sequence_number": self._seq}

    def record_goal(self, goal_id: Any, goal: Any, stamp_ns: Optional[int] = None, accepted: bool = True) -> None:
        """One event holding the SendGoal request (id + goal) and the server's response."""
        ns = int(stamp_ns) if stamp_ns is not None else time.time_ns()
        goal = to_dict(goal) if not isinstance(goal, Mapping) else dict(goal)
        with self._lock:
            self.writer.write(self.goal_topic, f"{PKG}/action/{ACTION}_SendGoal_Event", {
                "info": self._info(REQUEST_RECEIVED, ns),
                "request": [{"goal_id": {"uuid": uuid_bytes(goal_id)}, "goal": goal}],
                "response": [{"accepted": accepted, "stamp": {"sec": ns // 10**9, "nanosec": ns % 10**9}}],
            }, ns)

    def record_estimate(self, estimate: Any, stamp_ns: Optional[int] = None) -> None:
        with self._lock:
            self.writer.write(self.estimate_topic, f"{PKG}/msg/Estimate", estimate, stamp_ns)

    def record_result(self, goal_id: Any, result: Any, status: Any = "succeeded",
                      stamp_ns: Optional[int] = None) -> None:
        """One event holding the GetResult request (goal id) and response (status + result)."""
        ns = int(stamp_ns) if stamp_ns is not None else time.time_ns()
        code = GOAL_STATUS[status] if isinstance(status, str) else int(status)
        with self._lock:
            self.writer.write(self.result_topic, f"{PKG}/action/{ACTION}_GetResult_Event", {
                "info": self._info(RESPONSE_SENT, ns),
                "request": [{"goal_id": {"uuid": uuid_bytes(goal_id)}}],
                "response": [{"status": code, "result": result}],
            }, ns)

    def record_task(self, task: Mapping[str, Any], stamp_ns: Optional[int] = None) -> None:
        """Benchmark metadata (references, metric) for replay to score against; std_msgs/String JSON."""
        with self._lock:
            self.writer.write(TASK_TOPIC, "std_msgs/msg/String", {"data": json.dumps(dict(task))}, stamp_ns)

    def close(self) -> None:
        with self._lock:
            self.writer.close()

    def __enter__(self) -> "BagRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ================================================================================= crash recovery
def _mcap_file(path: Path) -> Optional[Path]:
    if path.is_file():
        return path if path.suffix == ".mcap" else None
    files = sorted(path.glob("*.mcap"))
    return files[0] if len(files) == 1 else None


def mcap_is_complete(path: Path) -> bool:
    """True when the file ends with an MCAP footer (its writer closed it)."""
    size = path.stat().st_size
    if size < 8 + 37:
        return False
    with path.open("rb") as fh:
        fh.seek(-37, 2)
        tail = fh.read(37)
    return tail[-8:] == MAGIC and tail[0] == 0x02


def valid_prefix(path: Path) -> int:
    """Byte length of the header plus every complete record before the first torn one."""
    with path.open("rb") as fh:
        data = fh.read()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not an MCAP file (bad magic)")
    pos, end = len(MAGIC), len(data)
    while pos + 9 <= end:
        op = data[pos]
        (length,) = struct.unpack_from("<Q", data, pos + 1)
        if op == 0 or pos + 9 + length > end:
            break
        pos += 9 + length
        if op in (0x0F, 0x02):  # data end / footer: the rest is the summary
            break
    return pos


def _footer_bytes() -> bytes:
    data_end = bytes([0x0F]) + struct.pack("<Q", 4) + struct.pack("<I", 0)
    footer = bytes([0x02]) + struct.pack("<Q", 20) + struct.pack("<QQI", 0, 0, 0)
    return data_end + footer + MAGIC


def _repaired_copy(src: Path, dst: Path) -> None:
    n = valid_prefix(src)
    with src.open("rb") as fi, dst.open("wb") as fo:
        fo.write(fi.read(n))
        fo.write(_footer_bytes())


def recover(path: str | os.PathLike) -> Path:
    """Make a bag whose writer died readable in place (like ``ros2 bag reindex``).

    Keeps every complete record, appends a footer and writes ``metadata.yaml``. Returns the bag
    directory. Idempotent: a complete bag is left as it is.
    """
    path = Path(path)
    mcap = _mcap_file(path)
    if mcap is None:
        raise FileNotFoundError(f"no single .mcap file in {path}")
    bagdir = mcap.parent
    if not mcap_is_complete(mcap):
        tmp = mcap.with_suffix(".mcap.recovering")
        _repaired_copy(mcap, tmp)
        tmp.replace(mcap)
    if not (bagdir / "metadata.yaml").exists():
        _write_metadata(mcap)
    return bagdir


def _write_metadata(mcap: Path) -> None:
    from rosbags.highlevel import AnyReader
    from ruamel.yaml import YAML

    with AnyReader([mcap]) as reader:
        counts: Dict[int, int] = {}
        start, stop, total = 2**63 - 1, 0, 0
        for conn, ts, _ in reader.messages():
            counts[conn.id] = counts.get(conn.id, 0) + 1
            start, stop, total = min(start, ts), max(stop, ts), total + 1
        topics = [{"topic_metadata": {"name": c.topic, "type": c.msgtype, "serialization_format": "cdr",
                                      "offered_qos_profiles": [], "type_description_hash":
                                          reader.typestore.hash_rihs01(c.msgtype)},
                   "message_count": counts.get(c.id, 0)} for c in reader.connections]
    start = start if total else 0
    info = {"version": 9, "storage_identifier": "mcap", "relative_file_paths": [mcap.name],
            "duration": {"nanoseconds": max(0, stop - start)}, "starting_time": {"nanoseconds_since_epoch": start},
            "message_count": total, "topics_with_message_count": topics, "compression_format": "",
            "compression_mode": "", "files": [{"path": mcap.name, "starting_time": {"nanoseconds_since_epoch": start},
                                               "duration": {"nanoseconds": max(0, stop - start)},
                                               "message_count": total}],
            "custom_data": None, "ros_distro": "rosbags"}
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    with (mcap.parent / "metadata.yaml").open("w") as fh:
        yaml.dump({"rosbag2_bagfile_information": info}, fh)


# ========================================================================================== reading
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
    """An open ``AnyReader`` on a bag directory or .mcap file, types taken from the bag.

    A bag without footer or metadata (writer killed) is read through a repaired temporary copy,
    so a bag still being recorded is never modified.
    """
    from rosbags.highlevel import AnyReader, AnyReaderError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bag not found: {path}")
    mcap = _mcap_file(path)
    needs_repair = mcap is not None and (not mcap_is_complete(mcap) or
                                         (path.is_dir() and not (path / "metadata.yaml").exists()))
    if not needs_repair:
        target = path if (path.is_file() or (path / "metadata.yaml").exists()) else mcap
        try:
            reader = AnyReader([target])
            reader.open()
        except AnyReaderError as exc:
            # ros2 stores rosidl's type hash, which counts a .msg `char` as uint8; rosbags recomputes it
            # from the stored text as char and refuses (e.g. service_msgs/ServiceEventInfo in action
            # recordings). The MCAP file itself carries no hashes: read it directly.
            if "hash mismatch" not in str(exc) or mcap is None or target == mcap:
                raise
            reader = AnyReader([mcap])
            reader.open()
        try:
            yield reader
        finally:
            reader.close()
        return
    with tempfile.TemporaryDirectory(prefix="timebill-bag-") as tmp:
        fixed = Path(tmp) / mcap.name
        if mcap_is_complete(mcap):
            shutil.copyfile(mcap, fixed)
        else:
            _repaired_copy(mcap, fixed)
        with AnyReader([fixed]) as reader:
            yield reader


def read_messages(path: str | os.PathLike, topics: Optional[Sequence[str]] = None) -> Iterator[BagMessage]:
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
    system_prompt: str = ""
    budget_s: Optional[float] = None  # relative budget; None: no deadline
    max_new_tokens: int = 0
    overrun_policy: str = ""
    task: Optional[Dict[str, Any]] = None  # references / metric, when the bag came from make-tasks
    source: str = ""  # msgtype it was read from


def _duration_s(d: Any) -> float:
    return float(d.sec) + float(d.nanosec) * 1e-9


def _goal_request(goal_id: str, goal: Any, stamp_ns: int, source: str) -> RecordedRequest:
    budget = None
    if hasattr(goal, "time_budget") and _duration_s(goal.time_budget) > 0:
        budget = _duration_s(goal.time_budget)
    elif hasattr(goal, "deadline") and _duration_s(goal.deadline) > 0:
        budget = max(_duration_s(goal.deadline) - stamp_ns * 1e-9, 0.0)  # absolute deadline: from recording time
    return RecordedRequest(request_id=goal_id, stamp_ns=stamp_ns, prompt=goal.prompt,
                           system_prompt=getattr(goal, "system_prompt", ""), budget_s=budget,
                           max_new_tokens=int(getattr(goal, "max_new_tokens", 0)),
                           overrun_policy=getattr(goal, "overrun_policy", ""), source=source)


def _extract(m: BagMessage, index: int) -> List[RecordedRequest]:
    msg = m.msg
    if hasattr(msg, "info") and hasattr(msg, "request") and isinstance(msg.request, list):  # service event
        if int(msg.info.event_type) not in (REQUEST_SENT, REQUEST_RECEIVED) and not msg.request:
            return []
        return [_goal_request(uuid_hex(r.goal_id), r.goal, m.stamp_ns, m.msgtype)
                for r in msg.request if hasattr(r, "goal")]
    if hasattr(msg, "goal_id") and hasattr(msg, "goal"):  # SendGoal_Request
        return [_goal_request(uuid_hex(msg.goal_id), msg.goal, m.stamp_ns, m.msgtype)]
    if hasattr(msg, "prompt") and hasattr(msg, "request_id") and hasattr(msg, "accepted_at"):  # msg/Request
        budget = None
        if _duration_s(msg.deadline) > 0:
            budget = max(_duration_s(msg.deadline) - _duration_s(msg.accepted_at), 0.0)
        return [RecordedRequest(request_id=msg.request_id, stamp_ns=m.stamp_ns, prompt=msg.prompt,
                                system_prompt=msg.system_prompt, budget_s=budget,
                                max_new_tokens=int(msg.max_new_tokens), overrun_policy=msg.overrun_policy,
                                source=m.msgtype)]
    if hasattr(msg, "prompt") and hasattr(msg, "time_budget"):  # a bare Goal
        return [_goal_request(f"goal-{index:06d}", msg, m.stamp_ns, m.msgtype)]
    return []


def read_requests(path: str | os.PathLike) -> List[RecordedRequest]:
    """Every recorded request in time order, deduplicated by id (client and server may both log it).

    Recognised by type, whatever the topic: ``*_SendGoal_Event`` / ``*_SendGoal_Request`` (ros2
    action recording or ours), ``timebill_ros/msg/Request`` (the predictor topic), a bare ``*_Goal``.
    Task metadata on ``/timebill/tasks`` is attached by goal id.
    """
    reqs: Dict[str, RecordedRequest] = {}
    tasks: Dict[str, Dict[str, Any]] = {}
    for i, m in enumerate(read_messages(path)):
        if m.topic == TASK_TOPIC or (m.msgtype == "std_msgs/msg/String" and m.topic.endswith("/tasks")):
            try:
                t = json.loads(m.msg.data)
                tasks[str(t.get("goal_id") or t.get("id"))] = t
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
    """goal id (32 hex) -> {"status": GoalStatus code, "result": dict, "stamp_ns"}.

    ros2 logs a GetResult request and its response as separate events sharing (client_gid,
    sequence_number); ours holds both in one. Either way they are paired here.
    """
    pending: Dict[Tuple[bytes, int], str] = {}
    responses: Dict[Tuple[bytes, int], Tuple[Any, int]] = {}
    out: Dict[str, Dict[str, Any]] = {}
    for m in read_messages(path):
        msg = m.msg
        if not (m.msgtype.endswith("_GetResult_Event") and hasattr(msg, "info")):
            continue
        key = (bytes(to_dict(msg.info.client_gid)), int(msg.info.sequence_number))
        if msg.request:
            pending[key] = uuid_hex(msg.request[0].goal_id)
        if msg.response:
            responses[key] = (msg.response[0], m.stamp_ns)
        if key in pending and key in responses:
            resp, ns = responses.pop(key)
            out[pending.pop(key)] = {"status": int(resp.status), "result": to_dict(resp.result), "stamp_ns": ns}
    return out


def read_estimates(path: str | os.PathLike) -> List[Dict[str, Any]]:
    return [dict(m.as_dict(), stamp_ns=m.stamp_ns) for m in read_messages(path)
            if m.msgtype == f"{PKG}/msg/Estimate"]


def write_request_bag(path: str | os.PathLike, requests: Sequence[Mapping[str, Any]],
                      action_name: str = DEFAULT_ACTION_NAME, start_ns: Optional[int] = None,
                      period_s: float = 0.0) -> Path:
    """A bag of goals to replay (``make-tasks``); each request may carry a ``task`` dict to score with.

    ``period_s`` spaces the goals' timestamps, so ``replay --pace recorded`` releases them periodically.
    """
    start = int(start_ns if start_ns is not None else time.time_ns())
    with BagRecorder(path, action_name=action_name) as rec:
        for i, r in enumerate(requests):
            r = dict(r)
            task = r.pop("task", None)
            gid = r.pop("goal_id", None) or uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"timebill-task-{i}-{r.get('prompt', '')[:64]}").hex
            ns = start + int(i * period_s * 1e9)
            if task is not None:
                rec.record_task(dict(task, goal_id=uuid_hex(gid)), ns)
            rec.record_goal(gid, r, ns)
    return Path(path)
