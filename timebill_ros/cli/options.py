"""
Command-line options that several ``timebill`` subcommands share, declared once.

The params file and its per-run overrides, the structured-answer flags, the flags that find a
running system, list-valued flags, and the press names (taken from the press registry, so a new
press shows in ``--help`` without editing the CLI).
"""

from __future__ import annotations

import argparse


def _split(text: str, kind, what: str) -> list:
    try:
        values = [kind(x) for x in text.replace(' ', '').split(',') if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected comma-separated {what}, got {text!r}'
        ) from None
    if not values:
        raise argparse.ArgumentTypeError('empty list')
    return values


def int_list(text: str) -> list:
    """Parse ``N,N,...`` (an argparse type): prompt lengths, grids, scene sizes."""
    return _split(text, int, 'integers')


def float_list(text: str) -> list:
    """Parse ``S,S,...`` (an argparse type): budgets in seconds, pessimism factors."""
    return _split(text, float, 'numbers')


def add_config_arguments(
    p,
    config_help: str = 'ROS 2 params YAML (default: the packaged config/timebill.yaml)',
    scope: str = '',
):
    """Add the flags ``load_config`` reads: one params file, then per-run overrides."""
    p.add_argument('--config', help=config_help)
    p.add_argument(
        '--model',
        help=f"{scope}override the config's model (alias, HF directory, .gguf file or hub id)",
    )
    p.add_argument('--dtype', help=f"{scope}override the config's dtype")
    p.add_argument('--device', help=f"{scope}override the config's device")
    p.add_argument('--threads', type=int, help=f"{scope}override the config's torch threads")


def load_config(args):
    """
    Build the config a subcommand runs with.

    ``--config`` (else the packaged YAML), then the ``--model/--dtype/--device/--threads`` flags
    the subcommand declares.
    """
    from timebill_ros.core.config import default_config_path, TimeBillConfig

    path = getattr(args, 'config', None) or (
        default_config_path() if default_config_path().is_file() else None
    )
    cfg = TimeBillConfig.from_yaml(path) if path else TimeBillConfig()
    changes = {
        k: getattr(args, k)
        for k in ('model', 'dtype', 'device', 'threads')
        if getattr(args, k, None) is not None
    }
    return cfg.replace(**changes) if changes else cfg


def add_structured_arguments(p, schema_note: str = '') -> None:
    """Add ``--json-schema`` and ``--grammar``: a goal whose answer must parse."""
    p.add_argument(
        '--json-schema',
        default=None,
        metavar='FILE',
        help='JSON schema the answer must match (a file, or the JSON itself)' + schema_note,
    )
    p.add_argument('--grammar', default=None, metavar='FILE', help='Lark grammar file')


def add_system_arguments(p, waits_for: str) -> None:
    """Add the flags that find a running TimeBill system: its namespace, how long to wait."""
    p.add_argument('--namespace', default='', help="the TimeBill system's ROS namespace")
    p.add_argument(
        '--wait', type=float, default=30.0, help=f'seconds to wait for the {waits_for}'
    )


class PressNames:
    """
    The press registry's names, read when argparse first needs them (help or a check).

    Reading the registry imports torch; every ``timebill`` call declares every subcommand's
    flags, so a list made up front would make even ``timebill --help`` pay for it.
    """

    def _names(self) -> list:
        from timebill_ros.core.eviction import PRESSES

        return sorted(PRESSES)

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()
