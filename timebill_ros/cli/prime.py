"""
``timebill prime "CONTEXT"``: load a standing context into the generator's prefix KV cache.

Goals whose prompt starts with that context (same system prompt) then prefill only what
follows it. Prints how many tokens are cached, the seconds it took, the cache's memory and the
prime id; ``--release ID`` lets a primed context go. Start the nodes first with
``timebill bringup`` (or ros2 launch); the system must be active.
"""

from __future__ import annotations

from pathlib import Path
import sys

from .options import add_system_arguments


def add_arguments(p) -> None:
    p.add_argument('context', nargs='?', help='the standing context the goals start with')
    p.add_argument('--file', help='read the context from this file (instead of CONTEXT)')
    p.add_argument('--system-prompt', default='', help="the goals' system prompt")
    p.add_argument('--id', default='', help='name the prime (default: a hash of its tokens)')
    p.add_argument('--release', metavar='ID', help='release the primed context ID')
    p.add_argument(
        '--timeout',
        type=float,
        default=0.0,
        help='answer after this many seconds at most (priming goes on); 0: when done',
    )
    add_system_arguments(p, 'generator to answer')


def format_primed(got) -> str:
    return (
        f'prime {got.prime_id or "-"}: ok={got.ok} — {got.reason}\n'
        f'cached {got.cached_tokens} of {got.context_tokens} context tokens in '
        f'{got.seconds:.2f} s; fits the bound: {got.fit}; prefix cache holds '
        f'{got.cache_mb_held:.1f} MB'
    )


def run(args) -> int:
    from timebill_ros.bringup import reexec_with_ros_env

    if args.file and args.context:
        print('give CONTEXT or --file, not both', file=sys.stderr)
        return 2
    context = args.context
    if args.file:
        try:
            context = Path(args.file).read_text(encoding='utf-8')
        except (OSError, UnicodeDecodeError) as exc:
            print(f'cannot read {args.file}: {exc}', file=sys.stderr)
            return 2
    if context is None and not args.release:
        print('give the CONTEXT text, --file F, or --release ID', file=sys.stderr)
        return 2
    reexec_with_ros_env()
    from timebill_ros.client import TimeBillClient

    code = 0
    with TimeBillClient('timebill_prime', namespace=args.namespace) as tb:
        if args.release:
            out = tb.release(args.release, timeout_s=args.wait)
            print(f'release {args.release}: ok={out.ok} — {out.reason}')
            code = 0 if out.ok else 1
        if context is not None:
            got = tb.prime(
                context,
                args.system_prompt,
                prime_id=args.id,
                timeout_s=args.timeout,
                wait_s=args.wait,
            )
            print(format_primed(got))
            code = code or (0 if got.ok else 1)
    return code
