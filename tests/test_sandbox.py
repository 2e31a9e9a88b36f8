"""The tool sandbox: real subprocesses, small limits, real outcomes.

Which OS-level isolation applies depends on the machine (root or not, namespaces
or not); the tests that need one skip with the reason where it is missing, and
``test_what_each_isolation_mode_blocks`` records what each mode does and does not
block, gaps included.
"""

from __future__ import annotations

import asyncio
import json
import math
import mmap
import os
import resource
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mars_ray.actors.sandbox import (
    NOBODY_ID,
    Sandbox,
    SandboxError,
    SandboxIsolation,
    SandboxLimits,
    ToolRunResult,
    can_use_namespaces,
    replay_tool_call,
)
from mars_ray.errors import ConfigError

T = TypeVar("T")

IS_ROOT = os.geteuid() == 0
NEEDS_ROOT = pytest.mark.skipif(not IS_ROOT, reason="dropping to another uid needs root")
NEEDS_NAMESPACES = pytest.mark.skipif(
    not can_use_namespaces(), reason="this process cannot create mount/network namespaces"
)

SMALL = SandboxLimits(
    timeout_s=5.0,
    cpu_s=2.0,
    memory_bytes=512 << 20,
    max_output_bytes=16 << 10,
    max_file_bytes=4 << 20,
    max_processes=32,
)

# ------------------------------------------------------------------------ factories


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def sandbox_root() -> Iterator[Path]:
    # Not pytest's tmp_path: its parents are mode 0700, and a child running as
    # uid 65534 must be able to reach its directory.
    root = Path(tempfile.mkdtemp(prefix="mars-sandbox-test-"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sandbox(sandbox_root: Path) -> Iterator[Sandbox]:
    box = Sandbox(sandbox_root, "session-1", SMALL)
    yield box
    box.close()


def limits(**overrides: Any) -> SandboxLimits:
    values = {name: getattr(SMALL, name) for name in SandboxLimits.__dataclass_fields__}
    return SandboxLimits(**(values | overrides))


def python(code: str) -> list[str]:
    return ["python3", "-c", code]


def is_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a lazy init)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_until_gone(pid: int, within_s: float = 1.0) -> bool:
    deadline = time.monotonic() + within_s
    while is_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ------------------------------------------------------------------------ normal runs


@pytest.fixture(params=["caller", "uid-only", "namespaces"])
def sandbox_in_each_mode(request: pytest.FixtureRequest, sandbox_root: Path) -> Iterator[Sandbox]:
    mode = request.param
    if mode != "caller" and not IS_ROOT:
        pytest.skip("dropping to another uid needs root")
    if mode == "namespaces" and not can_use_namespaces():
        pytest.skip("this process cannot create mount/network namespaces")
    isolation = {"caller": SandboxIsolation(), "uid-only": UID_ONLY, "namespaces": NAMESPACES}
    box = Sandbox(sandbox_root, "session-1", SMALL, isolation=isolation[mode])
    yield box
    box.close()


def test_runs_a_command_and_reports_it(sandbox_in_each_mode: Sandbox) -> None:
    sandbox = sandbox_in_each_mode
    result = run(sandbox.run(python("print(1)")))
    assert result == ToolRunResult(
        exit_code=0,
        stdout="1\n",
        stderr="",
        stdout_truncated=False,
        stderr_truncated=False,
        timed_out=False,
        killed_reason=None,
        wall_s=result.wall_s,
        cpu_s=result.cpu_s,
    )
    assert result.ok
    assert 0 < result.wall_s < 2
    assert 0 < result.cpu_s < 2


def test_files_persist_between_runs_of_a_session(sandbox_in_each_mode: Sandbox) -> None:
    sandbox = sandbox_in_each_mode
    assert not sandbox.path.exists()  # created on first use
    first = run(sandbox.run(python("open('note.txt', 'w').write('kept')")))
    assert first.exit_code == 0, first.stderr
    assert (sandbox.path / "note.txt").read_text() == "kept"
    second = run(sandbox.run(["cat", "note.txt"]))
    assert (second.exit_code, second.stdout) == (0, "kept")
    inside = run(sandbox.run(["cat", str(sandbox.path / "note.txt")]))  # absolute but inside
    assert inside.stdout == "kept"


def test_stdin_cwd_and_a_cleared_environment(sandbox: Sandbox) -> None:
    echo = run(sandbox.run(python("import sys; print(sys.stdin.read().upper())"), stdin="abc"))
    assert echo.stdout == "ABC\n"
    where = run(sandbox.run(python("import os; print(os.getcwd())")))
    assert where.stdout.strip() == str(sandbox.path)
    env = run(sandbox.run(["env"], env={"TOOL_VAR": "1"}))
    variables = dict(line.split("=", 1) for line in env.stdout.splitlines())
    assert variables == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(sandbox.path),
        "TMPDIR": str(sandbox.path),
        "LANG": "C.UTF-8",
        "TOOL_VAR": "1",
    }


def test_a_failing_or_crashing_tool_is_a_result_not_an_exception(sandbox: Sandbox) -> None:
    failed = run(sandbox.run(python("import sys; sys.exit(3)")))
    assert (failed.exit_code, failed.killed_reason) == (3, None)
    crashed = run(sandbox.run(python("import os; os.abort()")))
    assert crashed.exit_code is None
    assert crashed.killed_reason == "signal 6 (SIGABRT)"
    missing = run(sandbox.run(["no-such-command-here"]))
    assert missing.exit_code == 127
    assert "no-such-command-here" in missing.stderr


def test_concurrent_runs_in_two_sessions_overlap(sandbox_root: Path) -> None:
    async def both() -> list[ToolRunResult]:
        boxes = [Sandbox(sandbox_root, name, SMALL) for name in ("a", "b")]
        code = (
            "import os, time; start = time.monotonic(); time.sleep(0.3);"
            "print(os.path.basename(os.getcwd()), start, time.monotonic())"
        )
        return list(await asyncio.gather(*(box.run(python(code)) for box in boxes)))

    (name_a, start_a, end_a), (name_b, start_b, end_b) = (r.stdout.split() for r in run(both()))
    assert (name_a, name_b) == ("a", "b")
    assert float(start_b) < float(end_a) and float(start_a) < float(end_b)  # CLOCK_MONOTONIC


# ------------------------------------------------------------------------ refusals

ESCAPES = [
    ["cat", "/etc/passwd"],
    ["cat", "../x"],
    ["cat", "sub/../../x"],
    ["cat", "~/x"],
    ["cat", "~root"],
    ["sort", "--output=/etc/x", "in.txt"],
    ["dd", "if=../other/secret"],
    ["/etc/passwd"],
    ["../bin/sh"],
    ["/opt/tool"],
    [],
    "ls -la",
    ["ls", "a\0b"],
    ["ls", 3],
]


@pytest.mark.parametrize("argv", ESCAPES, ids=repr)
def test_refuses_paths_outside_and_bad_argv(sandbox: Sandbox, argv: Any) -> None:
    with pytest.raises(SandboxError):
        run(sandbox.run(argv))


def test_a_refused_command_runs_nothing(sandbox: Sandbox) -> None:
    with pytest.raises(SandboxError, match="outside the sandbox"):
        run(sandbox.run(["sh", "-c", "touch ran", "sh", "/etc/passwd"]))
    assert not (sandbox.path / "ran").exists()


def test_refuses_symlinks_that_resolve_outside(sandbox: Sandbox) -> None:
    sandbox.path.mkdir(parents=True)
    (sandbox.path / "etc").symlink_to("/etc")
    with pytest.raises(SandboxError):
        run(sandbox.run(["ls", "etc"]))
    with pytest.raises(SandboxError):
        run(sandbox.run(["cat", "etc/passwd"]))
    # One the tool made itself, without naming the target in argv.
    made = run(sandbox.run(python("import os; os.symlink('/' + 'root', 'link')")))
    assert made.exit_code == 0, made.stderr
    with pytest.raises(SandboxError):
        run(sandbox.run(["ls", "link/"]))
    # Links that stay inside are fine.
    (sandbox.path / "note.txt").write_text("x")
    (sandbox.path / "alias").symlink_to("note.txt")
    assert run(sandbox.run(["cat", "alias"])).stdout == "x"


def test_allows_standard_bin_paths_and_bare_names(sandbox: Sandbox) -> None:
    assert run(sandbox.run(["/usr/bin/env", "true"])).exit_code == 0
    assert run(sandbox.run(["sh", "-c", "exit 0"])).exit_code == 0


def test_refuses_a_bad_environment(sandbox: Sandbox) -> None:
    for env in ({"A=B": "x"}, {"": "x"}, {"A": "x\0y"}):
        with pytest.raises(SandboxError):
            run(sandbox.run(["true"], env=env))


@pytest.mark.parametrize(
    "session_id", ["", ".", "..", "a/b", "../x", "a b", "-rf", "x" * 129, "é", 5, None]
)
def test_bad_session_ids_are_refused(sandbox_root: Path, session_id: Any) -> None:
    with pytest.raises(SandboxError):
        Sandbox(sandbox_root, session_id)


@pytest.mark.parametrize(
    "overrides",
    [
        {"timeout_s": 0},
        {"timeout_s": -1.0},
        {"timeout_s": math.nan},
        {"cpu_s": math.inf},
        {"memory_bytes": 0},
        {"memory_bytes": 1.5},
        {"max_output_bytes": True},
        {"max_file_bytes": -1},
        {"max_processes": "64"},
    ],
    ids=repr,
)
def test_bad_limits_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SandboxLimits(**overrides)


def test_bad_isolation_is_refused() -> None:
    with pytest.raises(ConfigError):
        SandboxIsolation(mount_namespace=True)  # would stay root inside
    with pytest.raises(ConfigError):
        SandboxIsolation(run_as_uid=0, run_as_gid=0)
    with pytest.raises(ConfigError):
        SandboxIsolation(run_as_uid=NOBODY_ID)


@NEEDS_ROOT
def test_a_root_dir_the_sandbox_uid_cannot_reach_is_refused() -> None:
    private = Path(tempfile.mkdtemp(prefix="mars-sandbox-private-"))  # mode 0700
    try:
        with pytest.raises(ConfigError, match="not searchable"):
            Sandbox(private / "root", "s")
    finally:
        private.rmdir()


# ------------------------------------------------------------------------ OS-level isolation

PROBE = """
import json, os, socket

def attempt(action):
    try:
        action()
        return True
    except OSError:
        return False

def write(path):
    with open(path, "w") as file:
        file.write("escaped")

def read(path):
    with open(path) as file:
        file.read()

def connect():
    socket.create_connection(("127.0.0.1", int(os.environ["HOST_PORT"])), timeout=1).close()

targets = json.loads(os.environ["TARGETS"])
print(json.dumps({
    "write_tmp": attempt(lambda: write(targets["write_tmp"])),
    "write_var_tmp": attempt(lambda: write(targets["write_var_tmp"])),
    "write_root_owned_dir": attempt(lambda: write(targets["write_root_owned_dir"])),
    "write_dev_shm": attempt(lambda: write(targets["write_dev_shm"])),
    "read_host_tmp_file": attempt(lambda: read(targets["read_host_tmp_file"])),
    "read_other_session": attempt(lambda: read(targets["read_other_session"])),
    "reach_host_port": attempt(connect),
}))
"""

UID_ONLY = SandboxIsolation(run_as_uid=NOBODY_ID, run_as_gid=NOBODY_ID)
NAMESPACES = SandboxIsolation(
    run_as_uid=NOBODY_ID, run_as_gid=NOBODY_ID, mount_namespace=True, network_namespace=True
)
# What the tool managed to do, per mode. True where the mode does NOT block it:
# these are the documented gaps, asserted so that a change in either direction shows.
CAN_DO = {
    "caller": dict.fromkeys(
        [
            "write_tmp",
            "write_var_tmp",
            "write_root_owned_dir",
            "write_dev_shm",
            "read_host_tmp_file",
            "read_other_session",
            "reach_host_port",
        ],
        True,
    ),
    "uid-only": {
        "write_tmp": True,
        "write_var_tmp": True,
        "write_root_owned_dir": False,
        "write_dev_shm": True,
        "read_host_tmp_file": True,
        "read_other_session": True,
        "reach_host_port": True,
    },
    "namespaces": {
        "write_tmp": False,
        "write_var_tmp": False,
        "write_root_owned_dir": False,
        "write_dev_shm": True,  # a private tmpfs: checked below that the host never sees it
        "read_host_tmp_file": False,
        "read_other_session": False,
        "reach_host_port": False,
    },
}
CAN_DO["namespaces-with-network"] = CAN_DO["namespaces"] | {"reach_host_port": True}
MODES = [
    pytest.param("caller", SandboxIsolation(), id="caller"),
    pytest.param("uid-only", UID_ONLY, id="uid-only", marks=NEEDS_ROOT),
    pytest.param("namespaces", NAMESPACES, id="namespaces", marks=[NEEDS_ROOT, NEEDS_NAMESPACES]),
    pytest.param(
        "namespaces-with-network",
        SandboxIsolation(run_as_uid=NOBODY_ID, run_as_gid=NOBODY_ID, mount_namespace=True),
        id="namespaces-with-network",
        marks=[NEEDS_ROOT, NEEDS_NAMESPACES],
    ),
]


@pytest.mark.parametrize(("mode", "isolation"), MODES)
def test_what_each_isolation_mode_blocks(
    sandbox_root: Path, mode: str, isolation: SandboxIsolation
) -> None:
    if not Path("/var/tmp").is_dir() or not Path("/dev/shm").is_dir():
        pytest.skip("needs /var/tmp and /dev/shm")
    tag = uuid.uuid4().hex
    root_owned = Path(tempfile.mkdtemp(prefix="mars-sandbox-outside-"))
    root_owned.chmod(0o755)
    host_file = Path(tempfile.gettempdir()) / f"mars-sandbox-visible-{tag}"
    host_file.write_text("host")
    host_file.chmod(0o644)
    targets = {
        "write_tmp": f"/tmp/mars-sandbox-escape-{tag}",
        "write_var_tmp": f"/var/tmp/mars-sandbox-escape-{tag}",
        "write_root_owned_dir": str(root_owned / "escape"),
        "write_dev_shm": f"/dev/shm/mars-sandbox-escape-{tag}",
        "read_host_tmp_file": str(host_file),
    }
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        other = Sandbox(sandbox_root, "other-session", SMALL, isolation=isolation)
        assert run(other.run(python("open('secret', 'w').write('s')"))).exit_code == 0
        targets["read_other_session"] = str(other.path / "secret")
        box = Sandbox(sandbox_root, "session-1", SMALL, isolation=isolation)
        env = {"TARGETS": json.dumps(targets), "HOST_PORT": str(listener.getsockname()[1])}
        result = run(box.run(python(PROBE), env=env))
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout) == CAN_DO[mode]
        wrote = {k: Path(targets[k]).exists() for k in targets if k.startswith("write_")}
        if mode.startswith("namespaces"):  # nothing written outside is visible to the host
            assert not any(wrote.values()), wrote
        else:
            assert wrote == {k: CAN_DO[mode][k] for k in wrote}
    finally:
        listener.close()
        for key in ("write_tmp", "write_var_tmp", "write_dev_shm"):
            Path(targets[key]).unlink(missing_ok=True)
        host_file.unlink(missing_ok=True)
        shutil.rmtree(root_owned, ignore_errors=True)


@NEEDS_ROOT
@NEEDS_NAMESPACES
def test_a_script_cannot_write_outside_with_namespaces(sandbox_root: Path) -> None:
    target = Path(f"/tmp/escape-{uuid.uuid4().hex}")
    box = Sandbox(sandbox_root, "s", SMALL, isolation=NAMESPACES)
    try:
        result = run(box.run(python(f"open('{target}', 'w')")))
        assert result.exit_code == 1
        assert "Read-only file system" in result.stderr
        assert not target.exists()
        ours = run(box.run(python("open('mine', 'w').write('ok')")))  # its own dir stays writable
        assert ours.exit_code == 0, ours.stderr
    finally:
        target.unlink(missing_ok=True)


@NEEDS_ROOT
@NEEDS_NAMESPACES
def test_every_visible_mount_is_read_only_but_the_session_dir(sandbox_root: Path) -> None:
    box = Sandbox(sandbox_root, "s", SMALL, isolation=NAMESPACES)
    result = run(box.run(python("print(open('/proc/self/mountinfo').read())")))
    top_options: dict[str, str] = {}  # a later mount at the same point hides the earlier
    for line in result.stdout.strip().splitlines():
        fields = line.split()
        top_options[fields[4]] = fields[5]
    writable = {point for point, options in top_options.items() if "rw" in options.split(",")}
    assert writable == {str(box.path), "/dev/shm"}


@NEEDS_ROOT
def test_the_child_runs_unprivileged(sandbox_root: Path) -> None:
    box = Sandbox(sandbox_root, "s", SMALL, isolation=UID_ONLY)
    result = run(box.run(["id", "-u"]))
    assert result.stdout.strip() == str(NOBODY_ID)
    code = "print([l for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0])"
    assert run(box.run(python(code))).stdout.split() == ["NoNewPrivs:", "1"]
    with pytest.raises(SandboxError):  # the same path as an argument is refused
        run(box.run(["cat", "/proc/self/status"]))


# ------------------------------------------------------------------------ limits


def test_runaway_cpu_is_killed(sandbox: Sandbox) -> None:
    result = run(sandbox.run(python("while True: pass"), limits=limits(cpu_s=1, timeout_s=3)))
    assert result.exit_code is None
    assert result.killed_reason in ("cpu-limit", "timeout")  # timeout only on a busy machine
    assert result.wall_s < 4
    if result.killed_reason == "cpu-limit":
        assert 0.9 < result.cpu_s < 2.5


def test_the_memory_limit_binds_the_tool_not_the_forked_parent(sandbox: Sandbox) -> None:
    reserved = mmap.mmap(-1, 1 << 30)  # address space only: this process is now > 1 GiB
    try:
        result = run(sandbox.run(["true"], limits=limits(memory_bytes=64 << 20)))
    finally:
        reserved.close()
    assert result.exit_code == 0, result


def test_runaway_memory_fails(sandbox_in_each_mode: Sandbox) -> None:
    sandbox = sandbox_in_each_mode
    result = run(
        sandbox.run(python("b = bytearray(2 << 30)"), limits=limits(memory_bytes=256 << 20))
    )
    assert result.exit_code == 1
    assert "MemoryError" in result.stderr


def test_huge_output_is_truncated_and_returns_quickly(sandbox: Sandbox) -> None:
    code = "import sys; sys.stdout.write('x' * 10_000_000); sys.stderr.write('e' * 10_000_000)"
    result = run(sandbox.run(python(code), limits=limits(max_output_bytes=4096)))
    assert result.exit_code == 0
    assert result.stdout == "x" * 4096 and result.stdout_truncated
    assert result.stderr == "e" * 4096 and result.stderr_truncated
    assert result.wall_s < 2


def test_endless_output_is_drained_until_the_timeout(sandbox: Sandbox) -> None:
    result = run(sandbox.run(["yes"], limits=limits(timeout_s=0.5, max_output_bytes=1000)))
    assert (result.timed_out, result.killed_reason, result.exit_code) == (True, "timeout", None)
    assert result.stdout == "y\n" * 500 and result.stdout_truncated
    assert result.wall_s < 1.5


def test_timeout_kills_the_whole_process_tree(sandbox_in_each_mode: Sandbox) -> None:
    sandbox = sandbox_in_each_mode
    script = "sleep 100 & echo $! > grandchild.pid; sleep 100"
    result = run(sandbox.run(["sh", "-c", script], limits=limits(timeout_s=0.5)))
    assert (result.timed_out, result.killed_reason, result.exit_code) == (True, "timeout", None)
    assert result.wall_s < 1.5
    assert wait_until_gone(int((sandbox.path / "grandchild.pid").read_text()))


def test_background_processes_die_when_the_command_exits(sandbox: Sandbox) -> None:
    result = run(sandbox.run(["sh", "-c", "sleep 100 & echo $! > bg.pid; echo done"]))
    assert (result.exit_code, result.stdout, result.timed_out) == (0, "done\n", False)
    assert result.wall_s < 1.5
    assert wait_until_gone(int((sandbox.path / "bg.pid").read_text()))


def test_a_cancelled_run_kills_the_tool(sandbox: Sandbox) -> None:
    async def cancel_soon() -> None:
        task = asyncio.create_task(sandbox.run(["sh", "-c", "echo $$ > tool.pid; exec sleep 100"]))
        pid_file = sandbox.path / "tool.pid"
        while not pid_file.exists() or not pid_file.read_text().strip():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_soon())
    assert wait_until_gone(int((sandbox.path / "tool.pid").read_text()))


def test_file_size_limit(sandbox_in_each_mode: Sandbox) -> None:
    sandbox = sandbox_in_each_mode
    code = "open('big', 'wb').write(b'0' * (2 << 20))"
    result = run(sandbox.run(python(code), limits=limits(max_file_bytes=1 << 20)))
    assert result.exit_code == 1
    assert "File too large" in result.stderr
    assert (sandbox.path / "big").stat().st_size <= 1 << 20


@NEEDS_ROOT
def test_process_limit_applies_to_the_dropped_uid(sandbox_root: Path) -> None:
    box = Sandbox(sandbox_root, "s", SMALL, isolation=UID_ONLY)
    script = "for i in 1 2 3 4 5 6 7 8; do sleep 0.2 & done; wait"
    result = run(box.run(["sh", "-c", script], limits=limits(max_processes=4)))
    assert "fork" in result.stderr.lower()
    assert result.exit_code != 0


def test_cpu_time_is_measured(sandbox: Sandbox) -> None:
    code = "import time\nwhile time.process_time() < 0.3: pass"
    result = run(sandbox.run(python(code)))
    assert result.exit_code == 0
    assert 0.28 < result.cpu_s < 0.8


# ------------------------------------------------------------------------ close


def test_close_removes_the_directory_and_nothing_outside(sandbox: Sandbox) -> None:
    outside = Path(tempfile.mkdtemp(prefix="mars-sandbox-keep-"))
    (outside / "keep.txt").write_text("keep")
    try:
        code = (
            "import os; os.makedirs('locked/inner'); open('locked/inner/f', 'w').close();"
            "os.chmod('locked', 0)"
        )
        assert run(sandbox.run(python(code))).exit_code == 0
        (sandbox.path / "link").symlink_to(outside)
        sandbox.close()
        assert not sandbox.path.exists()
        assert (outside / "keep.txt").read_text() == "keep"  # the link was not followed
        sandbox.close()  # idempotent
    finally:
        shutil.rmtree(outside)


# ------------------------------------------------------------------------ replay


def test_replay_burns_cpu_in_a_child_without_blocking_the_loop() -> None:
    async def replay_with_ticker() -> tuple[float, int]:
        num_ticks = 0

        async def tick() -> None:
            nonlocal num_ticks
            while True:
                await asyncio.sleep(0.01)
                num_ticks += 1

        ticker = asyncio.create_task(tick())
        wall_s = await replay_tool_call(cpu_s=0.4, wait_s=0)
        ticker.cancel()
        return wall_s, num_ticks

    self_before = time.process_time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall_s, num_ticks = run(replay_with_ticker())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert 0.38 < child_cpu_s < 0.8  # burnt by the child, as CPU time
    assert time.process_time() - self_before < 0.3  # not by this process
    assert 0.38 < wall_s < 5.0
    assert num_ticks > 10  # the event loop kept running during the burn


def test_replay_waits_after_the_burn() -> None:
    wall_s = run(replay_tool_call(cpu_s=0.05, wait_s=0.3))
    assert 0.35 <= wall_s < 3.0


def test_replay_with_nothing_to_do_is_instant() -> None:
    assert run(replay_tool_call(0, 0)) < 0.05


@pytest.mark.parametrize(("cpu_s", "wait_s"), [(-1, 0), (0, -0.1), (math.nan, 0), (0, math.inf)])
def test_replay_refuses_negative_or_non_finite(cpu_s: float, wait_s: float) -> None:
    with pytest.raises(SandboxError):
        run(replay_tool_call(cpu_s, wait_s))
