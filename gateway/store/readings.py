"""Readings and the per-device dedup state that makes ingest exactly-once.

A BURST with header id M and n readings carries reading ids M..M+n-1. Per device the
gateway keeps a high-water mark (every id <= hwm is committed) and the committed ranges
above it (gaps come from readings a node dropped or sent out of order). Both are stored
in the same transaction as the readings, so after a crash an id is either committed and
known as such, or neither: a resent burst is then stored exactly once.

Readings are stored as *runs*: one row per run of consecutive ids of one device committed
together (a whole burst, normally), its timestamps and values packed column by column in
one blob. A row per reading cost one SQLite row insert per reading, which alone capped
ingest near 3,000 bursts/s. `iter_readings` reads them back one reading at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sqlite3
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from typing import Any

from gateway import proto
from gateway.store import db

log = logging.getLogger(__name__)

STORE = "readings"
MAX_SELECTIVE = proto.ACK_SELECTIVE_MAX  # the ACK frame's bound
# Reading ids are the frame header's u32 message ids. Id 0 is no reading's (a node's
# first id is 1, and a fresh device's hwm of 0 means "nothing committed"), and ids do not
# wrap: a BURST whose ids would run past ID_MAX is refused whole (gateway.pipeline.ingest answers
# ERROR malformed and dead-letters it). At one reading a second a node takes 136 years to
# get there; wrapping would make every comparison of the dedup state modular for a case
# no real node meets, while refusing keeps every stored id and every ACK field in u32.
ID_MAX = proto.MSG_ID_MAX
# Ranges kept above the hwm per device. Past it the oldest gap is given up (the node
# dropped those readings long ago); the cost is one warning, never a duplicate.
MAX_RANGES = 256

# `layout` holds one struct code per column (the time, then each value); `data` holds the
# `count` little-endian items of each column in turn: all times, then all v0, then v1...
_CREATE_RUNS = """
    CREATE TABLE reading_runs (
        device TEXT NOT NULL,
        msg_id INTEGER NOT NULL,
        count INTEGER NOT NULL,
        ts INTEGER NOT NULL,
        schema INTEGER NOT NULL,
        layout TEXT NOT NULL,
        data BLOB NOT NULL
    )
"""
_INSERT_RUN = ("INSERT INTO reading_runs(device, msg_id, count, ts, schema, layout, data) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)")
_SAVE_STATE = (
    "INSERT INTO dedup(device, hwm, ranges, total, last_commit) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(device) DO UPDATE SET hwm=excluded.hwm, ranges=excluded.ranges, "
    "total=excluded.total, last_commit=excluded.last_commit"
)


def migrate(conn: sqlite3.Connection) -> None:
    db.apply(conn, STORE, _STEPS)


def layout(schema: int, width: int) -> str:
    """The column codes of a schema's runs: the time (u32) and the spec's value types;
    64-bit values for a schema this gateway does not know (old rows only)."""
    info = proto.RECORD_FORMATS.get(schema)
    if info is not None and len(info) == width + 2:  # "<" + time + values
        return info[1:]
    return "I" + "q" * width


@lru_cache(maxsize=256)
def _packer(codes: str, n: int) -> struct.Struct:
    return struct.Struct("<" + "".join(f"{n}{c}" for c in codes))


def pack(codes: str, timestamps: Sequence[int], columns: Sequence[Sequence[int]]) -> bytes:
    """One run's `data`: the timestamps, then each column."""
    return _packer(codes, len(timestamps)).pack(*timestamps, *chain.from_iterable(columns))


def unpack(codes: str, count: int, data: bytes) -> list[tuple[int, ...]]:
    """A run's `data` as its columns: [timestamps, v0, v1, ...]."""
    flat = _packer(codes, count).unpack(data)
    return [flat[i * count:(i + 1) * count] for i in range(len(codes))]


def _to_runs(conn: sqlite3.Connection) -> None:
    """Migration to v2: the rows of `readings` become runs of consecutive ids."""
    conn.execute(_CREATE_RUNS)
    cols = ", ".join(f"v{i}" for i in range(_V1_VALUES))
    rows = conn.execute(
        f"SELECT device, msg_id, ts, schema, {cols} FROM readings ORDER BY device, msg_id")
    out: list[tuple[object, ...]] = []
    run: list[tuple[int, ...]] = []

    def flush() -> None:
        if run:
            device, schema = str(run[0][0]), int(run[0][3])
            width = sum(1 for v in run[0][4:] if v is not None)
            codes = layout(schema, width)
            columns = [[r[4 + i] for r in run] for i in range(width)]
            out.append((device, run[0][1], len(run), run[0][2], schema, codes,
                        pack(codes, [r[2] for r in run], columns)))
            run.clear()

    for row in rows:
        if run and not (row[0] == run[-1][0] and row[1] == run[-1][1] + 1
                        and row[3] == run[-1][3]):
            flush()
        run.append(row)
        if len(run) >= 255:
            flush()
        if len(out) >= 1000:
            conn.executemany(_INSERT_RUN, out)
            out.clear()
    flush()
    conn.executemany(_INSERT_RUN, out)
    conn.execute("DROP TABLE readings")
    conn.execute("CREATE INDEX reading_runs_device ON reading_runs(device, msg_id)")


_V1_VALUES = 8  # v1's value columns v0..v7
_STEPS = (
    f"""
    CREATE TABLE readings (
        device TEXT NOT NULL,
        msg_id INTEGER NOT NULL,
        ts INTEGER NOT NULL,
        schema INTEGER NOT NULL,
        {", ".join(f"v{i} INTEGER" for i in range(_V1_VALUES))}
    );
    CREATE TABLE dedup (
        device TEXT PRIMARY KEY,
        hwm INTEGER NOT NULL,
        ranges TEXT NOT NULL DEFAULT '',
        total INTEGER NOT NULL DEFAULT 0,
        last_commit REAL
    ) WITHOUT ROWID;
    """,
    # v2: runs instead of a row per reading (see the module's docstring).
    _to_runs,
    # v3: dedup states stored by gateways that let ids run past u32 are cut back to it.
    lambda conn: _repair_states(conn),
)


class IdRangeError(ValueError):
    """A BURST's reading ids are not all valid u32 reading ids (see ID_MAX)."""


def burst_problem(msg_id: int, count: int) -> str:
    """Why a BURST with header id `msg_id` and `count` readings cannot be stored ("" when
    it can): its ids must lie in 1..ID_MAX."""
    if msg_id < 1:
        return f"message id {msg_id} is not a reading id (reading ids start at 1)"
    if msg_id + count - 1 > ID_MAX:
        # Short enough for an ERROR frame's detail.
        return f"ids {msg_id}..{msg_id + count - 1} pass {ID_MAX} (ids do not wrap)"
    return ""


def _repair_states(conn: sqlite3.Connection) -> None:
    rows = conn.execute("SELECT device, hwm, ranges, total FROM dedup").fetchall()
    for device, hwm, ranges, total in rows:
        st, repaired = DedupState.from_row(hwm, ranges, total)
        if repaired:
            log.warning("%s: stored dedup state %s / %r cut back to reading ids 1..%d",
                        device, hwm, ranges, ID_MAX, extra={"device_id": device})
            conn.execute("UPDATE dedup SET hwm=?, ranges=?, total=? WHERE device=?",
                         (st.hwm, st.encode_ranges(), st.total, device))


@dataclass(slots=True)
class DedupState:
    """Committed reading ids of one device: all ids <= hwm, plus `ranges` (sorted,
    disjoint, inclusive, every lo > hwm + 1)."""

    hwm: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)
    total: int = 0

    def copy(self) -> DedupState:
        return DedupState(self.hwm, list(self.ranges), self.total)

    def contains(self, i: int) -> bool:
        if i <= self.hwm:
            return True
        return any(lo <= i <= hi for lo, hi in self.ranges)

    def new_spans(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of [lo, hi] not yet committed."""
        if lo <= self.hwm:
            lo = self.hwm + 1
        out: list[tuple[int, int]] = []
        for rlo, rhi in self.ranges:
            if lo > hi:
                break
            if rhi < lo:
                continue
            if rlo > hi:
                break
            if rlo > lo:
                out.append((lo, rlo - 1))
            lo = rhi + 1
        if lo <= hi:
            out.append((lo, hi))
        return out

    def add(self, lo: int, hi: int) -> None:
        """Mark [lo, hi] (not yet committed) as committed."""
        self.total += hi - lo + 1
        rs = self.ranges
        rs.append((lo, hi))
        rs.sort()
        merged: list[tuple[int, int]] = []
        for r in rs:
            if merged and r[0] <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], r[1]))
            else:
                merged.append(r)
        while merged and merged[0][0] <= self.hwm + 1:
            self.hwm = max(self.hwm, merged.pop(0)[1])
        while len(merged) > MAX_RANGES:
            glo, ghi = merged.pop(0)
            log.warning("giving up the gap %d..%d below committed ids (too many gaps)",
                        self.hwm + 1, glo - 1)
            self.hwm = ghi
        self.ranges = merged

    def give_up_below(self, first_id: int) -> int:
        """The node holds no reading below `first_id` any more (acknowledged or dropped by
        its overflow policy): stop waiting for the gaps there. Returns the ids given up."""
        if first_id - 1 <= self.hwm:
            return 0
        lost = first_id - 1 - self.hwm - sum(
            min(hi, first_id - 1) - lo + 1 for lo, hi in self.ranges if lo < first_id)
        self.hwm = first_id - 1
        rest = [(lo, hi) for lo, hi in self.ranges if hi > self.hwm]
        while rest and rest[0][0] <= self.hwm + 1:
            self.hwm = max(self.hwm, rest.pop(0)[1])
        self.ranges = rest
        return lost

    def selective(self, prefer: Sequence[tuple[int, int]] = ()) -> tuple[int, ...]:
        """Up to 64 committed ids above the hwm, those in `prefer` (ranges) first."""
        out: list[int] = []
        seen: set[int] = set()
        for lo, hi in list(prefer) + self.ranges:
            for i in range(max(lo, self.hwm + 1), hi + 1):
                if len(out) >= MAX_SELECTIVE:
                    return tuple(sorted(out))
                if i not in seen:
                    seen.add(i)
                    out.append(i)
        return tuple(sorted(out))

    def encode_ranges(self) -> str:
        return ",".join(f"{lo}-{hi}" for lo, hi in self.ranges)

    @staticmethod
    def decode_ranges(text: str) -> list[tuple[int, int]]:
        """The stored ranges; parts that are not `lo-hi` integers are left out (see
        from_row, which also checks them)."""
        out = []
        for part in filter(None, str(text).split(",")):
            lo, _, hi = part.partition("-")
            try:
                out.append((int(lo), int(hi)))
            except ValueError:
                continue
        return out

    @classmethod
    def from_row(cls, hwm: object, ranges: object, total: object) -> tuple[DedupState, bool]:
        """A state from a stored row, made valid: ids within 0..ID_MAX, ranges sorted,
        disjoint, inclusive and above hwm + 1. Also True when the row needed repair (a
        gateway that let ids pass u32 stored such states)."""
        try:
            h = int(hwm)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            h = 0
        try:
            t = max(0, int(total))  # type: ignore[call-overload]
        except (TypeError, ValueError):
            t = 0
        text = "" if ranges is None else str(ranges)
        parsed = cls.decode_ranges(text)
        st = cls(min(max(h, 0), ID_MAX), [], t)
        clean = sorted((max(lo, 0), min(hi, ID_MAX)) for lo, hi in parsed
                       if lo <= hi and lo <= ID_MAX and hi >= 0)
        merged: list[tuple[int, int]] = []
        for lo, hi in clean:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        while merged and merged[0][0] <= st.hwm + 1:
            st.hwm = max(st.hwm, merged.pop(0)[1])
        st.ranges = merged[-MAX_RANGES:] if len(merged) > MAX_RANGES else merged
        if len(merged) > MAX_RANGES:
            st.hwm = max(st.hwm, merged[-MAX_RANGES - 1][1])
        repaired = (st.hwm != h or st.total != total or st.encode_ranges() != text)
        return st, repaired


@dataclass(frozen=True, slots=True)
class AckState:
    """What to acknowledge for one burst: ACK(cumulative, selective)."""

    device: str
    msg_id: int
    cumulative: int
    selective: tuple[int, ...]
    stored: int  # readings of this burst stored now (0: a duplicate)


@dataclass(frozen=True, slots=True)
class Committed:
    """One run of consecutive readings stored in this transaction (for the upstream
    outbox): a whole burst, or each new part of a burst that was partly stored before."""

    device: str
    msg_id: int  # the run's first id; the others follow consecutively
    schema: int
    series: proto.Series


def _loaded(device: str, hwm: object, ranges: object, total: object) -> DedupState:
    st, repaired = DedupState.from_row(hwm, ranges, total)
    if repaired:
        log.warning("%s: stored dedup state %r / %r is not valid; using %d / %r",
                    device, hwm, ranges, st.hwm, st.encode_ranges(), extra={"device_id": device})
    return st


def load_states(conn: sqlite3.Connection, *, repair: bool = False) -> dict[str, DedupState]:
    """Every device's dedup state, made valid (see DedupState.from_row). With `repair`,
    the rows that needed it are written back valid (in a transaction of their own)."""
    states = {}
    bad = []
    for dev, hwm, ranges, total in conn.execute("SELECT device, hwm, ranges, total FROM dedup"):
        st, repaired = DedupState.from_row(hwm, ranges, total)
        if repaired:
            log.warning("%s: stored dedup state %r / %r is not valid; using %d / %r",
                        dev, hwm, ranges, st.hwm, st.encode_ranges(), extra={"device_id": dev})
            bad.append((st.hwm, st.encode_ranges(), st.total, dev))
        states[dev] = st
    if repair and bad:
        with db.atomic(conn):
            conn.executemany("UPDATE dedup SET hwm=?, ranges=?, total=? WHERE device=?", bad)
    return states


def load_state(conn: sqlite3.Connection, device: str) -> DedupState:
    row = conn.execute("SELECT hwm, ranges, total FROM dedup WHERE device=?", (device,)).fetchone()
    if row is None:
        return DedupState()
    return _loaded(device, *row)


def _runs(device: str, burst: proto.Burst, spans: list[tuple[int, int]]) -> list[Committed]:
    series = burst.readings
    first = burst.msg_id
    if len(spans) == 1 and spans[0] == (first, first + len(series) - 1):
        return [Committed(device, first, burst.schema, series)]
    out = []
    for lo, hi in spans:
        a, b = lo - first, hi - first + 1
        out.append(Committed(device, lo, burst.schema, proto.Series(
            series.timestamps[a:b], tuple(c[a:b] for c in series.columns))))
    return out


@dataclass(slots=True)
class CommitResult:
    """commit_bursts' answer: one AckState per burst, what was stored, and the new dedup
    states to publish into the caller's cache once the transaction has committed."""

    acks: list[AckState]
    committed: list[Committed]
    _cache: dict[str, DedupState]
    _new: dict[str, DedupState]

    def apply(self) -> None:
        self._cache.update(self._new)
        self._new = {}

    def state(self, device: str) -> DedupState | None:
        """The device's dedup state as this result leaves it (before or after apply)."""
        return self._new.get(device) or self._cache.get(device)


def commit_bursts(
    conn: sqlite3.Connection,
    batch: Iterable[tuple[str, proto.Burst]],
    states: dict[str, DedupState] | None = None,
    *,
    now: float = 0.0,
    in_transaction: bool = False,
    low_water: Iterable[tuple[str, int]] = (),
) -> CommitResult:
    """Store the new readings of `batch` (device, burst) and the dedup state; drop the
    readings already committed.

    `states` is the caller's cache (filled from the table on demand). With
    `in_transaction` the caller has opened the transaction (to add its own writes, e.g.
    the upstream outbox) and must call `result.apply()` after its COMMIT; otherwise this
    function commits and applies."""
    if states is None:
        states = {}
    work: dict[str, DedupState] = {}
    acks: list[AckState] = []
    committed: list[Committed] = []

    def state(device: str) -> DedupState:
        st = work.get(device)
        if st is None:
            base = states.get(device)
            if base is None:
                base = load_state(conn, device)
                states[device] = base
            st = work[device] = base.copy()
        return st

    dirty: set[str] = set()
    for device, first_id in low_water:
        if first_id - 1 > state(device).hwm:
            dirty.add(device)
            lost = work[device].give_up_below(first_id)
            log.info("%s: the node no longer holds ids below %d; %d never arrived",
                     device, first_id, lost, extra={"device_id": device})
    for device, burst in batch:
        n = len(burst.readings)
        problem = burst_problem(burst.msg_id, n)
        if problem:  # the caller checks first (gateway.pipeline.ingest); nothing past u32 is stored
            raise IdRangeError(f"{device}: {problem}")
        st = state(device)
        lo, hi = burst.msg_id, burst.msg_id + n - 1
        spans = st.new_spans(lo, hi)
        stored = 0
        if spans:
            runs = _runs(device, burst, spans)
            stored = sum(len(r.series) for r in runs)
            committed.extend(runs)
            for s_lo, s_hi in spans:
                st.add(s_lo, s_hi)
            dirty.add(device)
        acks.append(AckState(device, burst.msg_id, st.hwm, st.selective([(lo, hi)]), stored))
    result = CommitResult(acks, committed, states, work)
    if not dirty:
        return result

    def write() -> None:
        rows = []
        for c in committed:
            series = c.series
            codes = layout(c.schema, len(series.columns))
            rows.append((c.device, c.msg_id, len(series), series.timestamps[0], c.schema, codes,
                         pack(codes, series.timestamps, series.columns)))
        conn.executemany(_INSERT_RUN, rows)
        conn.executemany(
            _SAVE_STATE,
            [(d, s.hwm, s.encode_ranges(), s.total, now) for d, s in work.items() if d in dirty],
        )

    if in_transaction:
        write()
    else:
        with db.transaction(conn):
            write()
        result.apply()
    return result


def to_gateway_clock(batch: Sequence[tuple[str, proto.Burst]],
                     offsets: dict[str, float]) -> list[tuple[str, proto.Burst]]:
    """The bursts of `batch`, with those stamped on a node's unset clock (node_clock)
    moved to gateway time by that node's offset (receipt minus node time of its HELLO).
    A burst whose device has no offset yet keeps its stamps (and a warning)."""
    out: list[tuple[str, proto.Burst]] = []
    for device, burst in batch:
        if burst.node_clock:
            off = offsets.get(device)
            if off is None:
                log.warning("%s: burst %d stamped on the node's unset clock and no HELLO time "
                            "to correct it", device, burst.msg_id, extra={"device_id": device})
            else:
                shift = round(off)
                series = proto.Series(
                    tuple(max(0, min(0xFFFFFFFF, t + shift)) for t in burst.readings.timestamps),
                    burst.readings.columns)
                burst = dataclasses.replace(burst, readings=series, node_clock=False)
        out.append((device, burst))
    return out


def stats(conn: sqlite3.Connection, device: str) -> tuple[int, int, int]:
    """(hwm, committed ids above it, readings stored) of a device."""
    st = load_state(conn, device)
    return st.hwm, sum(hi - lo + 1 for lo, hi in st.ranges), st.total


def total(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(sum(total), 0) FROM dedup").fetchone()[0])


def count_rows(conn: sqlite3.Connection, device: str | None = None) -> int:
    """Readings stored (counted in the runs, not taken from the dedup totals)."""
    if device is None:
        row = conn.execute("SELECT coalesce(sum(count), 0) FROM reading_runs").fetchone()
    else:
        row = conn.execute("SELECT coalesce(sum(count), 0) FROM reading_runs WHERE device=?",
                           (device,)).fetchone()
    return int(row[0])


def iter_readings(conn: sqlite3.Connection, device: str | None = None,
                  after_id: int = 0) -> Iterator[tuple[Any, ...]]:
    """Every stored reading, one at a time: (device, msg_id, ts, v0, v1, ...), by device
    then id; only `device`'s when given, only ids above `after_id`."""
    sql = "SELECT device, msg_id, count, layout, data FROM reading_runs"
    if device is not None:
        cur = conn.execute(sql + " WHERE device=? AND msg_id + count > ? ORDER BY msg_id",
                           (device, after_id + 1))
    else:
        cur = conn.execute(sql + " WHERE msg_id + count > ? ORDER BY device, msg_id",
                           (after_id + 1,))
    for dev, first, count, codes, data in cur:
        columns = unpack(codes, count, data)
        for k, row in enumerate(zip(*columns, strict=True)):
            if first + k > after_id:
                yield (dev, first + k, *row)


def runs_after(conn: sqlite3.Connection, after: int,
               limit: int = 1000) -> list[tuple[int, str, int, list[tuple[int, ...]]]]:
    """Runs stored after the run with rowid `after`, in the order they were committed:
    (rowid, device, schema, [timestamps, v0, v1, ...]). A reader keeps the last rowid as
    its cursor (the edge rules and the Home Assistant publisher follow new readings so)."""
    rows = conn.execute(
        "SELECT rowid, device, schema, count, layout, data FROM reading_runs WHERE rowid > ? "
        "ORDER BY rowid LIMIT ?", (after, limit)).fetchall()
    return [(int(r[0]), str(r[1]), int(r[2]), unpack(r[4], int(r[3]), r[5])) for r in rows]


def latest_runs_after(conn: sqlite3.Connection, after: int
                      ) -> tuple[int, list[tuple[int, str, int, list[tuple[int, ...]]]]]:
    """The newest run of each device among those stored after rowid `after`, and the rowid
    up to which that holds (the reader's next cursor): what a state display needs, without
    unpacking every run."""
    hi = last_run_id(conn)
    if hi <= after:
        return after, []
    rows = conn.execute(
        "SELECT r.rowid, r.device, r.schema, r.count, r.layout, r.data FROM reading_runs r "
        "JOIN (SELECT max(rowid) AS m FROM reading_runs WHERE rowid > ? AND rowid <= ? "
        "GROUP BY device) l ON r.rowid = l.m ORDER BY r.rowid", (after, hi)).fetchall()
    return hi, [(int(r[0]), str(r[1]), int(r[2]), unpack(r[4], int(r[3]), r[5])) for r in rows]


def device_runs(conn: sqlite3.Connection, device: str, *, after: int = 0,
                since: float | None = None,
                until: float | None = None) -> list[tuple[int, int, list[tuple[int, ...]]]]:
    """The device's runs as (rowid, schema, [timestamps, v0, v1, ...]): those stored after
    the run with rowid `after`, and with `since`/`until` only runs that may hold readings
    sampled in that span (a run starting up to RUN_SPAN_S before `since` may). A reader that
    keeps the largest rowid it got has seen every run of the device up to it (runs are
    committed one transaction after another, with rowids growing), so asking again with
    `after` set to it returns exactly the runs stored since."""
    sql = ("SELECT rowid, schema, count, layout, data FROM reading_runs WHERE device=? "
           "AND rowid > ?")
    args: list[object] = [device, after]
    if since is not None:
        sql += " AND ts >= ?"
        args.append(int(since) - RUN_SPAN_S)
    if until is not None:
        sql += " AND ts <= ?"
        args.append(int(until))
    return [(int(r[0]), int(r[1]), unpack(r[3], int(r[2]), r[4]))
            for r in conn.execute(sql + " ORDER BY rowid", args)]


def last_run_id(conn: sqlite3.Connection) -> int:
    """The rowid of the newest run (0: none): where a new reader's cursor starts."""
    return int(conn.execute("SELECT coalesce(max(rowid), 0) FROM reading_runs").fetchone()[0])


def fetch(conn: sqlite3.Connection, device: str, limit: int = 100) -> list[tuple[int, ...]]:
    """The latest readings of a device, newest first: (msg_id, ts, schema, v0, ...)."""
    out: list[tuple[int, ...]] = []
    runs = conn.execute(
        "SELECT msg_id, count, schema, layout, data FROM reading_runs WHERE device=? "
        "ORDER BY msg_id DESC", (device,))
    for first, count, schema, codes, data in runs:
        columns = unpack(codes, count, data)
        for k in range(count - 1, -1, -1):
            if len(out) >= limit:
                return out
            out.append((first + k, columns[0][k], schema, *(c[k] for c in columns[1:])))
    return out


# A run spans one burst of one wake; runs that began this long before a range's start are
# read too, in case their later readings fall inside it.
RUN_SPAN_S = 86_400


def columns_between(conn: sqlite3.Connection, device: str, since: float,
                    until: float) -> dict[int, list[list[int]]]:
    """A device's readings sampled in [since, until], column by column: schema ->
    [times, v0, v1, ...], in time order."""
    out: dict[int, list[list[int]]] = {}
    runs = conn.execute(
        "SELECT msg_id, count, schema, layout, data FROM reading_runs WHERE device=? "
        "AND ts >= ? AND ts <= ? ORDER BY msg_id", (device, int(since) - RUN_SPAN_S, int(until)))
    for _first, count, schema, codes, data in runs:
        columns = unpack(codes, count, data)
        cols = out.setdefault(schema, [[] for _ in columns])
        if len(cols) != len(columns):  # a run of an unknown schema's other width
            continue
        stamps = columns[0]
        if since <= min(stamps) and max(stamps) <= until:
            for dst, src in zip(cols, columns, strict=True):
                dst.extend(src)
        else:
            keep = [k for k, t in enumerate(stamps) if since <= t <= until]
            for dst, src in zip(cols, columns, strict=True):
                dst.extend(src[k] for k in keep)
    for schema, cols in out.items():
        ts = cols[0]
        if any(a > b for a, b in zip(ts, ts[1:], strict=False)):  # ids out of time order
            order = sorted(range(len(ts)), key=ts.__getitem__)
            out[schema] = [[c[k] for k in order] for c in cols]
    return out


# ------------------------------------------------------------------ battery forecast
# The battery's days left, from its voltage trend: the rules engine's battery condition
# (gateway.pipeline.rules, whose rules may set their own window and empty level) and the
# operator's fleet page (these defaults) both read it here.
FORECAST_EMPTY_MV = 3000.0
FORECAST_WINDOW_DAYS = 7.0
FORECAST_MIN_POINTS = 6


def forecast_days(times: Sequence[float], mv: Sequence[float], empty_mv: float) -> float | None:
    """Days until the least-squares line through (time, mV) reaches `empty_mv`, from the
    last time; None without two distinct times, inf when the voltage is not falling."""
    n = len(times)
    if n < 2 or len(mv) != n:
        return None
    mt = sum(times) / n
    mv_mean = sum(mv) / n
    sxx = sum((t - mt) ** 2 for t in times)
    if sxx <= 0:
        return None
    slope = sum((t - mt) * (v - mv_mean) for t, v in zip(times, mv, strict=True)) / sxx
    if slope >= 0:
        return math.inf
    now_mv = mv_mean + slope * (times[-1] - mt)
    return max(0.0, (now_mv - empty_mv) / -slope / 86400.0)


def measurement_between(conn: sqlite3.Connection, device: str, measurement: str, since: float,
                        until: float) -> tuple[list[float], list[float]]:
    """(times, values in the spec's unit) of one measurement of a device in [since, until],
    in time order, across every schema that carries it."""
    times: list[float] = []
    values: list[float] = []
    for schema, cols in columns_between(conn, device, since, until).items():
        info = proto.SCHEMAS.get(schema)
        if info is None:
            continue
        for i, m in enumerate(info[1]):
            if m.name == measurement and i + 1 < len(cols):
                times.extend(float(x) for x in cols[0])
                values.extend(x * m.scale for x in cols[i + 1])
    if any(a > b for a, b in zip(times, times[1:], strict=False)):
        order = sorted(range(len(times)), key=times.__getitem__)
        times, values = [times[k] for k in order], [values[k] for k in order]
    return times, values


def battery_forecast(conn: sqlite3.Connection, device: str, t_last: float, *,
                     measurement: str = "battery", window_days: float = FORECAST_WINDOW_DAYS,
                     empty_mv: float = FORECAST_EMPTY_MV,
                     min_points: int = FORECAST_MIN_POINTS) -> float | None:
    """Days from `t_last` until the device's battery trend over the `window_days` before it
    reaches `empty_mv` (forecast_days); None with fewer than `min_points` readings."""
    times, mv = measurement_between(conn, device, measurement,
                                    t_last - window_days * 86400.0, t_last)
    if len(times) < min_points:
        return None
    return forecast_days(times, mv, empty_mv)
