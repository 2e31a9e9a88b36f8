"""A paged KV block pool with vLLM's semantics.

* Fixed-size blocks (16 tokens by default) with reference counts.
* Prefix caching: a full block carries a hash; a freed block keeps it and can be
  reused by a later request of the same prefix until it is evicted.
* The free queue is also the eviction order: allocation takes blocks from its
  head (evicting their cached content); freed blocks go to the tail (vLLM's LRU)
  or, by a retention decision, to the head ("evict first").
* An optional CPU tier holds offloaded session prefixes (LRU over sessions).

Blocks are ints; a block's hash is ``(session_id, block_index)`` because a
session's context is append-only: block ``i`` of a session always holds the same
tokens, across turns and after recomputation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

BlockHash = tuple[str, int]


class BlockPool:
    """GPU KV blocks: reference counts, prefix-cache hashes and the free queue."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._caching = enable_prefix_caching
        self._ref_cnt = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        # Head = next to be allocated (evicted first). Holds exactly the blocks with ref 0.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_evicted_blocks = 0  # cached blocks whose content was overwritten

    # -- queries --------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Blocks held by requests (or pinned) / all blocks; cached free blocks count as free."""
        return 1.0 - len(self._free) / self.num_blocks

    def num_cached_prefix_blocks(self, session_id: str, max_blocks: int) -> int:
        """How many leading blocks of ``session_id``'s context are cached on the GPU."""
        if not self._caching:
            return 0
        cached = self._cached
        n = 0
        while n < max_blocks and (session_id, n) in cached:
            n += 1
        return n

    # -- operations -----------------------------------------------------------
    def take_cached(self, session_id: str, num_blocks: int) -> list[int]:
        """Reference the first ``num_blocks`` cached blocks of a session (a prefix hit)."""
        blocks = [self._cached[(session_id, i)] for i in range(num_blocks)]
        for block in blocks:
            if self._ref_cnt[block] == 0:
                del self._free[block]
            self._ref_cnt[block] += 1
        return blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """``num_blocks`` fresh blocks from the head of the free queue, or None if too few
        (the caller then shrinks, preempts or waits)."""
        if num_blocks > len(self._free):
            return None
        free, ref, hashes = self._free, self._ref_cnt, self._hash
        blocks = []
        for _ in range(num_blocks):
            block, _ = free.popitem(last=False)
            ref[block] = 1
            old = hashes[block]
            if old is not None:
                del self._cached[old]
                hashes[block] = None
                self.num_evicted_blocks += 1
            blocks.append(block)
        return blocks

    def set_hash(self, block: int, block_hash: BlockHash) -> None:
        """Mark a full block as holding ``block_hash`` (it becomes a prefix-cache entry)."""
        if not self._caching:
            return
        old = self._cached.get(block_hash)
        if old is not None and old != block:
            return  # the same content is cached in another block already; keep that one
        self._hash[block] = block_hash
        self._cached[block_hash] = block

    def free(self, blocks: Sequence[int], evict_first: bool = False) -> None:
        """Drop one reference to each block; blocks reaching 0 join the free queue.

        The tail of a context is the least reusable part, so within one call the
        last block ends up nearest the head: at the tail end (LRU) blocks are
        appended last-first; at the head end they are pushed first-first.
        """
        ref, free = self._ref_cnt, self._free
        ordered = blocks if evict_first else reversed(blocks)
        for block in ordered:
            ref[block] -= 1
            if ref[block] == 0:
                free[block] = None
                if evict_first:
                    free.move_to_end(block, last=False)

    def check_invariants(self, referenced: Sequence[Sequence[int]]) -> None:
        """Every block is free xor referenced, and counts match ``referenced`` (every
        block list held by a request or a pin)."""
        counts = [0] * self.num_blocks
        for blocks in referenced:
            for block in blocks:
                counts[block] += 1
        assert counts == self._ref_cnt, "reference counts do not match the holders"
        for block in range(self.num_blocks):
            assert self._ref_cnt[block] >= 0, f"block {block} has a negative count"
            assert (self._ref_cnt[block] == 0) == (block in self._free), f"block {block}"
        for block_hash, block in self._cached.items():
            assert self._hash[block] == block_hash, f"hash map out of sync at {block}"


class CpuTier:
    """Offloaded session prefixes in CPU memory, evicted least recently used first."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self._sessions: OrderedDict[str, int] = OrderedDict()  # session -> prefix blocks
        self._num_blocks = 0

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def can_store(self, num_blocks: int) -> bool:
        return 0 < num_blocks <= self.capacity_blocks

    def store(self, session_id: str, num_blocks: int) -> None:
        self.discard(session_id)
        while self._num_blocks + num_blocks > self.capacity_blocks:
            _, dropped = self._sessions.popitem(last=False)
            self._num_blocks -= dropped
        self._sessions[session_id] = num_blocks
        self._num_blocks += num_blocks

    def num_prefix_blocks(self, session_id: str) -> int:
        return self._sessions.get(session_id, 0)

    def discard(self, session_id: str) -> None:
        self._num_blocks -= self._sessions.pop(session_id, 0)
