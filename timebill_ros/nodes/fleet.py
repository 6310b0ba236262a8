"""
The server's view of its generators: one or several, each known by its heartbeat.

Configuration lists them (``generators``); each serves ``timebill/<name>/generate`` and its
planning services under the same prefix, and beats on ``<name>/heartbeat`` with its time model,
the seconds of work it holds and the contexts it has primed. A generator counts as present while
its heartbeats come (a restarted or newly started one joins with its first beat, nothing else
restarts); it is lost to its goals when they stop: after ``failover_after_s`` when another
generator could take the goal over, else after ``peer_timeout_s``. ``core.fleet.rank`` picks the
generator for a goal. EstimateBudget, Prime and ReleasePrime are answered for the fleet here.
"""

from __future__ import annotations

from dataclasses import dataclass
import time
from typing import Dict, List, Optional

from rclpy.action import ActionClient
from timebill_ros.action import Generate
from timebill_ros.core.fleet import Choice, Member, rank
from timebill_ros.core.time_estimator import ExecutionTimeModel
from timebill_ros.msg import Heartbeat
from timebill_ros.nodes.heartbeat import heartbeat_topic
from timebill_ros.nodes.qos import ACTION_QOS, generator_endpoint, HEARTBEAT_QOS
from timebill_ros.nodes.spin import wait_first
from timebill_ros.srv import EstimateBudget, Prime, ReleasePrime

SERVICE_WAIT_S = 30.0  # a forwarded planning call waits this long for each generator


class Lost(str):
    """A stop reason that says the goal's generator is gone (the server may re-dispatch)."""


@dataclass
class Peer:
    """One generator: its clients and its last heartbeat."""

    name: str
    action: ActionClient
    estimate: object
    prime: object
    release: object
    beat: Optional[Heartbeat] = None
    beat_at: float = 0.0  # time.monotonic() of the last heartbeat

    def silent_s(self) -> float:
        return time.monotonic() - self.beat_at if self.beat is not None else float('inf')

    def model(self) -> Optional[ExecutionTimeModel]:
        return ExecutionTimeModel(*self.beat.time_model) if self.beat and self.beat.time_model \
            else None


class Fleet:
    """Clients, heartbeats and the choice among the configured generators."""

    def __init__(self, node, names: List[str], group, on_restart):
        self.node, self.on_restart = node, on_restart
        self.peers: Dict[str, Peer] = {}
        self.contexts: Dict[str, tuple] = {}  # prime id -> (system prompt, context, tokens)
        for name in names:
            peer = Peer(
                name,
                ActionClient(node, Generate, generator_endpoint(name, 'generate'),
                             callback_group=group, **ACTION_QOS),
                node.create_client(EstimateBudget, generator_endpoint(name, 'estimate_budget'),
                                   callback_group=group),
                node.create_client(Prime, generator_endpoint(name, 'prime'),
                                   callback_group=group),
                node.create_client(ReleasePrime, generator_endpoint(name, 'release_prime'),
                                   callback_group=group),
            )
            self.peers[name] = peer
            node.create_subscription(
                Heartbeat, heartbeat_topic(name), lambda msg, p=peer: self._on_beat(p, msg),
                HEARTBEAT_QOS, callback_group=group,
            )

    def _on_beat(self, peer: Peer, msg: Heartbeat) -> None:
        previous = peer.beat
        peer.beat, peer.beat_at = msg, time.monotonic()
        if previous is not None and previous.pid != msg.pid:
            self.on_restart(peer.name, previous.pid, msg.pid)

    # ------------------------------------------------------------------ presence
    def fresh(self, timeout_s: float, active: bool = True) -> List[Peer]:
        """
        Return the generators heard within ``timeout_s`` with their action server matched.

        ``active``: only those whose last beat said active. A beat is up to ``heartbeat_s``
        old, so a generator activated a moment ago may still show inactive: dispatch tries
        those too, after the active ones (the generator itself refuses when it is not).
        """
        return [
            p for p in self.peers.values()
            if p.silent_s() <= timeout_s and p.action.server_is_ready()
            and (p.beat.state == 'active' or not active and not p.beat.error)
        ]

    def lost_after_s(self, name: str, cfg) -> float:
        """How long ``name`` may be silent before its goals count it lost."""
        others = [p for p in self.fresh(cfg.peer_timeout_s) if p.name != name]
        return cfg.failover_after_s if others else cfg.peer_timeout_s

    def why_none(self) -> str:
        """Say why no generator can take a goal, naming each one's state."""
        parts = []
        for p in self.peers.values():
            if p.beat is None:
                parts.append(f'{p.name}: never heard')
            elif p.beat.error:
                parts.append(f'{p.name}: {p.beat.error}')
            elif p.beat.state != 'active':
                parts.append(f'{p.name}: {p.beat.state}')
            elif not p.action.server_is_ready():
                parts.append(f'{p.name}: not reachable')
            else:
                parts.append(f'{p.name}: no heartbeat for {p.silent_s():.1f} s')
        return 'no generator can take it (' + '; '.join(parts) + ')'

    def status(self, node_name: str, timeout_s: float):
        """Describe every generator for /diagnostics: heard, state, reachable, work held."""
        from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

        ready = {p.name for p in self.fresh(timeout_s)}
        st = DiagnosticStatus(name=f'{node_name}: generators', hardware_id='timebill')
        st.level = DiagnosticStatus.OK if ready else DiagnosticStatus.ERROR
        st.message = f'{len(ready)} of {len(self.peers)} generators ready'
        st.values = []
        for p in self.peers.values():
            if p.name in ready:
                what = f'ready, busy {p.beat.busy_s:.2f} s, {p.beat.queued} queued'
            elif p.beat is None:
                what = 'never heard'
            else:
                what = f'{p.beat.state or "?"}, silent {p.silent_s():.1f} s, ' + (
                    'reachable' if p.action.server_is_ready() else 'not reachable')
            st.values.append(KeyValue(key=p.name, value=what))
        return st

    # ------------------------------------------------------------------ choice
    def choose(self, cfg, left_s: float, prompt: str, system_prompt: str, n_prompt: int,
               max_new: int, alpha_cap: float, exclude=(), inflight=None) -> List[Choice]:
        """Rank the present generators for a goal (``core.fleet.rank``), best first."""
        members = []
        for p in self.fresh(cfg.peer_timeout_s, active=False):
            model = p.model()
            if p.name in exclude or model is None:
                continue
            held = set(p.beat.primed)
            ctx = [t for pid, (sp, text, t) in self.contexts.items()
                   if pid in held and sp == system_prompt and prompt.startswith(text)]
            members.append(Member(p.name, model, float(p.beat.busy_s), int(p.beat.queued),
                                  bool(ctx), max(ctx, default=0),
                                  (inflight or {}).get(p.name, 0), p.beat.state == 'active'))
        return rank(members, left_s, n_prompt, max_new, alpha_cap)

    # ------------------------------------------------------- planning services
    def _call_all(self, attr: str, request, peers: List[Peer]) -> Dict[str, object]:
        calls = {p.name: getattr(p, attr).call_async(request) for p in peers
                 if getattr(p, attr).service_is_ready()}
        end = time.monotonic() + SERVICE_WAIT_S + float(getattr(request, 'timeout_s', 0) or 0)
        answers = {}
        for name, future in calls.items():
            if wait_first(future, timeout_s=max(end - time.monotonic(), 0.0)) is not None:
                answers[name] = future.result()
        return answers

    def estimate(self, request, response, cfg):
        """Ask every present generator; answer with the best plan and who would serve it."""
        answers = self._call_all('estimate', request, self.fresh(cfg.peer_timeout_s, active=False))
        if not answers:
            response.ok, response.reason = False, self.why_none()
            return response

        def key(item):
            name, r = item
            return (not r.ok, not r.guaranteed, not r.feasible, round(r.alpha, 3),
                    not r.admissible, -r.cached_tokens, r.queue_ahead_s, name)

        name, best = min(answers.items(), key=key)
        for field in EstimateBudget.Response.get_fields_and_field_types():
            setattr(response, field, getattr(best, field))
        response.generator = name
        return response

    def prime(self, request, response, cfg):
        """Prime the context on every present generator: any of them can then serve it warm."""
        peers = self.fresh(cfg.peer_timeout_s) or self.fresh(cfg.peer_timeout_s, active=False)
        answers = self._call_all('prime', request, peers)
        if not answers:
            response.reason = self.why_none()
            return response
        first = next(iter(answers.values()))
        for field in Prime.Response.get_fields_and_field_types():
            setattr(response, field, getattr(first, field))
        response.ok = all(r.ok for r in answers.values())
        response.reason = '; '.join(f'{n}: {r.reason}' for n, r in answers.items())
        if response.ok or any(r.cached_tokens for r in answers.values()):
            self.contexts[first.prime_id] = (
                request.system_prompt, request.context, int(first.context_tokens)
            )
        return response

    def release(self, request, response, cfg):
        """Release a primed context on every generator that answers."""
        answers = self._call_all('release', request, self.fresh(cfg.peer_timeout_s, active=False))
        self.contexts.pop(request.prime_id, None)
        if not answers:
            response.reason = self.why_none()
            return response
        response.ok = any(r.ok for r in answers.values())
        response.released_blocks = sum(r.released_blocks for r in answers.values())
        response.reason = '; '.join(f'{n}: {r.reason}' for n, r in answers.items())
        return response
