"""MarsScheduler driven through vLLM's own schedule() / update_from_output() on CPU."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from factories import (
    BLOCK_SIZE,
    assert_no_leak,
    expire_pins,
    make_request,
    make_scheduler,
    num_free_blocks,
    run_to_completion,
    step,
)
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.request import Request, RequestStatus

from mars_ray.clock import VirtualClock
from mars_ray.policies.base import RetentionAction
from mars_ray.policies.registry import POLICIES
from mars_ray.vllm.hints import SessionHints
from mars_ray.vllm.scheduler import MarsFeatures, MarsScheduler


def _hints(session: str, turn: int = 0, tool_s: float = 1.0, last: bool = False) -> SessionHints:
    return SessionHints(session, turn_index=turn, last_turn=last, expected_tool_s=tool_s)


def test_waiting_queue_follows_mlfq_order(tiny_model_dir: Path) -> None:
    """Continuations first, then short first turns, then long prefills (level 1)."""
    sched = make_scheduler(
        MarsScheduler, tiny_model_dir, num_blocks=256, max_num_seqs=1, max_model_len=4096
    )
    sched.add_request(make_request("long", 2100, arrival_s=0.0, hints=_hints("s1")))
    sched.add_request(make_request("short", 100, arrival_s=1.0, hints=_hints("s2")))
    sched.add_request(make_request("cont", 100, arrival_s=2.0, hints=_hints("s3", turn=1)))
    assert [r.request_id for r in sched.waiting] == ["cont", "short", "long"]
    assert [new.req_id for new in step(sched).scheduled_new_reqs] == ["cont"]
    stock = make_scheduler(
        AsyncScheduler, tiny_model_dir, num_blocks=256, max_num_seqs=1, max_model_len=4096
    )
    for rid, n in (("long", 2100), ("short", 100), ("cont", 100)):
        stock.add_request(make_request(rid, n))
    assert [new.req_id for new in step(stock).scheduled_new_reqs] == ["long"]


def test_service_from_other_gpus_sets_the_autellix_level(tiny_model_dir: Path) -> None:
    """A global scheduler hands each turn the service its session got on every GPU
    (``service_tokens``); PLAS ranks by it, so a session served elsewhere waits
    behind a fresh one that arrived later."""

    def plas() -> AsyncScheduler:  # one request at a time: the order shows
        return make_scheduler(
            MarsScheduler,
            tiny_model_dir,
            policy="autellix",
            num_blocks=256,
            max_num_seqs=1,
            max_model_len=4096,
        )

    sched = plas()
    served = SessionHints("s1", turn_index=4, last_turn=False, service_tokens=10**6)
    sched.add_request(make_request("served", 100, arrival_s=0.0, hints=served))
    sched.add_request(make_request("fresh", 100, arrival_s=1.0, hints=_hints("s2", turn=1)))
    assert sched.view_of("served").session_service_tokens == 10**6
    assert [new.req_id for new in step(sched).scheduled_new_reqs] == ["fresh"]
    # without the hint the engine knows only its own service: arrival order
    local = plas()
    local.add_request(make_request("served", 100, arrival_s=0.0, hints=_hints("s1", turn=4)))
    local.add_request(make_request("fresh", 100, arrival_s=1.0, hints=_hints("s2", turn=1)))
    assert [new.req_id for new in step(local).scheduled_new_reqs] == ["served"]


#: the pressure mix needs the decoder to start beside the long prefill, which MARS's
#: start gate would prevent (test_a_newcomer_waits_while_running_prefills_need_its_blocks)
NO_RESERVATION = MarsFeatures(prefill_reservation=False)


def _pressure_mix(sched: AsyncScheduler) -> None:
    """A long prefill (219 blocks) starts alone; then a decoder (13 blocks and
    growing) joins: together they overflow the 229 usable blocks."""
    sched.add_request(make_request("L", 3500, 2, arrival_s=0.0, hints=_hints("sL")))
    step(sched)
    sched.add_request(make_request("D", 200, 300, arrival_s=1.0, hints=_hints("sD")))


def _first_victim(sched: AsyncScheduler) -> str:
    for _ in range(400):
        so = step(sched)
        if so.preempted_req_ids:
            return sorted(so.preempted_req_ids)[0]
    raise AssertionError("no preemption happened")


def test_victim_is_the_lowest_mars_priority(tiny_model_dir: Path) -> None:
    """Stock vLLM preempts the last-admitted request (the decoder); MARS the prefill."""
    kwargs = dict(num_blocks=230, max_model_len=4096, long_prefill_token_threshold=128)
    mars = make_scheduler(
        MarsScheduler,
        tiny_model_dir,
        features=MarsFeatures(shrink_chunks=False, prefill_reservation=False),
        **kwargs,
    )
    stock = make_scheduler(AsyncScheduler, tiny_model_dir, **kwargs)
    _pressure_mix(mars)
    _pressure_mix(stock)
    assert _first_victim(mars) == "L"
    assert _first_victim(stock) != "L"


@pytest.mark.parametrize("policy", POLICIES.names())
def test_running_list_ends_with_the_policys_victim(tiny_model_dir: Path, policy: str) -> None:
    """vLLM pops the last running request: after the pre-pass sort it is the request
    the policy's own ``choose_victim`` picks. No policy name is special-cased."""
    clock = VirtualClock()
    sched = make_scheduler(
        MarsScheduler,
        tiny_model_dir,
        policy=policy,
        clock=clock,
        num_blocks=512,
        max_model_len=4096,
        max_num_seqs=8,
    )
    assert isinstance(sched, MarsScheduler)
    core = sched.policy_core
    newest_first = ("fcfs", "infercept", "mars-no-unified-eviction")
    assert core.custom_victim_order == (policy not in newest_first)
    assert sched.applies_victim_rank == core.custom_victim_order
    rng = random.Random(7)
    for i in range(8):
        hints = _hints(f"s{i % 3}", turn=i // 3)
        num_prompt = rng.choice([30, 200, 2500, 3000])
        sched.add_request(make_request(f"r{i}", num_prompt, 40, arrival_s=float(i), hints=hints))
    num_checked = 0
    for _ in range(30):
        step(sched)
        sched._prepare_pass()  # what schedule() does before vLLM's loop
        if len(sched.running) < 2:
            continue
        views = [sched.view_of(r.request_id) for r in sched.running]
        victim = core.choose_victim(views, 0.0)
        if sched.applies_victim_rank:
            assert sched.running[-1] is victim.request
        num_checked += 1
    assert num_checked > 0
    run_to_completion(sched)
    expire_pins(sched, clock)  # no session had its last turn: pins last their TTL
    assert_no_leak(sched)


def test_chunks_shrink_before_anyone_is_preempted(tiny_model_dir: Path) -> None:
    kwargs = dict(num_blocks=230, max_model_len=4096, long_prefill_token_threshold=128)
    shrinking = make_scheduler(MarsScheduler, tiny_model_dir, features=NO_RESERVATION, **kwargs)
    plain = make_scheduler(
        MarsScheduler,
        tiny_model_dir,
        features=MarsFeatures(shrink_chunks=False, prefill_reservation=False),
        **kwargs,
    )
    _pressure_mix(shrinking)
    _pressure_mix(plain)
    shrunk_steps = 0
    for so in run_to_completion(shrinking):
        n = so.num_scheduled_tokens.get("L", 0)
        if 0 < n < 128 and not so.preempted_req_ids and n % 16 == 0:
            shrunk_steps += 1
    assert shrinking.num_shrunk_chunks > 0 and shrunk_steps > 0
    num_preempted = sum(len(so.preempted_req_ids or ()) for so in run_to_completion(plain))
    assert num_preempted > 0
    assert_no_leak(shrinking)
    assert_no_leak(plain)


def test_a_newcomer_waits_while_running_prefills_need_its_blocks(tiny_model_dir: Path) -> None:
    """L (3500 tokens, 219 blocks) prefills 128 tokens a step; N (200 tokens, 13 blocks)
    fits in the free blocks alone (vLLM's gate) but not beside the 211 L still needs:
    MARS starts it only once L no longer needs them, and nobody is preempted."""
    kwargs = dict(num_blocks=230, max_model_len=4096, long_prefill_token_threshold=128)
    reserving = make_scheduler(MarsScheduler, tiny_model_dir, **kwargs)
    gate_only = make_scheduler(
        MarsScheduler, tiny_model_dir, features=MarsFeatures(prefill_reservation=False), **kwargs
    )
    started = {}
    for name, sched in (("reserving", reserving), ("gate_only", gate_only)):
        sched.add_request(make_request("L", 3500, 2, arrival_s=0.0, hints=_hints("sL")))
        step(sched)
        sched.add_request(make_request("N", 200, 2, arrival_s=1.0, hints=_hints("sN")))
        started[name] = [new.req_id for new in step(sched).scheduled_new_reqs]
    assert started == {"reserving": [], "gate_only": ["N"]}
    outputs = run_to_completion(reserving)
    assert not any(so.preempted_req_ids for so in outputs)
    assert any(new.req_id == "N" for so in outputs for new in so.scheduled_new_reqs)
    run_to_completion(gate_only)
    assert_no_leak(reserving)
    assert_no_leak(gate_only)


def _run_tool_pause(sched: AsyncScheduler, clock: VirtualClock | None = None) -> tuple[int, int]:
    """Two sessions end turn 0 (A first, back soon; B later, gone for long); a third
    request needs most of the KV. How much of each session's context is still
    cached for its turn 1 (prefix-hit tokens)? Plain LRU evicts A, the older.
    MARS pins A's blocks (``clock``: the policy clock, advanced past the pin at the
    end) and evicts B's first."""
    a0 = make_request("a0", 160, 1, hints=_hints("A", tool_s=0.001))  # ends first
    b0 = make_request("b0", 160, 3, hints=_hints("B", tool_s=1e6))
    sched.add_request(a0)
    sched.add_request(b0)
    run_to_completion(sched)
    sched.add_request(make_request("c0", 400, 2, hints=_hints("C", last=True)))
    step(sched)
    step(sched)  # C's prompt, 25 blocks, is now fully allocated
    hits = []
    for prev in (a0, b0):
        nxt = make_request(
            prev.request_id[0] + "1",
            0,
            1,
            prompt=list(prev.all_token_ids) + list(range(5000, 5020)),
        )
        num_hit_tokens = sched.kv_cache_manager.get_computed_blocks(nxt)[1]
        hits.append(num_hit_tokens)
    run_to_completion(sched)
    if clock is not None:
        expire_pins(sched, clock)
    assert_no_leak(sched)
    return hits[0], hits[1]


def test_free_queue_order_keeps_the_session_that_returns_soon(tiny_model_dir: Path) -> None:
    clock = VirtualClock()
    mars = make_scheduler(MarsScheduler, tiny_model_dir, num_blocks=40, clock=clock)
    assert isinstance(mars, MarsScheduler)
    hit_a, hit_b = _run_tool_pause(mars, clock)
    assert (hit_a, hit_b) == (160, 0)
    assert mars.retention_actions == Counter(
        {RetentionAction.PIN: 1, RetentionAction.EVICT_FIRST: 2}  # A; B (long tool), C (last)
    )
    stock = make_scheduler(AsyncScheduler, tiny_model_dir, num_blocks=40)
    stock_hit_a, _ = _run_tool_pause(stock)
    assert stock_hit_a < 160  # plain LRU evicted part of A, which comes back first


def _next_turn(
    prev: Request, turn: int, num_new: int, max_tokens: int, hints: SessionHints
) -> Request:
    """The session's next turn: the previous turn's tokens (a prefix hit), then new ones."""
    session = hints.session_id
    prompt = list(prev.all_token_ids) + [9000 + 37 * turn + i for i in range(num_new)]
    return make_request(f"{session}t{turn}", 0, max_tokens, prompt=prompt, hints=hints)


def _pinned_turn(sched: AsyncScheduler) -> Request:
    """Session A's first turn (160-token prompt, one output token, a 1 ms tool: worth
    holding under MARS's benefit rule and Continuum's TTL rule) runs alone and ends."""
    a0 = make_request("a0", 160, 1, arrival_s=0.0, hints=_hints("A", tool_s=0.001))
    sched.add_request(a0)
    run_to_completion(sched)
    return a0


def _probe(prev: Request) -> Request:
    """A request extending ``prev``'s tokens, to look up prefix hits without touching."""
    return make_request("probe", 0, 1, prompt=list(prev.all_token_ids) + [5000] * 20)


def _hit_tokens(sched: AsyncScheduler, prev: Request) -> int:
    """Prefix-hit tokens the session's next turn would get now."""
    return sched.kv_cache_manager.get_computed_blocks(_probe(prev))[1]


def _prefix_blocks(sched: AsyncScheduler, prev: Request) -> list[KVCacheBlock]:
    """The cached blocks the session's next turn would hit now."""
    return list(sched.kv_cache_manager.get_computed_blocks(_probe(prev))[0].blocks[0])


@pytest.mark.parametrize("policy", ["mars", "continuum"])
def test_a_pinned_session_keeps_its_blocks_until_its_next_turn(
    tiny_model_dir: Path, policy: str
) -> None:
    """PIN holds a finished turn's cached blocks out of the free queue: a newcomer
    that needs them waits (under KEEP_LRU it starts and evicts part of the session's
    prefix), and the session's next turn hits every full block, then owns them."""
    pinning = make_scheduler(
        MarsScheduler, tiny_model_dir, policy=policy, num_blocks=40, clock=VirtualClock()
    )
    lru = make_scheduler(
        MarsScheduler,
        tiny_model_dir,
        policy=policy,
        num_blocks=40,
        clock=VirtualClock(),
        features=MarsFeatures(retention=False),
    )
    assert isinstance(pinning, MarsScheduler) and isinstance(lru, MarsScheduler)
    a0 = _pinned_turn(pinning)
    _pinned_turn(lru)
    assert pinning.retention_actions == Counter({RetentionAction.PIN: 1})
    assert lru.retention_actions == Counter({RetentionAction.KEEP_LRU: 1})
    full_blocks = 160 // BLOCK_SIZE  # the partial last block (no hash) was freed at once
    assert pinning.num_pinned_blocks == full_blocks and pinning.pinned_sessions == {"A"}
    assert num_free_blocks(lru) - num_free_blocks(pinning) == full_blocks
    pinned = _prefix_blocks(pinning, a0)
    assert len(pinned) == full_blocks
    assert all(b.ref_cnt == 1 and b.block_hash is not None for b in pinned)
    free_ids = {
        b.block_id
        for b in pinning.kv_cache_manager.block_pool.free_block_queue.get_all_free_blocks()
    }
    assert not free_ids & {b.block_id for b in pinned}
    # C needs 30 blocks: 29 are free beside the pin, 39 under KEEP_LRU
    for sched in (pinning, lru):
        sched.add_request(make_request("c0", 480, 2, arrival_s=1.0))
    started = {}
    for name, sched in (("pinning", pinning), ("lru", lru)):
        started[name] = [n.req_id for _ in range(3) for n in step(sched).scheduled_new_reqs]
    assert started == {"pinning": [], "lru": ["c0"]}
    assert _hit_tokens(pinning, a0) == 160
    assert _hit_tokens(lru, a0) < 160  # C took some of A's blocks
    assert all(b.ref_cnt == 1 and b.block_hash is not None for b in pinned)
    # A's next turn (its last) is scheduled first, with all 10 blocks as its prefix hit
    a1 = _next_turn(a0, 1, 20, 4, _hints("A", turn=1, tool_s=0.001, last=True))
    a1.arrival_time = 2.0
    pinning.add_request(a1)
    so = step(pinning)
    assert [(n.req_id, n.num_computed_tokens) for n in so.scheduled_new_reqs] == [("At1", 160)]
    assert so.scheduled_new_reqs[0].block_ids[0][:full_blocks] == [b.block_id for b in pinned]
    assert pinning.num_pinned_blocks == 0 and pinning.num_resumed_pins == 1
    assert all(b.ref_cnt == 1 for b in pinned)  # now a1's, not the pin's
    outputs = run_to_completion(pinning)
    assert any(n.req_id == "c0" for so in outputs for n in so.scheduled_new_reqs)
    assert pinning.num_expired_pins == 0
    assert_no_leak(pinning)  # a last turn never pins
    run_to_completion(lru)
    assert_no_leak(lru)


@pytest.mark.parametrize("policy", ["mars", "continuum"])
def test_a_pin_expires_after_its_ttl_on_the_policy_clock(tiny_model_dir: Path, policy: str) -> None:
    """Both rules hold for 1.5 x the predicted tool time; when it passes, the blocks
    go to the protected (LRU) end of the free queue, still cached."""
    clock = VirtualClock()
    sched = make_scheduler(MarsScheduler, tiny_model_dir, policy=policy, num_blocks=40, clock=clock)
    assert isinstance(sched, MarsScheduler)
    a0 = _pinned_turn(sched)
    pinned = _prefix_blocks(sched, a0)
    expires_s = sched.next_pin_expiry_s()
    assert expires_s == pytest.approx(1.5 * 0.001)
    clock.advance_to(0.99 * expires_s)
    step(sched)  # a pass (nothing to run) before the TTL: still pinned
    assert sched.num_pinned_blocks == len(pinned) == 10 and sched.num_expired_pins == 0
    clock.advance_to(expires_s)
    step(sched)
    assert sched.num_pinned_blocks == 0 and sched.num_expired_pins == 1
    assert sched.next_pin_expiry_s() is None
    free = sched.kv_cache_manager.block_pool.free_block_queue.get_all_free_blocks()
    assert {b.block_id for b in free[-len(pinned) :]} == {b.block_id for b in pinned}
    assert _hit_tokens(sched, a0) == 160  # still in the prefix cache
    assert_no_leak(sched)


def test_an_aborted_continuation_releases_the_pin(tiny_model_dir: Path) -> None:
    sched = make_scheduler(MarsScheduler, tiny_model_dir, num_blocks=40, clock=VirtualClock())
    assert isinstance(sched, MarsScheduler)
    a0 = _pinned_turn(sched)
    sched.add_request(_next_turn(a0, 1, 20, 4, _hints("A", turn=1, tool_s=0.001)))
    sched.finish_requests("At1", RequestStatus.FINISHED_ABORTED)
    assert sched.num_pinned_blocks == 0 and _hit_tokens(sched, a0) == 160
    assert_no_leak(sched)


def test_a_reset_of_the_prefix_cache_releases_pins(tiny_model_dir: Path) -> None:
    sched = make_scheduler(MarsScheduler, tiny_model_dir, num_blocks=40, clock=VirtualClock())
    assert isinstance(sched, MarsScheduler)
    a0 = _pinned_turn(sched)
    assert sched.num_pinned_blocks == 10
    assert sched.reset_prefix_cache()
    assert sched.num_pinned_blocks == 0 and _hit_tokens(sched, a0) == 0
    assert_no_leak(sched)


@pytest.mark.parametrize("policy", ["mars", "continuum", "infercept", "fcfs"])
def test_no_block_or_state_leaks_after_random_sessions(tiny_model_dir: Path, policy: str) -> None:
    """Random multi-turn sessions on a small KV cache, each turn extending the last
    (prefix hits), tools taking virtual time: pins are taken, resumed by the next
    turn and expire; a continuation is aborted; some sessions never come back.
    Pinned blocks are never free; at the end nothing is held once the pins of the
    sessions that never came back have expired."""
    rng = random.Random(3)
    clock = VirtualClock()
    sched = make_scheduler(
        MarsScheduler,
        tiny_model_dir,
        policy=policy,
        num_blocks=48,
        max_model_len=512,
        clock=clock,
    )
    assert isinstance(sched, MarsScheduler)
    pool = sched.kv_cache_manager.block_pool
    plans = {}  # session -> (number of turns, tool time, ends with a last turn)
    for s in range(10):
        plans[f"s{s}"] = (rng.randint(1, 4), rng.choice([0.01, 0.05, 0.5, 1e5]), s % 4 != 3)
    due: list[tuple[float, Request]] = []
    for s, (num_turns, tool_s, ends) in plans.items():
        hints = _hints(s, 0, tool_s, last=ends and num_turns == 1)
        first = make_request(f"{s}t0", rng.randint(10, 150), rng.randint(1, 20), hints=hints)
        due.append((rng.uniform(0, 0.05), first))
    due.append((0.01, make_request("bad", 30, 3, extra_args={"mars": {"session_id": 3}})))
    due.append((0.02, make_request("plain", 30, 3)))
    live: dict[str, tuple[Request, bool]] = {}  # session -> its latest turn, last?
    aborted = never_back = 0  # at most one continuation is aborted
    for _ in range(5000):
        if not due and not sched.has_requests():
            break
        now = clock.now_s()
        for at, request in [d for d in due if d[0] <= now]:
            due.remove((at, request))
            request.arrival_time = at
            sched.add_request(request)
            hints = sched.view_of(request.request_id).hints
            live[hints.session_id] = (request, hints.last_turn)
            if hints.turn_index == 1 and not aborted and rng.random() < 0.3:
                sched.finish_requests(request.request_id, RequestStatus.FINISHED_ABORTED)
                aborted += 1
                assert hints.session_id not in sched.pinned_sessions
        if sched.has_requests():
            step(sched)
            clock.advance_to(now + rng.choice([0.0002, 0.0005, 0.001]))
        else:  # idle until the next arrival
            clock.advance_to(min(at for at, _ in due))
        assert num_free_blocks(sched) + sched.num_pinned_blocks <= pool.num_gpu_blocks - 1
        for session, (request, last) in list(live.items()):
            if not request.is_finished():
                continue
            del live[session]
            num_turns, tool_s, ends = plans.get(session, (1, 0.0, True))  # bad, plain: 1 turn
            turn = int(request.request_id.split("t")[-1]) + 1 if session in plans else 1
            if request.status is RequestStatus.FINISHED_ABORTED or turn >= num_turns:
                never_back += not last  # the session's state stays (its last turn drops it)
                continue
            hints = _hints(session, turn, tool_s, last=ends and turn == num_turns - 1)
            nxt = _next_turn(request, turn, rng.randint(5, 40), rng.randint(1, 20), hints)
            tool_took_s = min(tool_s * rng.uniform(0.2, 2.5), 5.0)  # some overrun the TTL
            due.append((clock.now_s() + tool_took_s, nxt))
    else:
        raise AssertionError("not finished")
    expire_pins(sched, clock)
    assert_no_leak(sched)
    if policy != "fcfs":  # vLLM's LRU never pins
        assert sched.retention_actions[RetentionAction.PIN] > 0
        assert sched.num_resumed_pins > 0 and sched.num_expired_pins > 0
    assert sched.num_live_views == 0
    assert sched.num_session_entries == never_back  # dropped at a session's last turn


def _two_long_prefills_beside_a_decode(sched: AsyncScheduler) -> dict[str, int]:
    """A decodes; B and C (3000-token prompts: MLFQ level 1, quantum 1024) arrive."""
    sched.add_request(make_request("A", 20, 40, hints=_hints("A")))
    step(sched)  # A's prefill
    sched.add_request(make_request("B", 3000, 2, hints=_hints("B")))
    sched.add_request(make_request("C", 3000, 2, hints=_hints("C")))
    so = step(sched)
    run_to_completion(sched)
    assert_no_leak(sched)
    return dict(so.num_scheduled_tokens)


@pytest.mark.parametrize("work_conserving", [True, False])
def test_quanta_leave_no_budget_unused(tiny_model_dir: Path, work_conserving: bool) -> None:
    """The simulator hands the budget quanta leave unused to capped prefills in order;
    so does MarsScheduler: B gets 1024 plus all C does not need of its quantum."""
    features = MarsFeatures(work_conserving=work_conserving)
    sched = make_scheduler(
        MarsScheduler,
        tiny_model_dir,
        features=features,
        num_blocks=600,
        max_num_batched_tokens=4096,
        max_model_len=4096,
    )
    scheduled = _two_long_prefills_beside_a_decode(sched)
    if work_conserving:  # 4096 - 1 - 2 x 1024 spare: B takes 1976 of it, C the rest
        assert scheduled == {"A": 1, "B": 3000, "C": 1095}
    else:
        assert scheduled == {"A": 1, "B": 1024, "C": 1024}


@pytest.mark.parametrize(("policy", "action"), [("fcfs", "keep_lru"), ("mars", "evict_first")])
def test_a_last_turn_s_blocks_go_where_the_policy_says(
    tiny_model_dir: Path, policy: str, action: str
) -> None:
    """vLLM's own LRU (fcfs) keeps a finished session's blocks in LRU order, as the
    simulator does; MARS's retention evicts them first."""
    sched = make_scheduler(MarsScheduler, tiny_model_dir, policy=policy)
    assert isinstance(sched, MarsScheduler)
    sched.add_request(make_request("last", 40, 3, hints=_hints("s", turn=2, last=True)))
    run_to_completion(sched)
    assert {a.value: n for a, n in sched.retention_actions.items()} == {action: 1}
    assert_no_leak(sched)


def test_retention_applies_under_deferred_block_free(tiny_model_dir: Path) -> None:
    """With async scheduling and a consumer KV connector vLLM defers frees only while
    a step may still write the blocks; a turn whose last step was processed is freed
    at once, so the retention rule must still decide where its blocks go."""
    sched = make_scheduler(MarsScheduler, tiny_model_dir)
    assert isinstance(sched, MarsScheduler)
    sched.defer_block_free = True  # what vLLM sets for that configuration
    sched.add_request(make_request("last", 40, 3, hints=_hints("s", turn=2, last=True)))
    run_to_completion(sched)
    assert sched.retention_actions[RetentionAction.EVICT_FIRST] == 1
    # a request whose last step is still in flight is left to vLLM's deferred free
    request = make_request("inflight", 40, 3, hints=_hints("t", turn=2, last=True))
    request.last_sched_seq = sched.processed_step_seq + 1
    assert not sched._frees_now(request)


def test_the_policy_clock_runs_at_the_configured_time_scale(tiny_model_dir: Path) -> None:
    from mars_ray.errors import ConfigError
    from mars_ray.vllm.scheduler import MarsSchedulerSettings

    settings = MarsSchedulerSettings.from_mapping({"policy": "mars", "time_scale": 20})
    assert settings.time_scale == 20.0
    with pytest.raises(ConfigError, match="time_scale must be finite and > 0"):
        MarsSchedulerSettings.from_mapping({"time_scale": 0})
    with pytest.raises(
        ConfigError, match="accepted: policy, gpu, model, features, time_scale, policy_config"
    ):
        MarsSchedulerSettings.from_mapping({"clock": 1})


def test_the_whole_policy_config_reaches_the_engine(tiny_model_dir: Path) -> None:
    """A deployment's MLFQ and retention tunables are not dropped on the way into vLLM
    (they once were: the scheduler built PolicyConfig() and took five keys)."""
    from mars_ray.errors import ConfigError
    from mars_ray.vllm.scheduler import MarsSchedulerSettings

    tunables = {"mlfq": {"aging_s": 7.5}, "retention": {"tool_time_prior_s": 4.0}}
    sched = make_scheduler(MarsScheduler, tiny_model_dir, policy_config=tunables)
    assert isinstance(sched, MarsScheduler)
    assert sched.settings.policy_config.mlfq.aging_s == 7.5
    assert sched._tool_prior_s == 4.0
    with pytest.raises(ConfigError, match=r"PolicyConfig\.mlfq\.aging_s"):
        MarsSchedulerSettings.from_mapping({"policy_config": {"mlfq": {"aging_s": -1}}})
    with pytest.raises(ConfigError, match="PolicyConfig"):
        MarsSchedulerSettings.from_mapping({"policy_config": {"mlfqq": {}}})
