"""
``make demo``: bring the three nodes up, send goals with different budgets, print a table.

A planner's view of TimeBill: before each goal it asks ``estimate_budget`` (is this budget
feasible, and with which α?), then sends the goal and gets an answer before the deadline —
or, for the budget too tight to be feasible, a clean KILLED result at the deadline instead of
a late one. The "tighter" budget is sent twice, with the default quality floor and without
one (``min_quality=0``): where it needs more eviction than the floor allows, the first is
REJECTED with the numbers and the second served at the α it needs, with the accuracy the
press's measured curve expects there (once the generator has learned this machine's speed
from the first goals, the budget may fit without eviction after all: then both succeed).
Everything runs as separate processes on its own ROS_DOMAIN_ID and is stopped at the end, also
on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time


def robot_log(lines: int = 24) -> str:
    """Make a long, deterministic sensor log (~1.2k tokens): a long prompt, where α matters."""
    out = []
    battery = 96.0
    for i in range(lines):
        battery -= 1.6 + (i % 3) * 0.6
        out.append(
            f't={i * 2.5:6.1f}s lidar: nearest obstacle {1.2 + (i * 7 % 11) / 4:.2f} m at bearing '
            f'{(i * 37) % 360} deg; battery {battery:.1f}%; wheel odometry {i * 0.9:.1f} m; '
            f'status {"DOCKING" if i % 17 == 0 else "PATROL"}'
        )
    return '\n'.join(out)


SHORT = 'Name three things a delivery robot should check before crossing a road.'
LONG = (
    robot_log()
    + '\n\nFrom the log above: at what time did the battery first drop below 70%? Answer briefly.'
)
LONG_MAX_NEW = (
    256  # N̂ = N_max capped here: the WCET plans for 256 tokens, answers usually stop far sooner
)


def plan_goals(client):
    """
    Plan (label, prompt, budget, max_new_tokens, min_quality) goals on this machine's WCET range.

    The budgets are placed for the long prompt so the table shows α = 0, 0 < α < α_max, the
    quality floor at work, and a budget no α can meet.
    """
    hi = client.estimate_budget(LONG, 1e4, max_new_tokens=LONG_MAX_NEW)  # α = 0 fits
    # WCET at α_max (no quality floor)
    lo = client.estimate_budget(LONG, 1e-3, max_new_tokens=LONG_MAX_NEW, min_quality=0.0)
    if hi is None or lo is None or not hi.ok:
        raise RuntimeError(
            'timebill/estimate_budget did not answer: is timebill_predictor running?'
        )
    w0, w_max = hi.wcet_s, lo.wcet_at_alpha_s
    tighter = round(w_max + 0.2 * (w0 - w_max), 1)
    return [
        ('short question', SHORT, 20.0, 64, -1.0),
        ('long log, roomy', LONG, round(1.25 * w0, 1), LONG_MAX_NEW, -1.0),
        ('long log, tight', LONG, round((w0 + w_max) / 2, 1), LONG_MAX_NEW, -1.0),
        ('long log, tighter', LONG, tighter, LONG_MAX_NEW, -1.0),
        ('tighter, no floor', LONG, tighter, LONG_MAX_NEW, 0.0),
        ('too tight (infeasible)', LONG, 0.5, LONG_MAX_NEW, -1.0),
    ]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions
    from timebill_ros.bringup import Bringup
    from timebill_ros.client import TimeBillClient

    domain = args.domain_id if args.domain_id is not None else 1 + os.getpid() % 100
    log_dir = args.log_dir or tempfile.mkdtemp(prefix='timebill_demo_')
    context = Context()
    # Python's KeyboardInterrupt, not rclpy's handler: Ctrl-C must reach the finally below.
    rclpy.init(context=context, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
    client = TimeBillClient('timebill_demo', context=context)
    overrides = {'threads': args.threads} if args.threads is not None else {}
    runner = Bringup(args.params, overrides, domain_id=domain, log_dir=log_dir)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    rows = []
    try:
        t0 = time.monotonic()
        print(
            f'[demo] starting timebill_generator, timebill_predictor, timebill_server '
            f'(ROS_DOMAIN_ID={domain}, '
            f'{runner.params.name}{" + threads:=%d" % args.threads if overrides else ""}, '
            f'logs in {log_dir}) ...',
            flush=True,
        )
        runner.up(client, timeout_s=300.0)
        print(
            f'[demo] up in {time.monotonic() - t0:.1f} s; timebill_server is {client.get_state()}',
            flush=True,
        )
        goals = plan_goals(client)[: args.goals]
        for label, prompt, budget, max_new, floor in goals:
            plan = client.estimate_budget(
                prompt, budget, max_new_tokens=max_new, min_quality=floor
            )
            print(
                f"\n[demo] goal '{label}': budget {budget:g} s, "
                f"{plan.prompt_tokens if plan else '?'} prompt "
                f'tokens; plan: {plan.verdict if plan else "no predictor"}, '
                f'α={plan.alpha if plan else 0:.3f}',
                flush=True,
            )
            out = client.ask(prompt, budget, max_new_tokens=max_new, min_quality=floor)
            answer = ' '.join(out.text.split())
            print(f'[demo]   -> {out.status_name}: {out.reason}', flush=True)
            if answer:
                print(
                    f'[demo]   answer: {answer[:160]}{"..." if len(answer) > 160 else ""}',
                    flush=True,
                )
            rows.append((label, budget, plan, out))
    except KeyboardInterrupt:
        print('\n[demo] interrupted', flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        client.close()
        codes = runner.stop()
        rclpy.try_shutdown(context=context)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f'\n[demo] nodes stopped: {codes}', flush=True)
    print_table(rows)
    return 0 if rows and len(rows) == args.goals else 1


def print_table(rows) -> None:
    head = (
        'goal',
        'budget s',
        'plan (before)',
        'α used',
        'quality',
        'N̂',
        'tokens',
        'time s',
        'status',
        'deadline met',
    )
    body = []
    for label, budget, plan, out in rows:
        planned = f'{plan.verdict} α={plan.alpha:.2f}' if plan else '-'
        body.append(
            (
                label,
                f'{budget:g}',
                planned,
                f'{out.alpha:.3f}',
                f'{out.expected_quality:.2f}' if out.expected_quality >= 0 else '-',
                f'{out.predicted_length}{"*" if out.estimate_fallback else ""}',
                str(out.tokens_generated),
                f'{out.total_s:.2f}',
                out.status_name,
                'yes' if out.deadline_met else 'no',
            )
        )
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)
    ]
    line = lambda cells: '  '.join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print('\n' + line(head))
    print(line(['-' * w for w in widths]))
    for r in body:
        print(line(r))
    print(
        "\nplan: the predictor's verdict and α before prefill (estimate_budget); α used: what "
        "the generator solved after the measured prefill; quality: the accuracy the press's "
        'measured curve expects at that α (1 = as without eviction).\nN̂: predicted length '
        '(N_max capped by max_new_tokens until a length predictor is trained; * = no estimate '
        'in time). time: acceptance to result.'
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--params', help='ROS 2 parameters file (default: config/timebill.yaml)')
    p.add_argument('--domain-id', type=int)
    p.add_argument('--log-dir')
    p.add_argument('--goals', type=int, default=6, help='send only the first N goals (of 6)')
    p.add_argument(
        '--threads',
        type=int,
        default=1,
        help='torch threads for the nodes (default 1: on a shared 2-core CPU, two OpenMP threads '
        "were up to 25x slower per token whenever another process ran; -1 = the config's)",
    )
    args = p.parse_args(argv)
    args.threads = None if args.threads is not None and args.threads < 0 else args.threads
    if os.environ.get('_TIMEBILL_REEXEC') != '1':
        reexec_env_for_demo()
    return run(args)


def reexec_env_for_demo() -> None:
    """Like the CLI: restart with the colcon install on the paths if it is not sourced."""
    from timebill_ros.bringup import ros_env, ros_env_active

    if ros_env_active():
        return
    env = ros_env()
    env['_TIMEBILL_REEXEC'] = '1'
    sys.stdout.flush()
    os.execve(
        sys.executable, [sys.executable, '-P', '-m', 'timebill_ros.demo', *sys.argv[1:]], env
    )


if __name__ == '__main__':
    sys.exit(main())
