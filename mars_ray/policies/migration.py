"""Whether a session's KV should follow it to another GPU, or be recomputed there.

When placement sends a continuation away from the GPU that holds its KV (that GPU
is overloaded, or a rebalance moved the session), the KV can be copied over the
GPU link or the new GPU can re-prefill the context. The rule compares the two
times; the simulator and the Ray global scheduler both ask it, so the two runtimes
migrate the same sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

from mars_ray.config import MigrationConfig

_BYTES_PER_GB = 1e9


@dataclass(frozen=True, slots=True)
class MigrationDecision:
    """Move the KV (``move``) or recompute it; both times are in seconds."""

    move: bool
    num_tokens: int
    transfer_s: float
    recompute_s: float

    @property
    def reason(self) -> str:
        verdict = "move" if self.move else "recompute"
        return (
            f"{verdict}: {self.num_tokens} tokens, transfer {self.transfer_s * 1e3:.1f} ms "
            f"vs recompute {self.recompute_s * 1e3:.1f} ms"
        )


class KvMigrationRule:
    """Transfer time from the link model; move when it beats recomputing.

    ``kv_bytes_per_token`` is the model's KV size (all layers, K and V); the caller
    supplies the recompute time, which depends on the engine's cost model.
    """

    def __init__(self, config: MigrationConfig, kv_bytes_per_token: int) -> None:
        if kv_bytes_per_token <= 0:
            raise ValueError(f"kv_bytes_per_token must be > 0, got {kv_bytes_per_token}")
        self._config = config
        self._kv_bytes_per_token = kv_bytes_per_token

    def transfer_s(self, num_tokens: int, same_node: bool) -> float:
        """Seconds to copy the KV of ``num_tokens`` tokens between two GPUs."""
        config = self._config
        gb_per_s = config.intra_node_gb_per_s if same_node else config.inter_node_gb_per_s
        num_bytes = num_tokens * self._kv_bytes_per_token
        return config.setup_ms / 1e3 + num_bytes / (gb_per_s * _BYTES_PER_GB)

    def decide(self, num_tokens: int, same_node: bool, recompute_s: float) -> MigrationDecision:
        """Move iff there is KV to move and its transfer is faster than recomputing it."""
        if num_tokens < 0 or recompute_s < 0:
            raise ValueError(f"negative tokens or time: {num_tokens}, {recompute_s}")
        transfer_s = self.transfer_s(num_tokens, same_node)
        move = num_tokens > 0 and transfer_s < recompute_s
        return MigrationDecision(move, num_tokens, transfer_s, recompute_s)
