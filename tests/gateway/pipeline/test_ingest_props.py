"""Ingest and the decoder under hypothesis: any bytes decode or raise ProtocolError only;
stateful sequences of bursts, HELLOs (with first_id), garbage and gateway restarts keep
the dedup state exact across frames and at the u32 edge, and never raise out of ingest."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from gateway import proto
from gateway.config import IngestConfig
from gateway.pipeline.downlink import Downlink
from gateway.pipeline.ingest import Ingest
from gateway.pipeline.ota_delivery import OtaHandler
from gateway.store import db, devices, readings
from tools.bench.fuzz import Corpus, mutate

U32 = readings.ID_MAX
CORPUS = Corpus(random.Random(7)).frames


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    for buf in (data, bytes([proto.VERSION_BYTE]) + data):
        try:
            proto.decode(buf)
        except proto.ProtocolError:
            pass


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(CORPUS) - 1), st.integers(0, 2**32))
def test_mutated_boundary_frames_decode_or_raise_protocol_error(index: int, seed: int) -> None:
    frame = mutate(random.Random(seed), CORPUS[index], CORPUS)
    try:
        decoded = proto.decode(frame)
    except proto.ProtocolError:
        return
    # What decodes encodes again (every field of a decoded frame is within its limits).
    # (Compared as bytes: a NaN f32 is not equal to itself.)
    again = proto.encode(decoded)
    assert proto.encode(proto.decode(again)) == again


def test_every_boundary_frame_round_trips() -> None:
    for frame in CORPUS:
        assert proto.encode(proto.decode(frame)) == frame


ids = st.one_of(st.integers(0, 400), st.integers(U32 - 400, U32))
DEVICES = ("a", "b")


def _burst(first: int, n: int) -> bytes:
    s = proto.Series(tuple(1_700_000_000 + i for i in range(n)),
                     (tuple(range(n)), tuple(range(n)), (3000,) * n))
    return proto.encode_burst(proto.Burst(first, proto.SCHEMA_ENV3, 0, s))


def _hello(msg_id: int, first_id: int) -> bytes:
    return proto.encode_hello(proto.Hello(
        msg_id, 1, proto.BootCause.TIMER, 3300, -60, 40_000, 0, 0, 60, 800, 1_700_000_000,
        proto.DeviceClass.SENSOR, first_id=first_id))


class IngestMachine(RuleBasedStateMachine):
    """Ingest over a real SQLite file against a model: per device the committed ids and
    the floor below which the node holds nothing (HELLO first_id)."""

    @initialize()
    def start(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "g.db"
        self.conn = db.open_db(self.path)
        for d in DEVICES:
            devices.add(self.conn, d)
        self.ingest = self._new_ingest()
        self.committed: dict[str, set[int]] = {d: set() for d in DEVICES}
        self.floor = dict.fromkeys(DEVICES, 0)
        self.stored = dict.fromkeys(DEVICES, 0)

    def _new_ingest(self) -> Ingest:
        # No quarantine and no rate limit: the model follows every frame.
        return Ingest(self.conn, IngestConfig(malformed_threshold=1_000_000,
                                              rate_limit_frames_per_min=1_000_000),
                      downlink=Downlink(), ota=OtaHandler())

    def hwm(self, d: str) -> int:
        h = max(self.floor[d] - 1, 0)
        while h + 1 in self.committed[d]:
            h += 1
        return h

    def contains(self, d: str, i: int) -> bool:
        return i <= self.hwm(d) or i in self.committed[d]

    def answers(self, frames: list[tuple[str, bytes]]) -> list[tuple[str, proto.Frame]]:
        out = self.ingest.process([(f"torpor/{d}/up", p) for d, p in frames])
        return [(t.split("/")[1], proto.decode(p)) for t, p, _ in out]

    @rule(d=st.sampled_from(DEVICES), first=ids, n=st.integers(1, 255))
    def burst(self, d: str, first: int, n: int) -> None:
        ((dev, ans),) = self.answers([(d, _burst(first, n))])
        assert dev == d
        if first == 0 or first + n - 1 > U32:
            assert isinstance(ans, proto.Error) and ans.code == proto.ErrorCode.MALFORMED
            return
        new = [i for i in range(first, first + n) if not self.contains(d, i)]
        self.stored[d] += len(new)
        self.committed[d].update(range(first, first + n))
        assert isinstance(ans, proto.Ack) and ans.msg_id == first
        assert ans.cumulative == self.hwm(d)
        assert len(ans.selective) <= readings.MAX_SELECTIVE
        assert all(i > ans.cumulative and i in self.committed[d] for i in ans.selective)
        # Every id of the burst is acknowledged: at or below cumulative, or selective.
        above = [i for i in range(first, first + n) if i > ans.cumulative]
        assert set(above[:readings.MAX_SELECTIVE]) <= set(ans.selective)

    @rule(d=st.sampled_from(DEVICES), msg_id=ids, first_id=ids)
    def hello(self, d: str, msg_id: int, first_id: int) -> None:
        got = self.answers([(d, _hello(msg_id, first_id))])
        if first_id:
            self.floor[d] = max(self.floor[d], first_id)
        ack = got[0][1]
        assert isinstance(ack, proto.Ack) and ack.cumulative == self.hwm(d)
        assert isinstance(got[-1][1], proto.SleepNow)

    @rule(d=st.sampled_from(DEVICES), data=st.binary(max_size=64))
    def garbage(self, d: str, data: bytes) -> None:
        for _, ans in self.answers([(d, data)]):
            assert isinstance(ans, proto.Error | proto.Ack | proto.SleepNow)

    @rule()
    def restart(self) -> None:
        self.ingest = self._new_ingest()

    @invariant()
    def dedup_state_is_exact_and_within_u32(self) -> None:
        if not hasattr(self, "conn"):
            return
        states = readings.load_states(self.conn)
        for d in DEVICES:
            s = states.get(d, readings.DedupState())
            assert s.hwm == self.hwm(d) and 0 <= s.hwm <= U32
            prev = s.hwm + 1
            for lo, hi in s.ranges:
                assert prev < lo <= hi <= U32
                prev = hi + 1
            assert readings.count_rows(self.conn, d) == self.stored[d]

    def teardown(self) -> None:
        if hasattr(self, "conn"):
            self.conn.close()
            self.dir.cleanup()


IngestMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_ingest_state_machine = IngestMachine.TestCase
