"""Dead letters: a bounded head of each frame with its length, a table bounded in bytes and
rows, counts of every refused frame, and rows from before the bounds read as they were."""

from __future__ import annotations

from pathlib import Path

from gateway.store import db, deadletter


def test_a_letter_keeps_the_head_of_its_frame_and_its_length(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    deadletter.add(conn, "a", "malformed", bytes(range(200)), "why", at=1.0, raw_max=16)
    deadletter.add(conn, "a", "malformed", b"short", at=2.0, raw_max=16)
    new, old = deadletter.list_recent(conn, "a")
    assert (old.raw, old.raw_len, old.truncated) == (bytes(range(16)), 200, True)
    assert (new.raw, new.raw_len, new.truncated) == (b"short", 5, False)


def test_trim_keeps_the_table_under_its_byte_bound_oldest_first(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    for i in range(100):
        deadletter.add(conn, "a", "malformed", bytes(100), f"{i}", at=float(i))
    rows, size = deadletter.totals(conn)
    assert rows == 100 and size > 10_000
    gone = deadletter.trim(conn, 5_000)
    rows, size = deadletter.totals(conn)
    assert size <= 5_000 * 0.9 and rows == 100 - gone
    assert deadletter.list_recent(conn, limit=1)[0].detail == "99"  # the newest stay
    assert deadletter.trim(conn, 5_000) == 0
    assert deadletter.prune(conn, max_rows=3) == rows - 3


def test_rows_from_before_the_bounds_count_their_whole_frame(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    conn.execute("INSERT INTO dead_letters(device, at, reason, detail, raw) "
                 "VALUES ('a', 1.0, 'malformed', '', ?)", (bytes(1000),))
    (letter,) = deadletter.list_recent(conn)
    assert letter.raw_len == 1000 and not letter.truncated
    assert deadletter.totals(conn) == (1, 1000 + deadletter.ROW_OVERHEAD + 1 + len("malformed"))


def test_refused_frames_are_counted_per_device_and_reason(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "g.db")
    deadletter.count_refused(conn, [("q", "quarantined", 10, 500, 1, 5.0)])
    deadletter.count_refused(conn, [("q", "quarantined", 5, 100, 0, 9.0),
                                    ("q", "malformed", 1, 7, 1, 9.0)])
    counts = {c.reason: c for c in deadletter.refused(conn, "q")}
    c = counts["quarantined"]
    assert (c.frames, c.bytes, c.stored, c.first_at, c.last_at) == (15, 600, 1, 5.0, 9.0)
    assert counts["malformed"].frames == 1
