"""
What eviction costs in answers: the measured accuracy-vs-α curve of the configured press.

TimeBill picks the least α that meets the deadline, but a planner also needs to know what that
α costs and to bound it. The curve is measured offline (``benchmarks/press_quality.py``:
exact-match accuracy on long-context tasks the model answers right at α = 0) and shipped as the
quality profile (``config/quality_profile.json``). A goal's quality floor becomes the largest α
whose measured accuracy stays at or above it; a budget that needs more eviction than that ends
at once with the numbers instead of a confident wrong answer.

Without a curve for the configured model and press (any other model, until it is measured), the
default floor falls back to its definition, "no more eviction than ``quality_floor_alpha``",
and an explicit accuracy floor cannot be judged: such a goal is refused with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

# presses whose scores pool votes (the pooling setting changes what they keep)
POOLED = ('snapkv', 'pyramidkv', 'chunkkv', 'question_window', 'ada_layers')


@dataclass(frozen=True)
class QualityCurve:
    """Accuracy at measured eviction ratios; linear in between, flat beyond the last one."""

    press: str
    alphas: Tuple[float, ...]
    accuracy: Tuple[float, ...]
    model: str = ''
    pooling: str = ''
    weights: str = ''
    n_tasks: int = 0
    source: str = ''

    def __post_init__(self):
        a, q = tuple(map(float, self.alphas)), tuple(map(float, self.accuracy))
        if len(a) < 2 or len(a) != len(q):
            raise ValueError('a quality curve needs >= 2 (alpha, accuracy) points of equal count')
        if a[0] != 0.0 or any(y <= x for x, y in zip(a, a[1:])) or a[-1] >= 1.0:
            raise ValueError(f'curve alphas must start at 0, rise and stay below 1: {a}')
        if any(not 0.0 <= v <= 1.0 for v in q):
            raise ValueError(f'accuracies must lie in [0, 1]: {q}')
        object.__setattr__(self, 'alphas', a)
        object.__setattr__(self, 'accuracy', q)

    def at(self, alpha: float) -> float:
        """Return the expected accuracy at ``alpha`` (relative to the answers at α = 0)."""
        a, q = self.alphas, self.accuracy
        x = min(max(float(alpha), 0.0), a[-1])
        for i in range(1, len(a)):
            if x <= a[i]:
                t = (x - a[i - 1]) / (a[i] - a[i - 1])
                return q[i - 1] + t * (q[i] - q[i - 1])
        return q[-1]

    def max_alpha(self, floor: float, alpha_max: float) -> float:
        """
        Return the most eviction whose expected accuracy never drops below ``floor``.

        Scanning up from α = 0, the first crossing below the floor ends it (a later recovery of
        a noisy curve does not count). A floor above the accuracy at α = 0 allows no eviction.
        """
        a, q = self.alphas, self.accuracy
        if q[0] < floor:
            return 0.0
        for i in range(1, len(a)):
            if q[i] < floor:
                cross = a[i - 1] + (a[i] - a[i - 1]) * (q[i - 1] - floor) / (q[i - 1] - q[i])
                return min(cross, alpha_max)
            if a[i] >= alpha_max:
                break
        return alpha_max

    def matches(self, model: str, press: str, pooling: str) -> bool:
        """Tell whether it was measured for this model and press (and pooling, where it counts)."""
        if self.press != press or (self.model and self.model != model):
            return False
        return press not in POOLED or not self.pooling or self.pooling == pooling

    def to_dict(self) -> dict:
        return {
            'press': self.press,
            'pooling': self.pooling,
            'model': self.model,
            'weights': self.weights,
            'alphas': list(self.alphas),
            'accuracy': list(self.accuracy),
            'n_tasks': self.n_tasks,
            'source': self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> 'QualityCurve':
        return cls(
            press=str(d['press']),
            alphas=tuple(d['alphas']),
            accuracy=tuple(d['accuracy']),
            model=str(d.get('model', '')),
            pooling=str(d.get('pooling', '')),
            weights=str(d.get('weights', '')),
            n_tasks=int(d.get('n_tasks', 0)),
            source=str(d.get('source', '')),
        )


@dataclass(frozen=True)
class QualityLimit:
    """How much one goal may evict, and why (the floor behind it, in words for the planner)."""

    alpha_limit: float
    floor: float  # expected accuracy the goal must keep; -1: none
    why: str
    problem: str = ''  # non-empty: the goal's floor cannot be judged (refuse with this)


def limit_for(
    curve: Optional[QualityCurve],
    alpha_max: float,
    floor_alpha: float,
    min_quality: float = -1.0,
    max_alpha: float = -1.0,
) -> QualityLimit:
    """
    Turn a goal's quality wishes into the most eviction it allows.

    ``min_quality``: -1 = the server default (the curve's accuracy at ``floor_alpha``), 0 = no
    floor, (0, 1] = that floor. ``max_alpha``: -1 = no cap, else at most that much eviction.
    """
    if math.isnan(min_quality) or math.isnan(max_alpha):
        return QualityLimit(0.0, -1.0, '', 'min_quality and max_alpha must be numbers')
    limit, floor, why = float(alpha_max), -1.0, f'α_max={alpha_max:g}'
    if min_quality < 0 and floor_alpha < alpha_max:
        if curve is not None:
            floor = curve.at(floor_alpha)
            limit = curve.max_alpha(floor, alpha_max)
            why = (
                f'default quality floor {floor:.2f} (measured accuracy of {curve.press} at '
                f'α={floor_alpha:g}) allows α ≤ {limit:.2f}'
            )
        else:
            limit = float(floor_alpha)
            why = f'default quality floor: no quality curve measured, so α ≤ {floor_alpha:g}'
    elif min_quality > 0:
        if curve is None:
            return QualityLimit(
                0.0,
                float(min_quality),
                '',
                (
                    f'min_quality {min_quality:g} cannot be judged: no accuracy curve was '
                    f'measured for this model and press (benchmarks/press_quality.py); '
                    f'set max_alpha instead'
                ),
            )
        floor = float(min_quality)
        limit = curve.max_alpha(floor, alpha_max)
        why = f'quality floor {floor:.2f} allows α ≤ {limit:.2f} ({curve.press})'
    if 0 <= max_alpha < limit:
        limit, why = float(max_alpha), f'the goal allows α ≤ {max_alpha:g}'
    return QualityLimit(limit, floor, why)


def default_profile_path() -> Path:
    """Find the packaged ``config/quality_profile.json`` (source tree or colcon share dir)."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / 'config' / 'quality_profile.json']
    for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        if p:
            candidates.append(
                Path(p) / 'share' / 'timebill_ros' / 'config' / 'quality_profile.json'
            )
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def load_curves(path: str | os.PathLike) -> List[QualityCurve]:
    data = json.loads(Path(path).read_text())
    return [QualityCurve.from_dict(d) for d in data.get('curves', [])]


def save_curves(curves: Sequence[QualityCurve], path: str | os.PathLike, note: str = '') -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {'note': note, 'curves': [c.to_dict() for c in curves]}
    path.write_text(json.dumps(body, indent=1) + '\n')
    return path


def curve_for(cfg, path: str = '') -> Optional[QualityCurve]:
    """Return the configured press's measured curve for the configured model, or None."""
    path = path or getattr(cfg, 'quality_profile', '') or ''
    p = Path(path) if path else default_profile_path()
    if not p.is_file():
        if path:
            raise FileNotFoundError(f'quality_profile {path} does not exist')
        return None
    for c in load_curves(p):
        if c.matches(cfg.model, cfg.press, cfg.pooling):
            return c
    return None
