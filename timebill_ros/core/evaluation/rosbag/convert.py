"""
Plain Python <-> ROS messages: building rosbags messages from dicts and reading them back.

The server records from its callbacks with plain dicts or rclpy messages, and the evaluation
code wants plain dicts back, whichever library wrote the bag. This module is that conversion,
with ROS defaults for missing fields, times from seconds or ``{sec, nanosec}``, and goal ids in
any of the forms they travel in (hex string, UUID, bytes, ``unique_identifier_msgs/UUID``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping
import uuid as uuidlib

_NP = {
    'bool': 'bool',
    'byte': 'uint8',
    'char': 'uint8',
    'uint8': 'uint8',
    'int8': 'int8',
    'uint16': 'uint16',
    'int16': 'int16',
    'uint32': 'uint32',
    'int32': 'int32',
    'uint64': 'uint64',
    'int64': 'int64',
    'float32': 'float32',
    'float64': 'float64',
}
_PY = {'bool': bool, 'string': str, 'wstring': str, 'float32': float, 'float64': float}


def to_dict(msg: Any) -> Any:
    """Turn a rosbags or rclpy message (nested) into plain dicts, lists, numbers, strings."""
    if dataclasses.is_dataclass(msg) and not isinstance(msg, type):
        # rosbags keeps constants (UPPER_CASE) and __msgtype__ as fields; ROS field names are
        # lower case
        return {
            f.name: to_dict(getattr(msg, f.name))
            for f in dataclasses.fields(msg)
            if not f.name.startswith('__') and not f.name.isupper()
        }
    if hasattr(msg, 'get_fields_and_field_types'):  # rclpy message
        return {k: to_dict(getattr(msg, k)) for k in msg.get_fields_and_field_types()}
    if hasattr(msg, 'tolist'):
        return msg.tolist()
    if isinstance(msg, (list, tuple)):
        return [to_dict(v) for v in msg]
    if isinstance(msg, bytes):
        return list(msg)
    return msg


def stamp_fields(ns: int) -> Dict[str, int]:
    """builtin_interfaces Time fields from integer nanoseconds."""
    return {'sec': ns // 1_000_000_000, 'nanosec': ns % 1_000_000_000}


def _time_fields(value: Any) -> Dict[str, int]:
    """builtin_interfaces Time/Duration from seconds (float) or {sec, nanosec}."""
    if isinstance(value, Mapping):
        return {'sec': int(value.get('sec', 0)), 'nanosec': int(value.get('nanosec', 0))}
    return stamp_fields(int(round(float(value) * 1e9)))


def build_msg(store, msgtype: str, value: Any = None):
    """
    Make a rosbags message from a (partial) dict or an rclpy message.

    Missing fields get ROS defaults.
    """
    import numpy as np

    if value is not None and not isinstance(value, Mapping):
        if hasattr(value, '__msgtype__'):
            return value
        value = to_dict(value)
    times = ('builtin_interfaces/msg/Time', 'builtin_interfaces/msg/Duration')
    if msgtype in times and value is not None:
        value = _time_fields(value)
    value = dict(value or {})
    _, fields = store.fielddefs[msgtype]
    unknown = set(value) - {name for name, _ in fields}
    if unknown:
        raise ValueError(f'{msgtype} has no field(s) {sorted(unknown)}')
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
                kwargs[name] = [str(x) for x in items] or ([''] * count if node == 3 else [])
            else:
                kwargs[name] = [build_msg(store, sub_spec, x) for x in items]
    return store.types[msgtype](**kwargs)


def uuid_bytes(goal_id: Any) -> List[int]:
    """Goal id as 16 bytes from a 32-hex string, a UUID, bytes or a list of ints."""
    if isinstance(goal_id, Mapping) and 'uuid' in goal_id:
        goal_id = goal_id['uuid']
    if hasattr(goal_id, 'uuid') and not isinstance(goal_id, uuidlib.UUID):
        goal_id = goal_id.uuid
    if isinstance(goal_id, uuidlib.UUID):
        return list(goal_id.bytes)
    if isinstance(goal_id, str):
        return list(uuidlib.UUID(hex=goal_id).bytes)
    b = list(bytes(bytearray(int(x) for x in goal_id)))
    if len(b) != 16:
        raise ValueError(f'a goal id has 16 bytes, got {len(b)}')
    return b


def uuid_hex(goal_id: Any) -> str:
    return bytes(uuid_bytes(goal_id)).hex()
