"""Ideal (isolated) times: a turn or session alone on an idle GPU (docs/design.md §2).

These mirror the SimEngine's step sequence for a lone request exactly - prefix
hit on the previous turns' full blocks, prefill chunks of the full token budget
(MLFQ quanta never slow a lone request: leftover budget is handed back), then one
decode step per further output token - so a session running alone finishes in
its ideal time under every policy.
"""

from __future__ import annotations

from mars_ray.config import EngineConfig
from mars_ray.engine.costmodel import CostModel
from mars_ray.session import SessionSpec


def isolated_turn_s(
    cost: CostModel,
    config: EngineConfig,
    prior_computed_tokens: int,
    prompt_tokens: int,
    output_tokens: int,
) -> float:
    """Time from a turn reaching an idle GPU to its last token."""
    bs = config.block_size
    hit_blocks = 0
    if config.enable_prefix_caching:
        hit_blocks = min(prior_computed_tokens // bs, (prompt_tokens - 1) // bs)
    computed = hit_blocks * bs
    total_s = 0.0
    while computed < prompt_tokens:
        chunk = min(config.max_num_batched_tokens, prompt_tokens - computed)
        units = cost.prefill_attn_units(chunk, computed) if chunk > 1 else 0.0
        total_s += cost.step_time_s(1, chunk, computed, units)
        computed += chunk
    num_decodes = output_tokens - 1
    if num_decodes > 0:
        first_s = cost.step_time_s(1, 1, computed, 0.0)
        total_s += num_decodes * first_s
        total_s += cost.kv_read_s_per_token * num_decodes * (num_decodes - 1) / 2
    return total_s


def session_ideal_s(cost: CostModel, config: EngineConfig, session: SessionSpec) -> float:
    """Isolated GPU time of every turn plus uncontended tool time."""
    total_s = 0.0
    context = computed = 0
    for turn in session.turns:
        prompt = context + turn.new_tokens
        total_s += isolated_turn_s(cost, config, computed, prompt, turn.output_tokens)
        total_s += turn.tool_s
        context = prompt + turn.output_tokens
        computed = context - 1  # the last sampled token's KV is never computed
    return total_s
