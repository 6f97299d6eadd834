"""Readings and dedup state: each (device, id) stored once, acks that say what is on disk."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import proto
from gateway.store import db, readings


def burst(first: int, n: int = 64) -> proto.Burst:
    s = proto.Series(tuple(1_700_000_000 + 60 * i for i in range(n)),
                     (tuple(range(n)), tuple(range(100, 100 + n)), (3000,) * n))
    return proto.Burst(first, proto.SCHEMA_ENV3, 60, s)


def test_commit_dedup_hwm_and_selective(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    cache: dict[str, readings.DedupState] = {}
    r = readings.commit_bursts(conn, [("a", burst(1)), ("a", burst(129))], cache)
    assert [(a.cumulative, a.stored) for a in r.acks] == [(64, 64), (64, 64)]
    assert r.acks[1].selective == tuple(range(129, 193))
    # The gap filled: the hwm jumps over the range above it.
    r = readings.commit_bursts(conn, [("a", burst(65)), ("a", burst(65))], cache)
    assert [(a.cumulative, a.stored, a.selective) for a in r.acks] == [(192, 64, ()), (192, 0, ())]
    assert readings.count_rows(conn, "a") == 192
    got = [r for r in readings.iter_readings(conn, "a") if r[1] == 66]
    assert got == [("a", 66, 1_700_000_060, 1, 101, 3000)]
    # One row per burst: the three bursts are three runs.
    assert conn.execute("SELECT count(*) FROM reading_runs").fetchone()[0] == 3
    # The state survives a reopen.
    conn.close()
    conn = db.open_db(tmp_path / "g.db")
    assert readings.stats(conn, "a") == (192, 0, 192)
    r = readings.commit_bursts(conn, [("a", burst(150, 100))])
    assert r.acks[0].stored == 57 and r.acks[0].cumulative == 249
    assert readings.count_rows(conn, "a") == 249


def test_partial_overlap_stores_only_new_ids(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    readings.commit_bursts(conn, [("a", burst(10, 5))])
    r = readings.commit_bursts(conn, [("a", burst(8, 10))])
    assert r.acks[0].stored == 5
    assert r.committed[0].series.timestamps[0] == 1_700_000_000
    ids = [row[1] for row in readings.iter_readings(conn)]
    assert ids == list(range(8, 18))
    # The new ids on either side of the stored ones are runs of their own, and so are
    # their upstream copies, each with its own first id.
    assert [(c.msg_id, len(c.series)) for c in r.committed] == [(8, 2), (15, 3)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 400), st.integers(1, 70)), min_size=1, max_size=25))
def test_any_order_of_resends_stores_each_id_once(tmp_path_factory, spans) -> None:  # type: ignore[no-untyped-def]
    conn = db.open_db(tmp_path_factory.mktemp("h") / "g.db")
    cache: dict[str, readings.DedupState] = {}
    expected: dict[int, int] = {}  # id -> the time of the burst that stored it first
    for first, n in spans:
        r = readings.commit_bursts(conn, [("d", burst(first, n))], cache)
        for i in range(first, first + n):
            expected.setdefault(i, 1_700_000_000 + 60 * (i - first))
        a = r.acks[0]
        assert all(i in expected for i in range(1, a.cumulative + 1))
        assert set(a.selective) <= set(expected) and len(a.selective) <= 64
    stored = list(readings.iter_readings(conn, "d"))
    assert [row[1] for row in stored] == sorted(expected)
    # Each reading comes back with its own time and values.
    assert [row[2] for row in stored] == [expected[i] for i in sorted(expected)]
    assert all(row[5] == 3000 for row in stored)
    st_ = cache["d"]
    assert all(st_.contains(i) for i in expected)
    assert list(readings.iter_readings(conn, "d", after_id=200)) == [
        row for row in stored if row[1] > 200]


def test_low_water_mark_gives_up_gaps_the_node_dropped(tmp_path: Path) -> None:
    # ids 11..20 were dropped by the node's overflow policy and will never arrive
    conn = db.open_db(tmp_path / "g.db")
    states: dict[str, readings.DedupState] = {}
    readings.commit_bursts(conn, [("n1", burst(1, 10)), ("n1", burst(21, 10))], states)
    assert readings.stats(conn, "n1")[:2] == (10, 10)
    res = readings.commit_bursts(conn, [], states, low_water=[("n1", 21)])
    assert res.acks == []
    assert readings.stats(conn, "n1")[:2] == (30, 0)
    # a low-water mark below what is committed changes nothing
    readings.commit_bursts(conn, [], states, low_water=[("n1", 5)])
    assert readings.stats(conn, "n1")[:2] == (30, 0)
    again = readings.commit_bursts(conn, [("n1", burst(31, 4))], states)
    assert again.acks[0].cumulative == 34 and again.acks[0].selective == ()


def test_fetch_latest_first(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    readings.commit_bursts(conn, [("a", burst(1, 3)), ("a", burst(4, 3)), ("b", burst(1, 2))])
    got = readings.fetch(conn, "a", limit=4)
    assert [r[0] for r in got] == [6, 5, 4, 3]
    assert got[0] == (6, 1_700_000_120, proto.SCHEMA_ENV3, 2, 102, 3000)


def test_migration_turns_rows_into_runs(tmp_path: Path) -> None:
    """A database written with a row per reading (store version 1) keeps every reading."""
    path = tmp_path / "old.db"
    conn = db.connect(path)
    db.apply(conn, readings.STORE, readings._STEPS[:1])
    rows = [("a", i, 1_700_000_000 + i, proto.SCHEMA_ENV3, -i, i, 3000) for i in range(1, 301)]
    rows += [("a", i, 1_700_000_000 + i, proto.SCHEMA_ENV3, -i, i, 3000) for i in (400, 401)]
    rows += [("b", 7, 5, proto.SCHEMA_ENV3, 1, 2, 3)]
    conn.executemany("INSERT INTO readings(device, msg_id, ts, schema, v0, v1, v2) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()
    conn = db.open_db(path)
    assert db.version(conn, readings.STORE) == 3
    assert list(readings.iter_readings(conn)) == [(r[0], r[1], r[2], *r[4:]) for r in rows]
    # Runs of consecutive ids, at most 255 readings each.
    runs = conn.execute("SELECT device, msg_id, count FROM reading_runs ORDER BY device, msg_id")
    assert runs.fetchall() == [("a", 1, 255), ("a", 256, 45), ("a", 400, 2), ("b", 7, 1)]
    assert "readings" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
