"""The tool sandbox: run one agent tool call as a confined subprocess, or replay one.

A :class:`Sandbox` is one session's working directory under a root directory.
:meth:`Sandbox.run` executes a command there for real with a wall-clock timeout,
resource limits, a capped capture of its output and whatever OS-level isolation
this machine allows; :func:`replay_tool_call` replays a traced tool call as real
CPU burn in a child process followed by waiting. Pure asyncio, ``subprocess`` and
``resource``: the Ray ``ToolExecutor`` actors wrap this module.

What is enforced
================

In every mode
    * ``argv`` is checked before anything runs (:class:`SandboxError` otherwise):
      arguments (and the value after ``=`` in ``--opt=value``) that name a path
      outside the session directory are refused: absolute paths, ``..`` climbing
      out, ``~``, and symlinks inside the sandbox that resolve outside. The
      executable may be a bare name (looked up on the child's ``PATH``), a path in
      a standard bin directory, or a path inside the sandbox. This is a heuristic
      over ``argv`` only: it cannot see paths that a script or a ``sh -c`` string
      opens itself. The OS-level parts below are what actually confine those.
    * The environment is cleared except ``PATH`` (standard bin directories),
      ``HOME`` = ``TMPDIR`` = the session directory, ``LANG=C.UTF-8`` and the
      caller's ``env``; the working directory is the session directory.
    * The child gets a new session and process group. On timeout, and whenever
      the command exits, the whole group gets SIGKILL, grandchildren included.
      A descendant that calls ``setsid()``/``setpgid()`` itself leaves the group
      and is not killed; ``run`` stops waiting for its output at the deadline.
    * ``PR_SET_NO_NEW_PRIVS``: set-user-ID programs (``sudo``, ``su``) gain nothing.
    * rlimits: ``RLIMIT_CPU`` (whole seconds, rounded up; per process, so a tree
      of processes can use more in total, bounded by the wall-clock timeout),
      ``RLIMIT_AS`` (allocations beyond it fail inside the tool, which reports
      that itself, e.g. Python's ``MemoryError``; ``run`` does not guess a
      "memory-limit" from that), ``RLIMIT_FSIZE``, ``RLIMIT_CORE`` = 0.
    * Output: at most ``max_output_bytes`` per stream is kept, the rest is read
      and dropped so the child never blocks on a full pipe.

Running as root, without namespaces (``SandboxIsolation(run_as_uid=65534, ...)``)
    The child drops to uid/gid 65534 (``nobody``) with no supplementary groups; the
    session directory (mode 0700) is owned by it. It cannot write anything that
    uid 65534 cannot write, which is most of the system. **Not** enforced: writing
    world-writable directories (``/tmp``, ``/var/tmp``, ``/dev/shm``); reading any
    world-readable file; reading and writing other sessions' directories (all
    sessions share uid 65534 unless each gets its own ``run_as_uid``); signalling
    other processes of that uid; the network. ``RLIMIT_NPROC`` applies, counted
    over all processes of uid 65534 on the machine.

Running as root, with namespaces (the default where root may ``unshare``)
    Everything above, plus a private mount namespace set up before the uid drop:
    every mount is remounted read-only except the session directory (bind-mounted
    onto itself) and a private, empty ``/dev/shm`` tmpfs of ``max_file_bytes``
    (POSIX semaphores need it; it disappears with the call). ``/tmp`` is replaced
    by an empty read-only tmpfs and the sandbox root shows only this session, so
    host ``/tmp`` files and other sessions' directories are invisible. A network
    namespace with only a loopback interface cuts the network, including the Ray
    cluster's own ports (``SandboxIsolation.detect(allow_network=True)`` keeps it).
    **Not** enforced: reading world-readable files elsewhere (``/etc``, ``/usr``,
    other world-readable trees); seeing host processes in ``/proc`` (no PID
    namespace) and signalling or ptracing other processes of the same uid, which
    includes other sessions' concurrent tools when they share ``run_as_uid``; CPU
    and memory totals for the tree (no cgroups).

Not running as root
    The child runs as the caller. Only the "every mode" list applies: the tool can
    read and write whatever the caller can. ``RLIMIT_NPROC`` is not set, because it
    would count all the caller's processes, not the tool's.

The child is set up in a ``preexec_fn``, which CPython documents as unsafe when
other threads may hold locks at fork time; it only calls C-level functions of
modules imported here (no imports, no logging, no locks).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import math
import os
import re
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mars_ray.errors import ConfigError, MarsError

NOBODY_ID = 65534
"""uid and gid a root parent drops the child to by default."""

_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_STANDARD_BIN_DIRS = frozenset(
    {"/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"}
)
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_EXEC_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.ELOOP, errno.E2BIG}
)
_MIN_DRAIN_S = 0.1  # after the deadline, how long to wait for output still in the pipes

# Linux constants (<linux/sched.h>, <linux/mount.h>, <linux/prctl.h>, <linux/if.h>).
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_NOATIME = 0x400
_MS_NODIRATIME = 0x800
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MS_RELATIME = 0x200000
_MS_STRICTATIME = 0x1000000
_PRESERVED_MOUNT_FLAGS = {
    "nosuid": _MS_NOSUID,
    "nodev": _MS_NODEV,
    "noexec": _MS_NOEXEC,
    "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME,
    "relatime": _MS_RELATIME,
    "strictatime": _MS_STRICTATIME,
}
_PR_SET_NO_NEW_PRIVS = 38
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sh22x")  # struct ifreq: name, flags, rest of the union
_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")


def _is_unicode(text: str) -> bool:
    """Whether ``text`` encodes to UTF-8: JSON's ``\\ud800`` escapes decode to lone
    surrogates, which no file, pipe or exec argument can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _load_libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    return libc


# Loaded once here, never in a forked child.
_LIBC = _load_libc()


class SandboxError(MarsError, ValueError):
    """A command was refused before anything ran (escape attempt, bad argv); says why."""


class SandboxSetupError(MarsError, RuntimeError):
    """The child could not be confined as configured, so nothing ran."""


def _check_positive(owner: str, name: str, value: object, *, integer: bool) -> None:
    valid = False
    if isinstance(value, int | float) and not isinstance(value, bool):
        valid = math.isfinite(value) and value > 0 and (isinstance(value, int) or not integer)
    if not valid:
        kind = "integer" if integer else "number"
        raise ConfigError(f"{owner}.{name} must be a positive {kind}, got {value!r}")


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Per-call limits of one tool run; all must be positive (ConfigError otherwise)."""

    timeout_s: float = 30.0
    """Wall clock; then the whole process group is killed."""
    cpu_s: float = 30.0
    """RLIMIT_CPU per process, rounded up to whole seconds (SIGXCPU, then SIGKILL)."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS: address space per process."""
    max_output_bytes: int = 64 << 10
    """Kept per stream (stdout, stderr); the rest is drained and dropped."""
    max_file_bytes: int = 64 << 20
    """RLIMIT_FSIZE; also the size of the private /dev/shm with namespaces."""
    max_processes: int = 64
    """RLIMIT_NPROC when the child drops to its own uid (counted per uid)."""

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s"):
            _check_positive("SandboxLimits", name, getattr(self, name), integer=False)
        for name in ("memory_bytes", "max_output_bytes", "max_file_bytes", "max_processes"):
            _check_positive("SandboxLimits", name, getattr(self, name), integer=True)

    @property
    def cpu_limit_s(self) -> int:
        """The RLIMIT_CPU soft limit actually set: whole seconds, at least 1."""
        return max(1, math.ceil(self.cpu_s))


@dataclass(frozen=True, slots=True)
class SandboxIsolation:
    """The OS-level isolation a :class:`Sandbox` applies (see the module docstring).

    Namespaces need ``run_as_uid``: a child that stayed root could undo them.
    """

    run_as_uid: int | None = None
    """Drop the child to this uid (the parent must be root); None runs it as the caller."""
    run_as_gid: int | None = None
    mount_namespace: bool = False
    """Read-only mounts except the session directory; private /tmp and /dev/shm."""
    network_namespace: bool = False
    """No network but a private loopback interface."""

    def __post_init__(self) -> None:
        if (self.run_as_uid is None) != (self.run_as_gid is None):
            raise ConfigError("SandboxIsolation: run_as_uid and run_as_gid go together")
        if self.run_as_uid is not None and (self.run_as_uid <= 0 or (self.run_as_gid or 0) <= 0):
            raise ConfigError("SandboxIsolation: run_as_uid/run_as_gid must be unprivileged (> 0)")
        if (self.mount_namespace or self.network_namespace) and self.run_as_uid is None:
            raise ConfigError("SandboxIsolation: namespaces need run_as_uid (root could undo them)")

    @classmethod
    def detect(
        cls,
        *,
        allow_network: bool = False,
        run_as_uid: int = NOBODY_ID,
        run_as_gid: int = NOBODY_ID,
    ) -> SandboxIsolation:
        """The strongest isolation this process can apply."""
        if os.geteuid() != 0:
            return cls()
        namespaces = can_use_namespaces()
        return cls(
            run_as_uid=run_as_uid,
            run_as_gid=run_as_gid,
            mount_namespace=namespaces,
            network_namespace=namespaces and not allow_network,
        )

    def check_available(self) -> None:
        """Raise ConfigError if this process cannot apply this isolation."""
        if self.run_as_uid is not None and os.geteuid() != 0:
            raise ConfigError("SandboxIsolation: run_as_uid needs a root parent process")
        if (self.mount_namespace or self.network_namespace) and not can_use_namespaces():
            raise ConfigError("SandboxIsolation: this process cannot create namespaces")

    def describe(self) -> str:
        """One line for logs: what is enforced."""
        if self.run_as_uid is None:
            return "runs as the caller: argv checks and rlimits only"
        parts = [f"uid {self.run_as_uid}"]
        if self.mount_namespace:
            parts.append("read-only mounts except the session dir")
        parts.append("no network" if self.network_namespace else "network allowed")
        return ", ".join(parts)


@functools.cache
def can_use_namespaces() -> bool:
    """Whether this process may create mount and network namespaces (probed once)."""
    if _LIBC is None or os.geteuid() != 0:
        return False
    try:
        probe = subprocess.run(
            [sys.executable, "-I", "-S", "-c", ""],
            preexec_fn=_probe_namespaces,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


@dataclass(frozen=True, slots=True)
class ToolRunResult:
    """What one tool run did. A failing or crashing tool is a result, never an exception."""

    exit_code: int | None
    """The exit status; None if the process was killed by a signal."""
    stdout: str
    """Decoded as UTF-8 with errors replaced; at most max_output_bytes of it."""
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    killed_reason: str | None
    """One of "timeout", "cpu-limit", "file-size-limit", "signal N (NAME)"; None if it exited.

    Never "memory-limit": RLIMIT_AS makes allocations fail inside the tool, which
    then exits with its own error (e.g. Python's MemoryError, exit code 1).
    """
    wall_s: float
    cpu_s: float
    """User + system CPU of the child and the descendants it waited for (rusage)."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Sandbox:
    """One session's directory under a root; created on first use, removed by close().

    ``root_dir`` must be reachable by the uid the child runs as: with a uid drop,
    every existing ancestor needs the others-search bit (ConfigError otherwise).
    """

    def __init__(
        self,
        root_dir: Path | str,
        session_id: str,
        limits: SandboxLimits | None = None,
        *,
        isolation: SandboxIsolation | None = None,
    ) -> None:
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise SandboxError(
                f"bad session id {session_id!r}: use 1-128 of A-Z a-z 0-9 . _ -, "
                "starting with a letter or digit"
            )
        self.root_dir = Path(root_dir).resolve()
        if self.root_dir == Path(self.root_dir.anchor):
            raise ConfigError("Sandbox root_dir must not be the filesystem root")
        self.session_id = session_id
        self.limits = limits if limits is not None else SandboxLimits()
        self.isolation = isolation if isolation is not None else SandboxIsolation.detect()
        self.isolation.check_available()
        self.path = self.root_dir / session_id
        if self.isolation.run_as_uid is not None:
            _check_searchable_by_others(self.root_dir)
        self._live_group_ids: set[int] = set()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        limits: SandboxLimits | None = None,
    ) -> ToolRunResult:
        """Run ``argv`` in the sandbox and report what it did.

        Raises SandboxError, before running anything, for a refused command (see
        the module docstring); SandboxSetupError if the child could not be
        confined. An executable that cannot be started is exit code 127 (not
        found) or 126, like a shell.
        """
        limits = self.limits if limits is None else limits
        command = self._checked_argv(argv)
        if stdin is not None and not _is_unicode(stdin):
            raise SandboxError("stdin has a lone surrogate (\\ud800-\\udfff): not Unicode text")
        child_env = self._child_env(env)
        self._ensure_dir()
        started_s = time.monotonic()
        try:
            process = self._spawn(command, child_env, stdin, limits)
        except OSError as exc:
            if exc.errno not in _EXEC_ERRNOS:
                raise
            return _not_started(command[0], exc, time.monotonic() - started_s)
        return await self._supervise(process, limits, started_s)

    def close(self) -> None:
        """Kill what still runs here and remove the session directory (rm -rf)."""
        for group_id in list(self._live_group_ids):
            _kill_group(group_id)
        if self.path.is_symlink():
            self.path.unlink()
        elif self.path.exists():
            _remove_tree(self.path)

    # ------------------------------------------------------------------ argv checks

    def _checked_argv(self, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, str | bytes):
            raise SandboxError("argv must be a sequence of strings, not one string")
        command = list(argv)
        if not command:
            raise SandboxError("empty argv")
        for arg in command:
            if not isinstance(arg, str) or "\0" in arg:
                raise SandboxError(f"argv elements must be strings without NUL, got {arg!r}")
            if not _is_unicode(arg):
                raise SandboxError(f"argv element {arg!r} has a lone surrogate: not Unicode text")
        self._check_executable(command[0])
        for arg in command[1:]:
            self._check_argument(arg)
        return command

    def _check_executable(self, name: str) -> None:
        if name in ("", ".", ".."):
            raise SandboxError(f"bad executable {name!r}")
        if "/" not in name:
            return  # a bare command name, looked up on the child's PATH
        if os.path.isabs(name) and os.path.dirname(os.path.normpath(name)) in _STANDARD_BIN_DIRS:
            return
        if not self._resolves_inside(name):
            raise SandboxError(
                f"executable {name!r} is outside the sandbox and not in a standard bin directory"
            )

    def _check_argument(self, arg: str) -> None:
        candidates = [arg]
        if "=" in arg:  # --output=PATH, if=PATH
            candidates.append(arg.partition("=")[2])
        for candidate in candidates:
            if candidate.startswith("~"):
                raise SandboxError(f"argument {arg!r} names a home directory outside the sandbox")
            if not self._resolves_inside(candidate):
                raise SandboxError(f"argument {arg!r} names a path outside the sandbox")

    def _resolves_inside(self, candidate: str) -> bool:
        try:
            resolved = (self.path / candidate).resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop
            return False
        return resolved.is_relative_to(self.path)

    def _child_env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        child_env = {
            "PATH": _DEFAULT_PATH,
            "HOME": str(self.path),
            "TMPDIR": str(self.path),
            "LANG": "C.UTF-8",
        }
        for key, value in (env or {}).items():
            bad_key = not isinstance(key, str) or not key or "=" in key or "\0" in key
            if bad_key or not isinstance(value, str) or "\0" in value:
                raise SandboxError(f"bad environment variable {key!r}={value!r}")
            child_env[key] = value
        return child_env

    # ------------------------------------------------------------------ running

    def _ensure_dir(self) -> None:
        self.root_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        try:
            self.path.mkdir(mode=0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(self.path).st_mode):
                raise SandboxSetupError(f"{self.path} exists and is not a directory") from None
        uid, gid = self.isolation.run_as_uid, self.isolation.run_as_gid
        if uid is not None and gid is not None:
            os.chown(self.path, uid, gid, follow_symlinks=False)

    def _spawn(
        self, command: list[str], env: dict[str, str], stdin: str | None, limits: SandboxLimits
    ) -> subprocess.Popen[bytes]:
        setup = _ChildSetup(str(self.path), str(self.root_dir), self.isolation, limits)
        with _stdin_file(stdin) as stdin_file:
            try:
                return subprocess.Popen(
                    command,
                    stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=self.path,
                    env=env,
                    start_new_session=True,
                    preexec_fn=setup,
                    close_fds=True,
                )
            except subprocess.SubprocessError as exc:  # preexec_fn raised in the child
                raise SandboxSetupError(
                    f"could not confine the child ({self.isolation.describe()}): {exc}"
                ) from exc

    async def _supervise(
        self, process: subprocess.Popen[bytes], limits: SandboxLimits, started_s: float
    ) -> ToolRunResult:
        group_id = process.pid
        self._live_group_ids.add(group_id)
        exited = _wait4_in_thread(process)
        stdout = _CappedSink(limits.max_output_bytes)
        stderr = _CappedSink(limits.max_output_bytes)
        transports: list[asyncio.BaseTransport] = []
        timed_out = False
        try:
            loop = asyncio.get_running_loop()
            out_transport, _ = await loop.connect_read_pipe(lambda: stdout, process.stdout)
            transports.append(out_transport)
            err_transport, _ = await loop.connect_read_pipe(lambda: stderr, process.stderr)
            transports.append(err_transport)
            try:
                status, rusage = await asyncio.wait_for(asyncio.shield(exited), limits.timeout_s)
            except TimeoutError:
                timed_out = True
                _kill_group(group_id)
                status, rusage = await exited
            _kill_group(group_id)  # whatever the command left running in its group
            drain_s = max(started_s + limits.timeout_s - time.monotonic(), _MIN_DRAIN_S)
            await asyncio.wait([stdout.closed, stderr.closed], timeout=drain_s)
        except BaseException:  # cancelled: the tool must not outlive the call
            _kill_group(group_id)
            raise
        finally:
            self._live_group_ids.discard(group_id)
            for transport in transports:
                transport.close()
        return _result(status, rusage, stdout, stderr, timed_out, limits, started_s)


# ---------------------------------------------------------------------- the child


@dataclass(frozen=True, slots=True)
class _ChildSetup:
    """preexec_fn: runs in the forked child, as root if the parent is, before exec."""

    sandbox_dir: str
    root_dir: str
    isolation: SandboxIsolation
    limits: SandboxLimits

    def __call__(self) -> None:
        isolation = self.isolation
        if isolation.mount_namespace or isolation.network_namespace:
            _unshare(
                (_CLONE_NEWNS if isolation.mount_namespace else 0)
                | (_CLONE_NEWNET if isolation.network_namespace else 0)
            )
        if isolation.mount_namespace:
            _confine_mounts(self.sandbox_dir, self.root_dir, self.limits.max_file_bytes)
        if isolation.network_namespace:
            _bring_up_loopback()
        if isolation.run_as_uid is not None and isolation.run_as_gid is not None:
            os.setgroups([])
            os.setgid(isolation.run_as_gid)
            os.setuid(isolation.run_as_uid)
        os.chdir(self.sandbox_dir)  # through the new mounts, as the new uid
        _set_no_new_privs()
        _set_rlimits(self.limits, limit_processes=isolation.run_as_uid is not None)


def _confine_mounts(sandbox_dir: str, root_dir: str, shm_bytes: int) -> None:
    """Make every mount read-only except the session dir and a private /dev/shm."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates to the host
    sandbox_fd = os.open(sandbox_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        scratch_flags = _MS_NOSUID | _MS_NODEV
        _mount("tmpfs", "/tmp", "tmpfs", scratch_flags, "mode=0755,size=1m")
        writable = {sandbox_dir}
        if os.path.isdir("/dev/shm"):
            _mount("tmpfs", "/dev/shm", "tmpfs", scratch_flags, f"mode=1777,size={shm_bytes}")
            writable.add("/dev/shm")
        os.makedirs(root_dir, exist_ok=True)  # in the new /tmp if the root is under it
        _mount("tmpfs", root_dir, "tmpfs", scratch_flags, "mode=0711,size=64k")
        os.mkdir(sandbox_dir)
        _mount(f"/proc/self/fd/{sandbox_fd}", sandbox_dir, None, _MS_BIND)
    finally:
        os.close(sandbox_fd)
    _remount_read_only(except_mount_points=writable)


def _remount_read_only(except_mount_points: set[str]) -> None:
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        lines = mountinfo.read().splitlines()
    for line in lines:
        fields = line.split()
        mount_point = _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        if mount_point in except_mount_points:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in fields[5].split(","):
            flags |= _PRESERVED_MOUNT_FLAGS.get(option, 0)
        try:
            _mount(None, mount_point, None, flags)
        except OSError as exc:
            # A mount hidden under a later one cannot be reached by path, so it is
            # no way out; anything else is.
            if mount_point == "/" or exc.errno not in (errno.ENOENT, errno.EINVAL):
                raise


def _probe_namespaces() -> None:
    _unshare(_CLONE_NEWNS | _CLONE_NEWNET)
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)


def _unshare(flags: int) -> None:
    assert _LIBC is not None
    if _LIBC.unshare(flags) != 0:
        _raise_errno("unshare")


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    assert _LIBC is not None

    def encode(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    if _LIBC.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        _raise_errno(f"mount {target}")


def _set_no_new_privs() -> None:
    if _LIBC is not None and _LIBC.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _raise_errno("prctl(PR_SET_NO_NEW_PRIVS)")


def _raise_errno(what: str) -> None:
    code = ctypes.get_errno()
    raise OSError(code, f"{what}: {os.strerror(code)}")


def _bring_up_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = _IFREQ.pack(b"lo", 0)
        _, flags = _IFREQ.unpack(fcntl.ioctl(sock, _SIOCGIFFLAGS, request))
        fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def _set_rlimits(limits: SandboxLimits, *, limit_processes: bool) -> None:
    _lower_rlimit(resource.RLIMIT_CORE, 0, 0)
    _lower_rlimit(resource.RLIMIT_CPU, limits.cpu_limit_s, limits.cpu_limit_s + 1)
    _lower_rlimit(resource.RLIMIT_FSIZE, limits.max_file_bytes, limits.max_file_bytes)
    if limit_processes:
        _lower_rlimit(resource.RLIMIT_NPROC, limits.max_processes, limits.max_processes)
    # Last: the forked copy of the parent may already be larger than the limit.
    _lower_rlimit(resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes)


def _lower_rlimit(kind: int, soft: int, hard: int) -> None:
    _, current_hard = resource.getrlimit(kind)
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
        soft = min(soft, hard)
    resource.setrlimit(kind, (soft, hard))


# ---------------------------------------------------------------------- the parent


def _check_searchable_by_others(root_dir: Path) -> None:
    for directory in (root_dir, *root_dir.parents):
        try:
            mode = directory.stat().st_mode
        except FileNotFoundError:
            continue  # created later: 0711 for the root, 0755 (umask 022) above it
        if not mode & stat.S_IXOTH:
            raise ConfigError(
                f"Sandbox root_dir {root_dir}: {directory} (mode {stat.filemode(mode)}) is not "
                "searchable by the sandbox uid; choose a root under world-searchable directories"
            )


@contextlib.contextmanager
def _stdin_file(text: str | None) -> Iterator[IO[bytes] | None]:
    """A temporary file holding the child's stdin: no writer task, no pipe deadlock."""
    if text is None:
        yield None
        return
    with tempfile.TemporaryFile() as file:
        file.write(text.encode("utf-8"))
        file.seek(0)
        yield file


class _CappedSink(asyncio.Protocol):
    """Keeps the first max_bytes of a pipe, drops the rest, never stops reading."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._kept = bytearray()
        self.num_dropped_bytes = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        room = self._max_bytes - len(self._kept)
        self._kept += data[:room]
        self.num_dropped_bytes += max(0, len(data) - room)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def text(self) -> str:
        return self._kept.decode("utf-8", errors="replace")


_WaitOutcome = tuple[int | None, resource.struct_rusage | None]


def _wait4_in_thread(process: subprocess.Popen[bytes]) -> asyncio.Future[_WaitOutcome]:
    """Reap ``process`` with its rusage in a thread of its own; resolves on exit.

    A dedicated thread (as asyncio's ThreadedChildWatcher does) rather than the
    default executor, whose few threads would cap how many tools run at once.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_WaitOutcome] = loop.create_future()

    def wait() -> None:
        outcome: _WaitOutcome
        try:
            _, status, rusage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            outcome = (status, rusage)
        except ChildProcessError:  # reaped by someone else
            outcome = (None, None)
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(_set_result_unless_done, future, outcome)

    threading.Thread(target=wait, name=f"sandbox-wait-{process.pid}", daemon=True).start()
    return future


def _set_result_unless_done(future: asyncio.Future[_WaitOutcome], outcome: _WaitOutcome) -> None:
    if not future.done():
        future.set_result(outcome)


def _kill_group(group_id: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group_id, signal.SIGKILL)


def _result(
    status: int | None,
    rusage: resource.struct_rusage | None,
    stdout: _CappedSink,
    stderr: _CappedSink,
    timed_out: bool,
    limits: SandboxLimits,
    started_s: float,
) -> ToolRunResult:
    cpu_s = 0.0 if rusage is None else rusage.ru_utime + rusage.ru_stime
    exit_code: int | None = None
    killed_reason: str | None = None
    if status is not None and os.WIFEXITED(status):
        exit_code = os.WEXITSTATUS(status)
    elif status is not None and os.WIFSIGNALED(status):
        killed_reason = _killed_reason(os.WTERMSIG(status), cpu_s, timed_out, limits)
    else:
        killed_reason = "unknown: reaped elsewhere"
    return ToolRunResult(
        exit_code=exit_code,
        stdout=stdout.text(),
        stderr=stderr.text(),
        stdout_truncated=stdout.num_dropped_bytes > 0,
        stderr_truncated=stderr.num_dropped_bytes > 0,
        timed_out=timed_out,
        killed_reason=killed_reason,
        wall_s=time.monotonic() - started_s,
        cpu_s=cpu_s,
    )


def _killed_reason(signal_number: int, cpu_s: float, timed_out: bool, limits: SandboxLimits) -> str:
    if timed_out:
        return "timeout"
    if signal_number == signal.SIGXCPU or (
        signal_number == signal.SIGKILL and cpu_s >= limits.cpu_limit_s
    ):
        return "cpu-limit"  # SIGKILL: the hard limit, one second after the soft one
    if signal_number == signal.SIGXFSZ:
        return "file-size-limit"
    try:
        name = signal.Signals(signal_number).name
    except ValueError:
        return f"signal {signal_number}"
    return f"signal {signal_number} ({name})"


def _not_started(executable: str, exc: OSError, wall_s: float) -> ToolRunResult:
    exit_code = 127 if exc.errno == errno.ENOENT else 126
    return ToolRunResult(
        exit_code=exit_code,
        stdout="",
        stderr=f"sandbox: cannot execute {executable}: {os.strerror(exc.errno or 0)}\n",
        stdout_truncated=False,
        stderr_truncated=False,
        timed_out=False,
        killed_reason=None,
        wall_s=wall_s,
        cpu_s=0.0,
    )


def _remove_tree(path: Path) -> None:
    """rm -rf that also copes with directories a tool left without permissions."""
    try:
        shutil.rmtree(path)  # never follows symlinks out of the tree
    except PermissionError:
        os.chmod(path, stat.S_IRWXU)
        for dir_path, dir_names, _ in os.walk(path):  # does not follow symlinks
            for name in dir_names:
                child = os.path.join(dir_path, name)
                if not os.path.islink(child):
                    os.chmod(child, stat.S_IRWXU)
        shutil.rmtree(path)


# ---------------------------------------------------------------------- replay

_BURN_CPU_SCRIPT = (
    "import sys, time\nbudget_s = float(sys.argv[1])\nwhile time.process_time() < budget_s:\n"
    "    pass\n"
)


async def replay_tool_call(cpu_s: float, wait_s: float) -> float:
    """Replay a traced tool call: burn ``cpu_s`` of CPU time, then wait ``wait_s``.

    The burn runs in a child Python process (its own interpreter start counts
    towards ``cpu_s``), so it competes for cores for real and never blocks the
    event loop. Returns the wall seconds taken. Negative or non-finite -> SandboxError.
    """
    for name, value in (("cpu_s", cpu_s), ("wait_s", wait_s)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SandboxError(f"replay_tool_call: {name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise SandboxError(f"replay_tool_call: {name} must be >= 0 and finite, got {value!r}")
    started_s = time.monotonic()
    if cpu_s > 0:
        await _burn_cpu_in_child(cpu_s)
    if wait_s > 0:
        await asyncio.sleep(wait_s)
    return time.monotonic() - started_s


async def _burn_cpu_in_child(cpu_s: float) -> None:
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _BURN_CPU_SCRIPT, repr(float(cpu_s))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )
    exited = _wait4_in_thread(process)
    try:
        await asyncio.shield(exited)
    except BaseException:  # cancelled: stop burning
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        raise
