"""Robot JSON workloads: seeded scenes, ground truth, schemas and grading (no model)."""

import json
import re

import pytest
from timebill_ros.core.evaluation import robot_tasks as rt
from timebill_ros.core.evaluation.robot_grading import (
    score_json, step_validity, validate,
)
from timebill_ros.core.evaluation.robot_scene import make_scene
from timebill_ros.core.evaluation.scoring import score


def count_tokens(text):
    return len(text.split()) * 4 // 3


def count_chars(text, system_prompt=None):  # a denser, two-argument counter (like BPE)
    return (len(text) + len(system_prompt or '')) * 10 // 24


@pytest.fixture(scope='module')
def tasks():
    return rt.build_robot_tasks(count_tokens, sizes=(1024, 4096), per_kind=2, seed=1,
                                schema_in_prompt=False)


def _of(tasks, kind):
    return [t for t in tasks if t.kind == kind]


def test_deterministic_by_seed():
    a, b = make_scene(5, 1024, count_tokens), make_scene(5, 1024, count_tokens)
    assert a.to_dict() == b.to_dict()
    assert make_scene(6, 1024, count_tokens).text != a.text
    ta = [t.to_dict() for t in rt.make_tasks(a, 5, per_kind=2)]
    assert ta == [t.to_dict() for t in rt.make_tasks(b, 5, per_kind=2)]


@pytest.mark.parametrize('size', [1024, 2048, 4096, 8192])
@pytest.mark.parametrize('counter', [count_tokens, count_chars])
def test_scene_reaches_target_size(size, counter):
    scene = make_scene(0, size, counter)
    assert 0.97 * size <= scene.n_tokens <= size
    if counter is count_chars:
        assert scene.n_tokens == counter(scene.text, scene.system_prompt)


def test_scene_text_lists_the_facts():
    scene = make_scene(2, 2048, count_tokens)
    text = scene.text.splitlines()
    lines = set(text)
    for o in scene.objects:
        assert re.fullmatch(r'[a-z]+_[0-9]+', o['id'])
        if o['place']:  # under its place's heading
            at = text.index(f"{o['id']}: {o['colour']} {o['type']} at ({o['x']}, {o['y']})")
            heading = next(x for x in reversed(text[:at]) if x.startswith('In the '))
            assert heading == f"In the {o['place']}:"
    assert len({o['id'] for o in scene.objects}) == len(scene.objects)
    for e in scene.log:
        assert f"{e['time']} {e['level']} {e['message']}" in lines
    assert [e['time'] for e in scene.log] == sorted(e['time'] for e in scene.log)
    assert scene.robot['place'] in scene.places and set(scene.chargers) <= set(scene.places)
    assert scene.text.endswith('End of scene.')


def test_prompt_is_scene_then_question(tasks):
    by_scene = {}
    for t in tasks:
        assert t.prompt.startswith(t.meta['context'] + '\n\n')
        assert len(t.prompt) - len(t.meta['context']) < 800  # short after the scene
        by_scene.setdefault(t.meta['scene_id'], set()).add(t.meta['context'])
        assert t.meta['target_tokens'] in (1024, 4096)
        assert t.metric == rt.METRIC_OF[t.kind] and t.system_prompt
    assert len(by_scene) == 2 and all(len(v) == 1 for v in by_scene.values())
    assert len({t.id for t in tasks}) == len(tasks)


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('counter', [count_tokens, count_chars])
def test_list_truth_in_range(seed, counter):
    ts = rt.build_robot_tasks(counter, sizes=(1024, 8192), per_kind=3, seed=seed,
                              kinds=['robot-list'], schema_in_prompt=False)
    assert len(ts) == 6
    for t in ts:
        ids = json.loads(t.references[0])
        assert 5 <= len(ids) == t.meta['count'] <= 40
        assert t.max_new_tokens == min(512, 12 * len(ids) + 16)
    assert len({json.dumps(t.meta['condition']) for t in ts[:3]}) == 3  # distinct questions


def test_list_truth_matches_the_scene():
    scene = make_scene(3, 2048, count_tokens)
    for t in rt.make_tasks(scene, 3, kinds=['robot-list'], per_kind=3):
        cond = t.meta['condition']
        want = [o['id'] for o in scene.objects if all(o[k] == v for k, v in cond.items())]
        assert json.loads(t.references[0]) == want
        for word in cond.values():
            assert word in t.prompt[len(scene.text):]


def test_schema_is_json_and_truth_fits_it(tasks):
    for t in tasks:
        schema = json.loads(t.meta['json_schema'])
        assert validate(json.loads(t.references[0]), schema) == []
        g = rt.grade(t, t.references[0])
        assert g['valid'] and g['f1'] == 1.0 and g['score'] == 1.0, (t.id, g)
        assert score(t.metric, t.references[0], t.references) == 1.0


def test_cut_json_is_invalid(tasks):
    t = _of(tasks, 'robot-list')[0]
    g = rt.grade(t, '["cup_1","bo')
    assert not g['valid'] and g['score'] == 0.0 and g['error']
    assert score(t.metric, '["cup_1","bo', t.references) == 0.0
    assert score(t.metric, '', t.references) == 0.0


def test_list_with_a_wrong_id(tasks):
    t = _of(tasks, 'robot-list')[0]
    ids = json.loads(t.references[0])
    known = json.loads(t.meta['json_schema'])['items']['enum']  # the scene's ids only
    other = next(i for i in known if i not in ids)
    wrong = json.dumps(ids[:-1] + [other])
    g = rt.grade(t, wrong)
    assert g['valid'] and 0.5 < g['f1'] < 1.0 and g['score'] == g['f1']
    assert not rt.grade(t, json.dumps(ids[:-1] + ['zebra_999']))['valid']  # not in the scene
    assert score(t.metric, wrong, t.references) == pytest.approx(g['f1'])
    # an id that is not an id, or too many items: not valid
    assert not rt.grade(t, json.dumps(ids[:-1] + ['Cup 3']))['valid']
    assert not rt.grade(t, json.dumps(ids * 3))['valid']


def test_plan_action_outside_enum_is_invalid(tasks):
    t = _of(tasks, 'robot-plan')[0]
    steps = json.loads(t.references[0])
    steps[0]['action'] = 'teleport'
    g = rt.grade(t, json.dumps(steps))
    assert not g['valid'] and g['score'] == 0.0
    assert score(t.metric, json.dumps(steps), t.references) == 0.0
    assert not rt.grade(t, json.dumps(steps[1:]))['valid']  # k steps exactly


def test_plan_impossible_pick_loses_step_validity(tasks):
    t = _of(tasks, 'robot-plan')[0]
    world = json.loads(t.references[1])
    steps = json.loads(t.references[0])
    i = next(i for i, s in enumerate(steps) if s['action'] == 'pick')
    elsewhere = next(o for o, p in world['objects'].items()
                     if p and p != world['objects'][steps[i]['target']])
    steps[i]['target'] = elsewhere
    g = rt.grade(t, json.dumps(steps))
    assert g['valid'] and g['step_validity'] < 1.0 and g['f1'] == g['step_validity']
    assert g['steps_ok'][i] is False and g['score'] < g['matched'] < 1.0
    assert score(t.metric, json.dumps(steps), t.references) == pytest.approx(g['score'])


def test_step_validity_rules():
    world = {'at': 'lab', 'carrying': '', 'places': ['lab', 'dock_1'], 'chargers': ['dock_1'],
             'objects': {'cup_1': 'lab', 'box_2': 'dock_1'}}

    def run(*steps):
        return step_validity([{'action': a, 'target': x} for a, x in steps], world)

    assert run(('place', 'cup_1'), ('charge', 'dock_1')) == [False, False]
    assert run(('pick', 'box_2'), ('goto', 'dock_1'), ('pick', 'box_2')) == [False, True, True]
    assert run(('pick', 'cup_1'), ('pick', 'cup_1'), ('goto', 'dock_1'),
               ('place', 'cup_1'), ('inspect', 'cup_1'), ('charge', 'dock_1'),
               ('goto', 'kitchen')) == [True, False, True, True, True, True, False]
    assert world['objects']['cup_1'] == 'lab'  # the world is not changed


def test_plan_steps_are_possible_and_asked_for(tasks):
    for t in _of(tasks, 'robot-plan'):
        steps = t.meta['truth']
        assert len(steps) == t.meta['k'] and 4 <= len(steps) <= 8
        assert all(step_validity(steps, json.loads(t.references[1])))
        assert f"exactly {t.meta['k']} robot steps" in t.prompt and t.meta['object'] in t.prompt


def test_summary_truth_and_partial_credit(tasks):
    for t in _of(tasks, 'robot-summary'):
        truth = rt.log_summary(
            make_scene(1, t.meta['target_tokens'], count_tokens),
            '' if t.meta['scope'] == 'all' else t.meta['scope'],
        )
        assert json.loads(t.references[0]) == truth == t.meta['truth']
        other = 'INFO' if truth['level'] != 'INFO' else 'WARN'
        off = dict(truth, level=other)
        g = rt.grade(t, json.dumps(off))
        assert g['valid'] and g['f1'] == g['score'] == pytest.approx(2 / 3)
        assert score_json('json_record', json.dumps(off), t.references) == pytest.approx(2 / 3)
        assert not rt.grade(t, json.dumps(dict(truth, time='3')))['valid']
        assert not rt.grade(t, json.dumps(dict(truth, level='DEBUG')))['valid']
        assert not rt.grade(t, json.dumps(dict(truth, extra=1)))['valid']


def test_validate_subset():
    schema = {'type': 'object', 'required': ['a'], 'additionalProperties': False,
              'properties': {'a': {'type': 'array', 'minItems': 1, 'maxItems': 2,
                                   'items': {'type': 'string', 'pattern': '^x'}}}}
    assert validate({'a': ['x1']}, schema) == []
    assert validate({}, schema) and validate({'a': []}, schema)
    assert validate({'a': ['y']}, schema) and validate({'a': ['x', 'x', 'x']}, schema)
    assert validate({'a': ['x'], 'b': 1}, schema) and validate([], schema)
    assert validate(True, {'type': 'integer'}) and validate(-1, {'minimum': 0})


def test_save_load_and_summary(tasks, tmp_path):
    path = str(tmp_path / 'robot.jsonl')
    rt.save_tasks(tasks, path)
    assert [t.to_dict() for t in rt.load_tasks(path)] == [t.to_dict() for t in tasks]
    s = rt.summary(tasks)
    assert s['n'] == 12 and s['scenes'] == 2 and s['sizes'] == [1024, 4096]
    assert s['kinds'] == dict.fromkeys(rt.KINDS, 4)
    assert 5 <= s['list_items'][0] <= s['list_items'][1] <= 40


def test_unknown_kind():
    with pytest.raises(ValueError):
        rt.make_tasks(make_scene(0, 1024, count_tokens), kinds=['robot-dance'])


def test_n_tokens_counts_the_prompt_the_generator_sees():
    scene = make_scene(0, 1024, count_tokens)
    plain = rt.make_tasks(scene, kinds=['robot-list'], count_tokens=count_tokens,
                          schema_in_prompt=False)[0]
    hinted = rt.make_tasks(scene, kinds=['robot-list'], count_tokens=count_tokens)[0]
    assert plain.n_tokens == count_tokens(plain.prompt) > scene.n_tokens
    assert hinted.n_tokens > plain.n_tokens  # the schema is appended, as the node does
