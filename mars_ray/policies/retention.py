"""What happens to a session's KV while its tool runs (docs/design.md §4.5 and §5)."""

from __future__ import annotations

from mars_ray.config import RetentionConfig
from mars_ray.policies.base import (
    RetentionAction,
    RetentionDecision,
    RetentionPolicy,
    TurnEndContext,
)


class LruRetention(RetentionPolicy):
    """vLLM's default: freed blocks join the LRU prefix cache (evicted oldest first)."""

    def on_turn_end(self, ctx: TurnEndContext) -> RetentionDecision:
        return RetentionDecision(RetentionAction.KEEP_LRU, reason="lru")


class BenefitRetention(RetentionPolicy):
    """MARS: keep a session's KV only when a warm resume is worth the memory.

    Holding ``b`` of ``B`` blocks for the predicted tool time ``t`` costs about
    ``t * b / B`` GPU-seconds of memory; evicting costs ``recompute_s`` GPU-seconds
    of re-prefill (or ``reload_s`` from the CPU tier). The KV of a session worth
    keeping is held through its tool call (pinned for ``hold_ttl_factor * t``,
    then it joins the protected end of the LRU order): priority order is the
    eviction order, and an admitted session's continuation outranks the new work
    that would otherwise take its blocks. The rest go to the evict-first end, or to
    CPU memory when reloading beats recomputing.

    Holding only at the protected end of the free queue (``hold=False``) was
    measured and lost: vLLM counts those blocks as free, so newcomers are started
    on them and returning sessions re-prefill (docs/results.md).
    """

    def __init__(self, config: RetentionConfig | None = None, *, hold: bool = True) -> None:
        self._ttl_factor = (config or RetentionConfig()).mars_hold_ttl_factor
        self._hold = hold

    def on_turn_end(self, ctx: TurnEndContext) -> RetentionDecision:
        if ctx.is_last_turn:
            return RetentionDecision(RetentionAction.EVICT_FIRST, reason="session done")
        hold_cost_s = ctx.predicted_tool_s * ctx.num_blocks / max(1, ctx.num_total_blocks)
        if hold_cost_s <= ctx.recompute_s:
            ttl_s = self._ttl_factor * ctx.predicted_tool_s
            if self._hold and ttl_s > 0:
                return RetentionDecision(RetentionAction.PIN, ttl_s=ttl_s, reason="back soon")
            return RetentionDecision(RetentionAction.KEEP_LRU, reason="back soon")
        if ctx.can_offload and ctx.reload_s < ctx.recompute_s:
            return RetentionDecision(RetentionAction.OFFLOAD, reason="long wait, reload cheaper")
        return RetentionDecision(RetentionAction.EVICT_FIRST, reason="long wait")


class TtlPinRetention(RetentionPolicy):
    """Continuum: pin the KV for a TTL when the predicted tool time is short."""

    def __init__(self, config: RetentionConfig) -> None:
        self._pin_below_s = config.continuum_pin_below_s
        self._ttl_factor = config.continuum_ttl_factor

    def on_turn_end(self, ctx: TurnEndContext) -> RetentionDecision:
        if not ctx.is_last_turn and ctx.predicted_tool_s < self._pin_below_s:
            ttl_s = self._ttl_factor * ctx.predicted_tool_s
            return RetentionDecision(RetentionAction.PIN, ttl_s=ttl_s, reason="short tool")
        return RetentionDecision(RetentionAction.KEEP_LRU, reason="long tool")


class MinWasteRetention(RetentionPolicy):
    """InferCept: preserve, discard or swap, whichever wastes the least GPU memory x time.

    * preserve: the session's blocks sit idle for the tool call, ``b * t``;
    * discard: re-prefill later stalls the running batch, ``recompute_s * (b + used)``;
    * swap: moving out and back stalls the batch for the transfers, ``2 * reload_s * used``.
    """

    def on_turn_end(self, ctx: TurnEndContext) -> RetentionDecision:
        if ctx.is_last_turn:  # no tool call to intercept: plain vLLM free
            return RetentionDecision(RetentionAction.KEEP_LRU, reason="session done")
        preserve = ctx.num_blocks * ctx.predicted_tool_s
        discard = ctx.recompute_s * (ctx.num_blocks + ctx.num_used_blocks)
        options = [(preserve, RetentionAction.PIN), (discard, RetentionAction.EVICT_FIRST)]
        if ctx.can_offload:
            options.append((2 * ctx.reload_s * ctx.num_used_blocks, RetentionAction.OFFLOAD))
        _, action = min(options, key=lambda o: o[0])
        ttl_s = ctx.predicted_tool_s if action is RetentionAction.PIN else 0.0
        return RetentionDecision(action, ttl_s=ttl_s, reason="min waste")
