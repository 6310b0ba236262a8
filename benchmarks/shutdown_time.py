"""
Seconds from SIGINT to exit for each node, on a quiet machine and beside a CPU hog.

Why it exists: ``ros2 launch`` escalates to SIGTERM after 5 s and launch_testing then fails the
exit-code check; a robot's operator expects Ctrl-C to end every node cleanly and at once. Each run
brings the three nodes up to active (the generator holding its model), then sends SIGINT to all
three at the same moment, as a terminal's Ctrl-C does, and times each exit.

    python -P benchmarks/shutdown_time.py --runs 10            # real model, idle then --hog 1
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import signal
import statistics
import subprocess
import sys
import time


def one_run(overrides: dict, domain: int, log_dir: Path) -> dict:
    from timebill_ros.bringup import Bringup

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'test'))
    from conftest import close_client, make_client

    client = make_client(domain, 'shutdown_bench')
    bringup = Bringup(overrides=overrides, domain_id=domain, log_dir=log_dir)
    try:
        bringup.up(client, timeout_s=300.0)
        assert client.ask('Name a color.', 30.0, max_new_tokens=4).status_name == 'succeeded'
    finally:
        close_client(client)
    procs = dict(bringup.procs)
    t0 = time.monotonic()
    for p in procs.values():
        p.send_signal(signal.SIGINT)
    out, end = {}, t0 + 30.0
    while len(out) < len(procs) and time.monotonic() < end:
        for name, p in procs.items():
            if name not in out and p.poll() is not None:
                out[name] = {'exit_s': time.monotonic() - t0, 'code': p.returncode}
        time.sleep(0.005)
    for name in procs:
        out.setdefault(name, {'exit_s': float('inf'), 'code': None})
    bringup.stop()  # kills anything left over
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--runs', type=int, default=10)
    ap.add_argument(
        '--model', default='', help="'' = the configured model; 'tiny' for a quick run"
    )
    ap.add_argument('--domain', type=int, default=78)
    ap.add_argument('--out', default='results/shutdown_time')
    ap.add_argument('--conditions', default='idle,hog', help='idle, hog or both (comma-separated)')
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = {'threads': 1} | ({'model': args.model} if args.model else {})
    results = {}
    wanted = args.conditions.split(',')
    for label, hogs in [(c, 1 if c == 'hog' else 0) for c in wanted]:
        hog = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(hogs)]
        try:
            runs = []
            for i in range(args.runs):
                r = one_run(overrides, args.domain, out_dir / 'logs')
                runs.append(r)
                times = ', '.join(f"{n} {v['exit_s']:.2f} s ({v['code']})" for n, v in r.items())
                print(f'[{label} {i + 1}/{args.runs}] load {os.getloadavg()[0]:.1f}: {times}',
                      flush=True)
            results[label] = runs
        finally:
            for p in hog:
                p.kill()
    rows = ['| node | condition | median s | max s | exit codes |', '|---|---|---:|---:|---|']
    for label, runs in results.items():
        for name in runs[0]:
            t = [r[name]['exit_s'] for r in runs]
            codes = sorted({r[name]['code'] for r in runs}, key=str)
            rows.append(f'| {name} | {label} | {statistics.median(t):.2f} | {max(t):.2f} | '
                        f'{codes} |')
    print('\n'.join(rows))
    (out_dir / 'shutdown_time.json').write_text(json.dumps(results, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
