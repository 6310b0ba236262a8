"""Running figures over served goals, for ``/diagnostics`` (deadline misses, estimator errors)."""

from __future__ import annotations

import threading

from timebill_ros.action import TimedInference
from timebill_ros.nodes.results import status_name

R = TimedInference.Result


class ServedStats:
    """Running figures over served goals for ``/diagnostics`` (errors: the last ``WINDOW``)."""

    WINDOW = 200

    def __init__(self):
        from collections import Counter, deque

        self.lock = threading.Lock()
        self.counts = Counter()
        # |N̂ - tokens| over completed answers with an estimate
        self.length_err = deque(maxlen=self.WINDOW)
        self.model_state = 'unconfigured'

    def record(self, result) -> None:
        status = status_name(int(result.status))
        with self.lock:
            self.counts[status] += 1
            if result.status in (R.STATUS_REJECTED, R.STATUS_CANCELED, R.STATUS_ABORTED):
                return
            self.counts['planned'] += 1  # goals the server planned a deadline for and ran
            if not result.deadline_met:
                self.counts['missed'] += 1
            if result.completed and not result.estimate_fallback and result.predicted_length > 0:
                self.length_err.append(
                    abs(int(result.predicted_length) - int(result.tokens_generated))
                )

    def to_status(self, queued: int, running: int, generator_ok: bool, active: bool):
        from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

        def mean(xs):
            return f'{sum(xs) / len(xs):.2f}' if xs else 'n/a'

        with self.lock:
            planned, missed = self.counts['planned'], self.counts['missed']
            rate = missed / planned if planned else 0.0
            kv = lambda k, v: KeyValue(key=k, value=str(v))  # noqa: E731
            deadline = DiagnosticStatus(name='timebill_server: deadlines', hardware_id='timebill')
            deadline.level = DiagnosticStatus.OK if rate <= 0.05 else DiagnosticStatus.WARN
            deadline.message = f'deadline-miss rate {rate:.1%} over {planned} planned goals'
            deadline.values = [
                kv('deadline_miss_rate', f'{rate:.4f}'),
                kv('planned_goals', planned),
                kv('missed_goals', missed),
            ] + [
                kv(f'goals_{k}', v)
                for k, v in sorted(self.counts.items())
                if k not in ('planned', 'missed')
            ]
            est = DiagnosticStatus(
                name='timebill_server: estimators',
                hardware_id='timebill',
                level=DiagnosticStatus.OK,
            )
            est.message = (
                f'length error {mean(self.length_err)} tokens (time-model errors: '
                f"timebill_generator's online estimator status)"
            )
            est.values = [
                kv('length_abs_err_tokens_mean', mean(self.length_err)),
                kv('length_samples', len(self.length_err)),
            ]
            queue = DiagnosticStatus(
                name='timebill_server: queue', hardware_id='timebill', level=DiagnosticStatus.OK
            )
            queue.message = f'{queued} queued, {running} running'
            queue.values = [kv('queue_length', queued), kv('running', running)]
            model = DiagnosticStatus(name='timebill_server: model', hardware_id='timebill')
            ok = active and generator_ok
            model.level = (
                DiagnosticStatus.OK
                if ok
                else (DiagnosticStatus.ERROR if active else DiagnosticStatus.WARN)
            )
            reach = 'reachable' if generator_ok else 'unreachable'
            model.message = f'server {self.model_state}; generator {reach}'
            model.values = [
                kv('server_state', self.model_state),
                kv('generator_reachable', generator_ok),
            ]
            return [deadline, est, queue, model]

    def statuses(self, beat, fresh: bool, active: bool, node_name: str) -> list:
        """Return the server's statuses, named after ``node_name`` (its namespace included)."""
        out = self.to_status(
            queued=beat.queued if fresh else 0,
            running=1 if fresh and beat.running else 0,
            generator_ok=fresh and beat.state == 'active',
            active=active,
        )
        prefix = node_name.lstrip('/')
        for status in out:
            status.name = status.name.replace('timebill_server', prefix, 1)
        return out


def estimator_status(node_name: str, pipeline, ape: list):
    """Describe the generator's online time model: drift from the fit, served errors (APE %)."""
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

    drift = pipeline.online.drift()
    st = DiagnosticStatus(
        name=f'{node_name}: online estimator',
        hardware_id='timebill',
        level=DiagnosticStatus.WARN if drift else DiagnosticStatus.OK,
        message='; '.join(drift) or "measured times inside the fitted model's band",
    )
    values = dict(pipeline.online.summary(), estimator_samples=len(ape))
    if ape:
        values['prefill_ape_pct_mean'] = sum(a for a, _ in ape) / len(ape)
        values['decode_ape_pct_mean'] = sum(b for _, b in ape) / len(ape)
    st.values = [
        KeyValue(key=k, value=f'{v:.4g}' if isinstance(v, float) else str(v))
        for k, v in values.items()
    ]
    return st


def prefix_status(node_name: str, engine):
    """Describe the prefix cache for /diagnostics: hits, tokens reused, MB held, drops."""
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

    pc = getattr(engine, 'prefix_cache', None) if engine is not None else None
    st = DiagnosticStatus(
        name=f'{node_name}: prefix cache',
        hardware_id='timebill',
        level=DiagnosticStatus.OK,
    )
    if pc is None:
        st.message = 'off (prefix_cache: false or prefix_cache_mb: 0)'
        st.values = [KeyValue(key='prefix_cache', value='off')]
        return st
    v = pc.summary()
    st.message = (
        f"{v['prefix_hits']} hits of {v['prefix_lookups']} lookups, "
        f"{v['prefix_tokens_reused']} tokens reused; {v['prefix_blocks']} blocks, "
        f"{v['prefix_mb_held']:.1f} of {v['prefix_mb_bound']:.0f} MB held, "
        f"{v['prefix_primed']} primed context(s), {v['prefix_blocks_dropped']} blocks dropped"
    )
    if pc.last_refusal:
        st.message += f'; last refused: {pc.last_refusal}'
    st.values = [
        KeyValue(key=k, value=f'{x:.4g}' if isinstance(x, float) else str(x))
        for k, x in v.items()
    ]
    if pc.last_refusal:
        st.values.append(KeyValue(key='prefix_last_refusal', value=pc.last_refusal))
    return st
