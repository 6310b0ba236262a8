"""
Priming a standing context into the prefix cache, between goals.

Methods of ``core.pipeline.Pipeline`` (a mixin): priming shares the pipeline's lock, model
worker and queue, and always yields to a queued goal at a chunk boundary.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
import time
from typing import List, Optional

from .errors import PrefillStopped
from .job import PrimeResult


@dataclass(eq=False)
class _Prime:
    prime_id: str
    input_ids: List[int]
    future: Future
    seconds: float = 0.0


class Priming:
    """The priming half of ``Pipeline``: ``prime``, ``release`` and the model worker's step."""

    def prime(self, input_ids: List[int], prime_id: str) -> Future:
        """
        Cache a standing context between goals; the future's result is a ``PrimeResult``.

        Priming runs only while no goal is queued, one prefill chunk at a time: a goal that
        arrives waits at most for the chunk in progress (admission counts it), then priming
        goes on where it stopped. The cached blocks are held until ``release(prime_id)``.
        """
        fut: Future = Future()
        ids = [int(t) for t in input_ids]
        pc = self.prefix_cache
        why = ''
        if pc is None:
            why = 'the prefix cache is off (prefix_cache: false or prefix_cache_mb: 0)'
        elif not ids:
            why = 'the context has no tokens: nothing to prime'
        elif len(ids) >= self.engine.max_context:
            why = (
                f"the context has {len(ids)} tokens; the model's context is "
                f'{self.engine.max_context} (no room for a question)'
            )
        elif len(ids) < pc.block_tokens:
            why = (
                f'the context has {len(ids)} tokens, less than one cached block '
                f'({pc.block_tokens}): nothing to keep'
            )
        if why:
            fut.set_result(PrimeResult(prime_id, False, why, context_tokens=len(ids)))
            return fut
        whole = len(ids) - len(ids) % pc.block_tokens
        need = self._kv_bytes(whole - pc.peek(ids))
        free = pc.capacity_bytes - pc.pinned_bytes()
        if need > free:
            fut.set_result(
                PrimeResult(
                    prime_id,
                    False,
                    (
                        f'does not fit the prefix cache: {whole} tokens need '
                        f'{need / 2**20:.0f} MB more, {max(free, 0) / 2**20:.0f} MB of '
                        f'prefix_cache_mb={pc.capacity_bytes / 2**20:.0f} are not held by other '
                        f'primes or goals; goals with this context are served cold'
                    ),
                    context_tokens=len(ids),
                    cached_tokens=pc.peek(ids),
                )
            )
            return fut
        with self._cv:
            if self._closed:
                fut.set_result(PrimeResult(prime_id, False, 'the pipeline is shutting down'))
                return fut
            self._primes.append(_Prime(prime_id, ids[:whole], fut))
            self._start_threads()
            self._cv.notify_all()
        return fut

    def release(self, prime_id: str) -> int:
        """Stop holding a primed context (a queued prime is dropped); returns blocks released."""
        with self._cv:
            running = self._running is not None and self._running.job_id == f'prime:{prime_id}'
            if running:  # its last chunk would hold the blocks again: released when it stops
                self._released.add(prime_id)
            for p in list(self._primes):
                if p.prime_id == prime_id:
                    self._primes.remove(p)
                    p.future.set_result(
                        PrimeResult(prime_id, False, 'released before it was primed')
                    )
        pc = self.prefix_cache
        return pc.release(prime_id) if pc is not None else 0

    def _kv_bytes(self, tokens: int) -> int:
        per = getattr(self.engine, 'kv_bytes_per_token', None)
        return int(tokens * per()) if per is not None else 0

    def _prime_step(self, p: _Prime) -> None:
        """Prime ``p`` on the model thread until done or a goal is queued (a chunk boundary)."""
        pc, model, clock = self.prefix_cache, self.time_model(), self.clock
        chunk = self.cfg.prefill_chunk or len(p.input_ids)
        first: List[int] = []

        def should_stop(done: int, elapsed: float) -> Optional[str]:
            if not first:
                first.append(done)
            with self._cv:
                if self._closed:
                    return 'closed'
                if done > first[0] and len(self._queue):
                    return 'yield'  # a goal is waiting: it goes first
                if self._running is not None:  # admission counts the chunk about to run
                    end = min(done + chunk, len(p.input_ids))
                    now = clock()
                    self._running.expected_end = now + model.prefill_s(end, done)
                    self._running.worst_end = now + 2.0 * self.online.worst_model().prefill_s(
                        end, done
                    )
            return None

        t0 = time.monotonic()
        try:
            self.engine.prefill(
                p.input_ids,
                capacity=len(p.input_ids),
                chunk_tokens=self.cfg.prefill_chunk,
                should_stop=should_stop,
                prime=p.prime_id,
            )
            stopped = ''
        except PrefillStopped as stop:
            stopped = stop.reason
        except Exception as exc:  # noqa: BLE001 - a failed prime must not stop the worker
            stopped = f'generator error while priming: {exc or type(exc).__name__}'
        p.seconds += time.monotonic() - t0
        with self._cv:
            released = p.prime_id in self._released
            self._released.discard(p.prime_id)
            if stopped == 'yield' and not released:
                self._primes.appendleft(p)  # goes on once the queue is empty again
                return
        if released:
            pc.release(p.prime_id)
            stopped = 'released while it was being primed'
            if p.future.done():
                return
        held = pc.holds().get(p.prime_id, 0)
        whole = len(p.input_ids)
        if stopped:
            result = PrimeResult(p.prime_id, False, stopped, whole, held, p.seconds, False)
        elif held < whole:
            result = PrimeResult(
                p.prime_id,
                False,
                (pc.last_refusal or 'the memory bound was reached')
                + f'; {held} of {whole} tokens are cached, the rest is served cold',
                whole,
                held,
                p.seconds,
                False,
            )
        else:
            result = PrimeResult(
                p.prime_id, True, f'{held} tokens cached', whole, held, p.seconds, True
            )
        p.future.set_result(result)
