"""
Fire many TimedInference goals at once from one node and record how each ended.

Used by the concurrency tests and ``benchmarks/reliability.py``. Every goal is sent without
waiting for the previous one; the record keeps the client-side time the result arrived, so a
goal reported ``deadline_met`` can be checked against its deadline where the planner sees it.

``python -m timebill_ros.loadgen --goals 20 --out run.json`` is one client process.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
import json
import math
import sys
from typing import List, Optional, Sequence
import uuid

from rclpy.action import ActionClient
from timebill_ros.action import TimedInference
from timebill_ros.nodes.qos import ACTION_QOS, ACTION_TIMED_INFERENCE
from timebill_ros.nodes.ros_time import s_to_duration, s_to_time
from unique_identifier_msgs.msg import UUID

R = TimedInference.Result
STATUS = {
    R.STATUS_SUCCEEDED: 'succeeded',
    R.STATUS_TRUNCATED: 'truncated',
    R.STATUS_KILLED: 'killed',
    R.STATUS_DEADLINE_MISSED: 'deadline_missed',
    R.STATUS_CANCELED: 'canceled',
    R.STATUS_ABORTED: 'aborted',
    R.STATUS_REJECTED: 'rejected',
}
PROMPTS = (
    'Name a color.',
    'What is a robot?',
    'Say hello to the operator.',
    'List two fruits.',
    'Where is the charging dock?',
    'Summarise: the arm picked the red box and placed it on the shelf.',
)


@dataclass
class GoalSpec:
    prompt: str
    budget_s: float
    max_new_tokens: int = 8
    overrun_policy: str = ''
    cancel_after_s: Optional[float] = None  # cancel this long after sending


@dataclass
class GoalRecord:
    index: int
    sent_s: float  # client ROS time
    deadline_s: float  # sent_s + budget, sent as the goal's absolute deadline too
    received_s: float = math.nan  # when the result reached this client; NaN: never (hung)
    accepted: bool = False
    status: str = 'hung'
    reason: str = ''
    deadline_met: bool = False
    tokens: int = 0
    server_total_s: float = math.nan
    finished_at_s: float = math.nan  # generator's end, seconds after the server accepted

    @property
    def late_at_client(self) -> bool:
        return self.received_s > self.deadline_s


def mixed_goals(
    n: int, seed: int = 0, budgets: Sequence[float] = (0.05, 2.0, 8.0, 30.0), cancel_every: int = 0
) -> List[GoalSpec]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        cancel = 0.3 if cancel_every and i % cancel_every == cancel_every - 1 else None
        spec = GoalSpec(
            rng.choice(PROMPTS),
            rng.choice(budgets),
            rng.choice((1, 4, 12)),
            rng.choice(('', 'kill', 'truncate')),
            cancel,
        )
        if cancel is not None:  # one that is still running when its cancel comes
            spec.budget_s, spec.max_new_tokens = max(budgets), 400
        out.append(spec)
    return out


def fire(
    node,
    goals: Sequence[GoalSpec],
    timeout_s: float = 120.0,
    executor=None,
    after_send=None,
    settle_s: float = 1.5,
) -> List[GoalRecord]:
    """Send every goal at once; wait for the results until ``timeout_s`` past the last deadline."""
    if executor is None:
        executor = node._executor  # TimeBillClient's own SingleThreadedExecutor
    action = ActionClient(node, TimedInference, ACTION_TIMED_INFERENCE, **ACTION_QOS)
    try:
        if not action.wait_for_server(timeout_sec=30.0):
            raise RuntimeError('no timed_inference action server')
        now = lambda: node.get_clock().now().nanoseconds * 1e-9  # noqa: E731
        # wait_for_server means *we* see the server; the server may not see our response readers
        # yet, and Fast DDS then drops the goal response
        # ("failed to send response (timeout)"), so a
        # brand-new client gives discovery a moment before a burst
        settle = now() + settle_s
        while now() < settle:
            executor.spin_once(timeout_sec=0.05)
        records, sends, results, cancels, stamps = [], {}, {}, [], {}
        for i, g in enumerate(goals):
            goal = TimedInference.Goal(
                prompt=g.prompt,
                max_new_tokens=g.max_new_tokens,
                overrun_policy=g.overrun_policy,
                client_node=node.get_fully_qualified_name(),
            )
            goal.time_budget = s_to_duration(g.budget_s)
            t = now()
            # the planner's own deadline, as the client sets it
            if g.budget_s > 0 and math.isfinite(g.budget_s):
                goal.deadline = s_to_time(t + g.budget_s)
            records.append(GoalRecord(i, t, t + g.budget_s))
            sends[i] = action.send_goal_async(goal, goal_uuid=UUID(uuid=list(uuid.uuid4().bytes)))
            if g.cancel_after_s is not None:
                cancels.append((t + g.cancel_after_s, i))
            if after_send is not None:
                after_send(i)
        end = max(r.deadline_s for r in records) + timeout_s
        pending = set(range(len(goals)))
        while pending and now() < end:
            executor.spin_once(timeout_sec=0.01)
            t = now()
            for when, i in list(cancels):
                if t >= when and sends[i].done() and sends[i].result().accepted:
                    sends[i].result().cancel_goal_async()
                    cancels.remove((when, i))
            for i in list(pending):
                if i not in results and sends[i].done():
                    handle = sends[i].result()
                    records[i].accepted = handle.accepted
                    if not handle.accepted:
                        records[i].status, records[i].received_s = 'refused', t
                        pending.discard(i)
                        continue
                    results[i] = handle.get_result_async()
                    # stamp the arrival in the executor's own
                    # order (two results can land in one poll)
                    results[i].add_done_callback(lambda _f, i=i: stamps.setdefault(i, now()))
                if i in results and results[i].done():
                    res = results[i].result().result
                    r = records[i]
                    r.received_s, r.status, r.reason = (
                        stamps.get(i, t),
                        STATUS.get(res.status, str(res.status)),
                        res.reason,
                    )
                    r.deadline_met, r.tokens, r.server_total_s = (
                        bool(res.deadline_met),
                        int(res.tokens_generated),
                        res.total_s,
                    )
                    r.finished_at_s = res.finished_at_s
                    pending.discard(i)
        return records
    finally:
        action.destroy()


def summary(records: Sequence[GoalRecord]) -> dict:
    from collections import Counter

    counts = Counter(r.status for r in records)
    planned = [
        r for r in records if r.status in ('succeeded', 'truncated', 'killed', 'deadline_missed')
    ]
    lat = sorted(r.received_s - r.sent_s for r in records if not math.isnan(r.received_s))
    pct = lambda q: lat[min(int(q * len(lat)), len(lat) - 1)] if lat else math.nan  # noqa: E731
    return {
        'goals': len(records),
        'statuses': dict(counts),
        'hung': counts.get('hung', 0),
        'deadline_met': sum(r.deadline_met for r in records),
        'met_but_late_at_client': sum(r.deadline_met and r.late_at_client for r in records),
        'miss_rate_planned': (sum(not r.deadline_met for r in planned) / len(planned))
        if planned
        else 0.0,
        'latency_p50_s': pct(0.5),
        'latency_p95_s': pct(0.95),
        'latency_max_s': lat[-1] if lat else math.nan,
    }


def main(argv=None) -> int:
    import rclpy
    from timebill_ros.client import TimeBillClient

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--goals', type=int, default=20)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--cancel-every', type=int, default=0)
    ap.add_argument('--out', required=True)
    args = ap.parse_args(argv)
    rclpy.init()
    client = TimeBillClient(f'timebill_load_{args.seed}')
    try:
        records = fire(client, mixed_goals(args.goals, args.seed, cancel_every=args.cancel_every))
    finally:
        client.close()
        rclpy.try_shutdown()
    with open(args.out, 'w') as fh:
        json.dump({'records': [asdict(r) for r in records], 'summary': summary(records)}, fh)
    return 0


if __name__ == '__main__':
    sys.exit(main())
