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

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BlockHash = tuple[str, int]


NO_BLOCK = -1  # "nothing cached here" in a session's block index


@dataclass(slots=True, eq=False)
class _Run:
    """Blocks that joined the free queue together (one :meth:`BlockPool.free` call),
    in queue order. Allocation consumes a run from its front (``start``); a prefix
    hit takes a context's blocks back from its end. An entry is live (the block is
    free, here) iff the block's count is 0 and its run is this one; ``num_stale``
    counts the entries from ``start`` on that are not."""

    blocks: list[int]
    start: int = 0
    num_stale: int = 0

    @property
    def num_live(self) -> int:
        return len(self.blocks) - self.start - self.num_stale


class BlockPool:
    """GPU KV blocks: reference counts, prefix-cache hashes and the free queue.

    Contexts are thousands of blocks and whole contexts move at every turn
    boundary, so the bookkeeping works on lists rather than probing per block:

    * The free queue is a queue of runs (:class:`_Run`): freeing a context appends
      one run; a returning session usually finds its context at the end of that
      run and takes it back with one list comparison and one truncation.
    * Cached content is indexed per session: ``_by_session[sid][i]`` is the block
      holding ``(sid, i)``, so a prefix hit is one slice, and the cached prefix
      length is kept incrementally.
    * A block's hash lives in two parallel lists rather than in a tuple: a long
      run sets tens of millions of hashes, and tuples would feed the cyclic GC.
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._caching = enable_prefix_caching
        self._ref_cnt = [0] * num_blocks
        # A block's hash: (_hash_session[b], _hash_index[b]); session None = no hash.
        # The indices are a typed array: unboxed, they stay compact in the cache.
        self._hash_session: list[str | None] = [None] * num_blocks
        self._hash_index = array("q", bytes(8 * num_blocks))
        # session -> the block caching each block index, NO_BLOCK where none does.
        # Invariant: no list is empty or ends in NO_BLOCK (so lists of sessions whose
        # content was evicted do not linger).
        self._by_session: dict[str, list[int]] = {}
        # session -> a number of leading blocks known to be cached: exact or short,
        # never long (an eviction lowers it at once; a lookup extends it).
        self._prefix_len: dict[str, int] = {}
        # The free queue: runs in order, head (allocated and evicted first) first;
        # together their live entries are exactly the blocks with count 0.
        first = _Run(list(range(num_blocks)))
        self._runs: OrderedDict[_Run, None] = OrderedDict([(first, None)])
        self._run_of = [first] * num_blocks  # the run each block was last freed into
        self._num_free = num_blocks
        self._num_shared = 0  # blocks with more than one holder (a pin and its turn)
        self.num_evicted_blocks = 0  # cached blocks whose content was overwritten

    # -- queries --------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self._num_free

    @property
    def usage(self) -> float:
        """Blocks held by requests (or pinned) / all blocks; cached free blocks count as free."""
        return 1.0 - self._num_free / self.num_blocks

    def block_hash(self, block: int) -> BlockHash | None:
        """The content ``block`` holds, if it is a prefix-cache entry."""
        session_id = self._hash_session[block]
        return None if session_id is None else (session_id, self._hash_index[block])

    def num_cached_prefix_blocks(self, session_id: str, max_blocks: int) -> int:
        """How many leading blocks of ``session_id``'s context are cached on the GPU."""
        if not self._caching or max_blocks <= 0:
            return 0
        return min(self._cached_prefix_len(session_id), max_blocks)

    def _cached_prefix_len(self, session_id: str) -> int:
        cached = self._by_session.get(session_id)
        if cached is None:
            return 0
        known = self._prefix_len.get(session_id, 0)
        try:
            known = cached.index(NO_BLOCK, known)
        except ValueError:  # cached up to the end of the list
            known = len(cached)
        self._prefix_len[session_id] = known
        return known

    # -- operations -----------------------------------------------------------
    def take_cached(self, session_id: str, num_blocks: int) -> list[int]:
        """Reference the first ``num_blocks`` cached blocks of a session (a prefix hit)."""
        if num_blocks <= 0:
            return []
        if num_blocks > self._cached_prefix_len(session_id):
            raise KeyError(f"{session_id} has fewer than {num_blocks} cached blocks")
        blocks = self._by_session[session_id][:num_blocks]
        if not self._take_run_tail(blocks):
            self._take_each(blocks)
        return blocks

    def _take_run_tail(self, blocks: list[int]) -> bool:
        """Take ``blocks`` at once if they are the last entries of one run, all live
        (the usual prefix hit: the context the session's last turn freed)."""
        ref = self._ref_cnt
        if ref[blocks[0]] != 0:
            return False
        run = self._run_of[blocks[0]]
        n = len(blocks)
        if run.num_stale or run.num_live < n or run.blocks[-n:] != blocks[::-1]:
            return False
        del run.blocks[-n:]
        if run.num_live == 0:
            self._drop(run)
        for block in blocks:
            ref[block] = 1
        self._num_free -= n
        return True

    def _take_each(self, blocks: list[int]) -> None:
        """Reference ``blocks`` one by one; free ones leave a stale entry in their run."""
        ref, run_of = self._ref_cnt, self._run_of
        for block in blocks:
            if ref[block] == 0:
                run = run_of[block]
                run.num_stale += 1
                if run.num_live == 0:
                    self._drop(run)
                self._num_free -= 1
            elif ref[block] == 1:
                self._num_shared += 1
            ref[block] += 1

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self._num_free

    def allocate(self, num_blocks: int) -> list[int] | None:
        """``num_blocks`` fresh blocks from the head of the free queue, or None if too few
        (the caller then shrinks, preempts or waits)."""
        if num_blocks > self._num_free:
            return None
        blocks: list[int] = []
        while len(blocks) < num_blocks:
            self._pop_head(blocks, num_blocks - len(blocks))
        ref, sessions = self._ref_cnt, self._hash_session
        for block in blocks:
            ref[block] = 1
        self._num_free -= num_blocks
        evicted = [block for block in blocks if sessions[block] is not None]
        if evicted:
            self._uncache(evicted)
        return blocks

    def _pop_head(self, out: list[int], num_blocks: int) -> None:
        """Move up to ``num_blocks`` live entries from the head run to ``out``."""
        run = next(iter(self._runs))
        entries, start = run.blocks, run.start
        if run.num_stale == 0:
            end = min(len(entries), start + num_blocks)
            out.extend(entries[start:end])
            run.start = end
        else:
            ref, run_of = self._ref_cnt, self._run_of
            end = len(entries)
            while start < end and num_blocks > 0:
                block = entries[start]
                start += 1
                if ref[block] == 0 and run_of[block] is run:
                    out.append(block)
                    num_blocks -= 1
                else:
                    run.num_stale -= 1
            run.start = start
        if run.num_live == 0:
            self._drop(run)

    def _drop(self, run: _Run) -> None:
        """Take a run without live entries out of the queue. Blocks may still name it
        as their last run (nothing reads that while they are held); emptying it lets
        its list go."""
        del self._runs[run]
        run.blocks, run.start, run.num_stale = [], 0, 0

    def _uncache(self, blocks: list[int]) -> None:
        """Forget the cached content of ``blocks`` (they are about to be overwritten).
        Evicted blocks come in runs of one session's context; each such group is
        looked up and tidied once."""
        sessions, indices = self._hash_session, self._hash_index
        group: str | None = None
        cached: list[int] = []
        lowest = 0
        for block in blocks:
            session_id, index = sessions[block], indices[block]
            sessions[block] = None
            if session_id != group:
                if group is not None:
                    self._tidy_index(group, cached, lowest)
                assert session_id is not None
                group, cached, lowest = session_id, self._by_session[session_id], index
            cached[index] = NO_BLOCK
            if index < lowest:
                lowest = index
        assert group is not None
        self._tidy_index(group, cached, lowest)
        self.num_evicted_blocks += len(blocks)

    def _tidy_index(self, session_id: str, cached: list[int], lowest_evicted: int) -> None:
        """Restore the index invariants after evictions at ``lowest_evicted`` and above."""
        if lowest_evicted < self._prefix_len.get(session_id, 0):
            self._prefix_len[session_id] = lowest_evicted
        # Evictions usually take a context's tail: cut it in one go when all of it is
        # gone (NO_BLOCK is below every block id, so max() finds any survivor).
        if max(cached[lowest_evicted:]) == NO_BLOCK:
            del cached[lowest_evicted:]
        while cached and cached[-1] == NO_BLOCK:
            cached.pop()
        if not cached:
            del self._by_session[session_id]
            self._prefix_len.pop(session_id, None)

    def set_hash(self, block: int, block_hash: BlockHash) -> None:
        """Mark a full block as holding ``block_hash`` (it becomes a prefix-cache entry).
        If that content is cached in another block already, that block keeps it."""
        session_id, index = block_hash
        self.cache_blocks(session_id, index, [block])

    def cache_blocks(self, session_id: str, first_index: int, blocks: Sequence[int]) -> None:
        """:meth:`set_hash` of each ``blocks[k]`` to ``(session_id, first_index + k)``."""
        if not self._caching or not blocks:
            return
        cached = self._by_session.get(session_id)
        if cached is None:
            cached = self._by_session[session_id] = []
        sessions, indices = self._hash_session, self._hash_index
        if len(cached) <= first_index:  # all new entries (the usual case): no conflicts
            cached.extend([NO_BLOCK] * (first_index - len(cached)))
            cached.extend(blocks)
            for index, block in enumerate(blocks, first_index):
                sessions[block] = session_id
                indices[block] = index
            return
        end = first_index + len(blocks)
        if len(cached) < end:  # the new entries are all set below: no trailing NO_BLOCK
            cached.extend([NO_BLOCK] * (end - len(cached)))
        for index, block in enumerate(blocks, first_index):
            old = cached[index]
            if old in (NO_BLOCK, block):
                sessions[block] = session_id
                indices[block] = index
                cached[index] = block

    def free(self, blocks: Sequence[int], evict_first: bool = False) -> None:
        """Drop one reference to each block; blocks reaching 0 join the free queue.

        The tail of a context is the least reusable part, so within one call the
        last block ends up nearest the head: at the tail end (LRU) the blocks are
        appended last-first; at the head end they are pushed first-first (which
        leaves them last-first too). Either way they form one run.
        """
        ref = self._ref_cnt
        if self._num_shared == 0:  # every held block has count 1: all are released
            released = list(blocks)
        else:
            for block in blocks:
                if ref[block] == 2:
                    self._num_shared -= 1
                ref[block] -= 1
            released = [block for block in blocks if ref[block] == 0]
        if not released:
            return
        run = _Run(released[::-1])
        run_of = self._run_of
        for block in released:
            ref[block] = 0
            run_of[block] = run
        self._num_free += len(released)
        self._runs[run] = None
        if evict_first:
            self._runs.move_to_end(run, last=False)

    def check_invariants(self, referenced: Sequence[Sequence[int]]) -> None:
        """Every block is free xor referenced, counts match ``referenced`` (every block
        list held by a request or a pin), and the cache index matches the hashes."""
        counts = [0] * self.num_blocks
        for blocks in referenced:
            for block in blocks:
                counts[block] += 1
        assert counts == self._ref_cnt, "reference counts do not match the holders"
        assert all(c >= 0 for c in self._ref_cnt), "a negative reference count"
        assert self._num_shared == sum(c > 1 for c in self._ref_cnt), "shared count off"
        live: list[int] = []
        for run in self._runs:
            entries = run.blocks[run.start :]
            run_live = [b for b in entries if self._ref_cnt[b] == 0 and self._run_of[b] is run]
            assert len(entries) - len(run_live) == run.num_stale, "stale count off"
            assert run_live, "an empty run in the queue"
            live += run_live
        assert len(live) == len(set(live)) == self._num_free, "free count off"
        assert set(live) == {b for b, c in enumerate(self._ref_cnt) if c == 0}, "free set off"
        num_cached = 0
        for session_id, cached in self._by_session.items():
            assert cached and cached[-1] != NO_BLOCK, f"untrimmed index of {session_id}"
            for index, block in enumerate(cached):
                if block != NO_BLOCK:
                    num_cached += 1
                    assert self.block_hash(block) == (session_id, index), f"block {block}"
            known = self._prefix_len.get(session_id, 0)
            assert NO_BLOCK not in cached[:known], f"cached prefix of {session_id} overstated"
        num_hashed = sum(s is not None for s in self._hash_session)
        assert num_cached == num_hashed, "hashed blocks missing from the index"


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
