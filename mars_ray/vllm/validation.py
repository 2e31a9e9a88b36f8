"""Reject malformed session hints at the API, before a request reaches the engine.

vLLM 0.29 has no per-request hook for ``extra_args`` besides the logits-processor
one: for every request, the frontend (``InputProcessor``, in the API server or
``LLMEngine`` / ``AsyncLLM`` process) calls ``validate_params(sampling_params)`` of
each logits processor named by the ``logits_processors`` engine argument, and the
OpenAI server answers a ``VLLMValidationError`` raised there with HTTP 400.
:class:`MarsHintsValidator` is a logits processor that changes no logit and exists
for that classmethod. Register it with::

    EngineArgs(..., logits_processors=[MarsHintsValidator])
    # or: vllm serve ... --logits-processors mars_ray.vllm.validation:MarsHintsValidator

Without it, malformed hints still never crash the engine: ``MarsScheduler`` logs
them and schedules the request as an unhinted one (``adapter.hints_of``).
Limits (vLLM's, not ours): custom logits processors are refused with speculative
decoding and for pooling models, so there the validator cannot be registered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from mars_ray.vllm.hints import HintError, parse_hints

if TYPE_CHECKING:
    from vllm.config import VllmConfig

#: what ``--logits-processors`` takes to load :class:`MarsHintsValidator`
VALIDATOR_FQCN = "mars_ray.vllm.validation:MarsHintsValidator"


class MarsHintsValidator(LogitsProcessor):
    """A no-op logits processor whose ``validate_params`` checks session hints."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Raise ``VLLMValidationError`` (HTTP 400) naming the bad hint key."""
        try:
            parse_hints(sampling_params.extra_args, "<validation>")
        except HintError as exc:
            raise VLLMValidationError(
                f"invalid MARS session hints: {exc}", parameter="vllm_xargs"
            ) from exc

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        """Nothing to set up: the processor holds no per-request state."""

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True  # greedy sampling may skip it

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """No per-request state to track."""


def is_registered(logits_processors: Sequence[object] | None) -> bool:
    """Whether ``ModelConfig.logits_processors`` includes :class:`MarsHintsValidator`."""
    return any(
        entry is MarsHintsValidator or entry == VALIDATOR_FQCN for entry in logits_processors or ()
    )
