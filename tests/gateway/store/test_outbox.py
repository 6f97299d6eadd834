"""The outbox on a real SQLite file in WAL mode: order, transactions, bounds and counters."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError
from gateway.store import db
from gateway.store.outbox import Counters, Dropped, Outbox, OutboxItem, enqueue, migrate


def open_db(path: Path) -> sqlite3.Connection:
    """A connection like the gateway's (gateway.db: WAL, explicit transactions)."""
    conn = db.connect(path)
    migrate(conn)
    return conn


def item(n: int, created: float = 1000.0, device: str = "node-1") -> OutboxItem:
    return OutboxItem(f"up/{device}", f"payload-{n}".encode(), created, device, "readings")


def test_enqueue_joins_the_callers_transaction(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    ingest = open_db(path)
    ingest.execute("CREATE TABLE readings (v INTEGER)")
    box = Outbox(path)
    # Rolled back with the readings: neither the item nor its counter survive.
    with pytest.raises(RuntimeError), db.transaction(ingest):
        ingest.execute("INSERT INTO readings VALUES (1)")
        assert enqueue(ingest, [item(0)]) == 1
        assert box.depth() == 0  # not committed yet: invisible to another connection
        raise RuntimeError("crash before commit")
    assert box.depth() == 0 and box.counters().enqueued == 0
    # Committed with the readings: both visible.
    with db.transaction(ingest):
        ingest.execute("INSERT INTO readings VALUES (2)")
        enqueue(ingest, [item(1), item(2)])
    assert box.depth() == 2 and box.counters().enqueued == 2
    assert [q.item for q in box.peek(10)] == [item(1), item(2)]
    box.close()
    ingest.close()


def test_enqueue_does_not_commit(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "gw.db")  # Python's implicit transactions
    migrate(conn)
    enqueue(conn, [item(0)])
    assert conn.in_transaction
    conn.rollback()
    assert Outbox(conn).depth() == 0


def test_migrate_is_versioned_and_idempotent(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "gw.db")
    migrate(conn)
    assert db.version(conn, "outbox") == 2  # 2: the retain flag
    assert Outbox(conn).counters() == Counters(0, 0, 0, 0)


def test_peek_in_order_delete_after_ack(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "gw.db")
    box.put(item(i) for i in range(10))
    first = box.peek(4)
    assert [q.item.payload for q in first] == [f"payload-{i}".encode() for i in range(4)]
    assert box.peek(4) == first  # peek removes nothing
    nxt = box.peek(3, after=first[-1].id)
    assert [q.item.payload for q in nxt] == [b"payload-4", b"payload-5", b"payload-6"]
    assert box.delete([first[1].id, first[0].id]) == 2
    assert box.delete([first[0].id]) == 0  # already gone: not counted twice
    assert box.peek(1)[0] == first[2]
    assert box.depth() == 8
    assert box.counters() == Counters(enqueued=10, delivered=2, dropped_full=0, dropped_age=0)


def test_ids_keep_growing_after_the_outbox_empties(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "gw.db")
    box.put([item(0)])
    (q,) = box.peek(5)
    box.delete([q.id])
    box.put([item(1)])
    assert box.peek(5)[0].id > q.id


def test_max_items_drops_oldest_and_counts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "gw.db", max_items=5)
    box.put(item(i, created=1000.0 + i) for i in range(12))
    assert box.enforce_bounds(now=1100.0) == Dropped(age=0, full=7)
    assert [q.item.payload for q in box.peek(10)] == [f"payload-{i}".encode() for i in range(7, 12)]
    assert box.counters().dropped_full == 7
    assert box.enforce_bounds(now=1100.0) == Dropped(0, 0)


def test_newest_policy_keeps_the_oldest(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "gw.db", max_items=3, drop_policy="drop_newest")
    box.put(item(i) for i in range(5))
    assert box.enforce_bounds(now=1000.0).full == 2
    assert [q.item.payload for q in box.peek(10)] == [b"payload-0", b"payload-1", b"payload-2"]


def test_max_age_drops_old_and_counts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "gw.db", max_age_s=60.0)
    box.put(item(i, created=1000.0 + 10 * i) for i in range(10))  # 1000 .. 1090
    assert box.oldest() == 1000.0
    assert box.enforce_bounds(now=1125.0) == Dropped(age=7, full=0)  # keeps created >= 1065
    assert box.oldest() == 1070.0
    assert box.counters() == Counters(enqueued=10, delivered=0, dropped_full=0, dropped_age=7)


def test_counters_survive_reopening(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    box = Outbox(db, max_items=2)
    box.put(item(i) for i in range(4))
    box.enforce_bounds(now=1000.0)
    box.delete([box.peek(1)[0].id])
    box.close()
    again = Outbox(db, max_items=2)
    assert again.counters() == Counters(enqueued=4, delivered=1, dropped_full=2, dropped_age=0)
    assert again.depth() == 1


def test_bad_bounds_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="outbox_max_items"):
        Outbox(tmp_path / "a.db", max_items=0)
    with pytest.raises(ConfigError, match="outbox_max_age_s"):
        Outbox(tmp_path / "a.db", max_age_s=0)
    with pytest.raises(ConfigError, match="drop_policy"):
        Outbox(tmp_path / "a.db", drop_policy="random")


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(1, 8)),
        st.tuples(st.just("ack"), st.integers(1, 8)),
        st.tuples(st.just("bounds"), st.integers(0, 100)),
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(ops=ops, max_items=st.integers(1, 20))
def test_model(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]],
               max_items: int) -> None:
    """Against a list model: order kept, bounds hold after enforcement, counters add up."""
    box = Outbox(tmp_path_factory.mktemp("m") / "gw.db", max_items=max_items, max_age_s=50.0)
    model: list[tuple[int, float]] = []  # (serial, created)
    serial = 0
    clock = 0.0
    for op, n in ops:
        if op == "put":
            batch = [(serial + i, clock) for i in range(n)]
            serial += n
            box.put(item(s, created=c) for s, c in batch)
            model += batch
            clock += 1
        elif op == "ack":
            got = box.peek(n)
            assert [q.item.payload for q in got] == [f"payload-{s}".encode() for s, _ in model[:n]]
            box.delete([q.id for q in got])
            del model[:n]
        else:
            clock += n
            box.enforce_bounds(now=clock)
            model = [(s, c) for s, c in model if c >= clock - 50.0][-max_items:]
            assert box.depth() == len(model) <= max_items
    assert [q.item.payload for q in box.peek(1000)] == [f"payload-{s}".encode() for s, _ in model]
    c = box.counters()
    assert c.enqueued == serial
    assert c.enqueued - c.delivered - c.dropped_full - c.dropped_age == len(model)
    box.close()
