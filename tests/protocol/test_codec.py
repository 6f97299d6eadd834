"""The CPython codec: round trips, canonical bytes, and only ProtocolError on bad input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway.proto as p
from tests.protocol.strategies import SPEC, any_frame, frame_values


@pytest.mark.parametrize("fr", SPEC.frames, ids=lambda f: f.name)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_every_frame(fr, data) -> None:  # type: ignore[no-untyped-def]
    frame = data.draw(frame_values(fr))
    raw = p.encode(frame)
    assert raw[0] == p.VERSION_BYTE and raw[1] == fr.id
    assert len(raw) <= SPEC.max_frame_size(fr)
    back = p.decode(raw)
    assert back == frame
    assert p.encode(back) == raw


@settings(max_examples=6000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_error(raw: bytes) -> None:
    try:
        frame = p.decode(raw)
    except p.ProtocolError as exc:
        assert exc.frame and exc.offset >= 0
    else:
        assert p.decode(p.encode(frame)) == frame


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_frame, st.data())
def test_mutated_frames_raise_only_protocol_error(frame, data) -> None:  # type: ignore[no-untyped-def]
    raw = bytearray(p.encode(frame))
    # flip, cut or extend: the damage real radios and hostile peers do
    how = data.draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    if how == "flip" and len(raw) > 1:
        i = data.draw(st.integers(1, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "append":
        raw += data.draw(st.binary(min_size=1, max_size=8))
    else:
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    try:
        p.decode(bytes(raw))
    except p.ProtocolError:
        pass


def _hello(**kw: object) -> p.Hello:
    base = dict(msg_id=7, fw_version=3, boot_cause=p.BootCause.TIMER, battery_mv=3700, rssi=-61,
                free_mem=90000, queue_depth=4, dropped=0, next_wake_s=60, awake_window_ms=1500,
                time=1_700_000_000, device_class=p.DeviceClass.SENSOR)
    base.update(kw)
    return p.Hello(**base)  # type: ignore[arg-type]


def test_truncated_frame_names_frame_and_offset() -> None:
    raw = p.encode(_hello())
    with pytest.raises(p.ProtocolError) as err:
        p.decode(raw[:10])
    assert err.value.frame == "HELLO" and "truncated" in str(err.value)


def test_unknown_major_version_is_refused() -> None:
    raw = bytearray(p.encode(_hello()))
    raw[0] = (p.MAJOR + 1) << 4
    with pytest.raises(p.ProtocolError, match="unsupported protocol version 2.0"):
        p.decode(bytes(raw))


def test_trailing_garbage_is_refused_at_this_minor() -> None:
    raw = p.encode(p.SleepNow(1, 60)) + b"\x7f\x01\x00"
    with pytest.raises(p.ProtocolError, match="unknown field tag 127"):
        p.decode(raw)
    raw = p.encode(p.Ack(1, 5, ())) + b"\x00"
    with pytest.raises(p.ProtocolError):
        p.decode(raw)


def test_newer_minor_skips_unknown_optional_fields_and_trailing_bytes() -> None:
    raw = bytearray(p.encode(_hello(config_version=9)) + b"\x7e\x02ab")
    raw[0] = p.MAJOR << 4 | (p.MINOR + 1)
    assert p.decode(bytes(raw)) == _hello(config_version=9)
    burst = p.Burst(5, 1, 60, p.Series((100, 160), ((1, 2), (3, 4), (5, 6))))
    # BURST has optional fields since 1.2: what a newer minor adds is a field of its own.
    raw = bytearray(p.encode(burst) + b"\x7e\x01\x03")
    raw[0] = p.MAJOR << 4 | (p.MINOR + 1)
    assert p.decode(bytes(raw)) == burst


def test_bad_enum_bool_and_lengths_are_refused() -> None:
    raw = bytearray(p.encode(_hello()))
    raw[10] = 200  # boot_cause
    with pytest.raises(p.ProtocolError, match="boot_cause: 200 is not a BootCause"):
        p.decode(bytes(raw))
    raw = bytearray(p.encode(_hello(safe_mode=True)))
    raw[-1] = 2
    with pytest.raises(p.ProtocolError, match="safe_mode"):
        p.decode(bytes(raw))
    cmd = bytearray(p.encode(p.Command(1, 2, p.CommandOp.PING, (), 0, 10)))
    cmd[11] = 9  # args count above its max of 8
    with pytest.raises(p.ProtocolError, match="args: length 9 exceeds the maximum 8"):
        p.decode(bytes(cmd))


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(p.ProtocolError, match="exceeds the maximum"):
        p.decode(bytes([p.VERSION_BYTE, p.BURST]) + bytes(p.MAX_FRAME))


def test_encoder_names_the_field_that_does_not_fit() -> None:
    with pytest.raises(p.ProtocolError, match="battery_mv: 70000 does not fit u16"):
        p.encode(_hello(battery_mv=70000))
    with pytest.raises(p.ProtocolError, match="detail: 49 bytes exceeds the maximum 48"):
        p.encode(p.CommandResult(1, 2, p.ResultStatus.OK, detail="x" * 49))


def test_regular_burst_is_compact() -> None:
    cols = ((2000 + i % 3 for i in range(64)), (5000 - i for i in range(64)), (3700,) * 64)
    burst = p.Burst(1, 1, 60, p.Series(tuple(range(0, 64 * 60, 60)), tuple(tuple(c) for c in cols)))
    raw = p.encode(burst)
    assert len(raw) == 6 + 3 + 1 + 4 + 6 + 63 * 3
    assert p.decode(raw) == burst
    assert p.decode(raw).readings.rows()[1] == (60, 2001, 4999, 3700)


def test_series_values_outside_their_type_are_refused() -> None:
    burst = p.Burst(1, 1, 60, p.Series((0, 60), ((32767, 32767), (0, 0), (0, 0))))
    raw = bytearray(p.encode(burst))
    raw[-3] = 2  # temperature delta +1 from 32767
    with pytest.raises(p.ProtocolError, match="leaves its type's range"):
        p.decode(bytes(raw))
    assert struct.calcsize(p.RECORD_FORMATS[1]) == 10


def test_hello_energy_facts_round_trip_and_a_1_4_hello_has_none() -> None:
    """Protocol 1.5: the previous wake's awake and radio-on times and whether it sent travel
    as tagged fields; a HELLO encoded before them decodes with their defaults (unknown)."""
    h = p.Hello(3, 12, p.BootCause.TIMER, 2950, -80, 60000, 1, 0, 300, 1500, 1_767_225_900,
                p.DeviceClass.SENSOR, prev_awake_ms=4321, prev_radio_ms=3170, prev_sent=True)
    raw = p.encode(h)
    assert p.decode(raw) == h
    bare = p.encode(p.Hello(3, 12, p.BootCause.TIMER, 2950, -80, 60000, 1, 0, 300, 1500,
                            1_767_225_900, p.DeviceClass.SENSOR))
    assert len(raw) - len(bare) == 15  # tag, length, value: 6 + 6 + 3 bytes
    # A HELLO of protocol 1.4, byte for byte as a 1.4 node sent it (its frozen vector).
    old = p.decode(bytes.fromhex(
        "1401020000000100000000041000400d03000000000000003c000000e80300000000040f0101100105"
        "140101"))
    assert isinstance(old, p.Hello)
    assert (old.prev_awake_ms, old.prev_radio_ms, old.prev_sent) == (0, 0, False)
    # Facts that do not fit their field are refused by the encoder, naming it.
    with pytest.raises(p.ProtocolError, match="prev_awake_ms"):
        p.encode(p.Hello(3, 12, p.BootCause.TIMER, 2950, -80, 60000, 1, 0, 300, 1500,
                         1_767_225_900, p.DeviceClass.SENSOR, prev_awake_ms=1 << 32))
