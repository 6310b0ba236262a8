"""
Grading structured robot answers: JSON that parses, fits its schema and says the right thing.

A planner can only act on an answer it can parse, so an answer that is not valid scores 0.
``grade(task, text)`` validates against the task's own schema (a small validator for the
subset of JSON Schema the robot tasks emit: no ``jsonschema`` dependency). The scoring metrics
(``json_set_f1``, ``json_plan``, ``json_record``, registered in ``scoring``) need only the
references, as a replayed bag has them: ``references[0]`` is the ground truth as JSON, the
shape the answer must have follows from the metric and that truth, and a plan's
``references[1]`` is the world the steps are checked against.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .scoring import lcs_length, normalize_answer

ID_PATTERN = '^[a-z]+_[0-9]+$'
TARGET_PATTERN = '^[a-z][a-z0-9_]*$'
ACTIONS = ('goto', 'pick', 'place', 'inspect', 'charge')
PLACE_ACTIONS = ('goto', 'charge')  # take a place
OBJECT_ACTIONS = ('pick', 'place', 'inspect')  # take an object id
JSON_METRICS = ('json_set_f1', 'json_plan', 'json_record')
_TYPES = {
    'string': lambda v: isinstance(v, str),
    'integer': lambda v: isinstance(v, int) and not isinstance(v, bool),
    'number': lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    'boolean': lambda v: isinstance(v, bool),
    'array': lambda v: isinstance(v, list),
    'object': lambda v: isinstance(v, dict),
    'null': lambda v: v is None,
}


# ------------------------------------------------------------------------------------ schemas
def list_schema(max_items: int, ids: Sequence[str] = ()) -> Dict[str, Any]:
    """
    Return the schema of a list answer: a non-empty array of object ids.

    With ``ids`` (the scene's objects, which a planner knows) an item can only be one of them,
    as a planner's schema would say: the grammar then rules out invented ids.
    """
    item = {'type': 'string', 'enum': list(ids)} if ids else {
        'type': 'string', 'pattern': ID_PATTERN}
    return {'type': 'array', 'items': item, 'minItems': 1, 'maxItems': max_items}


def plan_schema(
    k: int, places: Sequence[str] = (), objects: Sequence[str] = ()
) -> Dict[str, Any]:
    """
    Return the schema of a plan of exactly ``k`` steps.

    With the scene's ``places`` and ``objects`` it is typed as a planner's would be: goto and
    charge take a place, pick, place and inspect an object id (the grammar rules out the rest).
    """
    if places and objects:
        def step_of(actions: Sequence[str], targets: Sequence[str]) -> Dict[str, Any]:
            return {
                'type': 'object',
                'properties': {
                    'action': {'type': 'string', 'enum': list(actions)},
                    'target': {'type': 'string', 'enum': list(targets)},
                },
                'required': ['action', 'target'],
                'additionalProperties': False,
            }

        typed = {'anyOf': [step_of(PLACE_ACTIONS, places), step_of(OBJECT_ACTIONS, objects)]}
        return {'type': 'array', 'items': typed, 'minItems': k, 'maxItems': k}
    target = {'type': 'string', 'pattern': TARGET_PATTERN}
    step = {
        'type': 'object',
        'properties': {
            'action': {'type': 'string', 'enum': list(ACTIONS)},
            'target': target,
        },
        'required': ['action', 'target'],
        'additionalProperties': False,
    }
    return {'type': 'array', 'items': step, 'minItems': k, 'maxItems': k}


def record_schema(truth: Dict[str, Any]) -> Dict[str, Any]:
    """Return the schema of a summary record with the fields (and value types) of ``truth``."""
    props: Dict[str, Any] = {}
    for key, value in truth.items():
        if isinstance(value, int):
            props[key] = {'type': 'integer', 'minimum': 0}
        elif key == 'level':
            props[key] = {'type': 'string', 'enum': ['INFO', 'WARN', 'ERROR']}
        elif key.endswith('time'):
            props[key] = {'type': 'string', 'pattern': '^[0-9]{2}:[0-9]{2}:[0-9]{2}$'}
        else:
            props[key] = {'type': 'string', 'maxLength': 80}
    return {
        'type': 'object',
        'properties': props,
        'required': list(truth),
        'additionalProperties': False,
    }


def validate(value: Any, schema: Dict[str, Any], path: str = '$') -> List[str]:
    """
    Check ``value`` against ``schema``; return what is wrong (empty when it fits).

    Covers type, enum, pattern, minLength/maxLength, minimum/maximum, items, minItems/maxItems,
    properties, required, additionalProperties (false or a schema) and anyOf.
    """
    errs: List[str] = []
    if 'anyOf' in schema:
        tries = [validate(value, sub, path) for sub in schema['anyOf']]
        if all(tries):
            return [f'{path}: matches none of anyOf ({"; ".join(t[0] for t in tries)})']
    kind = schema.get('type')
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_TYPES[k](value) for k in kinds):
            return [f'{path}: expected {kind}, got {type(value).__name__}']
    if 'enum' in schema and value not in schema['enum']:
        errs.append(f'{path}: {value!r} not one of {schema["enum"]}')
    if isinstance(value, str):
        if 'pattern' in schema and not re.search(schema['pattern'], value):
            errs.append(f'{path}: {value!r} does not match {schema["pattern"]}')
        if len(value) < schema.get('minLength', 0):
            errs.append(f'{path}: shorter than {schema["minLength"]}')
        if 'maxLength' in schema and len(value) > schema['maxLength']:
            errs.append(f'{path}: longer than {schema["maxLength"]}')
    if _TYPES['number'](value):
        if 'minimum' in schema and value < schema['minimum']:
            errs.append(f'{path}: below {schema["minimum"]}')
        if 'maximum' in schema and value > schema['maximum']:
            errs.append(f'{path}: above {schema["maximum"]}')
    if isinstance(value, list):
        if len(value) < schema.get('minItems', 0):
            errs.append(f'{path}: fewer than {schema["minItems"]} items')
        if 'maxItems' in schema and len(value) > schema['maxItems']:
            errs.append(f'{path}: more than {schema["maxItems"]} items')
        if isinstance(schema.get('items'), dict):
            for i, item in enumerate(value):
                errs += validate(item, schema['items'], f'{path}[{i}]')
    if isinstance(value, dict):
        props = schema.get('properties', {})
        errs += [f'{path}: missing {k!r}' for k in schema.get('required', []) if k not in value]
        extra = schema.get('additionalProperties', True)
        for k, v in value.items():
            if k in props:
                errs += validate(v, props[k], f'{path}.{k}')
            elif extra is False:
                errs.append(f'{path}: unexpected {k!r}')
            elif isinstance(extra, dict):
                errs += validate(v, extra, f'{path}.{k}')
    return errs


def parse(text: str) -> Tuple[bool, Any, str]:
    """Return (parsed, value, why not) for an answer's text."""
    try:
        return True, json.loads(text), ''
    except (TypeError, ValueError) as exc:
        return False, None, f'not JSON: {exc}'


# ------------------------------------------------------------------------------------ metrics
def set_scores(pred: Sequence[str], truth: Sequence[str]) -> Dict[str, float]:
    """Return precision, recall and F1 of the predicted id set against the true one."""
    p, t = set(pred), set(truth)
    hit = len(p & t)
    precision = hit / len(p) if p else float(not t)
    recall = hit / len(t) if t else float(not p)
    f1 = 2 * precision * recall / (precision + recall) if hit else float(not p and not t)
    return {'precision': precision, 'recall': recall, 'f1': f1}


def step_validity(steps: Sequence[Dict[str, str]], world: Dict[str, Any]) -> List[bool]:
    """
    Execute a plan on the world's state and say which steps are possible.

    goto: a known place; pick: an object in the place the robot is at, hands empty; place: the
    object held (or the place the robot is at) while holding; inspect: an object here or held,
    or this place; charge: this place, with a charger. A failed step changes nothing.
    """
    at, held = world['at'], world.get('carrying') or ''
    places, chargers = set(world['places']), set(world.get('chargers', ()))
    objects = world['objects']
    moved: Dict[str, str] = {}  # object -> place ('' held) after the plan's own picks/places
    out = []
    for step in steps:
        action, target = step.get('action'), step.get('target')
        where = moved.get(target, objects.get(target))
        ok = False
        if action == 'goto':
            ok = target in places
            at = target if ok else at
        elif action == 'pick':
            ok = not held and where is not None and where == at
            if ok:
                held, moved[target] = target, ''
        elif action == 'place':
            ok = bool(held) and target in (held, at)
            if ok:
                moved[held], held = at, ''
        elif action == 'inspect':
            ok = target == at or (where is not None and (where == at or target == held))
        elif action == 'charge':
            ok = target in chargers and target == at
        out.append(ok)
    return out


def _plan_scores(steps: List[Dict[str, str]], references: Sequence[str]) -> Dict[str, Any]:
    truth = json.loads(references[0])
    pairs = [(s.get('action'), s.get('target')) for s in steps]
    want = [(s['action'], s['target']) for s in truth]
    matched = lcs_length(pairs, want) / len(want) if want else float(not pairs)
    oks = step_validity(steps, json.loads(references[1])) if len(references) > 1 else []
    valid_steps = sum(oks) / len(oks) if oks else float(not steps)
    return {'f1': valid_steps, 'step_validity': valid_steps, 'steps_ok': oks,
            'matched': matched, 'score': matched * valid_steps}


def _record_scores(value: Dict[str, Any], references: Sequence[str]) -> Dict[str, Any]:
    truth = json.loads(references[0])
    right = {}
    for k, v in truth.items():
        got = value.get(k)
        right[k] = (normalize_answer(got) == normalize_answer(v) if isinstance(v, str)
                    else got == v)
    frac = sum(right.values()) / len(right) if right else 1.0
    return {'f1': frac, 'fields': right, 'score': frac}


def shape_error(metric: str, value: Any, references: Sequence[str]) -> Optional[str]:
    """Return why ``value`` lacks the shape ``metric`` and the ground truth imply (or None)."""
    truth = json.loads(references[0])
    if metric == 'json_set_f1':
        errs = validate(value, {'type': 'array', 'items': list_schema(0)['items']})
    elif metric == 'json_plan':
        errs = validate(value, plan_schema(len(truth)))
    elif metric == 'json_record':
        errs = validate(value, record_schema(truth))
    else:
        raise ValueError(f'unknown JSON metric {metric!r}; use one of {JSON_METRICS}')
    return '; '.join(errs[:3]) or None


def evaluate(metric: str, value: Any, references: Sequence[str]) -> Dict[str, Any]:
    """Score a parsed answer of the right shape: ``f1``, ``score`` and the details."""
    if metric == 'json_set_f1':
        out = set_scores(value, json.loads(references[0]))
        return {**out, 'score': out['f1']}
    if metric == 'json_plan':
        return _plan_scores(value, references)
    if metric == 'json_record':
        return _record_scores(value, references)
    raise ValueError(f'unknown JSON metric {metric!r}; use one of {JSON_METRICS}')


def score_json(metric: str, prediction: str, references: Sequence[str]) -> float:
    """Score one answer in [0, 1] from the references alone (``scoring.score``'s hook)."""
    ok, value, _ = parse(prediction)
    if not ok or shape_error(metric, value, references):
        return 0.0
    return float(evaluate(metric, value, references)['score'])


def grade(task, text: str) -> Dict[str, Any]:
    """
    Grade an answer to a robot task against the task's own schema.

    Returns ``valid`` (parses and fits ``task.meta['json_schema']``), ``f1`` (item-set F1 for
    lists, step validity for plans, fraction of fields right for summaries), ``score`` (0 when
    not valid, else the task's metric in [0, 1]), ``error`` and the metric's details.
    """
    ok, value, error = parse(text)
    if ok:
        errs = validate(value, json.loads(task.meta['json_schema']))
        error = '; '.join(errs[:3])
    if error:
        return {'valid': False, 'f1': 0.0, 'score': 0.0, 'error': error}
    return {'valid': True, 'error': '', **evaluate(task.metric, value, task.references)}
