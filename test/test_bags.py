"""rosbag2 MCAP recording: round trips, crash safety, and bags as ``ros2 bag`` writes them."""

import math
import os
from pathlib import Path
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from timebill_ros.core.evaluation import bags as B

REPO = Path(__file__).resolve().parents[1]


def _goal(i):
    return {
        'prompt': f'Request {i}: how far is the dock? ünïcødé ✓ ' + 'x' * (i * 50),
        'system_prompt': 'be brief' if i % 2 else '',
        'time_budget': 0.5 + i * 0.25,
        'deadline': {'sec': 100 + i, 'nanosec': 5} if i % 3 == 0 else {'sec': 0, 'nanosec': 0},
        'max_new_tokens': 16 * (i + 1),
        'overrun_policy': ('kill', 'truncate', '')[i % 3],
    }


def _result(i):
    return {
        'text': f'answer {i}',
        'completed': i % 2 == 0,
        'deadline_met': i % 3 != 0,
        'status': i % 7,
        'reason': 'r' * i,
        'alpha': 0.25 * (i % 4),
        'predicted_length': 10 + i,
        'estimate_fallback': i == 2,
        'wcet_s': 1.0 / (i + 1),
        'prompt_tokens': 1000 + i,
        'tokens_generated': 5 + i,
        'kv_before': 1000 + i,
        'kv_after': 500 + i,
        'prefill_s': 0.1 * i,
        'decode_s': 0.2 * i,
        'total_s': 0.3 * i + 1e-9,
        'dispatch_at_s': 0.001,
        'prefill_start_s': 0.002,
        'prefill_end_s': 0.5,
        'estimate_received_s': -1.0,
        'decode_start_s': 0.6,
        'finished_at_s': 1.5,
    }


def test_interface_types_follow_rosidl_naming():
    defs = B.interface_definitions()
    for part in (
        'Goal',
        'Result',
        'Feedback',
        'SendGoal_Request',
        'SendGoal_Event',
        'GetResult_Event',
        'FeedbackMessage',
    ):
        assert f'timebill_ros/action/TimedInference_{part}' in defs
    store = B.typestore()
    goal_fields = [
        name for name, _ in store.fielddefs['timebill_ros/action/TimedInference_Goal'][1]
    ]
    assert goal_fields == [
        'prompt',
        'system_prompt',
        'time_budget',
        'deadline',
        'max_new_tokens',
        'overrun_policy',
        'client_node',
        'min_quality',
        'max_alpha',
        'json_schema',
        'grammar',
    ]
    # a bare `Request` inside Generate.action is the package's msg, as rosidl resolves it
    ((_, (_, ref)),) = store.fielddefs['timebill_ros/action/Generate_Goal'][1]
    assert ref == 'timebill_ros/msg/Request'


def test_round_trip_goals_estimates_results(tmp_path):
    ids = [uuid.UUID(int=i + 1).hex for i in range(6)]
    with B.BagRecorder(tmp_path / 'bag') as rec:
        for i, gid in enumerate(ids):
            rec.record_goal(gid, _goal(i))
            rec.record_estimate(
                {
                    'request_id': gid,
                    'stamp': {'sec': 7, 'nanosec': 9},
                    'prompt_tokens': 1000 + i,
                    'predicted_length': 30 + i,
                    'predicted_bucket': 1 + i,
                    'n_hat_w': 150 + i,
                    'fallback': i == 1,
                    'wcet_s': 2.5 + i,
                    'prediction_s': 0.01 * i,
                }
            )
        for i, gid in reversed(list(enumerate(ids))):  # results finish in another order
            rec.record_result(gid, _result(i), status='aborted' if i == 4 else 'succeeded')
    assert (tmp_path / 'bag' / 'metadata.yaml').is_file()

    reqs = B.read_requests(tmp_path / 'bag')
    assert [r.request_id for r in reqs] == ids
    for i, r in enumerate(reqs):
        g = _goal(i)
        assert (r.prompt, r.system_prompt, r.max_new_tokens, r.overrun_policy) == (
            g['prompt'],
            g['system_prompt'],
            g['max_new_tokens'],
            g['overrun_policy'],
        )
        assert r.budget_s == pytest.approx(g['time_budget'], abs=1e-9)

    goals = [
        m.as_dict()['request'][0]['goal']
        for m in B.read_messages(tmp_path / 'bag')
        if m.msgtype.endswith('SendGoal_Event')
    ]
    assert [g['deadline'] for g in goals] == [_goal(i)['deadline'] for i in range(6)]

    results = B.read_results(tmp_path / 'bag')
    assert set(results) == set(ids)
    for i, gid in enumerate(ids):
        got, want = results[gid]['result'], _result(i)
        assert results[gid]['status'] == (6 if i == 4 else 4)
        for key, value in want.items():
            if key == 'alpha':  # float32 on the wire
                assert got[key] == pytest.approx(value, rel=1e-6)
            else:
                assert got[key] == value, key

    est = B.read_estimates(tmp_path / 'bag')
    assert [e['request_id'] for e in est] == ids
    assert est[3]['n_hat_w'] == 153 and est[1]['fallback'] is True and est[2]['wcet_s'] == 4.5
    stamps = [m.stamp_ns for m in B.read_messages(tmp_path / 'bag')]
    assert stamps == sorted(stamps)


def test_goal_from_rclpy_like_message_object(tmp_path):
    """The server may pass its messages as they are: anything with get_fields_and_field_types."""

    class Duration:
        def __init__(self):
            self.sec, self.nanosec = 3, 500_000_000

        def get_fields_and_field_types(self):
            return {'sec': 'int32', 'nanosec': 'uint32'}

    class Goal:
        def __init__(self):
            self.prompt, self.time_budget, self.max_new_tokens = 'hello', Duration(), 7

        def get_fields_and_field_types(self):
            return {
                'prompt': 'string',
                'time_budget': 'builtin_interfaces/Duration',
                'max_new_tokens': 'uint32',
            }

    gid = uuid.uuid4()
    with B.BagRecorder(tmp_path / 'bag') as rec:
        rec.record_goal(gid, Goal())
    (r,) = B.read_requests(tmp_path / 'bag')
    assert (r.request_id, r.prompt, r.budget_s, r.max_new_tokens) == (gid.hex, 'hello', 3.5, 7)


def test_unknown_field_is_an_error(tmp_path):
    with B.BagRecorder(tmp_path / 'bag') as rec:
        with pytest.raises(ValueError, match='no field'):
            rec.record_goal(uuid.uuid4(), {'prompt': 'x', 'budget': 3})


_CHILD = textwrap.dedent("""
    import sys, time, uuid
    from timebill_ros.core.evaluation import bags as B
    rec = B.BagRecorder(sys.argv[1])
    for i in range(10_000):
        rec.record_goal(uuid.UUID(int=i + 1), {"prompt": f"goal {i}", "time_budget": 1.0 + i})
        print(i, flush=True)
        time.sleep(0.01)
""")


def test_killed_recorder_leaves_a_readable_bag(tmp_path):
    bag = tmp_path / 'crashed'
    proc = subprocess.Popen(
        [sys.executable, '-c', _CHILD, str(bag)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        written = [
            int(proc.stdout.readline()) for _ in range(25)
        ]  # each line: a goal returned (flushed)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert written[-1] == 24
    assert not (bag / 'metadata.yaml').exists()  # the writer never closed
    reqs = B.read_requests(bag)
    assert len(reqs) >= 25  # nothing acknowledged was lost
    assert [r.prompt for r in reqs] == [f'goal {i}' for i in range(len(reqs))]
    assert reqs[24].budget_s == 25.0

    # reading used a repaired copy; the crashed bag is untouched until recover() fixes it in place
    assert not (bag / 'metadata.yaml').exists()
    B.recover(bag)
    from rosbags.highlevel import AnyReader  # stock reader, directory form, no help from us

    with AnyReader([bag]) as reader:
        assert sum(1 for _ in reader.messages()) == len(reqs)


def _message_records(data):
    """(start, end) of every MCAP message record (op 0x05) in the data section."""
    import struct

    pos, out = 8, []
    while pos + 9 <= len(data) and data[pos] not in (0x0F, 0x02):
        (length,) = struct.unpack_from('<Q', data, pos + 1)
        if data[pos] == 0x05:
            out.append((pos, pos + 9 + length))
        pos += 9 + length
    return out


def test_torn_last_record_is_dropped(tmp_path):
    with B.BagRecorder(tmp_path / 'bag') as rec:
        for i in range(5):
            rec.record_goal(uuid.UUID(int=i + 1), {'prompt': f'goal {i}'})
    data = (tmp_path / 'bag' / 'bag.mcap').read_bytes()
    records = _message_records(data)
    assert len(records) == 5
    last_start, last_end = records[-1]
    # died inside the last record
    for cut in (last_start + 5, (last_start + last_end) // 2, last_end - 1):
        torn = tmp_path / f'torn{cut}'
        torn.mkdir()
        (torn / 'torn.mcap').write_bytes(data[:cut])
        assert B.valid_prefix(torn / 'torn.mcap') == last_start
        assert [r.prompt for r in B.read_requests(torn)] == [f'goal {i}' for i in range(4)]
    whole = tmp_path / 'whole'
    whole.mkdir()
    (whole / 'whole.mcap').write_bytes(data[:last_end])  # died right after the last record
    assert [r.prompt for r in B.read_requests(whole)] == [f'goal {i}' for i in range(5)]


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_bag_in_ros2_bag_style_is_read_with_types_from_the_bag(tmp_path, storage):
    """
    Read what `ros2 bag record /timebill/request /timebill/estimate` writes without our typestore.

    Stock rosbag2 layout, chunked and indexed (or sqlite3), types registered from the .msg text.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import get_types_from_msg, get_typestore, Stores

    store = get_typestore(Stores.ROS2_JAZZY)
    types = {}
    for name in ('Request', 'Estimate'):
        types.update(
            get_types_from_msg(
                (REPO / 'msg' / f'{name}.msg').read_text(), f'timebill_ros/msg/{name}'
            )
        )
    store.register(types)
    Request, Time = (
        store.types['timebill_ros/msg/Request'],
        store.types['builtin_interfaces/msg/Time'],
    )
    import numpy as np

    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    with Writer(tmp_path / 'ros2bag', version=9, storage_plugin=plugin) as w:
        conn = w.add_connection('/timebill/request', 'timebill_ros/msg/Request', typestore=store)
        for i in range(3):
            msg = Request(
                request_id=f'{i:032x}',
                accepted_at=Time(sec=50, nanosec=0),
                deadline=Time(sec=52 + i, nanosec=500_000_000),
                prompt=f'p{i}',
                system_prompt='s',
                input_ids=np.array([1, 2, 3], dtype=np.uint32),
                max_new_tokens=20 + i,
                overrun_policy='kill',
                min_quality=-1.0,
                max_alpha=-1.0,
                json_schema='',
                grammar='',
            )
            w.write(conn, 1_000 + i, store.serialize_cdr(msg, 'timebill_ros/msg/Request'))
    reqs = B.read_requests(tmp_path / 'ros2bag')
    assert [(r.request_id, r.prompt, r.max_new_tokens) for r in reqs] == [
        (f'{i:032x}', f'p{i}', 20 + i) for i in range(3)
    ]
    assert [r.budget_s for r in reqs] == pytest.approx([2.5, 3.5, 4.5])


def test_request_bag_carries_tasks(tmp_path):
    reqs = [
        {
            'prompt': f'q{i}',
            'time_budget': 2.0,
            'max_new_tokens': 8,
            'task': {'id': f't{i}', 'references': [f'a{i}'], 'metric': 'token_f1'},
        }
        for i in range(3)
    ]
    B.write_request_bag(tmp_path / 'req', reqs, period_s=0.5)
    got = B.read_requests(tmp_path / 'req')
    assert [r.task['id'] for r in got] == ['t0', 't1', 't2']
    assert [r.task['references'] for r in got] == [['a0'], ['a1'], ['a2']]
    gaps = [(b.stamp_ns - a.stamp_ns) / 1e9 for a, b in zip(got, got[1:])]
    assert gaps == pytest.approx([0.5, 0.5])
    assert not math.isnan(got[0].budget_s)


def test_type_hashes_match_the_ros_build():
    """Our registered types hash exactly as rosidl hashed them in the colcon build (when built)."""
    import json

    share = REPO / 'install' / 'timebill_ros' / 'share' / 'timebill_ros'
    files = [
        share / 'action' / 'TimedInference.json',
        share / 'msg' / 'Estimate.json',
        share / 'msg' / 'Request.json',
    ]
    if not all(f.is_file() for f in files):
        pytest.skip('ROS interfaces not built (make ros)')
    store = B.typestore()
    checked = 0
    for f in files:
        for h in json.loads(f.read_text())['type_hashes']:
            if h['type_name'] in store.fielddefs:
                assert store.hash_rihs01(h['type_name']) == h['hash_string'], h['type_name']
                checked += 1
    assert checked >= 12  # Goal/Result/Feedback, SendGoal/GetResult request/response/event, ...


def test_ros2_action_recording_with_rosidl_hashes_is_read(tmp_path):
    """
    Read a `ros2 bag record` of an action, which rosbags alone refuses.

    The msgdef text comes from the .msg files (`char[16] client_gid`) but the hash is rosidl's
    (char counted as uint8).
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import get_types_from_msg, get_typestore, Stores

    ours = B.typestore()
    ros_text = get_typestore(Stores.ROS2_KILTED)  # ServiceEventInfo as the .msg file spells it
    types = {}
    for name, text in B.interface_definitions().items():
        types.update(get_types_from_msg(text, name))
    ros_text.register(types)
    event = 'timebill_ros/action/TimedInference_SendGoal_Event'
    gid = uuid.uuid4()
    with Writer(tmp_path / 'rec', version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conn = w.add_connection(
            '/timed_inference/_action/send_goal/_service_event',
            event,
            msgdef=B.message_definition(ros_text, event),
            rihs01=ours.hash_rihs01(event),
        )
        # client and server both log it
        for i, etype in enumerate((B.REQUEST_SENT, B.REQUEST_RECEIVED)):
            msg = B.build_msg(
                ours,
                event,
                {
                    'info': {'event_type': etype, 'sequence_number': 1},
                    'request': [
                        {
                            'goal_id': {'uuid': list(gid.bytes)},
                            'goal': {'prompt': 'go', 'time_budget': 4.0},
                        }
                    ],
                },
            )
            w.write(conn, 10 + i, ours.serialize_cdr(msg, event))
    assert 'char[16] client_gid' in (tmp_path / 'rec' / 'rec.mcap').read_bytes().decode('latin-1')
    from rosbags.highlevel import AnyReader, AnyReaderError

    with pytest.raises(AnyReaderError, match='hash mismatch'):
        with AnyReader([tmp_path / 'rec']):
            pass
    (r,) = B.read_requests(tmp_path / 'rec')
    assert (r.request_id, r.prompt, r.budget_s) == (gid.hex, 'go', 4.0)


# a robot-task schema: the scene's ids as a long enum (shortened in the prompt the model reads)
PLAN = {
    'type': 'array',
    'items': {'type': 'string', 'enum': [f'obj_{i}' for i in range(20)]},
    'maxItems': 3,
}


def _structured_bag(tmp_path):
    """
    Write a structured goal both ways a bag holds one; return (bag, schema, question).

    As a SendGoal event (the goal's own prompt) and as the server's msg/Request (its prompt with
    the schema appended, schema_in_prompt).
    """
    import json

    from timebill_ros.core.structured import with_schema

    schema, question = json.dumps(PLAN), 'Which objects hold cups?'
    with B.BagRecorder(tmp_path / 'bag') as rec:
        rec.record_goal(
            uuid.UUID(int=1),
            {'prompt': question, 'time_budget': 2.0, 'json_schema': schema},
            stamp_ns=1_000,
        )
        rec.record_goal(
            uuid.UUID(int=2), {'prompt': 'x', 'time_budget': 2.0, 'grammar': 'start: "a"'}, 2_000
        )
        rec.writer.write(
            '/timebill/requests',
            'timebill_ros/msg/Request',
            {
                'request_id': uuid.UUID(int=3).hex,
                'accepted_at': {'sec': 50, 'nanosec': 0},
                'deadline': {'sec': 52, 'nanosec': 0},
                'prompt': with_schema(question, schema),
                'json_schema': schema,
            },
            3_000,
        )
    return tmp_path / 'bag', schema, question


def test_structured_requests_keep_their_schema_and_grammar(tmp_path):
    bag, schema, question = _structured_bag(tmp_path)
    goal, lark, request = B.read_requests(bag)
    assert (goal.prompt, goal.json_schema, goal.grammar) == (question, schema, '')
    assert (lark.json_schema, lark.grammar) == ('', 'start: "a"')
    assert request.json_schema == schema and request.prompt.startswith(question + '\n')


def test_request_bag_from_before_the_structured_fields_reads_them_empty(tmp_path):
    """A msg/Request recorded without json_schema/grammar (an older build) is free text."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import get_types_from_msg, get_typestore, Stores

    text = (REPO / 'msg' / 'Request.msg').read_text().splitlines()
    old = '\n'.join(ln for ln in text if not ln.startswith(('string json_schema', 'string gram')))
    assert 'string json_schema' not in old and 'string grammar' not in old
    store = get_typestore(Stores.ROS2_JAZZY)
    store.register(get_types_from_msg(old, 'timebill_ros/msg/Request'))
    Request = store.types['timebill_ros/msg/Request']
    import numpy as np

    Time = store.types['builtin_interfaces/msg/Time']
    with Writer(tmp_path / 'old', version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conn = w.add_connection('/timebill/request', 'timebill_ros/msg/Request', typestore=store)
        msg = Request(
            request_id='a' * 32,
            accepted_at=Time(sec=1, nanosec=0),
            deadline=Time(sec=3, nanosec=0),
            prompt='p',
            system_prompt='',
            input_ids=np.array([1], dtype=np.uint32),
            max_new_tokens=4,
            overrun_policy='',
            min_quality=-1.0,
            max_alpha=-1.0,
        )
        w.write(conn, 1, store.serialize_cdr(msg, 'timebill_ros/msg/Request'))
    (r,) = B.read_requests(tmp_path / 'old')
    assert (r.prompt, r.json_schema, r.grammar, r.budget_s) == ('p', '', '', 2.0)


def test_replay_sends_the_recorded_schema_once(tmp_path):
    """
    Offline the Job, online the goal, carry the schema; the model reads it appended once.

    No model: the engine, pipeline and action client are stand-ins that keep what they got.
    """
    from types import SimpleNamespace

    from timebill_ros.cli.replay import OfflineServer, OnlineServer
    from timebill_ros.core.config import TimeBillConfig
    from timebill_ros.core.evaluation.policies import parse_policy
    from timebill_ros.core.structured import SCHEMA_HINT, with_schema

    bag, schema, question = _structured_bag(tmp_path)
    goal, lark, request = B.read_requests(bag)
    once = with_schema(question, schema)
    assert once.count(SCHEMA_HINT) == 1 and 'obj_19' not in once  # the long enum left out

    encoded, jobs = [], []
    offline = OfflineServer.__new__(OfflineServer)
    offline.cfg, offline.policy = TimeBillConfig(), parse_policy('timebill+replan')
    offline.engine = SimpleNamespace(encode=lambda text, system: encoded.append(text) or [1, 2])
    offline.pipeline = SimpleNamespace(
        run=lambda job: jobs.append(job)
        or SimpleNamespace(summary=lambda: {'status': 'succeeded'}, finished_at_s=0.1)
    )
    for r in (goal, lark, request):
        assert offline.serve(r, release=100.0)['finished_at'] == pytest.approx(100.1)
    assert encoded == [once, 'x', once]
    assert [(j.prompt, j.json_schema, j.grammar) for j in jobs] == [
        (once, schema, ''),
        ('x', '', 'start: "a"'),
        (once, schema, ''),
    ]
    offline.cfg = TimeBillConfig(schema_in_prompt=False)  # the node would not append it either
    offline.serve(goal, release=100.0)
    assert encoded[-1] == question and jobs[-1].json_schema == schema

    sent = []

    def ask(prompt, budget, **kw):
        sent.append((prompt, kw))
        return SimpleNamespace(
            status_name='succeeded', goal_id='g', text='["obj_1"]', completed=True,
            deadline_met=True, valid=True, structured=True, alpha=0.0, predicted_length=3,
            prompt_tokens=9, tokens_generated=3, kv_before=9, kv_after=9, prefill_s=0.0,
            decode_s=0.0, reason='',
        )

    online = OnlineServer.__new__(OnlineServer)
    online.client, online.timeout_s = SimpleNamespace(ask=ask), 1.0
    for r in (goal, lark, request):
        assert online.serve(r, release=time.monotonic())['valid'] is True
    assert [(kw['schema'], kw['grammar']) for _, kw in sent] == [
        (schema, ''),
        (None, 'start: "a"'),
        (schema, ''),
    ]
    # the server appends the schema (nodes.validation.model_prompt): once, whichever form
    assert [with_schema(p, kw['schema'] or '') for p, kw in sent] == [once, 'x', once]
