"""
``make demo``: bring the three nodes up, ask one robot scene several questions, print a table.

A planner's view of TimeBill: the robot's standing context (a sensor log of ~2k tokens) is
asked one question cold — its prefill is paid once and cached — then more questions warm,
whose prefill computes only the question (the table shows prefill seconds and cached tokens).
Before each goal the planner asks ``estimate_budget`` (feasible? which α? how much is cached?)
and gets an answer before the deadline. The warm budgets are placed between the worst case at
α_max and at α = 0, so they bind: TimeBill evicts (α > 0), the same budget with the default
quality floor is REJECTED with the numbers, and one budget no α can meet ends at once with the
reason. Then a second scene is primed ahead of time (``TimeBillClient.prime``) and its first
question is already warm. Everything runs as separate processes on its own ROS_DOMAIN_ID and is
stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time


def robot_log(lines: int = 40, seed: int = 0) -> str:
    """Make a long, deterministic sensor log (~2k tokens): a standing context, where α matters."""
    out = []
    battery = 96.0 - seed
    for i in range(lines):
        battery -= 1.6 + (i % 3) * 0.6
        out.append(
            f't={i * 2.5:6.1f}s lidar: nearest obstacle {1.2 + (i * 7 % 11) / 4:.2f} m at bearing '
            f'{(i * 37) % 360} deg; battery {battery:.1f}%; wheel odometry {i * 0.9:.1f} m; '
            f'status {"DOCKING" if i % 17 == 0 else "PATROL"}'
        )
    return f'Robot {seed + 1} sensor log:\n' + '\n'.join(out)


SCENE = robot_log()
SCENE2 = robot_log(seed=1)
QUESTIONS = (
    'From the log above: at what time did the battery first drop below 70%? Answer briefly.',
    'From the log above: what was the status at t=42.5 s? Answer with one word.',
    'From the log above: how far had the wheels travelled at t=20.0 s? Answer briefly.',
    'From the log above: list the times when the status was DOCKING.',
    'From the log above: what was the nearest obstacle at t=5.0 s? Answer briefly.',
    'From the log above: what was the battery level at the end of the log?',
)
MAX_NEW = 256  # N̂ = N_max capped here: the WCET plans for 256 tokens, answers stop far sooner


def ask_scene(scene: str, i: int) -> str:
    """Return the scene followed by question ``i``: the prompt a planner sends."""
    return f'{scene}\n\n{QUESTIONS[i % len(QUESTIONS)]}'


def plan_goals(client):
    """
    Plan (label, prompt, budget, max_new_tokens, min_quality) goals on this machine's WCET range.

    Roomy budgets for the cold and the first warm question; then, for a warm question, budgets
    between its worst case at α_max and at α = 0 (asked of ``estimate_budget`` once the scene is
    cached), so the table shows 0 < α, the quality floor at work, and a budget no α can meet.
    """
    roomy = client.estimate_budget(ask_scene(SCENE, 0), 1e4, max_new_tokens=MAX_NEW)
    if roomy is None or not roomy.ok:
        raise RuntimeError(
            'timebill/estimate_budget did not answer: is timebill_predictor running?'
        )
    big = round(1.5 * roomy.wcet_s + 5.0, 1)
    return [
        ('scene, 1st question (cold)', ask_scene(SCENE, 0), big, MAX_NEW, -1.0),
        ('scene, 2nd question (warm)', ask_scene(SCENE, 1), big, MAX_NEW, -1.0),
        # placed by binding_budgets() once the scene is cached:
        ('warm, budget binds', ask_scene(SCENE, 2), 'bind', MAX_NEW, 0.0),
        ('warm, same, quality floor', ask_scene(SCENE, 3), 'tighter', MAX_NEW, -1.0),
        ('warm, tighter, no floor', ask_scene(SCENE, 3), 'tighter', MAX_NEW, 0.0),
        ('warm, too tight', ask_scene(SCENE, 4), 'infeasible', MAX_NEW, -1.0),
        ('2nd scene, primed', ask_scene(SCENE2, 5), big, MAX_NEW, -1.0),
    ]


def binding_budgets(client, prompt: str) -> dict:
    """Budgets for a warm question: between its worst case at α_max and at α = 0."""
    hi = client.estimate_budget(prompt, 1e4, max_new_tokens=MAX_NEW)
    lo = client.estimate_budget(prompt, 1e-3, max_new_tokens=MAX_NEW, min_quality=0.0)
    w0, w_max = hi.wcet_s, lo.wcet_at_alpha_s
    return {
        'bind': round((w0 + w_max) / 2, 2),
        'tighter': round(w_max + 0.15 * (w0 - w_max), 2),
        'infeasible': 0.02,  # below the warm prefill and one step: refused at once
    }


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
            if isinstance(budget, str):  # placed for this prompt, on the model as it is now
                budget = binding_budgets(client, prompt)[budget]
            if 'primed' in label:
                t = time.monotonic()
                got = client.prime(SCENE2, timeout_s=300.0)
                print(
                    f'\n[demo] primed the 2nd scene ahead of its goals: {got.cached_tokens} of '
                    f'{got.context_tokens} tokens cached in {got.seconds:.2f} s '
                    f'({time.monotonic() - t:.2f} s at the planner): {got.reason}',
                    flush=True,
                )
            plan = client.estimate_budget(
                prompt, budget, max_new_tokens=max_new, min_quality=floor
            )
            print(
                f"\n[demo] goal '{label}': budget {budget:g} s, "
                f"{plan.prompt_tokens if plan else '?'} prompt "
                f'tokens; plan: {plan.verdict if plan else "no predictor"}, '
                f'α={plan.alpha if plan else 0:.3f}, cached {getattr(plan, "cached_tokens", 0)}',
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
        'cached',
        'prefill s',
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
                f'{getattr(out, "cached_tokens", 0)}/{out.prompt_tokens}',
                f'{out.prefill_s:.2f}' if out.prefill_s > 0 else '-',
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
        "\nplan: the predictor's verdict and α before prefill (estimate_budget); cached: prompt "
        'tokens taken from the prefix cache (the scene, after its first question or a prime); '
        "α used: what the generator solved after the measured prefill; quality: the press's "
        'measured curve expects at that α (1 = as without eviction).\nN̂: predicted length '
        '(N_max capped by max_new_tokens until a length predictor is trained; * = no estimate '
        'in time). time: acceptance to result.'
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--params', help='ROS 2 parameters file (default: config/timebill.yaml)')
    p.add_argument('--domain-id', type=int)
    p.add_argument('--log-dir')
    p.add_argument('--goals', type=int, default=7, help='send only the first N goals (of 7)')
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
