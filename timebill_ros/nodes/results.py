"""
Results across the boundary: core ``Outcome`` -> action Result, Generate -> TimedInference.

The three carry the same field names; ``test_ros_result_fields`` checks every field reaches
every copy, both ways.
"""

from __future__ import annotations


def copy_fields(src, dst, skip=()):
    """
    Copy same-named fields.

    Generate and TimedInference results share them, and ``core.outcome.Outcome`` uses the same
    names (its ``status`` is a name: see ``to_result``).
    """
    names = set(dst.get_fields_and_field_types()) - set(skip)
    src_names = (
        src.get_fields_and_field_types()
        if hasattr(src, 'get_fields_and_field_types')
        else vars(src)
    )
    for name in src_names:
        if name in names:
            value, kind = getattr(src, name), type(getattr(dst, name))
            setattr(dst, name, kind(value) if kind in (bool, int, float, str) else value)
    return dst


def to_result(outcome, result_type):
    """Make an action result from a pipeline ``Outcome``."""
    result = copy_fields(outcome, result_type(), skip=('status',))
    result.status = status_code(outcome.status, result_type)
    return result


def status_code(name: str, result_type) -> int:
    """Map a status name from core.outcome.STATUS_NAMES to the action's STATUS_* constant."""
    return int(getattr(result_type, f'STATUS_{name.upper()}'))


def status_name(code: int) -> str:
    from timebill_ros.core.outcome import STATUS_NAMES

    return STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else str(code)
