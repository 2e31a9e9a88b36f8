"""BlockPool against a plain per-block reference model.

BlockPool keeps its free queue as runs and its prefix cache indexed per session
(for speed); :class:`ReferencePool` is the straightforward version of the same
semantics: one ordered dict of free blocks, one dict of hashes. Random operation
sequences must give the same blocks, evictions and prefix hits in both, and keep
the pool's invariants after every operation.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

import pytest

from mars_ray.engine.kv_cache import BlockHash, BlockPool


class ReferencePool:
    """vLLM's block pool semantics, block by block."""

    def __init__(self, num_blocks: int) -> None:
        self.ref = [0] * num_blocks
        self.hash: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_evicted = 0

    def num_cached_prefix_blocks(self, session_id: str, max_blocks: int) -> int:
        n = 0
        while n < max_blocks and (session_id, n) in self.cached:
            n += 1
        return n

    def take_cached(self, session_id: str, num_blocks: int) -> list[int]:
        blocks = [self.cached[(session_id, i)] for i in range(num_blocks)]
        for block in blocks:
            if self.ref[block] == 0:
                del self.free_queue[block]
            self.ref[block] += 1
        return blocks

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks > len(self.free_queue):
            return None
        blocks = []
        for _ in range(num_blocks):
            block, _ = self.free_queue.popitem(last=False)
            self.ref[block] = 1
            old = self.hash[block]
            if old is not None:
                del self.cached[old]
                self.hash[block] = None
                self.num_evicted += 1
            blocks.append(block)
        return blocks

    def set_hash(self, block: int, block_hash: BlockHash) -> None:
        old = self.cached.get(block_hash)
        if old is not None and old != block:
            return
        self.hash[block] = block_hash
        self.cached[block_hash] = block

    def free(self, blocks: Sequence[int], evict_first: bool = False) -> None:
        for block in blocks if evict_first else reversed(blocks):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free_queue[block] = None
                if evict_first:
                    self.free_queue.move_to_end(block, last=False)


def run_random_ops(seed: int, num_blocks: int, num_steps: int) -> None:
    """Sessions take their cached prefix, grow, and free (to either end); a few pins
    share blocks with their session's next turn."""
    rng = random.Random(seed)
    pool, ref = BlockPool(num_blocks), ReferencePool(num_blocks)
    sessions = [f"s{i}" for i in range(6)]
    held: dict[str, list[int]] = {}  # session -> blocks of its running turn
    pins: dict[str, list[int]] = {}
    for _ in range(num_steps):
        sid = rng.choice(sessions)
        op = rng.random()
        if sid not in held and sid in pins and op < 0.2:  # the pin expires
            pool.free(pins[sid])
            ref.free(pins.pop(sid))
        elif sid not in held:  # a turn starts: take the cached prefix (or only part)
            hit = pool.num_cached_prefix_blocks(sid, 10_000)
            assert hit == ref.num_cached_prefix_blocks(sid, 10_000)
            take = hit if op < 0.8 else rng.randint(0, hit)
            held[sid] = pool.take_cached(sid, take)
            assert held[sid] == ref.take_cached(sid, take)
            if sid in pins and op < 0.6:  # the session is back: its pin lets go
                pool.free(pins[sid])
                ref.free(pins.pop(sid))
        elif op < 0.6:  # compute more blocks (full ones get hashes)
            want = rng.randint(1, 12)
            got = pool.allocate(want)
            assert got == ref.allocate(want)
            if got is not None:
                first = len(held[sid])
                held[sid].extend(got)
                full = rng.randint(0, len(got))  # the rest stays partial, unhashed
                pool.cache_blocks(sid, first, got[:full])
                for i, block in enumerate(got[:full]):
                    ref.set_hash(block, (sid, first + i))
        elif op < 0.7 and sid not in pins:  # the turn ends with its KV pinned
            pins[sid] = held.pop(sid)
        else:  # the turn ends (or is preempted): free to the tail or the head
            evict_first = op > 0.9
            blocks = held.pop(sid)
            pool.free(blocks, evict_first=evict_first)
            ref.free(blocks, evict_first=evict_first)
        assert pool.num_free_blocks == len(ref.free_queue)
        assert pool.num_evicted_blocks == ref.num_evicted
        pool.check_invariants([*held.values(), *pins.values()])
    assert list(pool._ref_cnt) == ref.ref


@pytest.mark.parametrize("seed", range(12))
def test_pool_matches_the_per_block_reference(seed: int) -> None:
    run_random_ops(seed, num_blocks=48, num_steps=600)


def test_stale_entries_are_skipped_by_allocation() -> None:
    """A prefix taken out of the middle of a run leaves stale entries that the next
    allocations skip, in queue order."""
    pool = BlockPool(6)
    a = pool.allocate(3)
    b = pool.allocate(3)
    assert a == [0, 1, 2] and b == [3, 4, 5]
    pool.cache_blocks("a", 0, a)
    pool.cache_blocks("b", 0, b)
    pool.free(a + b)  # one run, queue order 5 4 3 2 1 0
    assert pool.take_cached("a", 2) == [0, 1]  # the run's end: taken at once
    assert pool.take_cached("b", 1) == [3]  # mid-run: a stale entry
    pool.check_invariants([[0, 1], [3]])
    assert pool.allocate(3) == [5, 4, 2]
    assert pool.num_free_blocks == 0
    pool.check_invariants([[0, 1], [3], [5, 4, 2]])
