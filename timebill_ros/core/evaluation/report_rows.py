"""
Reading a sweep's results dict: rows per overrun strategy and their confidence intervals.

The Markdown tables and the figures show the same rows; both read them through here, so a row
the one shows the other shows too.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

from .policies import outcome_cis

OVERRUN_TITLES = {'kill': 'Kill', 'skip-next': 'Skip-Next'}
OWN_DEADLINE = ('truncate', 'close')  # policies that act at the deadline (no Kill/Skip-Next)


def rows_by_policy(table: List[dict], overrun: str) -> Dict[str, Dict[float, dict]]:
    """Policy -> budget -> row, for one overrun strategy (truncate and close show under both)."""
    out: Dict[str, Dict[float, dict]] = {}
    for row in table:
        if row['overrun'] in (overrun, 'truncate', 'close'):
            out.setdefault(row['policy'], {})[row['budget_s']] = row
    return out


def is_missing(x: Any) -> bool:
    """Tell a value the JSON could not hold (None, NaN), shown as a dash."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def add_cis(results: dict) -> dict:
    """
    Fill in ``completion_ci`` / ``score_ci`` from stored outcomes where a row lacks them.

    Results written before the CIs existed hold only the per-job outcomes; rows without
    outcomes (old k sweeps) stay without CIs and are shown as point values.
    """
    for d in results.get('groups', {}).values():
        for row in list(d.get('table', [])) + list(d.get('k_sweep', [])):
            if 'completion_ci' in row and 'score_ci' in row:
                continue
            outs = row.get('outcomes')
            if outs is None:
                continue
            row.update(
                outcome_cis(
                    [float(bool(o['completed'])) for o in outs],
                    [math.nan if o['score'] is None else o['score'] for o in outs],
                )
            )
    return results


def ci_of(row: dict, key: str) -> Optional[Sequence[float]]:
    """Return the row's ``key`` interval, or None when absent or undefined (no jobs)."""
    ci = row.get(key)
    if not ci or any(is_missing(c) for c in ci):
        return None
    return ci
