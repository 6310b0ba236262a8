"""
A robot's standing scene as text: places, objects, its own state and an event log.

A planner asks many questions about one world model, so the scene is the shared prefix of
their prompts (the engine primes it once and answers each question warm from the prefix
cache). It is built from the word lists below, seeded, with no data files and no network,
and grown object by object (and log line by log line) to a target size in tokens of the
target tokenizer. The text is line-oriented so that a small model can read it: one object
per line (``cup_3: red cup in kitchen at (2.1, 4.0)``), one event per line
(``12:03:41 WARN lidar dropout 0.4 s``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import inspect
import random
from typing import Any, Callable, Dict, List, Optional, Tuple

from .tasks import _fit

PLACES = (
    'kitchen', 'lab', 'office', 'hallway', 'storage', 'workshop', 'lobby', 'garage', 'dock_1',
    'dock_2', 'server_room', 'mail_room', 'canteen', 'clean_room', 'loading_bay',
    'charging_bay',
)
OBJECT_TYPES = (
    'cup', 'box', 'bottle', 'tray', 'crate', 'bin', 'tool', 'cable', 'drill', 'book', 'bag',
    'lamp',
)
COLOURS = ('red', 'blue', 'green', 'yellow', 'black', 'white', 'orange', 'grey')
N_PLACES = 6
N_CHARGERS = 2
SYSTEM_PROMPT = 'You are a robot assistant. Answer from the scene, in JSON only.'
# (level, component, message): {r} a place, {f} a small decimal, {i} an integer, {b} a low one
LOG_EVENTS = (
    ('INFO', 'nav', 'reached {r}'),
    ('INFO', 'nav', 'new goal {r}'),
    ('INFO', 'battery', 'level {i} %'),
    ('INFO', 'camera', 'exposure set {i} ms'),
    ('INFO', 'gripper', 'calibrated in {r}'),
    ('INFO', 'wifi', 'connected to ap_{i}'),
    ('WARN', 'lidar', 'dropout {f} s'),
    ('WARN', 'nav', 'path blocked in {r}'),
    ('WARN', 'battery', 'level low {b} %'),
    ('WARN', 'motor', 'left wheel current high {f} A'),
    ('WARN', 'gripper', 'slip force {f} N'),
    ('WARN', 'wifi', 'signal weak -{i} dBm'),
    ('WARN', 'camera', 'frame late {i} ms'),
    ('ERROR', 'lidar', 'no scans for {f} s'),
    ('ERROR', 'nav', 'localisation lost in {r}'),
    ('ERROR', 'motor', 'right wheel overheated {i} C'),
    ('ERROR', 'gripper', 'stall in {r}'),
    ('ERROR', 'camera', 'frame timeout {i} ms'),
    ('ERROR', 'wifi', 'link down {f} s'),
)
LEVEL_WEIGHTS = {'INFO': 6.0, 'WARN': 2.5, 'ERROR': 1.2}

CountTokens = Callable[..., int]


@dataclass
class Scene:
    """One standing scene: its text and the facts the questions' answers are computed from."""

    id: str  # noqa: A003
    seed: int
    target_tokens: int
    text: str
    n_tokens: int
    places: List[str]
    chargers: List[str]
    robot: Dict[str, Any]  # place, x, y, heading, battery, carrying ('' when nothing)
    objects: List[Dict[str, Any]]  # id, type, colour, place ('' when held), x, y
    log: List[Dict[str, str]]  # time, level, component, message
    system_prompt: str = SYSTEM_PROMPT
    meta: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'Scene':
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def object_place(self) -> Dict[str, str]:
        """Map each object id to its place ('' for the one the robot holds)."""
        return {o['id']: o['place'] for o in self.objects}


def measure(count_tokens: CountTokens, system_prompt: Optional[str]) -> Callable[[str], int]:
    """
    Return a one-argument token counter.

    ``count_tokens`` is either ``f(text)`` or, like ``tasks.counter_for``, ``f(text,
    system_prompt)`` (chat template and system prompt counted too).
    """
    try:
        params = list(inspect.signature(count_tokens).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    takes_two = (
        sum(p.kind in positional for p in params) >= 2
        or any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)
    )
    if takes_two:
        return lambda text: count_tokens(text, system_prompt)
    return lambda text: count_tokens(text)


class _World:
    """Seeded pools of objects and log lines; the first n of each never change with n."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.places = rng.sample(PLACES, N_PLACES)
        self.chargers = sorted(rng.sample(self.places, N_CHARGERS))
        # skewed weights: some places, types and colours are common, others rare
        self.place_w = [rng.uniform(0.5, 4.0) for _ in self.places]
        self.type_w = [rng.uniform(0.5, 3.0) for _ in OBJECT_TYPES]
        self.colour_w = [rng.uniform(0.5, 3.0) for _ in COLOURS]
        self.next_no = {t: rng.randint(1, 5) for t in OBJECT_TYPES}
        self.obj_rng = random.Random(rng.random())
        self.log_rng = random.Random(rng.random())
        self.clock = rng.randint(7 * 3600, 14 * 3600)
        held = self._object(self.obj_rng, '')
        here = rng.choice(self.places)
        self.robot = {
            'place': here,
            'x': round(rng.uniform(0, 20), 1),
            'y': round(rng.uniform(0, 20), 1),
            'heading': rng.randrange(0, 360, 15),
            'battery': rng.randint(25, 95),
            'carrying': held['id'] if rng.random() < 0.5 else '',
        }
        if not self.robot['carrying']:
            held['place'] = here
        self.objects: List[Dict[str, Any]] = [held]
        self.log: List[Dict[str, str]] = []

    def _object(self, rng: random.Random, place: Optional[str] = None) -> Dict[str, Any]:
        kind = rng.choices(OBJECT_TYPES, self.type_w)[0]
        no = self.next_no[kind]
        self.next_no[kind] += rng.randint(1, 3)
        return {
            'id': f'{kind}_{no}',
            'type': kind,
            'colour': rng.choices(COLOURS, self.colour_w)[0],
            'place': rng.choices(self.places, self.place_w)[0] if place is None else place,
            'x': round(rng.uniform(0, 20), 1),
            'y': round(rng.uniform(0, 20), 1),
        }

    def _event(self) -> Dict[str, str]:
        rng = self.log_rng
        self.clock += rng.randint(3, 90)
        weights = [LEVEL_WEIGHTS[e[0]] for e in LOG_EVENTS]
        level, component, template = rng.choices(LOG_EVENTS, weights)[0]
        message = template.format(
            r=rng.choice(self.places), f=round(rng.uniform(0.1, 9.9), 1), i=rng.randint(2, 95),
            b=rng.randint(5, 20),
        )
        t = self.clock % 86400
        return {
            'time': f'{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}',
            'level': level,
            'component': component,
            'message': f'{component} {message}',
        }

    def grow(self, n_objects: int, n_log: int) -> None:
        while len(self.objects) < n_objects:
            self.objects.append(self._object(self.obj_rng))
        while len(self.log) < n_log:
            self.log.append(self._event())


def log_counts(n: int) -> Tuple[int, int]:
    """Return (objects, log lines) of a scene of ``n`` growth units."""
    return n + 2, n // 2 + 3


def render(world: _World, n_objects: int, n_log: int) -> str:
    """Write the scene with the first ``n_objects`` objects and ``n_log`` log lines."""
    r = world.robot
    holding = r['carrying'] or 'nothing'
    lines = [
        'Robot scene. Places: ' + ', '.join(world.places) + '.',
        'Chargers are in: ' + ', '.join(world.chargers) + '.',
        f"Robot: in {r['place']} at ({r['x']}, {r['y']}), heading {r['heading']} deg, "
        f"battery {r['battery']} %, carrying {holding}.",
        '',
        'Objects by place (id: colour type at (x, y)):',
    ]
    shown = world.objects[:n_objects]
    held = [o for o in shown if o['id'] == r['carrying']]
    for place in world.places:  # grouped: a scene graph's rooms, and a list is one block
        here = [o for o in shown if o['place'] == place and o['id'] != r['carrying']]
        if here:
            lines.append(f'In the {place}:')
            lines += [f"{o['id']}: {o['colour']} {o['type']} at ({o['x']}, {o['y']})"
                      for o in here]
    for o in held:
        lines.append(f"Held by the robot: {o['id']}: {o['colour']} {o['type']}")
    lines += ['', 'Event log (time level message):']
    lines += [f"{e['time']} {e['level']} {e['message']}" for e in world.log[:n_log]]
    lines += ['End of scene.']  # the prefix ends on a word: a question after it keeps the ids
    return '\n'.join(lines)


def make_scene(
    seed: int,
    target_tokens: int,
    count_tokens: CountTokens,
    index: int = 0,
    system_prompt: str = SYSTEM_PROMPT,
) -> Scene:
    """
    Build the largest scene whose text (with the system prompt) has at most ``target_tokens``.

    Doubling, then binary search over growth units (one object and half a log line each), so
    the scene ends within about one object line of the target.
    """
    world = _World(random.Random(f'timebill-robot-{seed}-{target_tokens}-{index}'))

    units: Dict[str, int] = {}

    def build(n: int) -> str:
        n_obj, n_log = log_counts(n)
        world.grow(n_obj, n_log)
        text = render(world, n_obj, n_log)
        units[text] = n
        return text

    count = measure(count_tokens, system_prompt)
    text, n_tok = _fit(build, target_tokens, count)
    n_obj, n_log = log_counts(units[text])
    return Scene(
        id=f'scene-{target_tokens}-{seed}-{index}',
        seed=seed,
        target_tokens=target_tokens,
        text=text,
        n_tokens=n_tok,
        places=list(world.places),
        chargers=list(world.chargers),
        robot=dict(world.robot),
        objects=[dict(o) for o in world.objects[:n_obj]],
        log=[dict(e) for e in world.log[:n_log]],
        system_prompt=system_prompt,
        meta={'index': index},
    )
