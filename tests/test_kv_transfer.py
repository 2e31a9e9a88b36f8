"""KV migration over torch.distributed: real Ray actors forming a real gloo group."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import ray
import torch
from ray.actor import ActorHandle

from mars_ray.cluster.kv_transfer import (
    HEADER_BYTES,
    MAX_SESSION_ID_BYTES,
    KvHeader,
    KvTransferError,
    KvTransport,
    TransferStats,
    TransportConfig,
    _decode_header,
    _encode_header,
    free_port,
    sim_bytes_per_block,
    sim_kv_payload,
    verify_sim_kv_payload,
)
from mars_ray.errors import ConfigError

# A llama-3.1-8b block (16 tokens x 128 KiB) scaled down 1024x: 2 KiB.
BLOCK_SIZE = 16
BYTES_PER_BLOCK = sim_bytes_per_block(BLOCK_SIZE * 128 * 1024)
TIMEOUT_S = 30.0


@ray.remote(num_cpus=0, max_concurrency=4)
class KvWorker:
    """A stand-in GPU worker: just the transport, and sim payloads keyed by session."""

    def __init__(self) -> None:
        self.transport: KvTransport | None = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port on its node."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, config: TransportConfig, rank: int) -> None:
        self.transport = KvTransport(config, rank)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def send_sim(self, dst_rank: int, session_id: str, num_blocks: int) -> TransferStats:
        payload = sim_kv_payload(session_id, num_blocks, BYTES_PER_BLOCK)
        header = KvHeader(session_id, num_blocks * BLOCK_SIZE, num_blocks, payload.numel())
        return self._transport().send(dst_rank, header, payload)

    def recv_sim(
        self, src_rank: int, expected_session_id: str | None = None
    ) -> tuple[KvHeader, bool, TransferStats]:
        header, payload, stats = self._transport().recv(src_rank, expected_session_id)
        return header, verify_sim_kv_payload(header.session_id, payload, BYTES_PER_BLOCK), stats

    def relay_sim(self, src_rank: int, dst_rank: int, session_id: str) -> bool:
        """Receive a session's KV and migrate it on unchanged (its next-next turn moved)."""
        header, payload, _ = self._transport().recv(src_rank, session_id)
        self._transport().send(dst_rank, header, payload)
        return verify_sim_kv_payload(session_id, payload, BYTES_PER_BLOCK)

    def send_tensor(self, dst_rank: int, header: KvHeader, payload: torch.Tensor) -> None:
        self._transport().send(dst_rank, header, payload)

    def recv_tensor(self, src_rank: int) -> tuple[KvHeader, torch.Tensor]:
        header, payload, _ = self._transport().recv(src_rank)
        return header, payload

    def close(self) -> None:
        self._transport().close()

    def _transport(self) -> KvTransport:
        assert self.transport is not None, "setup() first"
        return self.transport


def start_group(workers: list[ActorHandle]) -> None:
    """Rendezvous at rank 0's node; every rank joins at once (init blocks until all do)."""
    addr, port = ray.get(workers[0].rendezvous.remote())
    config = TransportConfig(
        master_addr=addr, master_port=port, world_size=len(workers), timeout_s=TIMEOUT_S
    )
    ray.get([w.setup.remote(config, rank) for rank, w in enumerate(workers)])


def close_group(workers: list[ActorHandle]) -> None:
    ray.get([w.close.remote() for w in workers])
    for w in workers:
        ray.kill(w)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workers(ray_local: None) -> Iterator[list[ActorHandle]]:
    group = [KvWorker.remote() for _ in range(3)]  # type: ignore[attr-defined]
    start_group(group)
    yield group
    if ray.is_initialized():  # the multi-node test below shuts the local Ray down
        close_group(group)


# --- without Ray --------------------------------------------------------------------------


def test_bad_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown KV transport backend 'mpi'"):
        TransportConfig(backend="mpi", master_addr="127.0.0.1", master_port=29500, world_size=2)
    with pytest.raises(ConfigError, match="master_port"):
        TransportConfig(master_addr="127.0.0.1", master_port=0, world_size=2)
    config = TransportConfig(
        backend="nccl", master_addr="10.0.0.1", master_port=29500, world_size=8
    )
    assert config.init_method == "tcp://10.0.0.1:29500"


def test_session_id_longer_than_128_bytes_is_refused() -> None:
    KvHeader("é" * (MAX_SESSION_ID_BYTES // 2), 16, 1, 2048)  # 128 UTF-8 bytes: fits
    with pytest.raises(ConfigError, match="129 UTF-8 bytes"):
        KvHeader("x" * (MAX_SESSION_ID_BYTES + 1), 16, 1, 2048)
    with pytest.raises(ConfigError, match="130 UTF-8 bytes"):
        KvHeader("é" * 65, 16, 1, 2048)
    with pytest.raises(ConfigError, match="num_blocks"):
        KvHeader("s", 16, -1, 2048)


def test_sim_payload_is_deterministic_and_detects_tampering() -> None:
    payload = sim_kv_payload("sess-1", 64, BYTES_PER_BLOCK)
    assert payload.dtype == torch.uint8 and payload.shape == (64, BYTES_PER_BLOCK)
    assert torch.equal(payload, sim_kv_payload("sess-1", 64, BYTES_PER_BLOCK))
    assert verify_sim_kv_payload("sess-1", payload, BYTES_PER_BLOCK)
    assert not verify_sim_kv_payload("sess-2", payload, BYTES_PER_BLOCK)
    swapped = payload[[1, 0, *range(2, 64)]]
    assert not verify_sim_kv_payload("sess-1", swapped, BYTES_PER_BLOCK)
    flipped = payload.clone()
    flipped[40, 7] ^= 1
    assert not verify_sim_kv_payload("sess-1", flipped, BYTES_PER_BLOCK)
    assert not verify_sim_kv_payload("sess-1", payload.to(torch.int8), BYTES_PER_BLOCK)
    # Block b's content does not depend on how many blocks follow it.
    assert torch.equal(sim_kv_payload("sess-1", 8, BYTES_PER_BLOCK), payload[:8])
    # Bytes are spread over all values, not a short cycle.
    assert payload.unique().numel() == 256


def test_sim_bytes_per_block_scales_real_kv_down() -> None:
    assert BYTES_PER_BLOCK == 2048
    assert sim_bytes_per_block(100, scale_down=1024) == 1  # never below one byte
    with pytest.raises(ConfigError):
        sim_bytes_per_block(0)


def test_header_round_trips_and_a_corrupt_session_id_is_caught() -> None:
    header = KvHeader("é" * 64, 4096, 256, 2 * 256 * 8 * 4)
    payload = torch.zeros(2, 256, 8, 4, dtype=torch.bfloat16)
    words = _encode_header(header, payload)
    assert words.numel() * 8 == HEADER_BYTES
    assert _decode_header(words, src_rank=0) == (header, torch.bfloat16, (2, 256, 8, 4))
    words[-1] ^= 1 << 8  # one bit of the session id's last word
    with pytest.raises(KvTransferError, match="fails its hash"):
        _decode_header(words, src_rank=0)


# --- a real gloo group of Ray actors ------------------------------------------------------


def test_chained_migration_runs_concurrently_with_an_unrelated_one(
    workers: list[ActorHandle],
) -> None:
    """Session A moves 0 -> 1 -> 2 while session B moves 2 -> 0; all five calls overlap."""
    w0, w1, w2 = workers
    calls = [
        w0.send_sim.remote(1, "session-a", 300),
        w1.relay_sim.remote(0, 2, "session-a"),
        w2.recv_sim.remote(1, "session-a"),
        w2.send_sim.remote(0, "session-b", 200),
        w0.recv_sim.remote(2, "session-b"),
    ]
    _, relay_ok, (header_a, a_ok, stats_a), _, (header_b, b_ok, stats_b) = ray.get(calls)
    assert relay_ok and a_ok and b_ok
    assert header_a == KvHeader("session-a", 300 * BLOCK_SIZE, 300, 300 * BYTES_PER_BLOCK)
    assert header_b == KvHeader("session-b", 200 * BLOCK_SIZE, 200, 200 * BYTES_PER_BLOCK)
    assert stats_a.num_bytes == HEADER_BYTES + 300 * BYTES_PER_BLOCK
    assert stats_b.num_bytes == HEADER_BYTES + 200 * BYTES_PER_BLOCK


def test_generic_tensor_keeps_dtype_shape_and_a_128_byte_session_id(
    workers: list[ActorHandle],
) -> None:
    w0, w1, _ = workers
    session_id = "é" * (MAX_SESSION_ID_BYTES // 2)
    payload = torch.randn(2, 16, 4, 8, generator=torch.Generator().manual_seed(0)).half()
    header = KvHeader(session_id, 64, 16, payload.numel())
    sent = w1.send_tensor.remote(0, header, payload)
    got_header, got_payload = ray.get(w0.recv_tensor.remote(1))
    ray.get(sent)
    assert got_header == header
    assert got_payload.dtype == torch.float16 and torch.equal(got_payload, payload)


def test_recv_for_the_wrong_session_is_detected_and_the_pair_stays_in_step(
    workers: list[ActorHandle],
) -> None:
    w0, w1, _ = workers
    sent = w0.send_sim.remote(1, "session-c", 10)
    with pytest.raises(KvTransferError, match="expected KV of session 'session-d'"):
        ray.get(w1.recv_sim.remote(0, "session-d"))
    ray.get(sent)
    # The mismatched payload was drained: the next transfer on the pair is intact.
    sent = w0.send_sim.remote(1, "session-d", 10)
    header, ok, _ = ray.get(w1.recv_sim.remote(0, "session-d"))
    ray.get(sent)
    assert ok and header.session_id == "session-d"


def test_sending_to_self_or_outside_the_group_is_refused(workers: list[ActorHandle]) -> None:
    with pytest.raises(ConfigError, match="peer rank"):
        ray.get(workers[0].send_sim.remote(0, "s", 1))
    with pytest.raises(ConfigError, match="peer rank"):
        ray.get(workers[0].recv_sim.remote(3))


def test_a_few_megabytes_report_bytes_and_seconds(workers: list[ActorHandle]) -> None:
    w0, w1, _ = workers
    num_blocks = 4096  # 8 MiB at 2 KiB per block
    sent = w0.send_sim.remote(1, "session-big", num_blocks)
    header, ok, recv_stats = ray.get(w1.recv_sim.remote(0, "session-big"))
    send_stats = ray.get(sent)
    assert ok and header.payload_numel == num_blocks * BYTES_PER_BLOCK
    for stats in (send_stats, recv_stats):
        assert stats.num_bytes == HEADER_BYTES + num_blocks * BYTES_PER_BLOCK
        assert stats.seconds > 0
    assert send_stats.wait_s == 0 and recv_stats.wait_s >= 0
    mib = recv_stats.num_bytes / 2**20
    print(
        f"\nkv_transfer gloo {mib:.1f} MiB: send {send_stats.seconds * 1e3:.1f} ms, "
        f"recv {recv_stats.seconds * 1e3:.1f} ms (+{recv_stats.wait_s * 1e3:.1f} ms waiting "
        f"for the sender) = {recv_stats.bytes_per_s / 1e6:.0f} MB/s"
    )


# --- multi-node: ray.cluster_utils.Cluster ------------------------------------------------


@pytest.fixture
def two_gpu_nodes() -> Iterator[list[str]]:
    """Head (no GPUs) + two nodes with one logical GPU each; the local Ray must go first.

    Keep this test last in the module: it shuts the module's local Ray down.
    """
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    names = ["gpu_node_0", "gpu_node_1"]
    for name in names:
        cluster.add_node(num_cpus=1, num_gpus=1, resources={name: 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield names
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_multi_node_migration_between_pinned_gpu_workers(two_gpu_nodes: list[str]) -> None:
    start_s = time.perf_counter()
    workers = [
        KvWorker.options(num_gpus=1, resources={name: 1}).remote()  # type: ignore[attr-defined]
        for name in two_gpu_nodes
    ]
    node_ids = ray.get([w.node_id.remote() for w in workers])
    assert len(set(node_ids)) == 2
    start_group(workers)
    w0, w1 = workers
    calls = [
        w0.send_sim.remote(1, "session-x", 256),
        w1.recv_sim.remote(0, "session-x"),
        w1.send_sim.remote(0, "session-y", 128),
        w0.recv_sim.remote(1, "session-y"),
    ]
    _, (header_x, x_ok, _), _, (header_y, y_ok, _) = ray.get(calls)
    assert x_ok and y_ok
    assert (header_x.session_id, header_y.session_id) == ("session-x", "session-y")
    close_group(workers)
    print(f"\nkv_transfer multi-node test body: {time.perf_counter() - start_s:.1f} s")
