"""One device never stops ingest for the others: frames at the u32 edge, stored state
past it, a device whose frames raise, and dead letters bounded in bytes and sampled."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway import proto
from gateway.config import IngestConfig
from gateway.pipeline.downlink import Downlink
from gateway.pipeline.ingest import Ingest
from gateway.store import db, deadletter, readings
from gateway.store import devices as registry

U32 = 0xFFFFFFFF


def burst(first: int, n: int = 5) -> bytes:
    s = proto.Series(tuple(1_700_000_000 + 60 * i for i in range(n)),
                     (tuple(range(n)), tuple(range(n)), (3000,) * n))
    return proto.encode_burst(proto.Burst(first, proto.SCHEMA_ENV3, 60, s))


HELLO = proto.encode_hello(proto.Hello(
    7, 3, proto.BootCause.TIMER, 3300, -60, 40_000, 0, 0, 900, 800, 1_700_000_000,
    proto.DeviceClass.SENSOR))


def setup(tmp: Path, *devices: str) -> sqlite3.Connection:
    conn = db.open_db(tmp / "g.db")
    for d in devices:
        registry.add(conn, d)
    return conn


def decoded(out: Sequence[tuple[str, bytes, int]], device: str) -> list[proto.Frame]:
    return [proto.decode(p) for t, p, _ in out if t == f"torpor/{device}/down"]


def test_poison_burst_is_refused_and_everyone_else_is_acked(tmp_path: Path) -> None:
    conn = setup(tmp_path, "evil", "good")
    ing = Ingest(conn, IngestConfig(malformed_threshold=3))
    for k in range(4):
        out = ing.process([("torpor/evil/up", burst(U32)), ("torpor/good/up", burst(1 + 5 * k))])
        evil = decoded(out, "evil")
        if k < 3:
            assert isinstance(evil[0], proto.Error) and evil[0].code == proto.ErrorCode.MALFORMED
            assert "do not wrap" in evil[0].detail
        else:  # quarantined by its third malformed frame: refused before decoding
            assert evil == []
        good = decoded(out, "good")
        assert good == [proto.Ack(1 + 5 * k, 5 + 5 * k, ())]
    # Nothing of the poison burst was stored; it is a dead letter; the third one quarantined.
    assert readings.count_rows(conn, "evil") == 0
    assert conn.execute("SELECT count(*) FROM dedup WHERE device='evil'").fetchone()[0] == 0
    assert deadletter.count(conn, "evil", "malformed") == 3
    assert registry.get(conn, "evil").status == registry.QUARANTINED
    counts = {c.reason: c.frames for c in deadletter.refused(conn, "evil")}
    assert counts == {"malformed": 3, "quarantined": 1}
    assert readings.count_rows(conn, "good") == 20


@pytest.mark.parametrize(("first", "n", "ok"), [
    (0, 1, False), (0, 5, False), (1, 1, True), (U32, 1, True), (U32 - 4, 5, True),
    (U32 - 3, 5, False), (U32, 2, False), (U32 - 254, 255, True), (U32 - 253, 255, False),
])
def test_reading_ids_stop_at_the_u32_edge(tmp_path: Path, first: int, n: int, ok: bool) -> None:
    conn = setup(tmp_path, "a")
    ing = Ingest(conn)
    out = decoded(ing.process([("torpor/a/up", burst(first, n))]), "a")
    if ok:
        assert isinstance(out[0], proto.Ack) and out[0].msg_id == first
        assert readings.count_rows(conn, "a") == n
        # A resend is a duplicate, acknowledged again (the ids fit the ACK).
        again = decoded(ing.process([("torpor/a/up", burst(first, n))]), "a")
        assert again == out
    else:
        assert isinstance(out[0], proto.Error) and out[0].code == proto.ErrorCode.MALFORMED
        assert readings.count_rows(conn, "a") == 0
    hello = decoded(Ingest(conn).process([("torpor/a/up", HELLO)]), "a")
    assert isinstance(hello[0], proto.Ack)


def test_dedup_state_past_u32_stored_by_an_older_gateway_is_repaired(tmp_path: Path) -> None:
    conn = setup(tmp_path, "evil", "good")
    # What a gateway that let ids run past u32 left behind, and worse.
    conn.executemany("INSERT INTO dedup(device, hwm, ranges, total) VALUES (?, ?, ?, ?)", [
        ("evil", 0, "4294967295-4294967299", 5),
        ("good", 7, "9-x,12-11,20-25", 6),
    ])
    states = readings.load_states(conn)
    assert states["evil"].hwm == 0 and states["evil"].ranges == [(U32, U32)]
    assert states["good"].hwm == 7 and states["good"].ranges == [(20, 25)]
    ing = Ingest(conn)
    out = ing.process([("torpor/evil/up", burst(1)), ("torpor/evil/up", HELLO),
                       ("torpor/good/up", burst(8))])
    evil = decoded(out, "evil")
    assert evil[0] == proto.Ack(1, 5, (U32,))
    assert isinstance(evil[1], proto.Ack) and evil[1].cumulative == 5
    assert decoded(out, "good")[0] == proto.Ack(8, 12, tuple(range(20, 26)))
    # The migration repairs the stored rows of a database opened by this gateway.
    conn.execute("UPDATE dedup SET ranges='4294967295-4294967299' WHERE device='evil'")
    conn.execute("UPDATE schema_migrations SET version=2 WHERE store='readings'")
    conn.close()
    conn = db.open_db(tmp_path / "g.db")
    assert conn.execute("SELECT hwm, ranges FROM dedup WHERE device='evil'").fetchone() == (
        5, "4294967295-4294967295")


class FaultyDownlink(Downlink):
    """A downlink whose handling of one device's answers raises (a defect to contain)."""

    def handle_up(self, conn: sqlite3.Connection, answers: Sequence[tuple[str, object]],
                  now: float) -> None:
        if any(d == "evil" for d, _ in answers):
            raise RuntimeError("handling evil's answer failed")
        super().handle_up(conn, answers, now)  # type: ignore[arg-type]


def test_a_device_whose_frames_raise_is_written_apart(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    conn = setup(tmp_path, "evil", "good", "other")
    ing = Ingest(conn, downlink=FaultyDownlink())
    result = proto.encode_command_result(proto.CommandResult(9, 1, proto.ResultStatus.OK))
    out = ing.process([("torpor/good/up", HELLO), ("torpor/evil/up", burst(1)),
                       ("torpor/evil/up", result), ("torpor/good/up", burst(1)),
                       ("torpor/other/up", burst(1))])
    evil = decoded(out, "evil")
    assert [type(f) for f in evil] == [proto.Error, proto.Error]
    assert {f.code for f in evil if isinstance(f, proto.Error)} == {proto.ErrorCode.INTERNAL}
    assert decoded(out, "other") == [proto.Ack(1, 5, ())]
    good = decoded(out, "good")
    assert isinstance(good[0], proto.Ack) and good[-1] == proto.Ack(1, 5, ())
    assert readings.count_rows(conn, "evil") == 0 and readings.count_rows(conn, "good") == 5
    assert deadletter.count(conn, "evil", "ingest_error") == 2
    assert registry.get(conn, "evil").status == registry.QUARANTINED
    assert registry.get(conn, "good").status == registry.ACTIVE
    assert ing.metrics.device_errors == 1 and ing.metrics.isolated_batches == 1
    # The next batch goes the fast way again; evil's frames are refused before decoding.
    out = ing.process([("torpor/evil/up", burst(1)), ("torpor/other/up", burst(6))])
    assert decoded(out, "other") == [proto.Ack(6, 10, ())] and decoded(out, "evil") == []
    assert ing.metrics.isolated_batches == 1


def test_dead_letters_keep_a_bounded_head_and_the_table_a_bounded_size(tmp_path: Path) -> None:
    conn = setup(tmp_path, "a")
    cfg = IngestConfig(malformed_threshold=10_000, deadletter_raw_max_bytes=32,
                       deadletter_max_bytes=8192, rate_limit_frames_per_min=100_000)
    ing = Ingest(conn, cfg)
    junk = bytes([0x11, 0x02]) + bytes(range(256)) * 4  # 1026 bytes, malformed
    for _ in range(20):
        ing.process([("torpor/a/up", junk)] * 10)
    rows, size = deadletter.totals(conn)
    assert size <= 8192 and 0 < rows < 200
    letter = deadletter.list_recent(conn, "a", 1)[0]
    assert letter.raw == junk[:32] and letter.raw_len == len(junk) and letter.truncated
    # Every refused frame is counted, stored or pruned.
    assert {c.reason: c.frames for c in deadletter.refused(conn, "a")} == {"malformed": 200}


def test_a_quarantined_devices_frames_are_counted_and_sampled(tmp_path: Path) -> None:
    conn = setup(tmp_path, "q")
    registry.quarantine(conn, "q", "by hand")
    clock = [1000.0]
    ing = Ingest(conn, IngestConfig(deadletter_sample_s=60), clock=lambda: clock[0])
    for _ in range(10):
        ing.process([("torpor/q/up", burst(1))] * 100)
        clock[0] += 10
    (c,) = deadletter.refused(conn, "q")
    assert (c.reason, c.frames, c.stored) == ("quarantined", 1000, 2)
    assert deadletter.count(conn, "q") == 2


def test_config_errors_name_the_dead_letter_keys() -> None:
    from gateway.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"\[ingest\] deadletter_raw_max_bytes"):
        parse_config({"ingest": {"deadletter_raw_max_bytes": proto.MAX_FRAME + 1}})
    with pytest.raises(ConfigError, match=r"\[ingest\] deadletter_max_bytes"):
        parse_config({"ingest": {"deadletter_max_bytes": 4096, "deadletter_raw_max_bytes": 4096}})
    with pytest.raises(ConfigError, match=r"\[ingest\] deadletter_sample_s"):
        parse_config({"ingest": {"deadletter_sample_s": "often"}})


def test_a_wall_clock_stepped_back_does_not_rate_limit_anyone(tmp_path: Path) -> None:
    # The rate bucket refills with the time passed; a clock set back (NTP correcting a
    # gateway that booted with a later date, an operator fixing the date) is no time
    # passed, not an hour's worth of frames owed.
    conn = setup(tmp_path, "node")
    clock = [10_000.0]
    ing = Ingest(conn, IngestConfig(rate_limit_frames_per_min=60), clock=lambda: clock[0])
    for k in range(3):
        out = ing.process([("torpor/node/up", burst(1 + 5 * k))])
        assert decoded(out, "node") == [proto.Ack(1 + 5 * k, 5 + 5 * k, ())]
        clock[0] += 10.0 if k else -3600.0
    assert registry.status_of(conn, "node") in registry.SERVED
    assert deadletter.count(conn, "node", "rate_limited") == 0
