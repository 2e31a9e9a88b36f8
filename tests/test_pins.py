"""The one pin table (SimEngine and MarsScheduler both keep KV for sessions in a tool
call in it) and the one TurnEndContext builder."""

from __future__ import annotations

from mars_ray.engine.costmodel import CostModel, load_profile
from mars_ray.engine.pins import PinTable, turn_end_context


def test_a_pin_holds_blocks_until_it_expires_or_is_released() -> None:
    released: list[list[int]] = []
    table: PinTable[int] = PinTable(released.append)
    table.pin("a", [1, 2], expires_s=10.0)
    table.pin("b", [3], expires_s=5.0)
    assert table.num_blocks == 3 and table.sessions() == {"a", "b"} and "a" in table
    assert table.next_expiry_s() == 5.0
    assert table.expire(4.9) == 0 and released == []
    assert table.expire(5.0) == 1 and released == [[3]]
    assert table.unpin("a") and not table.unpin("a")
    assert released == [[3], [1, 2]] and table.num_blocks == 0 and not table
    assert table.next_expiry_s() is None


def test_a_replaced_pin_releases_the_old_blocks_and_its_stale_expiry_is_skipped() -> None:
    released: list[list[int]] = []
    table: PinTable[int] = PinTable(released.append)
    table.pin("a", [1], expires_s=5.0)
    table.pin("a", [1, 2], expires_s=20.0)  # the session's next turn pinned anew
    assert released == [[1]] and table.num_blocks == 2
    assert table.earliest_entry_s() == 5.0, "the stale entry stays until cleaned"
    assert table.expire(10.0) == 0, "the stale expiry does not release the new pin"
    assert table.next_expiry_s() == 20.0
    assert list(table.held()) == [[1, 2]]
    table.release_all()
    assert released == [[1], [1, 2]] and len(table) == 0


def test_turn_end_context_prices_recompute_at_the_engines_chunk_budget() -> None:
    cost = CostModel(load_profile("h100-80gb", "llama-3.1-8b"))
    args = dict(
        session_id="s",
        num_blocks=100,
        context_tokens=20_000,
        predicted_tool_s=3.0,
        num_total_blocks=1000,
        num_used_blocks=500,
        can_offload=False,
        is_last_turn=False,
    )
    small = turn_end_context(cost, chunk_budget_tokens=512, **args)  # type: ignore[arg-type]
    large = turn_end_context(cost, chunk_budget_tokens=8192, **args)  # type: ignore[arg-type]
    assert small.recompute_s == cost.prefill_time_s(20_000, 0, 512)
    assert large.recompute_s == cost.prefill_time_s(20_000, 0, 8192)
    assert small.reload_s == cost.swap_time_s(20_000) and small.session_id == "s"
