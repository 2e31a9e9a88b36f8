"""MarsScheduler driven through vLLM's own schedule() / update_from_output() on CPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from factories import (
    assert_no_leak,
    make_request,
    make_scheduler,
    num_free_blocks,
    run_to_completion,
    step,
)
from vllm.v1.core.sched.async_scheduler import AsyncScheduler

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
    sched = make_scheduler(
        MarsScheduler,
        tiny_model_dir,
        policy=policy,
        clock=VirtualClock(),
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


def _run_tool_pause(sched: AsyncScheduler) -> tuple[int, int]:
    """Two sessions end turn 0 (A first, back soon; B later, gone for long); a third
    request needs most of the KV. How much of each session's context is still
    cached for its turn 1 (prefix-hit tokens)? Plain LRU evicts A, the older."""
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
    assert_no_leak(sched)
    return hits[0], hits[1]


def test_free_queue_order_keeps_the_session_that_returns_soon(tiny_model_dir: Path) -> None:
    mars = make_scheduler(MarsScheduler, tiny_model_dir, num_blocks=40)
    hit_a, hit_b = _run_tool_pause(mars)
    assert (hit_a, hit_b) == (160, 0)
    stock = make_scheduler(AsyncScheduler, tiny_model_dir, num_blocks=40)
    stock_hit_a, _ = _run_tool_pause(stock)
    assert stock_hit_a < 160  # plain LRU evicted part of A, which comes back first


def test_no_block_or_state_leaks_after_random_sessions(tiny_model_dir: Path) -> None:
    rng = random.Random(3)
    sched = make_scheduler(MarsScheduler, tiny_model_dir, num_blocks=48, max_model_len=512)
    assert isinstance(sched, MarsScheduler)
    pending = []
    for s in range(6):
        num_turns = rng.randint(1, 3)
        for t in range(num_turns):
            hints = _hints(f"s{s}", t, rng.choice([0.001, 0.5, 1e5]), last=t == num_turns - 1)
            pending.append(
                make_request(f"s{s}t{t}", rng.randint(10, 200), rng.randint(1, 30), hints=hints)
            )
    pending.append(make_request("bad", 30, 3, extra_args={"mars": {"session_id": 3}}))
    pending.append(make_request("plain", 30, 3))
    rng.shuffle(pending)
    while pending or sched.has_requests():
        if pending and rng.random() < 0.5:
            sched.add_request(pending.pop())
        step(sched)
        assert num_free_blocks(sched) <= sched.kv_cache_manager.block_pool.num_gpu_blocks - 1
    assert_no_leak(sched)
    assert sched.num_live_views == 0 and sched.num_session_entries == 0


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
    with pytest.raises(ConfigError, match="accepted: policy, gpu, model, features, time_scale"):
        MarsSchedulerSettings.from_mapping({"clock": 1})
