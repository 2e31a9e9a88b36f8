"""The Parquet trace format (docs/design.md §7): one row per turn.

Rows are grouped by session and ordered by turn::

    session_id     string   the session's id
    arrival_s      float64  the session's arrival, repeated on each of its rows
    turn_index     int32    0, 1, ..., n-1 within the session
    new_tokens     int32    tokens appended before the turn (the first turn's prompt)
    output_tokens  int32    tokens decoded by the turn
    tool_cpu_s     float64  CPU seconds of the tool call after the turn (0 after the last)
    tool_wait_s    float64  non-CPU seconds of that tool call (0 after the last)
    tool_name      string   optional
    tenant         string   optional, constant within a session

:func:`read_trace` validates a file with vectorised checks and reports the first
bad row (counted from 0, as pyarrow and pandas count) and its column in a one-line
:class:`TraceError`. Any integer or float width is accepted where it converts to
the schema's type without loss; strings where numbers belong are not.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mars_ray.errors import TraceError
from mars_ray.session import SessionSpec, Turn

TRACE_SCHEMA = pa.schema(
    [
        pa.field("session_id", pa.string(), nullable=False),
        pa.field("arrival_s", pa.float64(), nullable=False),
        pa.field("turn_index", pa.int32(), nullable=False),
        pa.field("new_tokens", pa.int32(), nullable=False),
        pa.field("output_tokens", pa.int32(), nullable=False),
        pa.field("tool_cpu_s", pa.float64(), nullable=False),
        pa.field("tool_wait_s", pa.float64(), nullable=False),
        pa.field("tool_name", pa.string()),
        pa.field("tenant", pa.string()),
    ]
)
REQUIRED_COLUMNS = (
    "session_id",
    "arrival_s",
    "turn_index",
    "new_tokens",
    "output_tokens",
    "tool_cpu_s",
    "tool_wait_s",
)
OPTIONAL_COLUMNS = ("tool_name", "tenant")

_INT32_MIN = int(np.iinfo(np.int32).min)
_INT32_MAX = int(np.iinfo(np.int32).max)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- writing


def write_trace(sessions: Sequence[SessionSpec], path: PathLike) -> None:
    """Write ``sessions`` (in the given order) to a Parquet trace at ``path``.

    The table is validated exactly as :func:`read_trace` would validate it, so a
    trace that was written can always be read back; no sessions, a session
    without turns or an invalid value raises :class:`TraceError` and writes nothing.
    """
    label = str(path)
    if not sessions:
        raise TraceError(f"{label}: refusing to write an empty trace (no sessions)")
    for session in sessions:
        if not session.turns:
            raise TraceError(f"{label}: session {session.session_id!r} has no turns")
    table = _sessions_to_table(sessions)
    _validate(table, label)
    pq.write_table(table, path)


def _sessions_to_table(sessions: Sequence[SessionSpec]) -> pa.Table:
    turns = [turn for session in sessions for turn in session.turns]
    repeats = [session.num_turns for session in sessions]
    columns = {
        "session_id": np.repeat([s.session_id for s in sessions], repeats).tolist(),
        "arrival_s": np.repeat(np.array([s.arrival_s for s in sessions], float), repeats),
        "turn_index": [i for session in sessions for i in range(session.num_turns)],
        "new_tokens": [t.new_tokens for t in turns],
        "output_tokens": [t.output_tokens for t in turns],
        "tool_cpu_s": [t.tool_cpu_s for t in turns],
        "tool_wait_s": [t.tool_wait_s for t in turns],
        "tool_name": [t.tool_name for t in turns],
        "tenant": [s.tenant for s in sessions for _ in range(s.num_turns)],
    }
    arrays = [pa.array(columns[field.name], type=field.type) for field in TRACE_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=TRACE_SCHEMA)


# --------------------------------------------------------------------------- reading


def read_trace(path: PathLike) -> list[SessionSpec]:
    """Read and validate a Parquet trace; return its sessions sorted by arrival (stable).

    Raises :class:`TraceError` naming the file, and for bad values the first bad
    row and its column, e.g. ``t.parquet: row 17, column 'output_tokens': must be
    >= 1, got 0``. Columns outside the schema are ignored.
    """
    label = str(path)
    table = _read_table(path, label)
    columns = _validate(table, label)
    sessions = _to_sessions(columns)
    sessions.sort(key=lambda session: session.arrival_s)
    return sessions


def _read_table(path: PathLike, label: str) -> pa.Table:
    if not Path(path).exists():
        raise TraceError(f"{label}: no such file")
    if not Path(path).is_file():
        raise TraceError(f"{label}: not a file")
    try:
        parquet = pq.ParquetFile(path)
        present = set(parquet.schema_arrow.names)
        wanted = [name for name in TRACE_SCHEMA.names if name in present]
        table = parquet.read(columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TraceError(f"{label}: not a readable Parquet file ({reason})") from None
    if table.num_rows == 0:
        raise TraceError(f"{label}: the trace is empty (no rows)")
    return table


class _Columns(NamedTuple):
    """A trace as flat arrays, one entry per row."""

    session_ids: pa.Array  # string, no nulls
    session_codes: IntArray  # one integer per distinct session id
    arrival_s: FloatArray
    turn_index: IntArray
    new_tokens: IntArray
    output_tokens: IntArray
    tool_cpu_s: FloatArray
    tool_wait_s: FloatArray
    tool_names: pa.Array | None
    tenants: pa.Array | None

    def session_starts(self) -> BoolArray:
        """True on the first row of each run of rows with one session id."""
        codes = self.session_codes
        starts = np.ones(len(codes), dtype=bool)
        starts[1:] = codes[1:] != codes[:-1]
        return starts


class _Violation(NamedTuple):
    row: int
    column: str
    message: str


class _Findings:
    """Keeps the violation with the lowest row (the first one flagged on a tie)."""

    def __init__(self) -> None:
        self.first: _Violation | None = None

    def flag(self, mask: BoolArray, column: str, describe: Callable[[int], str]) -> None:
        """Record the first True row of ``mask`` unless an earlier row is already bad."""
        if not mask.any():
            return
        row = int(np.argmax(mask))
        if self.first is None or row < self.first.row:
            self.first = _Violation(row, column, describe(row))

    def raise_first(self, label: str) -> None:
        if self.first is not None:
            row, column, message = self.first
            raise TraceError(f"{label}: row {row}, column {column!r}: {message}")


def _validate(table: pa.Table, label: str) -> _Columns:
    """Check ``table`` against the schema; raise the first violation as a TraceError.

    Values are checked before the relations between rows (grouping, turn order,
    per-session constants): a bad session id would otherwise show up as a
    misleading relation error on an earlier row.
    """
    _check_columns_present(table, label)
    found = _Findings()
    columns = _decode_columns(table, label, found)
    _check_min(found, "turn_index", columns.turn_index, 0)
    _check_min(found, "new_tokens", columns.new_tokens, 0)
    _check_min(found, "output_tokens", columns.output_tokens, 1)
    found.raise_first(label)
    _check_relations(found, columns)
    found.raise_first(label)
    return columns


def _decode_columns(table: pa.Table, label: str, found: _Findings) -> _Columns:
    session_ids, codes = _session_column(table, label, found)
    return _Columns(
        session_ids,
        codes,
        _float_column(table, "arrival_s", label, found),
        _int_column(table, "turn_index", label, found),
        _int_column(table, "new_tokens", label, found),
        _int_column(table, "output_tokens", label, found),
        _float_column(table, "tool_cpu_s", label, found),
        _float_column(table, "tool_wait_s", label, found),
        _optional_string_column(table, "tool_name", label),
        _optional_string_column(table, "tenant", label),
    )


def _check_relations(found: _Findings, columns: _Columns) -> None:
    starts = columns.session_starts()
    ends = np.ones(len(starts), dtype=bool)
    ends[:-1] = starts[1:]
    new_tokens = columns.new_tokens
    found.flag(
        starts & (new_tokens < 1),
        "new_tokens",
        lambda r: f"must be >= 1 on a session's first turn, got {new_tokens[r]}",
    )
    _check_grouped(found, columns.session_codes, starts, columns.session_ids)
    _check_turn_order(found, columns.turn_index, starts)
    _check_constant(found, "arrival_s", columns.arrival_s, starts)
    if columns.tenants is not None:
        _check_constant(found, "tenant", _null_aware_codes(columns.tenants), starts)
    for name, values in (("tool_cpu_s", columns.tool_cpu_s), ("tool_wait_s", columns.tool_wait_s)):
        _check_no_tool_after_last_turn(found, name, values, ends, columns.session_ids)


def _check_columns_present(table: pa.Table, label: str) -> None:
    for name in REQUIRED_COLUMNS:
        if name not in table.column_names:
            required = ", ".join(REQUIRED_COLUMNS)
            raise TraceError(f"{label}: missing column {name!r} (required: {required})")


def _type_error(label: str, column: str, expected: str, got: pa.DataType) -> TraceError:
    return TraceError(f"{label}: column {column!r} must be {expected}, got {got}")


# --------------------------------------------------------------------------- decoding


def _null_mask(array: pa.Array) -> BoolArray:
    return np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _string_array(table: pa.Table, column: str, label: str) -> pa.Array:
    """The column as one ``string`` array (dictionary and large strings accepted)."""
    chunked = table.column(column)
    value_type = chunked.type
    if pa.types.is_dictionary(value_type):
        value_type = value_type.value_type
    is_text = pa.types.is_string(value_type) or pa.types.is_large_string(value_type)
    if not (is_text or pa.types.is_null(value_type)):
        raise _type_error(label, column, "a string", chunked.type)
    return pc.cast(chunked, pa.string()).combine_chunks()


def _session_column(
    table: pa.Table, label: str, found: _Findings
) -> tuple[pa.Array, npt.NDArray[np.int64]]:
    """Session ids (nulls flagged and blanked) and an integer code per distinct id."""
    ids = _string_array(table, "session_id", label)
    found.flag(_null_mask(ids), "session_id", lambda r: "missing value (null)")
    ids = pc.fill_null(ids, "")
    empty = np.asarray(pc.equal(ids, "").to_numpy(zero_copy_only=False), dtype=bool)
    found.flag(empty, "session_id", lambda r: "must not be empty")
    codes = pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False)
    return ids, codes.astype(np.int64)


def _numeric_array(table: pa.Table, column: str, label: str, expected: str) -> pa.Array:
    array = table.column(column).combine_chunks()
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        raise _type_error(label, column, expected, array.type)
    return array


def _float_column(table: pa.Table, column: str, label: str, found: _Findings) -> FloatArray:
    """A finite, non-negative float64 column (integers accepted)."""
    array = _numeric_array(table, column, label, "a number (float64)")
    found.flag(_null_mask(array), column, lambda r: "missing value (null)")
    raw = array.fill_null(0).to_numpy(zero_copy_only=False)
    values = np.asarray(raw, dtype=np.float64)
    found.flag(np.isnan(values), column, lambda r: "must not be NaN")
    found.flag(np.isinf(values), column, lambda r: f"must be finite, got {values[r]}")
    found.flag(values < 0, column, lambda r: f"must be >= 0, got {values[r]}")
    return values


def _int_column(table: pa.Table, column: str, label: str, found: _Findings) -> IntArray:
    """An int32 column; wider integers and whole-valued floats are accepted if they fit."""
    array = _numeric_array(table, column, label, "an integer (int32)")
    found.flag(_null_mask(array), column, lambda r: "missing value (null)")
    raw = np.asarray(array.fill_null(0).to_numpy(zero_copy_only=False))
    bad = np.zeros(len(raw), dtype=bool)
    if raw.dtype.kind == "f":
        whole = np.isfinite(raw) & (raw == np.round(raw))
        found.flag(np.isnan(raw), column, lambda r: "must not be NaN")
        found.flag(~whole, column, lambda r: f"must be a whole number, got {raw[r]}")
        bad |= ~whole
    out_of_range = ~bad & ((raw < _INT32_MIN) | (raw > _INT32_MAX))
    found.flag(out_of_range, column, lambda r: f"does not fit in int32, got {raw[r]}")
    bad |= out_of_range
    return np.where(bad, 0, raw).astype(np.int64)


def _optional_string_column(table: pa.Table, column: str, label: str) -> pa.Array | None:
    if column not in table.column_names:
        return None
    return _string_array(table, column, label)


def _null_aware_codes(array: pa.Array) -> FloatArray:
    """An integer code per distinct value, with -1 for null, as float for comparison."""
    codes = pc.fill_null(pc.dictionary_encode(array).indices, -1)
    return np.asarray(codes.to_numpy(zero_copy_only=False), dtype=np.float64)


# --------------------------------------------------------------------------- row checks


def _check_min(found: _Findings, column: str, values: IntArray, minimum: int) -> None:
    found.flag(values < minimum, column, lambda r: f"must be >= {minimum}, got {values[r]}")


def _check_grouped(
    found: _Findings, codes: IntArray, starts: BoolArray, session_ids: pa.Array
) -> None:
    """Each session's rows are contiguous: no session id starts two runs of rows."""
    start_rows = np.flatnonzero(starts)
    _, first_runs = np.unique(codes[start_rows], return_index=True)
    repeated = np.ones(len(start_rows), dtype=bool)
    repeated[first_runs] = False
    mask = np.zeros(len(codes), dtype=bool)
    mask[start_rows[repeated]] = True
    found.flag(
        mask,
        "session_id",
        lambda r: (
            f"session {session_ids[r].as_py()!r} reappears after other sessions;"
            " rows must be grouped by session"
        ),
    )


def _check_turn_order(found: _Findings, turn_index: IntArray, starts: BoolArray) -> None:
    """turn_index counts 0, 1, ..., n-1 down each session's rows."""
    start_rows = np.flatnonzero(starts)
    session_of_row = np.cumsum(starts) - 1
    expected = np.arange(len(turn_index)) - start_rows[session_of_row]
    found.flag(
        turn_index != expected,
        "turn_index",
        lambda r: f"expected {expected[r]} (turns count 0..n-1 in order), got {turn_index[r]}",
    )


def _check_constant(found: _Findings, column: str, values: FloatArray, starts: BoolArray) -> None:
    """``values`` repeat the session's first row on every row of the session."""
    first_row = np.flatnonzero(starts)[np.cumsum(starts) - 1]
    found.flag(
        values != values[first_row],
        column,
        lambda r: f"differs within a session (row {first_row[r]} has another value)",
    )


def _check_no_tool_after_last_turn(
    found: _Findings, column: str, values: FloatArray, ends: BoolArray, session_ids: pa.Array
) -> None:
    found.flag(
        ends & (values != 0),
        column,
        lambda r: (
            f"must be 0 after the last turn of session {session_ids[r].as_py()!r}, got {values[r]}"
        ),
    )


# --------------------------------------------------------------------------- building


@contextmanager
def _gc_paused() -> Iterator[None]:
    # Allocating a million small acyclic objects (one Turn per row) triggers the
    # cyclic collector over and over; pausing it while building halves read time.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _to_sessions(columns: _Columns) -> list[SessionSpec]:
    """Turn validated rows into sessions, in row order."""
    num_rows = len(columns.arrival_s)
    start_rows = np.flatnonzero(columns.session_starts())
    stop_rows = np.append(start_rows[1:], num_rows).tolist()
    tool_names = repeat(None) if columns.tool_names is None else columns.tool_names.to_pylist()
    take = pa.array(start_rows)
    session_ids = columns.session_ids.take(take).to_pylist()
    tenants = repeat(None) if columns.tenants is None else columns.tenants.take(take).to_pylist()
    arrivals_s = columns.arrival_s[start_rows].tolist()
    with _gc_paused():
        turns = list(
            map(
                Turn,
                columns.new_tokens.tolist(),
                columns.output_tokens.tolist(),
                columns.tool_cpu_s.tolist(),
                columns.tool_wait_s.tolist(),
                tool_names,
            )
        )
        return [
            SessionSpec(session_id, arrival_s, tuple(turns[start:stop]), tenant)
            for session_id, arrival_s, start, stop, tenant in zip(
                session_ids, arrivals_s, start_rows.tolist(), stop_rows, tenants, strict=False
            )
        ]
