"""
The package's ROS 2 interfaces as a rosbags typestore, and the names the recordings use.

Bags are written with the pure-Python ``rosbags`` library (``rosbag2_py`` is not installable
here), so the types come from our own interface files: ``msg/*.msg`` and ``action/*.action``
are parsed and registered the way rosidl names them. An action's parts become
``timebill_ros/action/TimedInference_Goal`` (``_Result``, ``_Feedback``) and its internal
services ``_SendGoal_Request/_Response/_Event`` and ``_GetResult_*``, with type hashes as a ROS
install computes them, so our bags and ``ros2 bag``'s are interchangeable. The topic names and
status codes that writer and reader share live here too.
"""

from __future__ import annotations

import os
from pathlib import Path
import re
from typing import Any, Dict, List, Optional, Sequence

PKG = 'timebill_ros'
ACTION = 'TimedInference'
# the server's action (nodes/qos.py ACTION_TIMED_INFERENCE)
DEFAULT_ACTION_NAME = '/timed_inference'
DEFAULT_ESTIMATE_TOPIC = '/timebill/estimates'
TASK_TOPIC = '/timebill/tasks'  # std_msgs/String JSON: the task's references and metric

# action_msgs/GoalStatus values a GetResult response carries
GOAL_STATUS = {
    'unknown': 0,
    'accepted': 1,
    'executing': 2,
    'canceling': 3,
    'succeeded': 4,
    'canceled': 5,
    'aborted': 6,
}
# service_msgs/ServiceEventInfo.event_type
REQUEST_SENT, REQUEST_RECEIVED, RESPONSE_SENT, RESPONSE_RECEIVED = 0, 1, 2, 3


def interface_root() -> Path:
    """Find the folder with ``msg/``, ``action/``: the source tree, else an installed share dir."""
    # the repository root: rosbag/ -> evaluation/ -> core/ -> timebill_ros/ -> root
    candidates = [Path(__file__).resolve().parents[4]]
    for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        if prefix:
            candidates.append(Path(prefix) / 'share' / PKG)
    for c in candidates:
        if (c / 'action' / f'{ACTION}.action').is_file():
            return c
    raise FileNotFoundError(
        f"cannot find {PKG}'s action/{ACTION}.action (looked in {[str(c) for c in candidates]})"
    )


_FIELD_RE = re.compile(r'^(\s*)([A-Z][A-Za-z0-9_]*)(\s*(?:\[[^\]]*\])?\s+[A-Za-z_])', re.M)


def _qualify(text: str, local_msgs: Sequence[str]) -> str:
    """
    Bare ``Request`` inside an action/srv means ``timebill_ros/msg/Request`` (rosidl's rule).

    rosbags would resolve it next to the owner (``timebill_ros/action/Request``), so spell it out.
    """
    return _FIELD_RE.sub(
        lambda m: (
            f'{m.group(1)}{PKG}/{m.group(2)}{m.group(3)}'
            if m.group(2) in local_msgs
            else m.group(0)
        ),
        text,
    )


def _split(text: str, parts: int, what: str) -> List[str]:
    sections: List[List[str]] = [[]]
    for line in text.splitlines():
        if line.strip() == '---':
            sections.append([])
        else:
            sections[-1].append(line)
    if len(sections) != parts:
        raise ValueError(
            f"{what}: expected {parts} sections separated by '---', found {len(sections)}"
        )
    return ['\n'.join(s) + '\n' for s in sections]


def interface_definitions(root: Optional[Path] = None) -> Dict[str, str]:
    """
    Msg text per ROS 2 type name, for every message and action part of the package.

    (Services are left out: rosbags names types only under ``msg/`` and ``action/``, and only
    topics are recorded.)
    """
    root = Path(root) if root else interface_root()
    msgs = {p.stem: p.read_text() for p in sorted((root / 'msg').glob('*.msg'))}
    local = list(msgs)
    defs = {f'{PKG}/msg/{name}': _qualify(text, local) for name, text in msgs.items()}
    for p in sorted((root / 'action').glob('*.action')):
        goal, result, feedback = _split(p.read_text(), 3, str(p))
        a = f'{PKG}/action/{p.stem}'
        defs[f'{a}_Goal'], defs[f'{a}_Result'], defs[f'{a}_Feedback'] = (
            _qualify(goal, local),
            _qualify(result, local),
            _qualify(feedback, local),
        )
        defs[f'{a}_SendGoal_Request'] = f'unique_identifier_msgs/UUID goal_id\n{a}_Goal goal\n'
        defs[f'{a}_SendGoal_Response'] = 'bool accepted\nbuiltin_interfaces/Time stamp\n'
        defs[f'{a}_GetResult_Request'] = 'unique_identifier_msgs/UUID goal_id\n'
        defs[f'{a}_GetResult_Response'] = f'int8 status\n{a}_Result result\n'
        defs[f'{a}_FeedbackMessage'] = (
            f'unique_identifier_msgs/UUID goal_id\n{a}_Feedback feedback\n'
        )
        for svc in ('SendGoal', 'GetResult'):
            defs[f'{a}_{svc}_Event'] = (
                f'service_msgs/ServiceEventInfo info\n'
                f'{a}_{svc}_Request[<=1] request\n'
                f'{a}_{svc}_Response[<=1] response\n'
            )
    return defs


def _type_ref(name: str) -> str:
    """
    Name a type as a field does in msg text.

    ``pkg/Type`` for messages, in full for action parts.
    """
    pkg, kind, base = name.split('/')
    return f'{pkg}/{base}' if kind == 'msg' else name


def message_definition(store, msgtype: str) -> str:
    """
    Write the ros2msg text rosbag2 stores for a connection: the type, then each dependency once.

    rosbags' own generator only handles ``pkg/msg/*`` dependencies; action parts nest
    ``pkg/action/*`` types (a SendGoal event holds the Goal), so this walks the fields itself.
    """
    order: List[str] = []

    def text(name: str) -> str:
        consts, fields = store.fielddefs[name]
        lines = [f'{ctype} {cname}={cval}' for cname, ctype, cval in consts]
        for fname, (node, spec) in fields:
            if node == 1:
                typ = spec[0] if spec[0] != 'string' or not spec[1] else f'string<={spec[1]}'
                lines.append(f'{typ} {fname}')
                continue
            if node == 2:
                sub, suffix = spec, ''
            else:
                (sub_node, sub_spec), count = spec
                suffix = '[]' if not count else (f'[{count}]' if node == 3 else f'[<={count}]')
                if sub_node == 1:
                    lines.append(f'{sub_spec[0]}{suffix} {fname}')
                    continue
                sub = sub_spec
            if sub not in order:
                order.append(sub)
            lines.append(f'{_type_ref(sub)}{suffix} {fname}')
        return '\n'.join(lines) + '\n'

    parts = [text(msgtype)]
    i = 0
    while i < len(order):  # breadth-first; `order` grows while walking
        name = order[i]
        parts.append(f'{"=" * 80}\nMSG: {_type_ref(name)}\n{text(name)}')
        i += 1
    return ''.join(parts)


# rosidl hashes a .msg ``char`` as uint8; rosbags hashes it as char, so its ServiceEventInfo
# (char[16] client_gid) gets a type hash that differs from ROS's. Spelled as uint8 it matches the
# ROS install.
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
    """
    Return a ROS 2 Kilted typestore with the package's interfaces registered.

    Type hashes are as ROS computes them.
    """
    from rosbags.typesys import get_types_from_msg, get_typestore, Stores

    base = get_typestore(Stores.ROS2_KILTED)
    store = get_typestore(Stores.EMPTY)
    types: Dict[str, Any] = {
        k: v for k, v in base.fielddefs.items() if k != 'service_msgs/msg/ServiceEventInfo'
    }
    types.update(get_types_from_msg(_SERVICE_EVENT_INFO, 'service_msgs/msg/ServiceEventInfo'))
    for name, text in interface_definitions(root).items():
        types.update(get_types_from_msg(text, name))
    store.register(types)
    return store
