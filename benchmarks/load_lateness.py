"""
Lateness under load: when do answers reach the planner, measured against their deadlines.

Why it exists: the request pipeline is being rewritten, and the claim to defend is that an
answer (or a refusal) reaches the planner before its absolute deadline even when several
planners share the model and the CPU is contended. This script measures that at the CLIENT,
so it can be run unchanged on the commit before the rewrite and after it (it uses only the
public client names: TimeBillClient, estimate_budget, send_goal/get_result or ask,
cancel_task).

It brings the three nodes up with ``Bringup`` (real SmolLM2, threads:=1, own ROS_DOMAIN_ID),
optionally starts N busy-loop processes (``--hog``), and runs ``--planners`` planner processes.
Each alternates long prompts (a slice of a Debian licence text with a planted passkey) and
short robot questions, with budgets from infeasible to roomy; half the goals are checked with
``estimate_budget`` first and a few are canceled ~1 s after sending. Every goal's send time,
deadline (send + budget, system time = the server's ROS time), arrival time and outcome are
written to JSON; a Markdown table of lateness (arrival - deadline) per status is printed,
with node thread counts and RSS idle and under load.

    python -P benchmarks/load_lateness.py --planners 2 --hog 1 --duration 270

With ``--scenes S --fresh F`` the first ``planners - F`` planners share ``S`` standing contexts
(licence text of ~1.5-3k words with planted locker codes, the same for every planner), prime
them at start (``TimeBillClient.prime``) and then ask short questions about them, so their
goals reuse the prefix cache; the last ``F`` planners send fresh prompts as above. The report
adds prefix-cache hits, kills in prefill that EstimateBudget had called feasible (false kills),
how often the measured time exceeded the result's own ``wcet_s``, and how often the length
estimate arrived after prefill.

    python -P benchmarks/load_lateness.py --planners 3 --scenes 2 --fresh 1 --hog 1
        --duration 420 --estimate-share 1.0
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
import random
import subprocess
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also under -P
from benchkit import licence_words, proc_status  # noqa: E402,I100
from lateness_report import report  # noqa: E402

SHORT = (
    'Is the corridor clear?',
    'Where is the charging dock?',
    'Name one safe speed for a robot arm near people.',
    'Should the robot stop when a person is close?',
    'What does a red warning light on the robot mean?',
    'Which shelf should the box go on?',
)


def scene(index: int, words: list) -> tuple:
    """Return standing context ``index`` (text, {locker: code}): the same in every planner."""
    rng = random.Random(5000 + index)
    n = rng.randint(1500, 3000)
    start = rng.randrange(len(words) - n)
    chunk = words[start:start + n]
    codes = {k: rng.randint(10000, 99999) for k in range(1, 9)}
    for k, code in codes.items():
        chunk.insert(rng.randrange(len(chunk)), f'The code of locker {k} is {code}.')
    return f'Scene {index}. ' + ' '.join(chunk), codes


def long_prompt(rng: random.Random, words: list) -> tuple:
    n = rng.randint(300, 3000)
    start = rng.randrange(len(words) - n)
    chunk = words[start:start + n]
    key = rng.randint(10000, 99999)
    chunk.insert(rng.randrange(len(chunk)), f'The passkey is {key}.')
    text = ' '.join(chunk) + '\n\nWhat is the passkey in the text above? Answer with the number.'
    return text, n, key


# ------------------------------------------------------------------------------ planner
def planner(args) -> int:
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions
    import timebill_ros
    from timebill_ros.client import TimeBillClient

    rng = random.Random(1000 + args.worker)
    words = licence_words()
    out = Path(args.out) / f'planner{args.worker}.json'
    records: list = []

    def dump():
        out.write_text(
            json.dumps(
                {'module': timebill_ros.__file__, 'records': records, 'primes': primes}, indent=1
            )
        )

    ctx = Context()
    rclpy.init(context=ctx, domain_id=args.domain, signal_handler_options=SignalHandlerOptions.NO)
    tb = TimeBillClient(f'lateness_planner_{args.worker}', context=ctx)
    sharing = args.scenes > 0 and args.worker < args.planners - args.fresh
    scenes = [scene(i, words) for i in range(args.scenes)] if sharing else []
    primes: list = []
    try:
        if hasattr(tb, 'wait_until_ready') and not tb.wait_until_ready(120.0):
            print(f'planner {args.worker}: server not ready', file=sys.stderr)
        time.sleep(1.5)  # let DDS discovery settle before the first goal
        if sharing and hasattr(tb, 'prime'):  # each sharing planner primes one scene
            t = time.time()
            got = tb.prime(scenes[args.worker % len(scenes)][0], timeout_s=300.0)
            primes.append(
                {
                    'scene': args.worker % len(scenes),
                    'wall_s': time.time() - t,
                    **{
                        f: getattr(got, f, None)
                        for f in ('ok', 'reason', 'context_tokens', 'cached_tokens', 'seconds')
                    },
                }
            )
        end, k = time.time() + args.duration, 0
        while time.time() < end and (not args.goals_per_planner or k < args.goals_per_planner):
            if sharing:
                rec = {'planner': args.worker, 'k': k, 'kind': 'scene'}
                rec['scene'] = (args.worker + k) % len(scenes)
                text, codes = scenes[rec['scene']]
                locker = rng.choice(sorted(codes))
                rec['passkey'] = codes[locker]
                prompt = (
                    text + f'\n\nWhat is the code of locker {locker}? Answer with the number.'
                )
            else:
                rec = {'planner': args.worker, 'k': k, 'kind': 'long' if k % 2 == 0 else 'short'}
                if rec['kind'] == 'long':
                    prompt, rec['words'], rec['passkey'] = long_prompt(rng, words)
                else:
                    prompt = rng.choice(SHORT)
            budget = round(math.exp(rng.uniform(math.log(0.5), math.log(20.0))), 3)
            mnt = rng.randint(32, 64)
            cancel = k % 7 == 5
            rec.update(budget_s=budget, max_new_tokens=mnt, cancel=cancel)
            if rng.random() < args.estimate_share:
                t = time.time()
                plan = tb.estimate_budget(prompt, budget, max_new_tokens=mnt)
                rec['estimate_s'] = time.time() - t
                keys = (
                    'ok',
                    'guaranteed',
                    'feasible',
                    'admissible',
                    'verdict',
                    'alpha',
                    'wcet_at_alpha_s',
                    'prompt_tokens',
                    'queued_ahead',
                )
                rec['estimate'] = plan and {f: getattr(plan, f, None) for f in keys}
            records.append(rec)
            give_up = budget + 120.0
            rec.update(status='timeout', sent_s=time.time())
            rec['deadline_s'] = rec['sent_s'] + budget
            dump()
            if hasattr(tb, 'send_goal'):
                o = tb.send_goal(prompt, budget, max_new_tokens=mnt)
                if o is None and cancel:
                    time.sleep(1.0)
                    rec['cancel_sent_s'] = time.time()
                    rec['cancel_accepted'] = bool(tb.cancel_task())
                if o is None:
                    o = tb.get_result(max(give_up - (time.time() - rec['sent_s']), 1.0))
            else:
                o = tb.ask(prompt, budget, max_new_tokens=mnt, timeout_s=give_up)
            rec['arrival_s'] = time.time()
            rec['lateness_s'] = rec['arrival_s'] - rec['deadline_s']
            timed_out = (
                o.status_name == 'aborted' and rec['arrival_s'] - rec['sent_s'] >= give_up - 0.5
            )
            rec.update(
                status='timeout' if timed_out else o.status_name,
                reason=o.reason,
                accepted=bool(o.accepted),
                alpha=float(o.alpha),
                tokens=int(o.tokens_generated),
                prompt_tokens=int(o.prompt_tokens),
                cached_tokens=int(getattr(o, 'cached_tokens', 0)),
                deadline_met=bool(o.deadline_met),
                server_total_s=float(o.total_s),
                prefill_s=float(o.prefill_s),
                wcet_s=float(o.wcet_s),
                timeline=dict(getattr(o, 'timeline', {}) or {}),
            )
            dump()
            k += 1
    finally:
        dump()
        tb.close()
        rclpy.try_shutdown(context=ctx)
    return 0


# --------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument('--planners', type=int, default=2)
    ap.add_argument('--hog', type=int, default=0, help='busy-loop processes during the load')
    ap.add_argument('--duration', type=float, default=270.0, help='seconds of load per planner')
    ap.add_argument('--goals-per-planner', type=int, default=0, help='0: until --duration')
    ap.add_argument('--domain', type=int, default=77, help='ROS_DOMAIN_ID (never 0)')
    ap.add_argument(
        '--estimate-share', type=float, default=0.5, help='share of goals estimated first'
    )
    ap.add_argument('--out', default='results/load_lateness')
    ap.add_argument(
        '--scenes', type=int, default=0, help='standing contexts shared by the sharing planners'
    )
    ap.add_argument(
        '--fresh', type=int, default=1, help='with --scenes: planners that send fresh prompts'
    )
    ap.add_argument('--worker', type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.domain == 0:
        ap.error('--domain 0 is the shared default domain: pick another')
    if args.worker >= 0:
        return planner(args)

    from timebill_ros.bringup import Bringup, ros_env, ros_env_active

    if not ros_env_active():  # the type-support libraries must be on LD_LIBRARY_PATH at start
        os.execve(
            sys.executable,
            [
                sys.executable,
                '-P',
                os.path.abspath(__file__),
                *(sys.argv[1:] if argv is None else argv),
            ],
            ros_env(),
        )
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions
    from timebill_ros.client import TimeBillClient

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob('planner*.json'):
        old.unlink()
    ctx = Context()
    rclpy.init(context=ctx, domain_id=args.domain, signal_handler_options=SignalHandlerOptions.NO)
    tb = TimeBillClient('lateness_bringup', context=ctx)
    bringup = Bringup(overrides={'threads': 1}, domain_id=args.domain, log_dir=out / 'logs')
    env = dict(bringup.env)
    probe = 'import timebill_ros, timebill_ros.msg as m; print(timebill_ros.__file__, m.__file__)'
    where = subprocess.run(
        [sys.executable, '-P', '-c', probe], env=env, capture_output=True, text=True
    ).stdout.strip()
    print(f'nodes import: {where}', flush=True)
    hogs, planners, mem, records = [], [], {}, []
    t0 = time.time()
    try:
        bringup.up(tb, timeout_s=300.0)
        print(f'up in {time.time() - t0:.0f} s', flush=True)
        pids = {name: p.pid for name, p in bringup.procs.items()}
        idle = {}
        for _ in range(3):
            for name, pid in pids.items():
                s = proc_status(pid)
                i = idle.setdefault(name, {'Threads': 0, 'VmRSS': 0})
                i.update({k: max(i[k], s.get(k, 0)) for k in i})
            time.sleep(1.0)
        mem = {
            n: {
                'idle_threads': i['Threads'],
                'idle_rss': i['VmRSS'],
                'max_threads': 0,
                'max_rss': 0,
                'samples': [],
            }
            for n, i in idle.items()
        }
        hogs = [
            subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(args.hog)
        ]
        cmd = [
            sys.executable,
            '-P',
            os.path.abspath(__file__),
            '--domain',
            str(args.domain),
            '--duration',
            str(args.duration),
            '--goals-per-planner',
            str(args.goals_per_planner),
            '--estimate-share',
            str(args.estimate_share),
            '--out',
            str(out),
            '--planners',
            str(args.planners),
            '--scenes',
            str(args.scenes),
            '--fresh',
            str(args.fresh),
        ]
        planners = [
            subprocess.Popen([*cmd, '--worker', str(i)], env=env) for i in range(args.planners)
        ]
        hard_end = time.time() + args.duration + 20.0 + 150.0
        while any(p.poll() is None for p in planners) and time.time() < hard_end:
            for name, pid in pids.items():
                s = proc_status(pid)
                m = mem[name]
                m['samples'].append([round(time.time() - t0, 1), s.get('Threads'), s.get('VmRSS')])
                m['max_threads'] = max(m['max_threads'], s.get('Threads', 0))
                m['max_rss'] = max(m['max_rss'], s.get('VmRSS', 0))
            time.sleep(3.0)
        dead = {n: c for n, c in bringup.alive().items() if c is not None}
        if dead:
            print(f'node(s) died during the load: {dead}', flush=True)
    finally:
        for p in hogs + planners:
            if p.poll() is None:
                p.kill()
            p.wait()
        codes = bringup.stop()
        tb.close()
        rclpy.try_shutdown(context=ctx)
        print(f'node exit codes: {codes}', flush=True)
    modules, primes = set(), []
    for f in sorted(out.glob('planner*.json')):
        data = json.loads(f.read_text())
        modules.add(data['module'])
        records += data['records']
        primes += data.get('primes', [])
    text = report(records, mem)
    summary = {
        'args': vars(args),
        'nodes_import': where,
        'planner_modules': sorted(modules),
        'node_exit_codes': codes,
        'memory': mem,
        'primes': primes,
        'records': records,
    }
    (out / 'load_lateness.json').write_text(json.dumps(summary, indent=1))
    (out / 'report.md').write_text(text + '\n')
    print(f'planners import: {sorted(modules)}')
    for pr in primes:
        print(f'primed scene {pr["scene"]}: {pr}')
    print(text)
    print(f'\nJSON: {out / "load_lateness.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
