"""
Every fact of a goal's ending reaches the planner: core ``Outcome`` -> action Result -> client.

The result exists as three types (the pipeline's ``Outcome``, the TimedInference Result, the
client's ``GoalResult``). The fields are listed from the classes and the .action file, and each
gets a distinct value that must arrive, so a field added to one copy and not carried fails here.
No node runs: the conversions are the ones the generator, the server and the client call.
"""

from dataclasses import fields
from pathlib import Path
import re

import pytest

pytest.importorskip('timebill_ros.action', reason='ROS interfaces not built (run `make ros`)')

ACTION = Path(__file__).resolve().parents[1] / 'action'
# what the pipeline keeps for itself: objects, not values a message can carry
NOT_ON_WIRE = {'verdict', 'replans', 'result'}
# set by the server, not the pipeline: when it handed the request on, and to which generator
SERVER_ONLY = {'dispatch_at_s', 'generator'}


def action_result_fields(name: str) -> list:
    """Return the Result field names of ``action/<name>.action``, in order (constants skipped)."""
    result = re.split(r'(?m)^---$', (ACTION / f'{name}.action').read_text())[1]
    names = []
    for line in result.splitlines():
        m = re.match(r'\s*([\w/]+(?:\[\])?)\s+(\w+)\s*(#.*)?$', line)
        if m:  # a constant is 'TYPE NAME=VALUE' and does not match
            names.append(m.group(2))
    return names


def distinct(kind: str, i: int):
    """Return a value of a message field type, different from its default and from others'."""
    if kind == 'string':
        return f'value {i}'
    if kind == 'boolean':
        return True
    if kind.startswith(('uint', 'int')):
        return 7 + i
    return 0.25 + i  # float/double: exact in float32


def filled(msg_type):
    """Return a ``msg_type`` with a distinct value in every field."""
    msg = msg_type()
    for i, (name, kind) in enumerate(msg.get_fields_and_field_types().items()):
        setattr(msg, name, distinct(kind, i))
    msg.status = msg_type.STATUS_TRUNCATED  # a real status: the names map onto the codes
    return msg


def test_the_action_file_and_the_generated_result_agree():
    from timebill_ros.action import Generate, TimedInference

    for name, action in (('TimedInference', TimedInference), ('Generate', Generate)):
        assert action_result_fields(name) == list(action.Result.get_fields_and_field_types())


def test_every_carried_outcome_field_reaches_the_result():
    from timebill_ros.action import Generate, TimedInference
    from timebill_ros.core.outcome import Outcome
    from timebill_ros.nodes.results import copy_fields, to_result

    carried = [f.name for f in fields(Outcome) if f.name not in NOT_ON_WIRE]
    wire = set(action_result_fields('TimedInference'))
    assert set(carried) <= wire, f'not on the wire: {sorted(set(carried) - wire)}'
    assert wire - set(carried) == SERVER_ONLY
    out = Outcome(status='truncated')
    for i, name in enumerate(carried):
        if name != 'status':
            kind = type(getattr(out, name)).__name__
            setattr(out, name, distinct({'str': 'string', 'bool': 'boolean'}.get(kind, kind), i))
    inner = to_result(out, Generate.Result)  # the generator's result
    outer = copy_fields(inner, TimedInference.Result())  # what the server relays
    assert outer.status == TimedInference.Result.STATUS_TRUNCATED
    for name in carried:
        if name != 'status':
            assert getattr(outer, name) == pytest.approx(getattr(out, name)), name


def test_every_result_field_reaches_the_client():
    from timebill_ros.action import TimedInference
    from timebill_ros.goal_result import GoalResult, TIMELINE

    result = filled(TimedInference.Result)
    got = GoalResult.from_result(result, goal_status=4)
    client_fields = {f.name for f in fields(GoalResult)}
    for name in action_result_fields('TimedInference'):
        sent = getattr(result, name)
        if name in TIMELINE:
            assert got.timeline[TIMELINE[name]] == pytest.approx(sent), name
        else:
            assert name in client_fields, f'{name} does not reach GoalResult'
            assert getattr(got, name) == pytest.approx(sent), name
    assert got.accepted and got.status_name == 'truncated' and got.goal_status == 4
