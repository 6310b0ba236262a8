"""
``timebill bringup``: start the nodes as processes; the lifecycle manager activates them.

The same nodes and parameters as ``ros2 launch timebill_ros bringup.launch.py``, for machines
without launch_ros. Ctrl-C (or SIGTERM) stops every node cleanly.
"""

from __future__ import annotations

import signal
import sys
import time


def add_arguments(p) -> None:
    p.add_argument(
        '--params', help="ROS 2 parameters file (default: the package's config/timebill.yaml)"
    )
    p.add_argument(
        '-p',
        '--param',
        action='append',
        default=[],
        metavar='NAME:=VALUE',
        help='override one parameter for every node (repeatable)',
    )
    p.add_argument(
        '--domain-id', type=int, help='ROS_DOMAIN_ID for the nodes (default: inherited)'
    )
    p.add_argument(
        '--log-dir', help="write each node's output to <dir>/<node>.log instead of this terminal"
    )
    p.add_argument(
        '--namespace',
        default='',
        help='ROS namespace for the nodes (a second system beside the first, e.g. robot2)',
    )
    p.add_argument(
        '--generators',
        help='several generators behind the server: a count (2) or node names (gen_a,gen_b); '
        "each may have its own section in the params file (default: the file's generators)",
    )
    p.add_argument(
        '--keystore',
        help='run secured (DDS Security, Enforce) from this SROS2 keystore '
        '(tools/make_keystore.sh): each node in enclave /timebill/<node>, this command in '
        '/timebill/timebill_bringup; see docs/SECURITY.md',
    )
    p.add_argument(
        '--no-activate', action='store_true', help='leave the nodes unconfigured (no startup)'
    )
    p.add_argument(
        '--timeout', type=float, default=180.0, help='seconds to wait for the nodes to come up'
    )


def parse_overrides(items) -> dict:
    import yaml

    out = {}
    for item in items:
        if ':=' not in item:
            raise SystemExit(f'--param expects NAME:=VALUE, got {item!r}')
        name, value = item.split(':=', 1)
        out[name.strip()] = yaml.safe_load(value) if value else ''
    return out


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    from timebill_ros.bringup import reexec_with_ros_env

    reexec_with_ros_env()
    import os

    import rclpy
    from rclpy.signals import SignalHandlerOptions
    from timebill_ros.bringup import Bringup, enclave_of, MANAGER, security_env
    from timebill_ros.client import TimeBillClient

    if args.domain_id is not None:
        os.environ['ROS_DOMAIN_ID'] = str(args.domain_id)
    # Our handlers, not rclpy's: a signal must stop the children, in order, before we exit.
    # args=[]: this command's own `-p name:=value` are for the nodes, not ROS arguments of this
    # process (rcl would read them as old-style remap rules and warn).
    ros_args = []
    if args.keystore:  # this command's client must be enrolled too, or it cannot see the nodes
        os.environ.update(security_env(args.keystore))
        ros_args = ['--ros-args', '--enclave', enclave_of('timebill_bringup')]
    rclpy.init(args=ros_args, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    runner = Bringup(
        args.params,
        parse_overrides(args.param),
        domain_id=args.domain_id,
        log_dir=args.log_dir,
        namespace=args.namespace,
        generators=args.generators,
        keystore=args.keystore,
    )
    try:
        client = TimeBillClient('timebill_bringup', namespace=args.namespace)
    except Exception as exc:  # noqa: BLE001 - e.g. a Fast DDS built without DDS Security
        print(f"[bringup] cannot create this command's node: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    code = 0
    try:
        runner.prepare()
        runner.start()
        runner.wait_ready(client, args.timeout)
        if not args.no_activate and not client.startup(timeout_s=240.0):
            print(
                f'[bringup] could not activate the system ({MANAGER}: {client.get_state()!r})',
                file=sys.stderr,
            )
            return 1
        names = ', '.join(runner.nodes)
        print(
            f'[bringup] up: {names}; the system is {client.get_state()}. Ctrl-C stops.',
            flush=True,
        )
        while True:
            dead = {n: c for n, c in runner.alive().items() if c is not None}
            if dead:
                print(
                    f'[bringup] node(s) exited: {dead}; stopping the rest',
                    file=sys.stderr,
                    flush=True,
                )
                code = 1
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        print('[bringup] stopping', flush=True)
    except (RuntimeError, TimeoutError) as exc:
        print(f'[bringup] {exc}', file=sys.stderr)
        code = 1
    finally:
        # a second Ctrl-C must not orphan the children
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        client.close()
        codes = runner.stop()
        rclpy.try_shutdown()
        print(f'[bringup] stopped: {codes}', flush=True)
    return code
