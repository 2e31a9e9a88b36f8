"""Sessions recognised from the conversation itself, for clients that send no id.

A stock agent resends its whole conversation on every call: turn *k*'s prompt is
turn *k-1*'s prompt, that turn's answer, then the tool's output. So a request
continues a session exactly when its (canonical) prompt starts with an earlier
turn's prompt plus that turn's answer. :class:`PrefixIndex` finds, for a new prompt,
the longest such registered prefix, by hashes only:

* at a turn's end the runtime registers ``prompt + answer`` as the session's
  *continuation key*: a fingerprint of its first ``FINGERPRINT_BYTES`` bytes (keys
  shorter than that share one bucket), its length and a digest of the whole (the
  bytes themselves are not kept);
* a lookup hashes the new prompt once, incrementally, and takes a digest at every
  candidate length up to the prompt's own: O(prompt bytes + candidates), no quadratic
  re-hashing. For a prompt made of delimited messages (chat) a key can only end where
  a message ends, so the candidates are the prompt's message ends, however many
  sessions are live; for free text (completions) they are the registered lengths of
  the prompt's fingerprint bucket.

Each session holds only its latest turn's keys (two: with and without the answer, see
:meth:`PrefixIndex.register`), so memory is bounded by the live sessions, and by
``max_entries`` beyond that (the least recently registered session goes first). Keys
are *consumed* by the request that matches them: two agents that sent the same
conversation and got the same answer are two sessions whose next requests take one
session each, and no two requests continue one turn. Pure: no I/O, no clock.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

FINGERPRINT_BYTES = 64  # prompts that share their first 64 bytes share a bucket
DIGEST_BYTES = 16


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


@dataclass(frozen=True, slots=True)
class ContinuationKey:
    """What is kept of a turn's ``prompt + answer``: enough to recognise its extension."""

    fingerprint: bytes
    num_bytes: int
    digest: bytes

    @staticmethod
    def of(data: bytes) -> ContinuationKey:
        return ContinuationKey(_fingerprint(data, len(data)), len(data), _digest(data))

    @staticmethod
    def turn(prompt: bytes, answer: bytes) -> tuple[ContinuationKey, ContinuationKey]:
        """A turn's two keys, ``prompt + answer`` and ``prompt`` alone, hashing the
        prompt once."""
        hasher = hashlib.blake2b(prompt, digest_size=DIGEST_BYTES)
        alone = ContinuationKey(_fingerprint(prompt, len(prompt)), len(prompt), hasher.digest())
        hasher.update(answer)
        whole = prompt + answer if len(prompt) < FINGERPRINT_BYTES else prompt
        num_bytes = len(prompt) + len(answer)
        with_answer = ContinuationKey(_fingerprint(whole, num_bytes), num_bytes, hasher.digest())
        return with_answer, alone


_SHORT = b"short"  # the one bucket of keys shorter than FINGERPRINT_BYTES


def _fingerprint(data: bytes, key_bytes: int) -> bytes:
    """The bucket of a key of ``key_bytes`` bytes that ``data`` starts with."""
    return _digest(data[:FINGERPRINT_BYTES]) if key_bytes >= FINGERPRINT_BYTES else _SHORT


def _ends(data: bytes, delimiter: bytes) -> list[int]:
    """The offsets just after each occurrence of ``delimiter`` in ``data``, ascending."""
    ends, at = [], data.find(delimiter)
    while at >= 0:
        ends.append(at + len(delimiter))
        at = data.find(delimiter, at + len(delimiter))
    return ends


@dataclass(slots=True)
class _Bucket:
    lengths: list[int] = field(default_factory=list)  # sorted, distinct
    by_length: dict[int, dict[bytes, deque[str]]] = field(default_factory=dict)


class PrefixIndex:
    """Continuation keys of live sessions; finds the session a prompt continues."""

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries  # sessions with keys
        self._buckets: dict[bytes, _Bucket] = {}
        # session -> its keys (its latest turn's), least recently registered first
        self._keys: OrderedDict[str, tuple[ContinuationKey, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def register(self, session_id: str, *keys: ContinuationKey) -> None:
        """The session's latest turn ended: ``keys`` replace any earlier ones. The
        runtime registers the prompt + answer (what an agent that echoes its answers
        resends) and the prompt alone (an agent that drops an answer it could not use,
        as mini-swe-agent does on a format error, resends that plus its complaint)."""
        self.forget(session_id)
        if len(self._keys) >= self.max_entries:
            self.forget(next(iter(self._keys)))
        self._keys[session_id] = keys
        for key in keys:
            bucket = self._buckets.setdefault(key.fingerprint, _Bucket())
            by_digest = bucket.by_length.get(key.num_bytes)
            if by_digest is None:
                by_digest = bucket.by_length[key.num_bytes] = {}
                bisect.insort(bucket.lengths, key.num_bytes)
            by_digest.setdefault(key.digest, deque()).append(session_id)

    def forget(self, session_id: str) -> tuple[ContinuationKey, ...]:
        """Drop the session's keys (it ended, expired, or a continuation claimed them)."""
        keys = self._keys.pop(session_id, ())
        for key in keys:
            bucket = self._buckets[key.fingerprint]
            by_digest = bucket.by_length[key.num_bytes]
            owners = by_digest[key.digest]
            owners.remove(session_id)
            if not owners:
                del by_digest[key.digest]
            if not by_digest:
                del bucket.by_length[key.num_bytes]
                bucket.lengths.remove(key.num_bytes)
            if not bucket.lengths:
                del self._buckets[key.fingerprint]
        return keys

    def find(self, prompt: bytes, delimiter: bytes | None = None) -> str | None:
        """The session whose registered key is the longest prefix of ``prompt`` (and
        shorter than it: a continuation adds something), without consuming it.
        ``delimiter``: keys end only right after one (a message end), so only those
        lengths are tried."""
        if delimiter is not None:
            return self._find_at(prompt, _ends(prompt, delimiter))
        found = None
        if len(prompt) > FINGERPRINT_BYTES:
            bucket = self._buckets.get(_fingerprint(prompt, len(prompt)))
            found = self._find_at(prompt, bucket.lengths if bucket else [])
        short = self._buckets.get(_SHORT)
        return found or self._find_at(prompt, short.lengths if short else [])

    def _find_at(self, prompt: bytes, lengths: list[int]) -> str | None:
        """The longest of ``lengths`` (sorted) at which ``prompt`` has a key."""
        hasher = hashlib.blake2b(digest_size=DIGEST_BYTES)
        hashed = 0
        found: str | None = None
        end = bisect.bisect_left(lengths, len(prompt))  # strictly shorter keys
        for num_bytes in lengths[:end]:
            bucket = self._buckets.get(_fingerprint(prompt, num_bytes))
            by_digest = bucket.by_length.get(num_bytes) if bucket else None
            if not by_digest:
                continue
            hasher.update(prompt[hashed:num_bytes])
            hashed = num_bytes
            owners = by_digest.get(hasher.copy().digest())
            if owners:
                found = owners[0]  # the longest match wins: keep going
        return found

    def take(
        self, prompt: bytes, delimiter: bytes | None = None
    ) -> tuple[str, tuple[ContinuationKey, ...]] | None:
        """Find and consume: the matched session's keys are removed (its next turn is
        being claimed) and returned, so that an abandoned claim can be put back."""
        session_id = self.find(prompt, delimiter)
        if session_id is None:
            return None
        return session_id, self.forget(session_id)

    def keys_of(self, session_id: str) -> tuple[ContinuationKey, ...]:
        return self._keys.get(session_id, ())
