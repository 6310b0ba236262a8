"""
``timebill replay BAG``: send every recorded request again, as a planner would, and report.

Reads goals from a bag written by the server's recorder, by ``timebill make-tasks`` or by
``ros2 bag record`` (action recording, or the ``timebill/requests`` topic) — types are taken
from the bag. Online (default) the goals go to a running server through ``TimeBillClient``;
``--offline`` runs the generator node's request pipeline (``core.pipeline``) in this process,
no ROS needed: the same admission, queue, α, eviction and statuses as the nodes.

Pacing: ``--pace fast`` sends the next request when the previous one ended; ``--pace recorded``
releases each at its recorded time offset divided by ``--speed``. A request's deadline runs
from its release, so time spent queued behind a slow one counts against it, as it would on a
robot. Requests that carry benchmark metadata (``make-tasks`` bags) are scored.

A structured request (``json_schema`` / ``grammar``) is replayed with them. A prompt recorded on
the request topic already has the schema appended (``schema_in_prompt``); ``with_schema`` leaves
such a prompt as it is, so neither path appends the schema twice.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
import sys
import time
from typing import Callable, Dict, List, Optional

from .options import add_config_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('bag', help='bag directory or .mcap file')
    p.add_argument(
        '--offline', action='store_true', help='run the core engine here instead of a ROS server'
    )
    p.add_argument(
        '--pace',
        choices=('fast', 'recorded'),
        default='fast',
        help='fast: back to back (default); recorded: at the recorded offsets / --speed',
    )
    p.add_argument(
        '--speed',
        type=float,
        default=1.0,
        help='time scale for --pace recorded (2 = twice as fast)',
    )
    p.add_argument(
        '--policy',
        default='timebill+replan',
        help=(
            'offline only: timebill+replan (what the nodes run, default) | timebill | '
            'timebill:k=3 | vanilla | alpha=0.5 | truncate'
        ),
    )
    p.add_argument(
        '--budget-scale', type=float, default=1.0, help='multiply every recorded budget'
    )
    p.add_argument(
        '--budget', type=float, help='use this budget (s) for requests recorded without one'
    )
    p.add_argument('--limit', type=int, help='replay only the first N requests')
    p.add_argument(
        '--out', default='results/replay', help='report directory (default results/replay)'
    )
    p.add_argument(
        '--timeout',
        type=float,
        default=60.0,
        help='online: seconds past the budget to wait for a result',
    )
    add_config_arguments(
        p, 'ROS 2 params YAML (offline engine, profile, predictor)', scope='offline: '
    )


# ---------------------------------------------------------------------------------- pacing
def release_times(requests, pace: str, speed: float) -> List[Optional[float]]:
    """Seconds after the start at which each request is released (None: when the previous ends)."""
    if pace == 'fast' or not requests:
        return [None] * len(requests)
    if speed <= 0:
        raise ValueError(f'--speed must be > 0, got {speed}')
    t0 = requests[0].stamp_ns
    return [(r.stamp_ns - t0) / 1e9 / speed for r in requests]


def _wait_until(t: float) -> None:
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


# --------------------------------------------------------------------------------- offline
class OfflineServer:
    """The request pipeline the generator node runs, in this process, under a chosen policy."""

    def __init__(self, cfg, policy_text: str, log: Callable[[str], None]):
        from timebill_ros.core.calibration.store import profile_key, time_model_for
        from timebill_ros.core.engine import Engine
        from timebill_ros.core.evaluation.policies import parse_policy
        from timebill_ros.core.length_predictor import load_length_predictor
        from timebill_ros.core.lengths import FixedLength, PredictorLength
        from timebill_ros.core.pipeline import Pipeline

        self.cfg, self.policy = cfg, parse_policy(policy_text)
        self.engine = Engine.from_config(cfg)
        model, _ = time_model_for(cfg, profile_key(self.engine), log=log)
        lengths = (
            PredictorLength(load_length_predictor(cfg, logger=log))
            if self.policy.budget_dependent
            else FixedLength(None)
        )
        self.pipeline = Pipeline(self.engine, model, cfg, lengths)

    def serve(self, req, release: float) -> Dict:
        """
        Serve one request released at ``release`` (monotonic).

        Returns a result dict shaped like TimedInference.Result.
        """
        from timebill_ros.core.errors import TimeBillError
        from timebill_ros.core.job import Job
        from timebill_ros.core.structured import with_schema

        pol = self.policy
        json_schema, grammar = req.json_schema or '', req.grammar or ''
        # what the node encodes (nodes.validation.model_prompt)
        prompt = (
            with_schema(req.prompt, json_schema)
            if json_schema and self.cfg.schema_in_prompt
            else req.prompt
        )
        try:
            ids = self.engine.encode(prompt, req.system_prompt or None)
        except TimeBillError as exc:
            return {
                'status': 'rejected',
                'reason': str(exc),
                'completed': False,
                'deadline_met': False,
                'finished_at': time.monotonic(),
            }
        job = Job(
            request_id=req.request_id,
            input_ids=ids,
            prompt=prompt,
            system_prompt=req.system_prompt or '',
            json_schema=json_schema,
            grammar=grammar,
            deadline=release + req.budget_s if req.budget_s is not None else math.inf,
            accepted_at=release,
            max_new_tokens=req.max_new_tokens or self.cfg.max_new_tokens,
            overrun='truncate'
            if pol.kind == 'truncate'
            else (req.overrun_policy or self.cfg.overrun_policy),
            alpha=None if pol.budget_dependent else pol.alpha,
            k=pol.k,
            replan=pol.replan,
            min_quality=0.0,  # the paper's policies: no quality floor
        )
        out = self.pipeline.run(job)
        d = out.summary()
        d['finished_at'] = release + out.finished_at_s
        return d

    def close(self) -> None:
        self.pipeline.close()


# ---------------------------------------------------------------------------------- online
class OnlineServer:
    """A running TimeBill server, through the planner-facing client."""

    def __init__(self, timeout_s: float, log: Callable[[str], None]):
        from timebill_ros.client import TimeBillClient

        self.client = TimeBillClient(node_name='timebill_replay')
        self.timeout_s = timeout_s
        if not self.client.wait_until_ready(timeout_s=30.0):
            self.client.close()
            raise SystemExit(
                'no TimeBill server answered within 30 s (start it with `timebill bringup`)'
            )

    def serve(self, req, release: float) -> Dict:
        budget = req.budget_s
        if budget is not None:
            # the release-to-now wait is spent budget
            budget = max(release + budget - time.monotonic(), 1e-3)
        out = self.client.ask(
            req.prompt,
            budget,
            system_prompt=req.system_prompt,
            max_new_tokens=req.max_new_tokens,
            overrun_policy=req.overrun_policy,
            schema=req.json_schema or None,
            grammar=req.grammar or '',
            timeout_s=(budget or 0.0) + self.timeout_s,
        )
        d = {
            f: getattr(out, f)
            for f in (
                'text',
                'completed',
                'deadline_met',
                'valid',
                'structured',
                'alpha',
                'predicted_length',
                'prompt_tokens',
                'tokens_generated',
                'kv_before',
                'kv_after',
                'prefill_s',
                'decode_s',
                'reason',
            )
        }
        d.update(
            status=out.status_name,
            total_s=time.monotonic() - release,
            finished_at=time.monotonic(),
            goal_id=out.goal_id,
        )
        return d

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------------- report
def _score(req, text: str) -> Optional[float]:
    from timebill_ros.core.evaluation.scoring import score

    if not req.task or 'metric' not in req.task:
        return None
    return score(req.task['metric'], text or '', req.task.get('references') or [''])


def summarize(rows: List[Dict]) -> Dict:
    n = len(rows)
    late = sorted(r['late_s'] for r in rows if r['late_s'] > 0)
    scored = [r['score'] for r in rows if r['score'] is not None]
    statuses: Dict[str, int] = {}
    for r in rows:
        statuses[r['status']] = statuses.get(r['status'], 0) + 1
    return {
        'requests': n,
        'completion_rate': sum(bool(r['deadline_met']) for r in rows) / n if n else math.nan,
        'avg_score': sum(scored) / len(scored) if scored else None,
        'scored': len(scored),
        'statuses': statuses,
        'late_count': len(late),
        'late_s_median': late[len(late) // 2] if late else 0.0,
        'late_s_max': late[-1] if late else 0.0,
    }


def markdown(report: Dict) -> str:
    s = report['summary']
    lines = [
        f'# Replay of `{report["bag"]}`',
        '',
        f'- mode: {report["mode"]}, policy: {report["policy"]}, pace: {report["pace"]}'
        f'{" ×" + str(report["speed"]) if report["pace"] == "recorded" else ""}',
        f'- {s["requests"]} requests; completion rate {100 * s["completion_rate"]:.0f}% '
        f'(finished by the deadline)'
        + (
            f'; average score {s["avg_score"]:.3f} over {s["scored"]}'
            if s['avg_score'] is not None
            else ''
        ),
        f'- statuses: {", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items()))}',
        f'- late: {s["late_count"]} (median {s["late_s_median"]:.2f} s, max {s["late_s_max"]:.2f} '
        f's past the '
        'deadline)',
        '',
        '| request | budget (s) | status | α | tokens | total (s) | late (s) | score |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in report['requests']:
        lines.append(
            f'| {r["task_id"] or r["request_id"][:12]} | '
            f'{r["budget_s"] if r["budget_s"] is not None else "–"} '
            f'| {r["status"]} | {r.get("alpha", 0):.2f} | {r.get("tokens_generated", 0)} | '
            f'{r.get("total_s", 0):.2f} | {r["late_s"]:.2f} | '
            f'{"–" if r["score"] is None else format(r["score"], ".2f")} |'
        )
    return '\n'.join(lines) + '\n'


def run(args) -> int:
    from timebill_ros.core.evaluation.bags import read_requests

    from .options import load_config

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    requests = read_requests(args.bag)
    if args.limit:
        requests = requests[: args.limit]
    if not requests:
        print(f'no requests found in {args.bag}', file=sys.stderr)
        return 2
    for r in requests:
        if r.budget_s is None and args.budget is not None:
            r.budget_s = args.budget
        if r.budget_s is not None:
            r.budget_s *= args.budget_scale
    log(f'[replay] {len(requests)} requests from {args.bag} ({requests[0].source})')
    server = (
        OfflineServer(load_config(args), args.policy, log)
        if args.offline
        else OnlineServer(args.timeout, log)
    )
    releases = release_times(requests, args.pace, args.speed)
    rows = []
    t0 = time.monotonic()
    try:
        for req, rel in zip(requests, releases):
            release = time.monotonic() if rel is None else t0 + rel
            _wait_until(release)
            res = server.serve(req, release)
            late = 0.0
            if req.budget_s is not None:  # a refusal that arrives late is a miss too
                late = max(res['finished_at'] - (release + req.budget_s), 0.0)
            row = {
                'request_id': req.request_id,
                'task_id': (req.task or {}).get('id'),
                'budget_s': req.budget_s,
                **{k: v for k, v in res.items() if k != 'finished_at'},
                'late_s': late,
                'score': _score(req, res.get('text', ''))
                if res['status'] not in ('killed', 'rejected')
                else (0.0 if req.task else None),
            }
            rows.append(row)
            log(
                f'[replay] {len(rows)}/{len(requests)} {row["task_id"] or req.request_id[:12]}: '
                f'{row["status"]}, α={row.get("alpha", 0):.2f}, '
                f'{row.get("total_s", 0):.2f}s of {req.budget_s}s'
            )
    finally:
        close = getattr(server, 'close', None)
        if close:
            close()
    report = {
        'bag': str(args.bag),
        'mode': 'offline' if args.offline else 'online',
        'policy': args.policy if args.offline else "server's",
        'pace': args.pace,
        'speed': args.speed,
        'summary': summarize(rows),
        'requests': rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'replay.json').write_text(json.dumps(report, indent=1, default=str))
    (out / 'replay.md').write_text(markdown(report))
    print(markdown(report))
    return 0
