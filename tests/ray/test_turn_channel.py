"""The ingress's batched channel to the real GlobalScheduler actor: batches form under
concurrency, order holds inside a batch, a session waiting for admission does not
hold up the others, and errors stay per message (with their HTTP status)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from mars_ray.actors.config import deployment_config
from mars_ray.actors.ingress import scheduler_channel
from mars_ray.actors.messages import TurnAsk, TurnGrant, TurnReport
from mars_ray.actors.scheduler import SessionError
from mars_ray.actors.turn_channel import TurnChannel
from mars_ray.cluster.launch import connect, ensure_runtime, teardown_runtime

NUM_GPUS = 2
WINDOW_PER_GPU = 2  # admission lets 4 sessions in at once


@pytest.fixture(scope="module")
def scheduler() -> Iterator[Any]:
    config = deployment_config(
        {
            "cluster": {"num_gpus": NUM_GPUS},
            # a strict window: work conservation would start waiting sessions beyond it
            # on the idle GPUs of this test
            "policy": "mars-no-work-conservation",
            "policy_config": {
                "admission": {
                    "window_init_per_gpu": WINDOW_PER_GPU,
                    "window_min_per_gpu": 1,
                    "window_max_per_gpu": WINDOW_PER_GPU,
                }
            },
        }
    )
    local = connect(None, num_gpus=NUM_GPUS)
    try:
        yield ensure_runtime(config).scheduler
    finally:
        teardown_runtime(NUM_GPUS)
        local.shutdown()


def channel_to(scheduler: Any) -> TurnChannel:
    return scheduler_channel(scheduler)  # as the ingress builds it


def report(grant: TurnGrant, last: bool) -> TurnReport:
    return TurnReport(
        grant.session_id, grant.turn_index, grant.engine_id, 110, 0.01, 100, 10, 0.0, last
    )


def test_concurrent_turns_share_calls_and_waiting_sessions_do_not_block_others(
    scheduler: Any,
) -> None:
    async def scenario() -> None:
        channel = channel_to(scheduler)
        asks = [TurnAsk(f"adm-{i}", 0, 100, 10) for i in range(6)]
        tasks = [asyncio.ensure_future(channel.begin(a)) for a in asks]
        await asyncio.wait(tasks, timeout=5.0)
        granted = [t.result() for t in tasks if t.done()]
        waiting = [a.session_id for a, t in zip(asks, tasks, strict=True) if not t.done()]
        # the window admits 4; the other 2 wait, and the 4 were answered regardless
        assert len(granted) == NUM_GPUS * WINDOW_PER_GPU and len(waiting) == 2
        assert channel.num_calls <= 2 < channel.num_messages, "the six asks shared calls"
        # two sessions end: the waiting two are admitted and their grants arrive
        for grant in granted[:2]:
            assert await channel.end(report(grant, last=True)) is not None  # a summary
        late = await asyncio.wait_for(asyncio.gather(*tasks), timeout=10.0)
        assert sorted(g.session_id for g in late) == sorted(a.session_id for a in asks)
        # a session's end and its next turn in one batch: applied in order, no wait
        grant = granted[2]
        ended = channel.end(report(grant, last=False))
        nxt = await channel.begin(TurnAsk(grant.session_id, 1, 130, 10))
        assert (await ended) is None and nxt.turn_index == 1
        assert nxt.prior_context_tokens == 110, "the end was applied before the ask"
        # close the rest (the window is shared with the next test)
        ends = [channel.end(report(nxt, last=True))]
        done = {g.session_id for g in granted[:3]}
        ends += [channel.end(report(g, last=True)) for g in late if g.session_id not in done]
        assert all(summary is not None for summary in await asyncio.gather(*ends))

    asyncio.run(scenario())


def test_errors_are_per_message_and_keep_their_status(scheduler: Any) -> None:
    async def scenario() -> None:
        channel = channel_to(scheduler)
        good = asyncio.ensure_future(channel.begin(TurnAsk("err-ok", 0, 100, 10, True)))
        unknown = channel.end(TurnReport("nobody", 0, 0, 1, 0.0, 1, 0, 0.0, True))
        grant = await good
        outcome = await unknown
        assert isinstance(outcome, SessionError) and outcome.status == 404
        with pytest.raises(SessionError) as info:  # a turn out of order in the same session
            await channel.begin(TurnAsk("err-ok", 5, 100, 10))
        # (turn 0 is still running: the ask waits out the grace period, then 409)
        assert info.value.status == 409 and "already has turn 0 running" in str(info.value)
        summary = await channel.end(report(grant, last=True))
        assert summary is not None and summary.failed_reason is None

    asyncio.run(scenario())
