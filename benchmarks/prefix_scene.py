"""
The prefix benchmark's workload: a robot's standing scene and the short questions about it.

Deterministic given the seed: rooms, objects with ids, colours and positions, and an event log,
grown to a target token count; questions of 20-60 tokens appended after it.
"""

from __future__ import annotations

import random

SIZES = (1024, 4096, 7680)  # context tokens; 7680 + question + 64 answer tokens fit 8192
MAX_NEW = 64
ALPHAS = (0.0, 0.5)
SYSTEM_PROMPT = (
    'You are the task planner of a mobile service robot. Answer briefly and only from the scene '
    'description and the event log.'
)
ROOMS = (
    'kitchen', 'lab', 'corridor', 'storage room', 'office', 'workshop', 'lobby', 'charging bay',
    'meeting room', 'server room',
)
COLOURS = (
    'red', 'blue', 'green', 'yellow', 'white', 'black', 'orange', 'grey', 'purple', 'brown',
)
OBJECTS = (
    'cup', 'box', 'drill', 'cable', 'bottle', 'screwdriver', 'tray', 'laptop', 'chair', 'bin',
    'toolbox', 'lamp', 'helmet', 'cart', 'valve', 'sensor', 'keyboard', 'book', 'bucket', 'mug',
)
SURFACES = ('table', 'shelf', 'floor', 'bench', 'cabinet', 'desk', 'rack', 'windowsill')
STATES = ('idle', 'in use', 'damaged', 'reserved', 'missing a part', 'needs cleaning')
EVENTS = (
    'picked up {o}', 'placed {o} on the {s}', 'scanned {o}', 'reported {o} as {st}',
    'moved {o} to the {r}', 'could not grasp {o}', 'opened the door to the {r}',
    'charged to {p} %', 'detected a person near {o}', 'navigated to the {r}',
)


# ------------------------------------------------------------------------------ standing context
def scene_lines(seed: int, n_lines: int) -> list:
    """Return a robot's scene description and event log, ``n_lines`` lines, seeded."""
    rng = random.Random(seed)
    lines = [f'Scene report of site {seed}. Map frame: metres, origin at the main entrance.']
    objects = []
    for i in range(n_lines):
        if i % 3 != 2 or not objects:  # two object lines per log line
            oid = f'obj_{len(objects):04d}'
            room, colour, kind = rng.choice(ROOMS), rng.choice(COLOURS), rng.choice(OBJECTS)
            x, y, z = rng.uniform(-40, 40), rng.uniform(-25, 25), rng.uniform(0, 2.2)
            objects.append((oid, colour, kind, room))
            lines.append(
                f'{oid}: {colour} {kind} in the {room}, on the {rng.choice(SURFACES)} at '
                f'({x:.2f}, {y:.2f}, {z:.2f}), {rng.choice(STATES)}.'
            )
        else:
            oid, colour, kind, room = rng.choice(objects)
            t = 8 * 3600 + 7 * i
            event = rng.choice(EVENTS).format(
                o=f'{oid} ({colour} {kind})',
                s=rng.choice(SURFACES),
                st=rng.choice(STATES),
                r=rng.choice(ROOMS),
                p=rng.randint(20, 100),
            )
            lines.append(f'[{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}] robot {event}.')
    return lines


def standing_context(engine, target: int, seed: int) -> tuple:
    """Return (text, ids): the longest scene whose shared ids (encode_prefix) fit ``target``."""
    lines = scene_lines(seed, 4 * target // 20 + 50)  # a line is ~20-30 tokens

    def ids(k):
        return engine.encode_prefix('\n'.join(lines[:k]), SYSTEM_PROMPT)

    lo, hi = 1, len(lines)
    while len(ids(hi)) <= target:  # more lines than that many tokens hold
        lines += scene_lines(seed + 1000 + len(lines), len(lines))
        hi = len(lines)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(ids(mid)) <= target else (lo, mid - 1)
    return '\n'.join(lines[:lo]), ids(lo)


def questions(seed: int, count: int) -> list:
    """Return ``count`` distinct questions of 20-60 tokens about the scene."""
    rng = random.Random(seed)
    forms = (
        'Which {c} objects are in the {r}, and which of them is closest to the door? '
        'Give their ids and positions.',
        'The operator needs the {c} {o}. In which room is it, on which surface, and what did the '
        'robot last do with it? Answer in one sentence.',
        'List every object in the {r} that is {st}, with its id, so the robot can plan a route '
        'that visits all of them.',
        'Where is {oid} now, and has the robot moved it since the start of the log? Answer with '
        'the room and the coordinates.',
        'Plan the next task: bring a {c} {o} from the {r} to the charging bay. Which object id '
        'should the robot take?',
    )
    out, seen = [], set()
    while len(out) < count:
        q = rng.choice(forms).format(
            c=rng.choice(COLOURS),
            r=rng.choice(ROOMS),
            o=rng.choice(OBJECTS),
            st=rng.choice(STATES),
            oid=f'obj_{rng.randrange(100):04d}',
        )
        if q not in seen:
            seen.add(q)
            out.append(q)
    return out
