"""
``timebill ask "PROMPT" --budget 8``: send one TimedInference goal to running nodes.

Streams the answer as it is decoded (feedback), then prints the result: status and reason,
α, predicted length, WCET, tokens, and the stage timeline that shows the estimate arriving
during prefill. Start the nodes first with ``timebill bringup`` (or ros2 launch).
``--json-schema FILE`` (or ``--grammar FILE``) sends a structured goal: the answer is JSON
matching the schema, checked by the generator token by token; ``--overrun close`` closes it
valid near the deadline.
"""

from __future__ import annotations

import json
import sys

from .options import add_structured_arguments, add_system_arguments


def add_arguments(p) -> None:
    p.add_argument('prompt', help='the question or instruction')
    p.add_argument('--budget', type=float, help='time budget in seconds, counted from acceptance')
    p.add_argument(
        '--deadline-in', type=float, help='absolute deadline this many seconds from now'
    )
    p.add_argument('--system', default='', help='system prompt')
    p.add_argument('--max-new-tokens', type=int, default=0, help="0: the server's default")
    p.add_argument(
        '--overrun', default='', help="kill | truncate | close | skip-next (default: the server's)"
    )
    add_structured_arguments(p)
    p.add_argument(
        '--estimate', action='store_true', help='ask estimate_budget first and print the plan'
    )
    p.add_argument('--quiet', action='store_true', help='no streaming, only the result')
    p.add_argument('--json', action='store_true', help='print the result as JSON')
    add_system_arguments(p, 'server to be ready')


class _Printer:
    """Prints stage changes and the newly decoded text as feedback arrives."""

    def __init__(self):
        self.stage = None
        self.shown = ''

    def __call__(self, fb) -> None:
        from timebill_ros.goal_result import STAGE_NAMES

        if fb.stage != self.stage:
            self.stage = fb.stage
            extra = (
                f' (α={fb.alpha:.3f}, N̂={fb.predicted_length})'
                if STAGE_NAMES.get(fb.stage) == 'decoding'
                else ''
            )
            print(f'\n[{STAGE_NAMES.get(fb.stage, fb.stage)}]{extra} ', end='', flush=True)
        if fb.partial_text.startswith(self.shown):
            print(fb.partial_text[len(self.shown):], end='', flush=True)
        self.shown = fb.partial_text


def format_outcome(out) -> str:
    t = out.timeline
    lines = [f'status: {out.status_name} — {out.reason}']
    if out.accepted and out.status_name != 'rejected':
        lines += [
            f'deadline met: {out.deadline_met}   completed: {out.completed}   tokens: '
            f'{out.tokens_generated}',
            f'α: {out.alpha:.3f}   predicted length: {out.predicted_length}'
            f'{" (N_max fallback)" if out.estimate_fallback else ""}   WCET: {out.wcet_s:.2f} s',
            f'prefill {out.prefill_s:.2f} s, decode {out.decode_s:.2f} '
            f's, total {out.total_s:.2f} s (budget {out.budget_s:g} s)',
            'timeline (s since acceptance): '
            + ', '.join(
                f'{k} {v:.3f}' for k, v in sorted(t.items(), key=lambda kv: kv[1]) if v >= 0
            ),
        ]
        if out.structured:  # the parsed answer (a planner's json.loads of the text)
            value = f'   value: {json.dumps(out.value)}' if out.valid else ''
            lines.insert(-1, f'valid: {out.valid}{value}')
    return '\n'.join(lines)


def run(args) -> int:
    from timebill_ros.bringup import reexec_with_ros_env

    reexec_with_ros_env()
    from timebill_ros.client import TimeBillClient

    if args.budget is None and args.deadline_in is None:
        print('give --budget SECONDS (or --deadline-in SECONDS)', file=sys.stderr)
        return 2
    from pathlib import Path

    from timebill_ros.cli.generate import read_schema

    try:
        schema = read_schema(args.json_schema) if args.json_schema else None
        grammar = Path(args.grammar).expanduser().read_text('utf-8') if args.grammar else ''
    except OSError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    with TimeBillClient('timebill_ask', namespace=args.namespace) as tb:
        if not tb.wait_until_ready(args.wait):
            print(
                f'timebill_server is not ready after {args.wait:g} s (state: '
                f'{tb.get_state(timeout_s=1.0)!r}); '
                'start it with `timebill bringup`',
                file=sys.stderr,
            )
            return 1
        if args.estimate and args.budget is not None:
            plan = tb.estimate_budget(
                args.prompt,
                args.budget,
                args.system,
                args.max_new_tokens,
                schema=schema,
                grammar=grammar,
                overrun_policy=args.overrun,
            )
            if plan is not None:
                print(
                    f'plan: ok={plan.ok} feasible={plan.feasible} α={plan.alpha:.3f} '
                    f'N̂={plan.predicted_length} '
                    f'WCET={plan.wcet_at_alpha_s:.2f} s — {plan.reason}'
                )
        deadline = tb.now_s() + args.deadline_in if args.deadline_in is not None else None
        out = tb.ask(
            args.prompt,
            args.budget,
            deadline_s=deadline,
            system_prompt=args.system,
            max_new_tokens=args.max_new_tokens,
            overrun_policy=args.overrun,
            on_feedback=None if (args.quiet or args.json) else _Printer(),
            schema=schema,
            grammar=grammar,
        )
    if args.json:
        from dataclasses import asdict

        print(json.dumps(dict(asdict(out), status_name=out.status_name), indent=2))
    else:
        head = out.text + '\n' if args.quiet else '\n'  # streamed text is already on screen
        print(head + format_outcome(out))
    if out.status_name == 'rejected':
        return 2
    return 0 if out.ok else 1
