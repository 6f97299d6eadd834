"""Readings and dedup state: each (device, id) stored once, acks that say what is on disk."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import db, proto, readings


def burst(first: int, n: int = 64) -> proto.Burst:
    s = proto.Series(tuple(1_700_000_000 + 60 * i for i in range(n)),
                     (tuple(range(n)), tuple(range(100, 100 + n)), (3000,) * n))
    return proto.Burst(first, proto.SCHEMA_ENV3, 60, s)


def test_every_schema_fits_the_value_columns() -> None:
    assert all(len(m) <= readings.MAX_VALUES for _, m in proto.SCHEMAS.values())


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
    got = conn.execute("SELECT msg_id, ts, schema, v0, v1, v2, v3 FROM readings "
                       "WHERE device='a' AND msg_id=66").fetchone()
    assert got == (66, 1_700_000_060, 1, 1, 101, 3000, None)
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
    ids = [row[0] for row in conn.execute("SELECT msg_id FROM readings ORDER BY msg_id")]
    assert ids == list(range(8, 18))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 400), st.integers(1, 70)), min_size=1, max_size=25))
def test_any_order_of_resends_stores_each_id_once(tmp_path_factory, spans) -> None:  # type: ignore[no-untyped-def]
    conn = db.open_db(tmp_path_factory.mktemp("h") / "g.db")
    cache: dict[str, readings.DedupState] = {}
    expected: set[int] = set()
    for first, n in spans:
        r = readings.commit_bursts(conn, [("d", burst(first, n))], cache)
        expected |= set(range(first, first + n))
        a = r.acks[0]
        assert all(i in expected for i in range(1, a.cumulative + 1))
        assert set(a.selective) <= expected and len(a.selective) <= 64
    ids = [row[0] for row in conn.execute("SELECT msg_id FROM readings")]
    assert sorted(ids) == sorted(expected)
    st_ = cache["d"]
    assert all(st_.contains(i) for i in expected)


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
