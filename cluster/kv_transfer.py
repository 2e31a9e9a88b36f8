"""KV migration between GPU workers over torch.distributed.

When the global scheduler moves a session's next turn to another GPU worker, the
session's KV blocks travel from the old worker to the new one point to point:
NCCL on GPUs, gloo on CPU. Every GPU worker actor owns one :class:`KvTransport`,
its rank in one process group (the default group) of all GPU workers.

A transfer is two messages on the (sender, receiver) pair, in order:

1. a fixed-size int64 header (:data:`HEADER_NUMEL` words): magic, session id
   length and hash, ``num_tokens``, ``num_blocks``, payload numel, dtype code,
   shape, and the session id's UTF-8 bytes (at most :data:`MAX_SESSION_ID_BYTES`);
2. the payload tensor, of the dtype and shape the header announces.

Point to point needs both sides at once: the caller starts ``send`` on the old
worker and ``recv`` on the new one concurrently (two Ray calls, then one
``ray.get``). One transport may run a send and a recv in two threads at the same
time; a lock per peer and direction keeps each transfer's two messages adjacent.

Simulated engines have no KV tensors, so CPU runs ship a stand-in:
:func:`sim_kv_payload` builds ``num_blocks`` rows of ``bytes_per_block`` uint8
bytes whose content is a hash of (session id, block index), and
:func:`verify_sim_kv_payload` checks it on arrival. :func:`sim_bytes_per_block`
scales a real block's KV bytes down (by 1024 by default: a llama-3.1-8b block of
16 tokens x 128 KiB becomes 2 KiB), so a migration moves a payload proportional
to the real one at a size a CPU run can afford.

This module imports torch but nothing from Ray; actors adapt it.
"""

from __future__ import annotations

import hashlib
import math
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from mars_ray.errors import ConfigError

if TYPE_CHECKING:
    import torch

BACKENDS: tuple[str, ...] = ("gloo", "nccl")
MAX_SESSION_ID_BYTES = 128
MAX_PAYLOAD_NDIM = 8

# Header layout, in int64 words.
_MAGIC = 0x4D41_5253_4B56_01  # "MARSKV" + format version 1
_W_MAGIC, _W_ID_LEN, _W_ID_HASH, _W_TOKENS, _W_BLOCKS, _W_NUMEL, _W_DTYPE, _W_NDIM = range(8)
_W_SHAPE = 8
_W_ID = _W_SHAPE + MAX_PAYLOAD_NDIM
HEADER_NUMEL = _W_ID + MAX_SESSION_ID_BYTES // 8
HEADER_BYTES = HEADER_NUMEL * 8

# sim_kv_payload's mixing constants (splitmix64), as signed int64.
_GOLDEN = 0x9E37_79B9_7F4A_7C15 - (1 << 64)
_MIX1 = 0xBF58_476D_1CE4_E5B9 - (1 << 64)
_MIX2 = 0x94D0_49BB_1331_11EB - (1 << 64)


class KvTransferError(RuntimeError):
    """A transfer went wrong on the wire: wrong session, corrupt header, bad peer."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportConfig:
    """Where and how the GPU workers' process group meets.

    ``master_addr``/``master_port`` is a TCP rendezvous reachable from every
    worker (rank 0's node and a free port there); ``world_size`` counts the GPU
    workers; ``timeout_s`` bounds rendezvous and every send or recv.
    """

    backend: str = "gloo"
    """``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors)."""
    master_addr: str
    master_port: int
    world_size: int
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"unknown KV transport backend {self.backend!r}; known: {', '.join(BACKENDS)}"
            )
        if not self.master_addr:
            raise ConfigError("master_addr must be a host name or IP address, got ''")
        if not 1 <= self.master_port <= 65535:
            raise ConfigError(f"master_port must be in 1..65535, got {self.master_port}")
        if self.world_size < 1:
            raise ConfigError(f"world_size must be >= 1, got {self.world_size}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")

    @property
    def init_method(self) -> str:
        """The ``init_method`` URL for ``torch.distributed.init_process_group``."""
        return f"tcp://{self.master_addr}:{self.master_port}"


@dataclass(frozen=True, slots=True)
class KvHeader:
    """What a migrating payload is: whose KV, how many tokens and blocks, how big.

    ``session_id`` must encode to at most :data:`MAX_SESSION_ID_BYTES` UTF-8
    bytes (it crosses the wire in a fixed-size field); ``payload_numel`` must
    equal the payload's element count.
    """

    session_id: str
    num_tokens: int
    num_blocks: int
    payload_numel: int

    def __post_init__(self) -> None:
        if not self.session_id:
            raise ConfigError("session_id must be non-empty")
        num_id_bytes = len(self.session_id.encode("utf-8"))
        if num_id_bytes > MAX_SESSION_ID_BYTES:
            raise ConfigError(
                f"session_id is {num_id_bytes} UTF-8 bytes; at most "
                f"{MAX_SESSION_ID_BYTES} can migrate: {self.session_id[:32]!r}..."
            )
        for name in ("num_tokens", "num_blocks", "payload_numel"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class TransferStats:
    """One side's view of a transfer.

    ``num_bytes`` counts the wire (header plus payload). ``seconds`` is the time
    moving them: the sender's from its first send to delivery, the receiver's
    from the header's arrival to the payload's. ``wait_s`` is the receiver's wait
    for the header (the sender not there yet); always 0 for the sender.
    """

    num_bytes: int
    seconds: float
    wait_s: float = 0.0

    @property
    def bytes_per_s(self) -> float:
        """Throughput; ``inf`` for a transfer too fast for the clock."""
        return self.num_bytes / self.seconds if self.seconds > 0 else math.inf


class KvTransport:
    """One per GPU worker: a member (rank) of a torch.distributed process group of all GPU workers.

    Construct it inside the actor process; construction blocks until all
    ``world_size`` ranks have joined (or ``timeout_s`` passes). It owns the
    process's default group, so a process holds at most one open transport.
    """

    def __init__(self, config: TransportConfig, rank: int) -> None:
        import torch.distributed as dist

        if not 0 <= rank < config.world_size:
            raise ConfigError(f"rank must be in 0..{config.world_size - 1}, got {rank}")
        if dist.is_initialized():
            raise KvTransferError("this process already has a torch.distributed default group")
        dist.init_process_group(
            backend=config.backend,
            init_method=config.init_method,
            world_size=config.world_size,
            rank=rank,
            timeout=timedelta(seconds=config.timeout_s),
        )
        self.config = config
        self.rank = rank
        self._send_locks = {peer: threading.Lock() for peer in range(config.world_size)}
        self._recv_locks = {peer: threading.Lock() for peer in range(config.world_size)}
        self._closed = False

    @property
    def device(self) -> torch.device:
        """Where payloads live: the current CUDA device under NCCL, else the CPU."""
        import torch

        if self.config.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def send(self, dst_rank: int, header: KvHeader, payload: torch.Tensor) -> TransferStats:
        """Send ``header`` then ``payload`` to ``dst_rank``; blocks until both are handed off.

        Handed off means written to the peer's socket under gloo (the receiver
        may still be reading) and the CUDA stream finished under NCCL.

        ``payload`` must be on :attr:`device`, have ``header.payload_numel``
        elements, a supported dtype and at most :data:`MAX_PAYLOAD_NDIM` dims.
        """
        import torch.distributed as dist

        self._check_peer(dst_rank)
        self._check_payload(header, payload)
        payload = payload.contiguous()
        wire_header = _encode_header(header, payload).to(self.device)
        with self._send_locks[dst_rank]:
            start_s = time.perf_counter()
            dist.send(wire_header, dst=dst_rank)
            if payload.numel():  # both sides skip an empty payload: the header says so
                dist.send(payload, dst=dst_rank)
            self._sync()
            seconds = time.perf_counter() - start_s
        return TransferStats(HEADER_BYTES + _num_bytes(payload), seconds)

    def recv(
        self, src_rank: int, expected_session_id: str | None = None
    ) -> tuple[KvHeader, torch.Tensor, TransferStats]:
        """Receive one transfer from ``src_rank``: its header, payload and stats.

        The payload arrives on :attr:`device` with the sender's dtype and shape.
        With ``expected_session_id`` set, a transfer for another session is
        still drained (so the pair stays in step) and then raises
        :class:`KvTransferError`. A corrupt header also raises it, but leaves the
        pair out of step (the payload size is unknown): close the group.
        """
        import torch
        import torch.distributed as dist

        self._check_peer(src_rank)
        with self._recv_locks[src_rank]:
            wire_header = torch.empty(HEADER_NUMEL, dtype=torch.int64, device=self.device)
            wait_start_s = time.perf_counter()
            dist.recv(wire_header, src=src_rank)
            header, dtype, shape = _decode_header(wire_header.cpu(), src_rank)
            start_s = time.perf_counter()
            payload = torch.empty(shape, dtype=dtype, device=self.device)
            if payload.numel():
                dist.recv(payload, src=src_rank)
            self._sync()
            seconds = time.perf_counter() - start_s
        if expected_session_id is not None and header.session_id != expected_session_id:
            raise KvTransferError(
                f"rank {self.rank} expected KV of session {expected_session_id!r} from rank "
                f"{src_rank}, received session {header.session_id!r}"
            )
        num_bytes = HEADER_BYTES + _num_bytes(payload)
        return header, payload, TransferStats(num_bytes, seconds, start_s - wait_start_s)

    def close(self) -> None:
        """Leave the process group (``destroy_process_group``); idempotent."""
        import torch.distributed as dist

        if not self._closed and dist.is_initialized():
            dist.destroy_process_group()
        self._closed = True

    def _check_peer(self, peer_rank: int) -> None:
        if self._closed:
            raise KvTransferError(f"rank {self.rank}: transport is closed")
        if not 0 <= peer_rank < self.config.world_size or peer_rank == self.rank:
            raise ConfigError(
                f"peer rank must be in 0..{self.config.world_size - 1} and not "
                f"{self.rank} (self), got {peer_rank}"
            )

    def _check_payload(self, header: KvHeader, payload: torch.Tensor) -> None:
        if payload.device != self.device:
            raise ConfigError(
                f"payload is on {payload.device}; the {self.config.backend} transport "
                f"sends from {self.device}"
            )
        if payload.numel() != header.payload_numel:
            raise ConfigError(
                f"header says payload_numel={header.payload_numel}, payload has {payload.numel()}"
            )
        if payload.dim() > MAX_PAYLOAD_NDIM:
            raise ConfigError(f"payload has {payload.dim()} dims; at most {MAX_PAYLOAD_NDIM}")
        _dtype_code(payload.dtype)

    def _sync(self) -> None:
        # NCCL ops return once enqueued; wait for the stream so timing is real.
        if self.config.backend == "nccl":
            import torch

            torch.cuda.current_stream().synchronize()


def sim_bytes_per_block(kv_bytes_per_block: int, scale_down: int = 1024) -> int:
    """Bytes of a simulated block's stand-in payload: the real KV bytes over ``scale_down``.

    At least 1 byte, so every block carries verifiable content.
    """
    if kv_bytes_per_block < 1 or scale_down < 1:
        raise ConfigError(
            f"kv_bytes_per_block and scale_down must be >= 1, got {kv_bytes_per_block}, "
            f"{scale_down}"
        )
    return max(1, kv_bytes_per_block // scale_down)


def sim_kv_payload(session_id: str, num_blocks: int, bytes_per_block: int) -> torch.Tensor:
    """A simulated session's KV: ``(num_blocks, bytes_per_block)`` uint8 on the CPU.

    Word ``w`` (bytes ``8w..8w+7``) of block ``b`` is a hash of (session id,
    ``b``, ``w``), so the content is deterministic across processes and a
    swapped, truncated or foreign block fails :func:`verify_sim_kv_payload`.
    """
    import torch

    if num_blocks < 0 or bytes_per_block < 1:
        raise ConfigError(
            f"need num_blocks >= 0 and bytes_per_block >= 1, got {num_blocks}, {bytes_per_block}"
        )
    seeds = torch.tensor([_block_seed(session_id, b) for b in range(num_blocks)], dtype=torch.int64)
    num_words = -(-bytes_per_block // 8)  # each mixed int64 word yields 8 bytes
    offsets = torch.arange(num_words, dtype=torch.int64) * _GOLDEN
    # splitmix64's finaliser; int64 arithmetic wraps, shifts are arithmetic: both deterministic.
    x = seeds[:, None] + offsets[None, :]
    x = (x ^ (x >> 30)) * _MIX1
    x = (x ^ (x >> 27)) * _MIX2
    x = x ^ (x >> 31)
    return x.view(torch.uint8)[:, :bytes_per_block].contiguous()


def verify_sim_kv_payload(session_id: str, payload: torch.Tensor, bytes_per_block: int) -> bool:
    """True when ``payload`` is exactly :func:`sim_kv_payload` of ``session_id`` (any shape)."""
    import torch

    if payload.dtype != torch.uint8 or bytes_per_block < 1:
        return False
    if payload.numel() % bytes_per_block:
        return False
    num_blocks = payload.numel() // bytes_per_block
    expected = sim_kv_payload(session_id, num_blocks, bytes_per_block)
    return torch.equal(payload.detach().cpu().reshape(num_blocks, bytes_per_block), expected)


def free_port() -> int:
    """A TCP port free on this host right now, for ``TransportConfig.master_port``.

    Call it on the rank-0 worker's node; another process may take the port
    before the group binds it, so retry rendezvous on failure.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port: int = sock.getsockname()[1]
        return port


def _block_seed(session_id: str, block_index: int) -> int:
    digest = hashlib.blake2b(f"{session_id}\0{block_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _session_id_hash(id_bytes: bytes) -> int:
    digest = hashlib.blake2b(id_bytes, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _supported_dtypes() -> tuple[torch.dtype, ...]:
    import torch

    # Append only: the index is the wire code.
    return (
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    )


def _dtype_code(dtype: torch.dtype) -> int:
    dtypes = _supported_dtypes()
    if dtype not in dtypes:
        raise ConfigError(f"payload dtype {dtype} cannot migrate; supported: {dtypes}")
    return dtypes.index(dtype)


def _num_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _encode_header(header: KvHeader, payload: torch.Tensor) -> torch.Tensor:
    import torch

    id_bytes = header.session_id.encode("utf-8")
    words = torch.zeros(HEADER_NUMEL, dtype=torch.int64)
    words[_W_MAGIC] = _MAGIC
    words[_W_ID_LEN] = len(id_bytes)
    words[_W_ID_HASH] = _session_id_hash(id_bytes)
    words[_W_TOKENS] = header.num_tokens
    words[_W_BLOCKS] = header.num_blocks
    words[_W_NUMEL] = header.payload_numel
    words[_W_DTYPE] = _dtype_code(payload.dtype)
    words[_W_NDIM] = payload.dim()
    words[_W_SHAPE : _W_SHAPE + payload.dim()] = torch.tensor(payload.shape, dtype=torch.int64)
    padded = id_bytes.ljust(MAX_SESSION_ID_BYTES, b"\0")
    words[_W_ID:] = torch.frombuffer(bytearray(padded), dtype=torch.uint8).view(torch.int64)
    return words


def _decode_header(
    words: torch.Tensor, src_rank: int
) -> tuple[KvHeader, torch.dtype, tuple[int, ...]]:
    import torch

    values = words.tolist()
    if values[_W_MAGIC] != _MAGIC:
        raise KvTransferError(f"rank {src_rank} sent a header without the KV magic word")
    id_len, ndim, code = values[_W_ID_LEN], values[_W_NDIM], values[_W_DTYPE]
    dtypes = _supported_dtypes()
    if not (0 < id_len <= MAX_SESSION_ID_BYTES and 0 <= ndim <= MAX_PAYLOAD_NDIM):
        raise KvTransferError(f"rank {src_rank} sent a corrupt header: {values[:_W_ID]}")
    if not 0 <= code < len(dtypes):
        raise KvTransferError(f"rank {src_rank} sent an unknown dtype code {code}")
    id_bytes = words[_W_ID:].contiguous().view(torch.uint8).numpy().tobytes()[:id_len]
    if _session_id_hash(id_bytes) != values[_W_ID_HASH]:
        raise KvTransferError(f"rank {src_rank} sent a header whose session id fails its hash")
    shape = tuple(values[_W_SHAPE : _W_SHAPE + ndim])
    if math.prod(shape) != values[_W_NUMEL]:
        raise KvTransferError(
            f"rank {src_rank} sent shape {shape} that disagrees with numel {values[_W_NUMEL]}"
        )
    header = KvHeader(
        session_id=id_bytes.decode("utf-8"),
        num_tokens=values[_W_TOKENS],
        num_blocks=values[_W_BLOCKS],
        payload_numel=values[_W_NUMEL],
    )
    return header, dtypes[code], shape
