"""
Reliability report (issue 7): a soak of many goals against the three real node processes.

Brings up generator, predictor and server (``model: tiny`` by default: the queue, the DDS
paths and the bookkeeping are under test, not the model), fires goals in concurrent waves
(mixed budgets, lengths, overrun policies, some canceled), and reports: how every goal
ended, goals that never ended (hung), deadline-miss rate among planned goals, goals reported
on time that reached the client late, client-side latency percentiles, and each node's
resident memory (RSS) after warm-up and at the end.

    python benchmarks/reliability.py --goals 500 --out results/reliability
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import sys
import time


def rss_kib(pid: int) -> int:
    with open(f'/proc/{pid}/status') as fh:
        for line in fh:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


def threads(pid: int) -> int:
    with open(f'/proc/{pid}/status') as fh:
        for line in fh:
            if line.startswith('Threads:'):
                return int(line.split()[1])
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument('--goals', type=int, default=500)
    ap.add_argument('--wave', type=int, default=20, help='goals sent at once per wave')
    ap.add_argument('--warmup', type=int, default=60, help='goals before the RSS baseline')
    ap.add_argument('--model', default='tiny')
    ap.add_argument(
        '--domain', type=int, default=int(os.environ.get('ROS_DOMAIN_ID', '0') or 0) or 222
    )
    ap.add_argument('--out', default='results/reliability')
    args = ap.parse_args(argv)

    from timebill_ros.bringup import Bringup, reexec_with_ros_env

    reexec_with_ros_env()
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions
    from timebill_ros.client import TimeBillClient
    from timebill_ros.core.model import ensure_tiny_model
    from timebill_ros.loadgen import fire, mixed_goals, summary

    if args.model == 'tiny':
        ensure_tiny_model()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = Context()
    rclpy.init(
        context=context, domain_id=args.domain, signal_handler_options=SignalHandlerOptions.NO
    )
    client = TimeBillClient('timebill_reliability', context=context)
    bringup = Bringup(
        overrides={'threads': 1, 'model': args.model},
        domain_id=args.domain,
        log_dir=out_dir / 'logs',
    )
    records, rss = [], {}
    t0 = time.monotonic()
    try:
        bringup.up(client, timeout_s=240.0)
        pids = {name: p.pid for name, p in bringup.procs.items()}
        sent, wave_no = 0, 0
        while sent < args.goals:
            n = min(args.wave, args.goals - sent)
            goals = mixed_goals(n, seed=wave_no, cancel_every=9)
            recs = fire(client, goals, timeout_s=60.0)
            for r in recs:
                r.index += sent
            records += recs
            sent += n
            wave_no += 1
            rss.setdefault('trajectory', []).append(
                {
                    'goals': sent,
                    **{n: rss_kib(pid) for n, pid in pids.items()},
                    'generator_threads': threads(pids['timebill_generator']),
                }
            )
            if sent >= args.warmup and 'baseline' not in rss:
                rss['baseline'] = {name: rss_kib(pid) for name, pid in pids.items()}
            print(
                f'[reliability] {sent}/{args.goals} goals, {time.monotonic() - t0:.0f} s',
                flush=True,
            )
        rss['final'] = {name: rss_kib(pid) for name, pid in pids.items()}
        alive = bringup.alive()
    finally:
        client.close()
        rclpy.try_shutdown(context=context)
        codes = bringup.stop()
    report = summary(records)
    report['wall_s'] = time.monotonic() - t0
    report['model'] = args.model
    report['rss_kib'] = rss
    report['rss_growth_pct'] = {
        n: 100.0 * (rss['final'][n] - rss['baseline'][n]) / rss['baseline'][n]
        for n in rss.get('final', {})
        if rss.get('baseline', {}).get(n)
    }
    report['nodes_alive_at_end'] = {n: c is None for n, c in alive.items()}
    report['node_exit_codes'] = codes
    (out_dir / 'report.json').write_text(json.dumps(report, indent=2))
    (out_dir / 'goals.json').write_text(json.dumps([r.__dict__ for r in records]))
    lines = [
        f'# Reliability soak: {report["goals"]} goals, model {args.model}',
        '',
        f'- wall time: {report["wall_s"]:.0f} s; waves of {args.wave} goals sent at once',
        f'- statuses: {report["statuses"]}',
        f'- hung (no result): {report["hung"]}',
        f'- deadline-miss rate among planned goals: {report["miss_rate_planned"]:.2%}',
        f'- reported deadline met but late at the client: {report["met_but_late_at_client"]}',
        f'- client latency p50 / p95 / max: {report["latency_p50_s"]:.3f} / '
        f'{report["latency_p95_s"]:.3f} / '
        f'{report["latency_max_s"]:.3f} s',
        '- RSS after warm-up -> end (KiB), growth:',
    ]
    for n, g in report['rss_growth_pct'].items():
        lines.append(f'  - {n}: {rss["baseline"][n]} -> {rss["final"][n]} ({g:+.2f} %)')
    lines.append(f'- node exit codes: {codes}')
    (out_dir / 'report.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    ok = (
        report['hung'] == 0
        and report['met_but_late_at_client'] == 0
        and all(g < 5.0 for g in report['rss_growth_pct'].values())
        and all(c == 0 for c in codes.values())
    )
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
