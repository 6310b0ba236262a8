"""
A goal's round trip through a generator in another network namespace, and what crosses the link.

Why it exists: a generator on another machine is reached over a network, not shared memory
(issue 24). Each phase makes two network namespaces joined by a veth pair
(``timebill_ros.netns``), runs predictor, server, lifecycle manager and the planner's client in
A and one generator (the tiny model, fp32, one thread) and sends ``--goals`` goals in turn:

- ``remote``: the generator in B, Fast DDS limited to UDPv4: every goal crosses the veth;
- ``local``: the generator in A too, still UDPv4 (the same stack, no link): the baseline;
- ``shm`` (``--control``): the generator in B with Fast DDS's default transports, to show
  whether shared memory would carry the data past the link.

Per phase: the goal round trip (send to result at the client; median, p90), the generator's own
``total_s``, bytes and packets on the link per goal (both directions), idle link traffic, and
discovery: seconds from starting the processes until the client in A saw each node's services.
Needs root and ``ip``. Writes ``results/netns_fleet/netns_fleet.json``; the last line printed is
``remote_rtt_ms=<median> local_rtt_ms=<median> bytes_per_goal=<n> remote_seen_s=<s>``.

    python -P benchmarks/netns_fleet.py            # about 2 min
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import statistics
import subprocess
import sys

GEN = 'timebill_generator_1'


def _phase(name: str, remote: bool, udp_only: bool, args) -> dict:
    from timebill_ros.netns import NetnsPair, run_env

    pair = NetnsPair(f'{os.getpid() % 100000}{name[0]}').create()
    try:
        env = run_env() if udp_only else {
            k: v for k, v in os.environ.items() if k != 'FASTDDS_BUILTIN_TRANSPORTS'
        }
        cmd = [
            *pair.exec_prefix(pair.a), sys.executable, '-P', '-m', 'timebill_ros.netns',
            '--dev', pair.dev_a, '--remote-ns', pair.b, '--generators', GEN,
            '--remote', GEN if remote else '', '--domain', str(args.domain),
            '--log-dir', str(args.out / f'logs_{name}'), '--goals', str(args.goals),
            '--max-new-tokens', str(args.max_new_tokens),
        ]
        before = pair.counters('a')
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        link = {k: v - before[k] for k, v in pair.counters('a').items()}
    finally:
        pair.remove()
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith('{')]
    if not lines:
        raise SystemExit(f'{name}: runner exit {done.returncode}\n{done.stderr[-3000:]}')
    report = json.loads(lines[-1])
    goals = [g for g in report.get('goals', []) if g.get('status') == 'succeeded']
    rtt = sorted(g['wall_s'] * 1e3 for g in goals)
    per_goal = [sum(g['link'][k] for k in ('rx_bytes', 'tx_bytes')) for g in goals]
    packets = [sum(g['link'][k] for k in ('rx_packets', 'tx_packets')) for g in goals]
    return {
        'phase': name, 'remote': remote, 'udp_only': udp_only,
        'succeeded': f'{len(goals)}/{args.goals}',
        'rtt_ms_median': round(statistics.median(rtt), 1) if rtt else None,
        'rtt_ms_p90': round(rtt[int(0.9 * (len(rtt) - 1))], 1) if rtt else None,
        'gen_total_ms_median': round(statistics.median(g['total_s'] * 1e3 for g in goals), 1)
        if goals else None,
        'bytes_per_goal': round(statistics.median(per_goal)) if per_goal else None,
        'packets_per_goal': round(statistics.median(packets)) if packets else None,
        'idle_bytes_per_s': report.get('idle_bytes_per_s'),
        'generator_seen_s': report.get('seen_s', {}).get(GEN),
        'server_seen_s': report.get('seen_s', {}).get('timebill_server'),
        'fleet_ready_s': report.get('fleet_ready_s'),
        'link_total': link, 'error': report.get('error', ''),
        'exit_codes': report.get('exit_codes'),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--goals', type=int, default=20)
    p.add_argument('--max-new-tokens', type=int, default=32)
    p.add_argument('--domain', type=int, default=78)
    p.add_argument('--no-control', dest='control', action='store_false')
    p.add_argument('--out', type=Path, default=Path('results/netns_fleet'))
    args = p.parse_args()
    from timebill_ros.core.model import ensure_tiny_model
    from timebill_ros.netns import unavailable

    why = unavailable()
    if why:
        raise SystemExit(f'cannot make network namespaces: {why}')
    ensure_tiny_model()
    args.out.mkdir(parents=True, exist_ok=True)
    phases = [('remote', True, True), ('local', False, True)]
    if args.control:
        phases.append(('shm', True, False))
    rows = [_phase(name, remote, udp, args) for name, remote, udp in phases]
    (args.out / 'netns_fleet.json').write_text(json.dumps(rows, indent=1))
    cols = ['phase', 'succeeded', 'rtt_ms_median', 'rtt_ms_p90', 'gen_total_ms_median',
            'bytes_per_goal', 'packets_per_goal', 'idle_bytes_per_s', 'generator_seen_s',
            'server_seen_s']
    print('| ' + ' | '.join(cols) + ' |')
    print('|' + '---|' * len(cols))
    for row in rows:
        print('| ' + ' | '.join(str(row[c]) for c in cols) + ' |')
    by = {r['phase']: r for r in rows}
    print(
        f'remote_rtt_ms={by["remote"]["rtt_ms_median"]}'
        f' local_rtt_ms={by["local"]["rtt_ms_median"]}'
        f' bytes_per_goal={by["remote"]["bytes_per_goal"]}'
        f' remote_seen_s={by["remote"]["generator_seen_s"]}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
