"""
Prefix KV cache: a robot's standing context (system prompt, scene, log) prefilled once.

A planner asks many questions about the same context; only the question at the end changes.
Here the α = 0 keys and values of every whole block of ``block_tokens`` prompt tokens are kept,
keyed by a hash chain (block i's key hashes block i-1's key and its own token ids, as vLLM's
automatic prefix caching does), so a goal finds the longest cached prefix of its token ids with
one dictionary look-up per block and prefills only the rest.

Why blocks and a hash chain, not a radix tree: the engine's per-request cache is one contiguous
buffer per layer (the C++ decode step reads it), so a hit is copied into the goal's own buffer
anyway; fixed blocks make that copy, the memory bound and LRU dropping simple, share the blocks
of a common system prompt between contexts, and a look-up never walks token by token. What a
radix tree adds (reuse to the exact token) matters little: the warm path recomputes the press's
observation window (see ``Engine.reusable``) and a block is 64 tokens of a several-thousand-token
context.

Cached blocks are never written after insertion: a goal copies them into its own buffer, so its
eviction and decoding cannot touch them. Blocks a queued or running goal will reuse are pinned
(``Lease``); blocks a planner primed are held until it releases them. Everything else is dropped
least recently used first, leaves before their parents, when the memory bound is reached.

ROS-free and model-agnostic: a block stores, per layer, keys and values ``[kv_heads, n, head_dim]``
in the cache's dtype.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
import hashlib
import threading
from typing import Dict, List, Optional, Sequence, Set

import numpy as np
import torch

ROOT = b'timebill-prefix-v1'


def block_keys(ids: Sequence[int], block_tokens: int, limit: Optional[int] = None) -> List[bytes]:
    """
    Chain keys of the whole blocks of ``ids`` (at most ``limit`` tokens of them).

    Key i identifies tokens [0, (i+1)·block_tokens) exactly: it hashes key i-1 and block i's ids.
    Deterministic across processes (BLAKE2b), so any node can compute them.
    """
    n = len(ids) if limit is None else min(len(ids), int(limit))
    arr = np.asarray(list(ids[: n - n % block_tokens]), dtype=np.int64)
    keys, prev = [], ROOT
    for start in range(0, arr.size, block_tokens):
        prev = hashlib.blake2b(
            prev + arr[start:start + block_tokens].tobytes(), digest_size=16
        ).digest()
        keys.append(prev)
    return keys


@dataclass(eq=False)
class Block:
    key: bytes
    parent: Optional[bytes]
    start: int  # first token position
    kv: List[tuple]  # per layer (keys, values), each [kv_heads, block_tokens, head_dim]
    nbytes: int
    children: int = 0
    pins: int = 0  # goals that will copy it (queued or running)
    holds: Set[str] = field(default_factory=set)  # primes that keep it


@dataclass
class Lease:
    """The cached prefix one goal will reuse, pinned until ``release``."""

    cache: Optional['PrefixCache']
    blocks: List[Block]
    released: bool = False

    @property
    def tokens(self) -> int:
        return sum(b.kv[0][0].shape[-2] for b in self.blocks) if self.blocks else 0

    def release(self) -> None:
        if not self.released and self.cache is not None:
            self.cache._unpin(self.blocks)
        self.released = True


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0  # look-ups that reused at least one block
    tokens_reused: int = 0
    tokens_looked_up: int = 0
    blocks_inserted: int = 0
    blocks_dropped: int = 0  # dropped by the memory bound (LRU)
    blocks_refused: int = 0  # not cached: the bound was full of pinned or held blocks
    cleared: int = 0


class PrefixCache:
    """Whole-block KV prefixes under a memory bound; thread-safe."""

    def __init__(self, capacity_mb: float = 2048.0, block_tokens: int = 64):
        if block_tokens < 1:
            raise ValueError(f'prefix block must hold >= 1 token, got {block_tokens}')
        if not capacity_mb >= 0:
            raise ValueError(f'prefix_cache_mb must be >= 0, got {capacity_mb}')
        self.block_tokens = int(block_tokens)
        self.capacity_bytes = int(capacity_mb * 2**20)
        self._blocks: 'OrderedDict[bytes, Block]' = OrderedDict()  # oldest use first
        self._lock = threading.RLock()
        self.bytes_held = 0
        self.stats = PrefixStats()
        self.last_refusal = ''

    # ------------------------------------------------------------------ look-up
    def _match(self, ids: Sequence[int], limit: Optional[int]) -> List[Block]:
        out = []
        for key in block_keys(ids, self.block_tokens, limit):
            b = self._blocks.get(key)
            if b is None:
                break
            out.append(b)
        return out

    def peek(self, ids: Sequence[int], limit: Optional[int] = None) -> int:
        """Tokens of ``ids`` cached now (whole blocks, at most ``limit``); changes nothing."""
        with self._lock:
            return len(self._match(ids, limit)) * self.block_tokens

    def acquire(self, ids: Sequence[int], limit: Optional[int] = None) -> Lease:
        """Pin the longest cached prefix of ``ids`` (at most ``limit`` tokens) for one goal."""
        with self._lock:
            blocks = self._match(ids, limit)
            self.stats.lookups += 1
            self.stats.tokens_looked_up += len(ids)
            if blocks:
                self.stats.hits += 1
                self.stats.tokens_reused += len(blocks) * self.block_tokens
            for b in blocks:
                b.pins += 1
            self._touch(blocks)
            return Lease(self, blocks)

    def _touch(self, blocks: List[Block]) -> None:
        # children first, so a parent is always more recent than its children: LRU drops leaves
        for b in reversed(blocks):
            self._blocks.move_to_end(b.key)

    def _unpin(self, blocks: List[Block]) -> None:
        with self._lock:
            for b in blocks:
                b.pins = max(b.pins - 1, 0)

    # ------------------------------------------------------------------ copy in / out
    @staticmethod
    def copy_into(lease: Lease, cache) -> int:
        """Write the lease's blocks into the first positions of ``cache`` (a fresh one)."""
        if not lease.blocks:
            return 0
        n = lease.tokens
        for i, layer in enumerate(cache.layers):
            keys = torch.cat([b.kv[i][0] for b in lease.blocks], dim=-2).unsqueeze(0)
            values = torch.cat([b.kv[i][1] for b in lease.blocks], dim=-2).unsqueeze(0)
            layer.update(keys, values)
        return n

    def insert(
        self, ids: Sequence[int], cache, upto: int, hold: Optional[str] = None
    ) -> int:
        """
        Cache the whole blocks of ``ids[:upto]`` from ``cache`` (α = 0 entries, positions 0…).

        Blocks already cached are only touched (and held for ``hold``, a prime's id). Returns the
        tokens of ``ids`` now cached from the start. Stops at the first block that does not fit
        the bound (``last_refusal`` says why).
        """
        keys = block_keys(ids, self.block_tokens, upto)
        if not keys:
            return 0
        layers = list(cache.layers)
        bt = self.block_tokens
        with self._lock:
            chain: List[Block] = []
            parent = None
            try:
                for i, key in enumerate(keys):
                    blk = self._blocks.get(key)
                    if blk is None:
                        blk = self._new_block(key, parent, i * bt, layers)
                        if blk is None:
                            break
                    blk.pins += 1  # the chain so far must not make room for its own next block
                    chain.append(blk)
                    if hold is not None:
                        blk.holds.add(hold)
                    parent = key
            finally:
                for blk in chain:
                    blk.pins -= 1
            self._touch(chain)
            return len(chain) * bt

    def _new_block(
        self, key: bytes, parent: Optional[bytes], start: int, layers
    ) -> Optional[Block]:
        bt = self.block_tokens
        nbytes = sum(
            (la.keys[0, :, start:start + bt].numel() + la.values[0, :, start:start + bt].numel())
            * la.keys.element_size()
            for la in layers
        )
        if not self._make_room(nbytes):
            self.stats.blocks_refused += 1
            self.last_refusal = (
                f'prefix cache full: {self.bytes_held / 2**20:.0f} MB of '
                f'{self.capacity_bytes / 2**20:.0f} MB held by blocks in use or primed'
            )
            return None
        kv = [
            (
                la.keys[0, :, start:start + bt].clone(),
                la.values[0, :, start:start + bt].clone(),
            )
            for la in layers
        ]
        blk = Block(key, parent, start, kv, nbytes)
        self._blocks[key] = blk
        if parent is not None and parent in self._blocks:
            self._blocks[parent].children += 1
        self.bytes_held += nbytes
        self.stats.blocks_inserted += 1
        return blk

    def _make_room(self, nbytes: int) -> bool:
        if nbytes > self.capacity_bytes:
            return False
        while self.bytes_held + nbytes > self.capacity_bytes:
            victim = next(
                (
                    b
                    for b in self._blocks.values()
                    if b.children == 0 and b.pins == 0 and not b.holds
                ),
                None,
            )
            if victim is None:
                return False
            self._drop(victim)
            self.stats.blocks_dropped += 1
        return True

    def _drop(self, blk: Block) -> None:
        del self._blocks[blk.key]
        self.bytes_held -= blk.nbytes
        if blk.parent is not None and blk.parent in self._blocks:
            self._blocks[blk.parent].children -= 1

    # ------------------------------------------------------------------ primes
    def release(self, hold: str) -> int:
        """Stop holding the blocks primed as ``hold``; returns how many it held."""
        with self._lock:
            n = 0
            for b in self._blocks.values():
                if hold in b.holds:
                    b.holds.discard(hold)
                    n += 1
            return n

    def holds(self) -> Dict[str, int]:
        """Tokens held per prime id."""
        with self._lock:
            out: Dict[str, int] = {}
            for b in self._blocks.values():
                for h in b.holds:
                    out[h] = out.get(h, 0) + self.block_tokens
            return out

    def pinned_bytes(self) -> int:
        """Bytes the memory bound cannot drop now (blocks primed or in use)."""
        with self._lock:
            return sum(b.nbytes for b in self._blocks.values() if b.pins or b.holds)

    # ------------------------------------------------------------------ the rest
    def clear(self) -> None:
        """Drop every block (lifecycle cleanup); leases still out keep their blocks alive."""
        with self._lock:
            self._blocks.clear()
            self.bytes_held = 0
            self.stats.cleared += 1

    def __len__(self) -> int:
        return len(self._blocks)

    def summary(self) -> dict:
        """Numbers for /diagnostics."""
        with self._lock:
            s = self.stats
            return {
                'prefix_blocks': len(self._blocks),
                'prefix_mb_held': self.bytes_held / 2**20,
                'prefix_mb_bound': self.capacity_bytes / 2**20,
                'prefix_lookups': s.lookups,
                'prefix_hits': s.hits,
                'prefix_tokens_reused': s.tokens_reused,
                'prefix_blocks_dropped': s.blocks_dropped,
                'prefix_blocks_refused': s.blocks_refused,
                'prefix_primed': len({h for b in self._blocks.values() for h in b.holds}),
            }
