"""
Goals served on time with one generator and with two behind one server, and a failover.

Why it exists: several generators should serve more goals by their deadlines than one (issue
24). Each phase brings a system up with ``Bringup`` (real SmolLM2 unless ``--model``, one
thread per generator, its own ROS_DOMAIN_ID), then ``--planners`` planner threads (each its
own rclpy context) ask in a closed loop for ``--duration`` seconds: EstimateBudget first (is it
guaranteed?), then the goal -- a slice of licence text and a question, ``--max-new`` tokens,
``--budget`` seconds. A goal is on time when it succeeded and its answer reached the planner
before send + budget. Optional busy loops (``--hog``) share the 2 cores. After the two-generator
phase, a long goal is sent, the generator holding it is SIGKILLed, and the time from the kill
to the re-dispatch (the server's own stamps in the result's reason) is compared with one
prefill chunk.

    python -P benchmarks/fleet.py --quick        # <= 5 min: 60 s per phase, no hog
    python -P benchmarks/fleet.py --duration 180 --hog 1

Writes ``results/fleet/fleet.json`` and a Markdown table; the last line printed is
``generators=2 on_time_ratio_vs_1=<x> guaranteed_on_time=<n>/<m> failover=<ok|failed>``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also under -P
from benchkit import cpu_info, licence_words, load1  # noqa: E402,I100

QUESTIONS = (
    'Summarise the text above in one sentence.',
    'Which rights does the text above grant?',
    'Name one condition the text above sets.',
)


def client_for(domain: int, name: str):
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions
    from timebill_ros.client import TimeBillClient

    context = Context()
    rclpy.init(context=context, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
    return TimeBillClient(name, context=context)


def close(client) -> None:
    import rclpy

    context = client.context
    client.close()
    rclpy.try_shutdown(context=context)


def planner(i: int, domain: int, args, corpus: list, stop_at: float, records: list) -> None:
    """Ask goals back to back until ``stop_at``: estimate first, then the goal."""
    rnd = random.Random(i)
    client = client_for(domain, f'fleet_planner_{i}')
    try:
        time.sleep(1.0)  # discovery both ways before the first goal
        while time.time() < stop_at:
            start = rnd.randrange(0, max(len(corpus) - args.words, 1))
            prompt = ' '.join(corpus[start:start + args.words]) + '\n\n' + rnd.choice(QUESTIONS)
            plan = client.estimate_budget(prompt, args.budget, max_new_tokens=args.max_new)
            sent = time.time()
            out = client.ask(prompt, args.budget, max_new_tokens=args.max_new,
                             timeout_s=args.budget + 30)
            got = time.time()
            records.append({
                'planner': i,
                'sent': sent,
                'arrived': got,
                'status': out.status_name,
                'on_time': out.status_name == 'succeeded' and got <= sent + args.budget,
                'late_s': got - (sent + args.budget),
                'guaranteed': bool(plan is not None and plan.ok and plan.guaranteed),
                'estimate_generator': plan.generator if plan is not None else '',
                'generator': out.generator,
                'dispatch_ms': out.timeline.get('dispatch', -1.0) * 1000.0,
                'prompt_tokens': out.prompt_tokens,
                'alpha': out.alpha,
                'reason': out.reason,
            })
            if out.status_name in ('rejected', 'aborted'):
                time.sleep(0.5)  # a refused planner waits a moment instead of hammering
    finally:
        close(client)


def phase(n_gen: int, args, domain: int, corpus: list, out_dir: Path) -> dict:
    """Bring up a system of ``n_gen`` generators, load it, measure; maybe kill one mid-goal."""
    from timebill_ros.bringup import Bringup

    log = out_dir / f'logs_{n_gen}'
    nodes = Bringup(
        overrides={'threads': 1, 'model': args.model}, domain_id=domain, log_dir=log,
        generators=n_gen,
    )
    probe = client_for(domain, f'fleet_probe_{n_gen}')
    hogs, records = [], []
    try:
        t0 = time.time()
        nodes.up(probe, timeout_s=300.0)
        up_s = time.time() - t0
        print(f'[fleet] {n_gen} generator(s) up in {up_s:.1f} s', file=sys.stderr, flush=True)
        hogs = [subprocess.Popen([sys.executable, '-c', 'while True: pass'])
                for _ in range(args.hog)]
        stop_at = time.time() + args.duration
        threads = [
            threading.Thread(target=planner, args=(i, domain, args, corpus, stop_at, records))
            for i in range(args.planners)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.duration + args.budget + 90)
        for h in hogs:
            h.kill()
        hogs = []
        failover = failover_run(nodes, probe, args, corpus) if n_gen > 1 else None
    finally:
        for h in hogs:
            h.kill()
        close(probe)
        nodes.stop()
    return summarize(n_gen, records, args, up_s, failover)


def failover_run(nodes, client, args, corpus: list) -> dict:
    """Send a long goal, SIGKILL the generator holding it, read when it was re-dispatched."""
    from timebill_ros.msg import Heartbeat
    from timebill_ros.nodes.heartbeat import heartbeat_topic
    from timebill_ros.nodes.qos import HEARTBEAT_QOS

    names = [n for n in nodes.procs if n.startswith('timebill_generator')]
    beats = {}
    subs = [client.create_subscription(Heartbeat, heartbeat_topic(n),
                                       lambda m, n=n: beats.__setitem__(n, m), HEARTBEAT_QOS)
            for n in names]
    prompt = ' '.join(corpus[:args.words]) + '\n\nTell me a long story about this text.'
    sent = time.time()
    goal = client.send_goal(prompt, 120.0, max_new_tokens=400)
    busy, killed_at = '', None
    end = time.time() + 60
    while time.time() < end and not busy:
        client._executor.spin_once(timeout_sec=0.05)
        busy = next((n for n, b in beats.items() if b.running), '')
    chunk_s = 0.0
    if busy:
        from timebill_ros.core.time_estimator import ExecutionTimeModel

        model = ExecutionTimeModel(*beats[busy].time_model)
        chunk_s = model.prefill_s(256)
        killed_at = time.time()
        os.kill(nodes.procs[busy].pid, signal.SIGKILL)
    for s in subs:
        client.destroy_subscription(s)
    out = client.get_result(150.0) if goal is None else None
    if out is None:
        return {'ok': False, 'why': f'no result ({goal})'}
    m = re.search(r're-dispatched to (\S+) at ([0-9.]+) s', out.reason)
    redispatch_s = float(m.group(2)) - (killed_at - sent) if (m and killed_at) else None
    ok = bool(m) and out.status_name == 'succeeded' and redispatch_s is not None and \
        redispatch_s <= nodes_failover_after(nodes) + chunk_s
    return {'ok': ok, 'killed': busy, 'served_by': out.generator, 'status': out.status_name,
            'kill_to_redispatch_s': redispatch_s, 'prefill_chunk_s': chunk_s,
            'reason': out.reason}


def nodes_failover_after(nodes) -> float:
    from timebill_ros.core.config import TimeBillConfig

    return TimeBillConfig.from_yaml(nodes.params).failover_after_s


def summarize(n_gen: int, records: list, args, up_s: float, failover) -> dict:
    on_time = [r for r in records if r['on_time']]
    guaranteed = [r for r in records if r['guaranteed']]
    dispatch = sorted(r['dispatch_ms'] for r in records if r['dispatch_ms'] >= 0)
    by_status = {}
    for r in records:
        by_status[r['status']] = by_status.get(r['status'], 0) + 1
    return {
        'generators': n_gen,
        'up_s': up_s,
        'goals': len(records),
        'on_time': len(on_time),
        'on_time_per_min': len(on_time) * 60.0 / args.duration,
        'guaranteed': len(guaranteed),
        'guaranteed_on_time': sum(r['on_time'] for r in guaranteed),
        'statuses': by_status,
        'served_by': {g: sum(r['generator'] == g for r in on_time)
                      for g in sorted({r['generator'] for r in on_time})},
        'dispatch_ms_median': statistics.median(dispatch) if dispatch else None,
        'dispatch_ms_p95': dispatch[int(0.95 * (len(dispatch) - 1))] if dispatch else None,
        'max_late_s': max((r['late_s'] for r in records), default=None),
        'failover': failover,
        'records': records,
    }


def table(rows: list) -> str:
    lines = ['| generators | goals | on time | on time / min | guaranteed on time | '
             'dispatch ms (median / p95) | statuses |', '|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(
            f"| {r['generators']} | {r['goals']} | {r['on_time']} | "
            f"{r['on_time_per_min']:.1f} | {r['guaranteed_on_time']}/{r['guaranteed']} | "
            f"{r['dispatch_ms_median'] or 0:.1f} / {r['dispatch_ms_p95'] or 0:.1f} | "
            f"{r['statuses']} |")
    return '\n'.join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='60 s per phase (<= 5 min in all)')
    ap.add_argument('--model', default='smollm2-135m-instruct')
    ap.add_argument('--planners', type=int, default=6)
    ap.add_argument('--duration', type=float, default=120.0, help='seconds of load per phase')
    ap.add_argument('--budget', type=float, default=8.0, help="each goal's time budget (s)")
    ap.add_argument('--max-new', type=int, default=24)
    ap.add_argument('--words', type=int, default=400, help='licence words per prompt')
    ap.add_argument('--hog', type=int, default=0, help='busy-loop processes during the load')
    ap.add_argument('--domain', type=int, default=int(os.environ.get('FLEET_DOMAIN', '91')))
    ap.add_argument('--out', default='results/fleet')
    args = ap.parse_args()
    if args.quick:
        args.duration = min(args.duration, 60.0)
    from timebill_ros.bringup import reexec_with_ros_env

    reexec_with_ros_env()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = licence_words() or ['robot'] * 1000
    started = time.strftime('%Y-%m-%d %H:%M')
    rows = [phase(n, args, args.domain + n, corpus, out_dir) for n in (1, 2)]
    one, two = rows
    ratio = two['on_time'] / max(one['on_time'], 1)
    fo = two['failover'] or {}
    report = {'started': started, 'args': vars(args), 'cpu': cpu_info(), 'load_end': load1(),
              'phases': rows, 'on_time_ratio_vs_1': ratio}
    (out_dir / 'fleet.json').write_text(json.dumps(report, indent=1))
    md = table(rows)
    (out_dir / 'fleet.md').write_text(md + '\n')
    print(md)
    print(f"failover: {json.dumps({k: v for k, v in fo.items() if k != 'reason'})}")
    verdict = 'ok' if fo.get('ok') else 'failed'
    print(f'generators=2 on_time_ratio_vs_1={ratio:.2f} '
          f"guaranteed_on_time={two['guaranteed_on_time']}/{two['guaranteed']} "
          f'failover={verdict}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
