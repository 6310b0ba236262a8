"""
A TimeBill system split across a real network boundary: two Linux network namespaces.

``NetnsPair`` makes namespaces A and B joined by a veth pair (each end addressed, ``lo`` up, a
multicast route so DDS discovery crosses), reads the link's byte and packet counters, and
removes both namespaces (ending whatever still runs in them). Needs root and ``ip``;
``unavailable()`` says why not.

``python -m timebill_ros.netns`` is the side that runs inside namespace A (``ip netns exec A``):
it brings up predictor, server, lifecycle manager and the local generators there, the remote
generators under ``ip netns exec B`` (``Bringup(wrap=...)``), sends goals from its own client
and prints one JSON object: timings, which generator served each goal, and the bytes and
packets that crossed the veth during each. Fast DDS must be forced to UDPv4
(``FASTDDS_BUILTIN_TRANSPORTS=UDPv4``, which ``run_env`` adds): with its default shared-memory
transport, processes on one host exchange data without touching the link.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

SUBNET = '10.77.0'
MULTICAST = '224.0.0.0/4'
STORY = 'Tell me a long story about a robot.'


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(['ip', *args], capture_output=True, text=True, check=check)


def unavailable() -> str:
    """Return why network namespaces cannot be made here ('' when they can)."""
    if shutil.which('ip') is None:
        return 'no `ip` command (iproute2) on PATH'
    if os.geteuid() != 0:
        return f'not root (euid {os.geteuid()}): `ip netns add` needs CAP_SYS_ADMIN'
    probe = f'tb_probe_{os.getpid()}'
    made = _ip('netns', 'add', probe, check=False)
    if made.returncode != 0:
        return f'`ip netns add` failed: {made.stderr.strip() or made.returncode}'
    _ip('netns', 'del', probe, check=False)
    return ''


def run_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Return ``base`` (default: this environment) with Fast DDS limited to UDPv4."""
    env = dict(os.environ if base is None else base)
    env['FASTDDS_BUILTIN_TRANSPORTS'] = 'UDPv4'
    return env


class NetnsPair:
    """Namespaces ``tb_a_<tag>`` and ``tb_b_<tag>`` joined by veth ``tba<tag>``/``tbb<tag>``."""

    def __init__(self, tag: Optional[str] = None, subnet: str = SUBNET):
        tag = tag or str(os.getpid())
        self.a, self.b = f'tb_a_{tag}', f'tb_b_{tag}'
        self.dev_a, self.dev_b = f'tba{tag}'[:15], f'tbb{tag}'[:15]  # IFNAMSIZ
        self.addr_a, self.addr_b = f'{subnet}.1', f'{subnet}.2'

    def exec_prefix(self, ns: str) -> List[str]:
        """Return the command prefix that runs a program in namespace ``ns``."""
        return ['ip', 'netns', 'exec', ns]

    def create(self) -> 'NetnsPair':
        """Make both namespaces and the link; on any failure remove what was made and raise."""
        try:
            for ns in (self.a, self.b):
                _ip('netns', 'add', ns)
            _ip('link', 'add', self.dev_a, 'netns', self.a, 'type', 'veth',
                'peer', 'name', self.dev_b, 'netns', self.b)
            for ns, dev, addr in ((self.a, self.dev_a, self.addr_a),
                                  (self.b, self.dev_b, self.addr_b)):
                _ip('-n', ns, 'addr', 'add', f'{addr}/24', 'dev', dev)
                _ip('-n', ns, 'link', 'set', 'lo', 'up')
                _ip('-n', ns, 'link', 'set', dev, 'up')
                _ip('-n', ns, 'route', 'add', MULTICAST, 'dev', dev)
        except subprocess.CalledProcessError as exc:
            self.remove()
            raise RuntimeError(f'{" ".join(exc.cmd)}: {exc.stderr.strip()}') from exc
        return self

    def pids(self) -> List[int]:
        """Return the processes running in either namespace."""
        out = []
        for ns in (self.a, self.b):
            done = _ip('netns', 'pids', ns, check=False)
            out += [int(p) for p in done.stdout.split() if p.isdigit()]
        return out

    def remove(self, grace_s: float = 5.0) -> List[int]:
        """End the processes left in the namespaces (by id), delete both; return those ended."""
        left = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + grace_s
            while time.monotonic() < end and any(_running(p) for p in left):
                time.sleep(0.1)
        for ns in (self.a, self.b):
            _ip('netns', 'del', ns, check=False)
        return left

    def counters(self, side: str = 'a') -> Dict[str, int]:
        """Return rx/tx bytes and packets of this side's veth end (read from outside it)."""
        ns, dev = (self.a, self.dev_a) if side == 'a' else (self.b, self.dev_b)
        link = json.loads(_ip('-n', ns, '-s', '-j', 'link', 'show', 'dev', dev).stdout)[0]
        stats = link.get('stats64') or link['stats']
        return {f'{d}_{k}': int(stats[d][k]) for d in ('rx', 'tx') for k in ('bytes', 'packets')}

    def __enter__(self) -> 'NetnsPair':
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()


def _running(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as fh:
            return fh.read().rsplit(')', 1)[-1].split()[0] != 'Z'
    except OSError:
        return False


def sys_counters(dev: str) -> Dict[str, int]:
    """Return a device's counters from /sys (the calling process's own namespace)."""
    base = Path('/sys/class/net') / dev / 'statistics'
    return {
        f'{d}_{k}': int((base / f'{d}_{k}').read_text())
        for d in ('rx', 'tx') for k in ('bytes', 'packets')
    }


def delta(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    return {k: after[k] - before[k] for k in before}


# --------------------------------------------------------------- the side in namespace A
def _fleet_ready(client, count: int, timeout_s: float) -> bool:
    """Wait until the server's /diagnostics says every generator is ready (heard, matched)."""
    from diagnostic_msgs.msg import DiagnosticArray

    want = f'{count} of {count} generators ready'
    seen = []
    sub = client.create_subscription(DiagnosticArray, '/diagnostics', seen.append, 10)
    try:
        return client._wait(
            lambda: any(
                s.name == 'timebill_server: generators' and s.message == want
                for m in seen for s in m.status
            ),
            timeout_s,
        )
    finally:
        client.destroy_subscription(sub)


def _seen(nodes, client, timeout_s: float) -> Dict[str, float]:
    """Start the nodes; return seconds from the start until this client saw each one's services."""
    nodes.prepare()
    t0 = time.monotonic()
    nodes.start()
    seen: Dict[str, float] = {}
    while len(seen) < len(nodes.procs) and time.monotonic() - t0 < timeout_s:
        for name in nodes.procs:
            if name not in seen and client.wait_for_lifecycle(name, 0.02):
                seen[name] = round(time.monotonic() - t0, 3)
    nodes.wait_ready(client, timeout_s)  # names a node that exited or never came
    return seen


def _goal_record(out, wall_s: float, link: Dict[str, int]) -> dict:
    return {
        'status': out.status_name, 'generator': out.generator, 'reason': out.reason,
        'tokens': out.tokens_generated, 'text_bytes': len(out.text.encode()),
        'wall_s': round(wall_s, 4),
        'total_s': round(out.total_s, 4), 'link': link,
    }


def _ask(client, dev: str, prompt: str, max_new_tokens: int) -> dict:
    before, t0 = sys_counters(dev), time.monotonic()
    out = client.ask(prompt, 60.0, max_new_tokens=max_new_tokens, timeout_s=120)
    return _goal_record(out, time.monotonic() - t0, delta(before, sys_counters(dev)))


def _pair(clients, dev: str) -> List[dict]:
    """Send two long goals 0.5 s apart (two clients): the second goes to the idle generator."""
    out: Dict[int, dict] = {}

    def ask(i):
        try:
            out[i] = _ask(clients[i], dev, STORY, 400)
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            out[i] = {'status': 'error', 'reason': repr(exc)}

    before = sys_counters(dev)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    threads[0].start()
    time.sleep(0.5)
    threads[1].start()
    for t in threads:
        t.join(150)
    link = delta(before, sys_counters(dev))
    return [dict(out.get(i, {'status': 'timeout'}), pair_link=link) for i in range(2)]


def run(args) -> dict:
    """Bring the system up here, the remote generators in ``args.remote_ns``; ask; report."""
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions
    from timebill_ros.bringup import Bringup, MANAGER
    from timebill_ros.client import TimeBillClient

    names = [g for g in args.generators.split(',') if g]
    remote = [g for g in args.remote.split(',') if g]
    wrap = {g: ['ip', 'netns', 'exec', args.remote_ns] for g in remote}
    overrides = {'threads': 1, 'model': 'tiny', 'weights': 'fp32'}
    report: dict = {'dev': args.dev, 'generators': names, 'remote': remote}
    clients = []
    for i in range(2):  # a client is one thread: the pair needs two
        context = Context()
        rclpy.init(context=context, domain_id=args.domain,
                   signal_handler_options=SignalHandlerOptions.NO)
        clients.append(TimeBillClient(f'timebill_netns_client_{i}', context=context))
    nodes = Bringup(overrides=overrides, domain_id=args.domain, log_dir=args.log_dir,
                    generators=names, wrap=wrap)
    t0, link0 = time.monotonic(), sys_counters(args.dev)
    try:
        report['seen_s'] = _seen(nodes, clients[0], args.timeout)
        if not clients[0].startup(timeout_s=args.timeout):
            report['error'] = f'could not activate the system\n{nodes.log_tail(MANAGER)}'
            return report
        report['active_s'] = round(time.monotonic() - t0, 3)
        if not _fleet_ready(clients[0], len(names), args.timeout):
            report['error'] = 'the server never reported every generator ready'
            return report
        report['fleet_ready_s'] = round(time.monotonic() - t0, 3)
        report['bringup_link'] = delta(link0, sys_counters(args.dev))
        idle0, t1 = sys_counters(args.dev), time.monotonic()
        time.sleep(args.idle_s)
        idle = delta(idle0, sys_counters(args.dev))
        idle_s = time.monotonic() - t1
        report['idle_bytes_per_s'] = round((idle['tx_bytes'] + idle['rx_bytes']) / idle_s, 1)
        if args.pair:
            report['pair'] = _pair(clients, args.dev)
        report['goals'] = [
            _ask(clients[0], args.dev, args.prompt, args.max_new_tokens) for _ in range(args.goals)
        ]
    finally:
        report['exit_codes'] = nodes.stop()
        for client in clients:
            context = client.context
            client.close()
            rclpy.try_shutdown(context=context)
    return report


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dev', required=True, help='the veth end in this namespace (counters)')
    p.add_argument('--remote-ns', required=True, help='namespace of the remote generators')
    p.add_argument('--generators', default='timebill_generator_0,timebill_generator_1')
    p.add_argument('--remote', default='timebill_generator_1', help='generators run remotely')
    p.add_argument('--domain', type=int, default=77)
    p.add_argument('--log-dir', required=True)
    p.add_argument('--pair', action='store_true', help='two long goals at once first')
    p.add_argument('--goals', type=int, default=0, help='then this many short goals in turn')
    p.add_argument('--prompt', default='Name a color.')
    p.add_argument('--max-new-tokens', type=int, default=16)
    p.add_argument('--idle-s', type=float, default=2.0, help='measure idle link traffic')
    p.add_argument('--timeout', type=float, default=240.0)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    report = run(args)
    print(json.dumps(report), flush=True)
    return 0 if 'error' not in report else 1


if __name__ == '__main__':
    sys.exit(main())
