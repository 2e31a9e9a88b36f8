"""Turn decisions between an ingress replica and the global scheduler, batched.

Every turn costs the scheduler two messages (``begin`` asks where to run, ``end``
reports the service it got). Their logic is ~0.1 ms; an actor call costs more than
that in serialization and scheduling on both sides, so one call per message caps
the scheduler far below what its logic sustains. A :class:`TurnChannel` keeps at
most one call in flight per replica and sends everything that queued meanwhile as
the next call: an idle deployment pays one call per message as before (no timer,
no added latency), a busy one pays one call per batch.

Order is kept: a batch is applied in the order its messages were queued (a
session's ``end`` before its next ``begin``), and batches run in the order sent.
A ``begin`` the scheduler cannot grant at once (the session waits for admission)
comes back as :class:`PendingGrant`; the channel then waits for it in a call of
its own, so one waiting session never holds up the others in its batch. Errors are
per message: a refused ``begin`` raises its own error, the rest of the batch goes on.

A scheduler restart: a call that fails with one of ``retry_on`` (the actor is
restarting) is sent again, with whatever queued meanwhile behind it, for up to
``retry_for_s``. That is safe because the restarted scheduler has every answered
change in its store and recognises what it applied but could not answer: each ask
carries an ``ask_id`` (set here, kept across retries) that gets the same grant
again, and a report of a turn already ended is a no-op. A pending grant the restart
lost is asked again with its ask.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .messages import SessionSummary, TurnAsk, TurnGrant, TurnReport

log = logging.getLogger(__name__)

TurnOp = TurnAsk | TurnReport


@dataclass(frozen=True, slots=True)
class PendingGrant:
    """The turn waits for admission; ``await_grant(key)`` returns its grant."""

    key: int


#: what the scheduler answers per message: a grant (or PendingGrant) for an ask,
#: the closed session's summary (or None) for a report, or the message's error
TurnOutcome = TurnGrant | PendingGrant | SessionSummary | BaseException | None

SubmitFn = Callable[[list[TurnOp]], Awaitable[list[TurnOutcome]]]
#: the grant of a pending ask: its key, and the ask itself (asked again if the
#: scheduler restarted and lost the key)
AwaitGrantFn = Callable[[int, TurnAsk], Awaitable[TurnGrant]]

RETRY_PAUSE_S = 0.2  # between tries while the scheduler restarts


class TurnChannel:
    """Batches ``begin`` / ``end`` messages to the global scheduler (module docstring).

    ``submit`` sends one batch (the scheduler's ``turns``), ``await_grant`` waits for
    a pending grant. Use from one asyncio loop.
    """

    def __init__(
        self,
        submit: SubmitFn,
        await_grant: AwaitGrantFn,
        *,
        retry_on: tuple[type[BaseException], ...] = (),
        retry_for_s: float = 60.0,
    ) -> None:
        self._submit = submit
        self._await_grant = await_grant
        self._retry_on = retry_on
        self._retry_for_s = retry_for_s
        self.num_retries = 0
        self._queue: list[tuple[TurnOp, asyncio.Future[TurnOutcome]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.num_calls = 0
        self.num_messages = 0

    async def begin(self, ask: TurnAsk) -> TurnGrant:
        """Where the turn runs, once admitted. Raises the scheduler's error, or the
        call's (an unavailable scheduler past ``retry_for_s``)."""
        if ask.ask_id is None:
            ask = dataclasses.replace(ask, ask_id=uuid.uuid4().hex)
        outcome = await self._send(ask)
        if isinstance(outcome, PendingGrant):
            deadline = time.monotonic() + self._retry_for_s
            while True:
                try:
                    return await self._await_grant(outcome.key, ask)
                except self._retry_on:
                    if time.monotonic() > deadline:
                        raise
                    self.num_retries += 1
                    await asyncio.sleep(RETRY_PAUSE_S)
        assert isinstance(outcome, TurnGrant), outcome
        return outcome

    def end(self, report: TurnReport) -> asyncio.Future[TurnOutcome]:
        """Report a turn's end without waiting (queued now, so ordered before this
        replica's later messages); the future holds the outcome or the error."""
        return self._enqueue(report)

    async def _send(self, op: TurnOp) -> TurnOutcome:
        outcome = await self._enqueue(op)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _enqueue(self, op: TurnOp) -> asyncio.Future[TurnOutcome]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[TurnOutcome] = loop.create_future()
        self._queue.append((op, done))
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._drain())
        return done

    async def _drain(self) -> None:
        """Send batches, one call in flight, until nothing is queued."""
        deadline: float | None = None
        retry: list[tuple[TurnOp, asyncio.Future[TurnOutcome]]] = []
        while self._queue or retry:
            batch, self._queue = retry + self._queue, []
            retry = []
            self.num_calls += 1
            self.num_messages += len(batch)
            try:
                outcomes = await self._submit([op for op, _ in batch])
            except self._retry_on as exc:  # the scheduler restarts: send it all again
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self._retry_for_s
                if now <= deadline:
                    self.num_retries += 1
                    retry = [(op, done) for op, done in batch if not done.done()]
                    await asyncio.sleep(RETRY_PAUSE_S)
                    continue
                for _, done in batch:
                    _settle(done, exc=exc)
                continue
            except Exception as exc:  # the call failed: every message of it did
                for _, done in batch:
                    _settle(done, exc=exc)
                continue
            if len(outcomes) != len(batch):
                error = RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} messages")
                for _, done in batch:
                    _settle(done, exc=error)
                continue
            deadline = None
            for (_, done), outcome in zip(batch, outcomes, strict=True):
                _settle(done, outcome)

    @property
    def mean_batch(self) -> float:
        """Messages per call so far (1.0 when idle)."""
        return self.num_messages / self.num_calls if self.num_calls else 0.0


def _settle(
    done: asyncio.Future[Any], outcome: TurnOutcome = None, exc: BaseException | None = None
) -> None:
    if done.done():  # its caller went away (cancelled)
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(outcome)
