"""
Robot workloads answered in JSON under a schema: object lists, plans and log summaries.

A robot's planner asks short questions about a standing scene (``robot_scene``) and parses
the answers, so these tasks measure what a deadline costs a structured answer: each prompt is
the scene (the same text for every question of that scene, so the engine primes it once)
followed by a short question, and each answer must match a JSON schema the decoder enforces:

- ``robot-list``    — ids of the objects that match a colour / type / place condition (5–40);
- ``robot-plan``    — k steps of {action, target} that move an object (and charge);
- ``robot-summary`` — error and warning counts, last error and last event time of the log.

Ground truth is computed from the scene; everything is deterministic given the seed and built
from word lists in ``robot_scene`` (no data files, no network). Grading is in
``robot_grading`` (``grade`` is re-exported here; the metrics are registered in ``scoring``).
"""

from __future__ import annotations

from collections import Counter
import json
import random
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .longctx_tasks import load_tasks, save_tasks
from .robot_grading import ACTIONS, grade, list_schema, plan_schema, record_schema
from .robot_scene import CountTokens, make_scene, measure, Scene
from .tasks import Task

KINDS = ('robot-list', 'robot-plan', 'robot-summary')
METRIC_OF = {'robot-list': 'json_set_f1', 'robot-plan': 'json_plan',
             'robot-summary': 'json_record'}
SIZES = (1024, 2048, 4096, 8192)
LIST_RANGE = (5, 40)
LIST_PREFERRED = (8, 40)  # answers of ≥ 50 tokens where the scene has such conditions
# conditions a planner asks and a small model can answer from a scene grouped by place
_CONDITIONS = (('place',), ('type', 'place'), ('colour', 'place'))

__all__ = ['KINDS', 'METRIC_OF', 'Scene', 'build_robot_tasks', 'grade', 'load_tasks',
           'make_scene', 'make_tasks', 'save_tasks', 'summary']


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(',', ':'))  # as the decoder writes it: no whitespace


def _plural(kind: str) -> str:
    return kind + ('es' if kind.endswith(('x', 's')) else 's')


# ------------------------------------------------------------------------------------ list
def _phrase(cond: Dict[str, str]) -> str:
    what = (f"{cond.get('colour', '')} " if 'colour' in cond else '') + (
        _plural(cond['type']) if 'type' in cond else 'objects')
    return 'all ' + what.strip() + (f" in the {cond['place']}" if 'place' in cond else '')


def list_candidates(scene: Scene) -> List[Tuple[Dict[str, str], List[str]]]:
    """Every condition the scene's objects meet, with the matching ids in scene order."""
    out = []
    for keys in _CONDITIONS:
        values = sorted({tuple(o[k] for k in keys) for o in scene.objects
                         if all(o[k] for k in keys)})
        for vals in values:
            cond = dict(zip(keys, vals))
            ids = [o['id'] for o in scene.objects if all(o[k] == v for k, v in cond.items())]
            out.append((cond, ids))
    return out


def _choose_lists(scene: Scene, rng: random.Random, n: int) -> List[Tuple[dict, List[str]]]:
    """
    Pick ``n`` distinct conditions with answers of spread sizes.

    Each pick draws a wanted count uniformly from LIST_PREFERRED (capped at the largest count
    in LIST_RANGE the scene has) and takes the condition nearest to it, out-of-range counts
    last: small compound conditions outnumber large ones and would otherwise dominate.
    """
    lo, hi = LIST_RANGE
    left = list_candidates(scene)
    out = []
    for _ in range(min(n, len(left))):
        top = max((len(ids) for _, ids in left if lo <= len(ids) <= hi), default=hi)
        want = rng.randint(min(LIST_PREFERRED[0], top), min(LIST_PREFERRED[1], top))
        best = min(left, key=lambda c: (max(lo - len(c[1]), len(c[1]) - hi, 0),
                                        abs(len(c[1]) - want), rng.random()))
        left.remove(best)
        out.append(best)
    return out


def _example_list(scene: Scene, cond: Dict[str, str]) -> str:
    """Return a worked example from the same scene (another place): one-shot, as planners do."""
    for other in scene.places:
        ids = [o['id'] for o in scene.objects
               if o['place'] == other and o['id'] != scene.robot['carrying']]
        if other != cond.get('place') and 2 <= len(ids) <= 12:
            return f' Example: the ids of all objects in the {other} are {_dump(ids)}.'
    return ''


def _list_task(scene: Scene, cond: Dict[str, str], ids: List[str]) -> Dict[str, Any]:
    n = len(ids)
    return {
        'question': f'List the ids of {_phrase(cond)}. Answer with a JSON array of object ids.'
        + _example_list(scene, cond),
        'schema': list_schema(n + max(3, n // 4), [o['id'] for o in scene.objects]),
        'references': [_dump(ids)],
        'max_new_tokens': min(512, 12 * n + 16),
        'meta': {'condition': cond, 'count': n, 'truth': ids},
    }


# ------------------------------------------------------------------------------------ plan
def world_of(scene: Scene) -> Dict[str, Any]:
    """Return the state a plan is checked against (a plan task's ``references[1]``)."""
    return {
        'at': scene.robot['place'],
        'carrying': scene.robot['carrying'],
        'places': scene.places,
        'chargers': scene.chargers,
        'objects': scene.object_place(),
    }


def _plan_task(scene: Scene, rng: random.Random) -> Dict[str, Any]:
    held = scene.robot['carrying']
    steps: List[Dict[str, str]] = []
    parts = []
    if held:
        steps.append({'action': 'place', 'target': held})
        parts.append(f'first place {held}, which the robot holds, where the robot is')
    obj = rng.choice([o for o in scene.objects if o['place']])
    src, dest = obj['place'], rng.choice([p for p in scene.places if p != obj['place']])
    inspect = rng.random() < 0.5
    steps.append({'action': 'goto', 'target': src})
    if inspect:
        steps.append({'action': 'inspect', 'target': obj['id']})
    steps += [{'action': 'pick', 'target': obj['id']}, {'action': 'goto', 'target': dest},
              {'action': 'place', 'target': obj['id']}]
    parts.append(f"bring {obj['id']} to the {dest}: go to the place where {obj['id']} is, "
                 + ('inspect it, ' if inspect else '') + f'pick it, go to the {dest}, place it')
    charger = ''
    if rng.random() < 0.5:
        charger = rng.choice([c for c in scene.chargers if c != dest] or scene.chargers)
        steps += [{'action': 'goto', 'target': charger}, {'action': 'charge', 'target': charger}]
        parts.append(f'then go to the {charger} and charge there')
    k = len(steps)
    said = {'goto': 'go to the {}', 'pick': 'pick {}', 'place': 'place {}',
            'inspect': 'inspect {}', 'charge': 'charge in the {}'}
    question = (
        f'Turn this task into exactly {k} robot steps: '
        + ', then '.join(said[s['action']].format(s['target']) for s in steps)
        + f' ({"; ".join(parts)}). Answer with a JSON array of steps '
        '{"action": ..., "target": ...}; actions: ' + ', '.join(ACTIONS)
        + '; goto and charge take a place, pick, place and inspect an object id.'
    )
    other = next(o for o in scene.objects if o['id'] != obj['id'] and o['place'])
    question += (
        f' Example: "go to the {other["place"]}, then pick {other["id"]}" is '
        + _dump([{'action': 'goto', 'target': other['place']},
                 {'action': 'pick', 'target': other['id']}]) + '.'
    )
    return {
        'question': question,
        'schema': plan_schema(k, scene.places, [o['id'] for o in scene.objects]),
        'references': [_dump(steps), _dump(world_of(scene))],
        'max_new_tokens': 16 * k + 16,
        'meta': {'k': k, 'object': obj['id'], 'source': src, 'dest': dest, 'charger': charger,
                 'truth': steps},
    }


# --------------------------------------------------------------------------------- summary
def log_summary(scene: Scene, component: str = '') -> Dict[str, Any]:
    """
    Ground truth of a log record: the last event (of one component, or of the log).

    A record a planner reads back (what happened last, when, how bad); counting the events
    was tried first and is beyond a 135M model (none of the candidates answered).
    """
    events = [e for e in scene.log if not component or e['component'] == component]
    last = events[-1] if events else {'time': '', 'level': '', 'message': ''}
    return {'time': last['time'], 'level': last['level'], 'message': last['message']}


def _summary_task(scene: Scene, component: str) -> Dict[str, Any]:
    truth = log_summary(scene, component)
    scope = f'the last {component} event of the log' if component else 'the last event of the log'
    question = (
        f'Report {scope} as a record: its time, level (INFO, WARN or ERROR) and message '
        '(without time and level). Answer with a JSON object with the keys '
        + ', '.join(truth) + '.'
    )
    first = scene.log[0] if scene.log else None
    if first is not None:  # one worked example, from the same log
        question += (
            f' Example: the line "{first["time"]} {first["level"]} {first["message"]}" is '
            + _dump({'time': first['time'], 'level': first['level'],
                     'message': first['message']}) + '.'
        )
    return {
        'question': question,
        'schema': record_schema(truth),
        'references': [_dump(truth)],
        'max_new_tokens': 80,
        'meta': {'scope': component or 'all', 'truth': truth},
    }


def _summary_scopes(scene: Scene, rng: random.Random, n: int) -> List[str]:
    components = sorted({e['component'] for e in scene.log})
    scopes = [''] + rng.sample(components, len(components))
    return [scopes[i % len(scopes)] for i in range(n)]


# ------------------------------------------------------------------------------------ tasks
def make_tasks(
    scene: Scene,
    seed: int = 0,
    kinds: Iterable[str] = KINDS,
    per_kind: int = 1,
    count_tokens: Optional[CountTokens] = None,
    schema_in_prompt: bool = True,
) -> List[Task]:
    """
    Ask ``per_kind`` questions of each kind about ``scene``, kinds interleaved.

    Every prompt is ``scene.text`` + a blank line + the question (``meta['context']`` is the
    scene: the prefix a planner primes). ``n_tokens`` counts the prompt as the generator
    encodes it (with the schema appended when ``schema_in_prompt``, as the node does); without
    ``count_tokens`` it is the scene's tokens plus an estimate for the question.
    """
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f'unknown robot task kinds {unknown}; use some of {KINDS}')
    rng = random.Random(f'timebill-robot-tasks-{seed}-{scene.id}')
    specs: Dict[str, List[Dict[str, Any]]] = {}
    for kind in kinds:
        if kind == 'robot-list':
            specs[kind] = [_list_task(scene, c, ids)
                           for c, ids in _choose_lists(scene, rng, per_kind)]
        elif kind == 'robot-plan':
            specs[kind] = [_plan_task(scene, rng) for _ in range(per_kind)]
        else:
            specs[kind] = [_summary_task(scene, c)
                           for c in _summary_scopes(scene, rng, per_kind)]
    count = measure(count_tokens, scene.system_prompt) if count_tokens else None
    tasks = []
    for i in range(per_kind):
        for kind in kinds:
            if i >= len(specs[kind]):
                continue
            spec = specs[kind][i]
            schema = _dump(spec['schema'])
            prompt = scene.text + '\n\n' + spec['question']
            if count is None:
                n_tok = scene.n_tokens + len(spec['question'].split()) * 4 // 3
            else:
                n_tok = count(_with_schema(prompt, schema) if schema_in_prompt else prompt)
            tasks.append(Task(
                id=f'{kind}-{scene.target_tokens}-{scene.seed}-{scene.meta.get("index", 0)}-{i}',
                kind=kind,
                prompt=prompt,
                references=spec['references'],
                metric=METRIC_OF[kind],
                n_tokens=n_tok,
                max_new_tokens=spec['max_new_tokens'],
                system_prompt=scene.system_prompt,
                meta={
                    'scene_id': scene.id,
                    'context': scene.text,
                    'target_tokens': scene.target_tokens,
                    'scene_tokens': scene.n_tokens,
                    'seed': seed,
                    'json_schema': schema,
                    **spec['meta'],
                },
            ))
    return tasks


def _with_schema(prompt: str, schema: str) -> str:
    from ..structured import with_schema  # torch comes with it: only when counting

    return with_schema(prompt, schema)


def build_robot_tasks(
    count_tokens: CountTokens,
    sizes: Sequence[int] = SIZES,
    scenes_per_size: int = 1,
    per_kind: int = 2,
    seed: int = 0,
    kinds: Iterable[str] = KINDS,
    schema_in_prompt: bool = True,
) -> List[Task]:
    """
    Build scenes of each size (tokens, with the system prompt) and their questions.

    The questions of one scene are consecutive, so a sweep primes each scene once.
    """
    kinds = list(kinds)
    tasks: List[Task] = []
    for size in sizes:
        for index in range(scenes_per_size):
            scene = make_scene(seed, size, count_tokens, index=index)
            tasks += make_tasks(scene, seed, kinds, per_kind, count_tokens, schema_in_prompt)
    return tasks


def summary(tasks: Sequence[Task]) -> Dict[str, Any]:
    """Count tasks per kind and scene, the token-length range and the list answers' sizes."""
    counts = [t.meta.get('count', 0) for t in tasks if t.kind == 'robot-list']
    lengths = [t.n_tokens for t in tasks]
    return {
        'n': len(tasks),
        'kinds': dict(Counter(t.kind for t in tasks)),
        'scenes': len({t.meta.get('scene_id') for t in tasks}),
        'sizes': sorted({t.meta.get('target_tokens') for t in tasks}),
        'min_tokens': min(lengths) if lengths else 0,
        'max_tokens': max(lengths) if lengths else 0,
        'list_items': [min(counts), max(counts)] if counts else [],
    }
