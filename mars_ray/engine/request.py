"""One turn of a session inside an engine (implements the policies' SchedulableRequest)."""

from __future__ import annotations

from typing import Any


class EngineRequest:
    """A turn as the engine tracks it.

    Token accounting follows vLLM: ``num_tokens`` = prompt + generated; a step
    computes KV for ``num_tokens - num_computed_tokens`` tokens at most, and when
    the KV covers every token a new one is sampled. A decode step therefore
    computes exactly one token; a request with more than one left is prefilling.
    """

    __slots__ = (
        "arrival_s",
        "block_ids",
        "cached_tokens",
        "first_token_s",
        "high_water_tokens",
        "is_last_turn",
        "is_running",
        "max_output_tokens",
        "num_computed_tokens",
        "num_output_tokens",
        "num_preemptions",
        "num_prompt_tokens",
        "num_tokens",
        "policy_state",
        "recomputed_tokens",
        "request_id",
        "service_s",
        "service_tokens",
        "session_arrival_s",
        "session_context_tokens",
        "session_id",
        "session_service_s",
        "session_service_tokens",
        "started",
        "turn_index",
    )

    def __init__(
        self,
        session_id: str,
        turn_index: int,
        arrival_s: float,
        prompt_tokens: int,
        max_output_tokens: int,
        *,
        session_arrival_s: float | None = None,
        prior_computed_tokens: int = 0,
        session_service_tokens: int = 0,
        session_service_s: float = 0.0,
        is_last_turn: bool = False,
    ) -> None:
        if prompt_tokens < 1 or max_output_tokens < 1:
            raise ValueError(
                f"{session_id} turn {turn_index}: prompt and output must be >= 1 token, "
                f"got {prompt_tokens} and {max_output_tokens}"
            )
        self.request_id = f"{session_id}#{turn_index}"
        self.session_id = session_id
        self.turn_index = turn_index
        self.arrival_s = arrival_s
        self.session_arrival_s = arrival_s if session_arrival_s is None else session_arrival_s
        self.num_prompt_tokens = prompt_tokens
        self.max_output_tokens = max_output_tokens
        self.num_tokens = prompt_tokens
        self.num_computed_tokens = 0
        self.num_output_tokens = 0
        self.block_ids: list[int] = []
        self.high_water_tokens = prior_computed_tokens  # computed before: recompute accounting
        self.session_context_tokens = min(prior_computed_tokens, prompt_tokens)
        self.session_service_tokens = session_service_tokens
        self.session_service_s = session_service_s
        self.is_last_turn = is_last_turn
        self.policy_state: Any = None
        self.first_token_s: float | None = None
        self.cached_tokens = 0
        self.recomputed_tokens = 0
        self.num_preemptions = 0
        self.service_tokens = 0
        self.service_s = 0.0
        self.started = False  # prefix lookup done since it last entered the waiting queue
        self.is_running = False

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.num_output_tokens >= self.max_output_tokens

    @property
    def remaining_output_tokens(self) -> int:
        return self.max_output_tokens - self.num_output_tokens

    def __repr__(self) -> str:
        return (
            f"EngineRequest({self.request_id}, computed={self.num_computed_tokens}/"
            f"{self.num_tokens}, out={self.num_output_tokens}/{self.max_output_tokens})"
        )
