"""The transport's MQTT 3.1.1 codec: known bytes, bounds, and hypothesis fuzzing of the
incremental decoder (random chunking, random bytes, encode/decode round trips)."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.transport import codec
from gateway.transport.codec import (
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
)
from gateway.transport.errors import (
    EncodeError,
    ErrorCode,
    MalformedPacket,
    PacketTooLarge,
    TransportError,
)

BIG = 1 << 28


def decode_all(data: bytes, max_packet: int = BIG) -> list[codec.Packet]:
    d = Decoder(max_packet)
    d.feed(data)
    out = list(d)
    assert d.buffered == 0
    return out


# --- known bytes (from MQTT 3.1.1's figures) ----------------------------------------------

def test_connect_bytes_match_the_standard() -> None:
    # 3.1 figure: protocol name, level 4, clean session, keepalive 60, client id "a"
    assert codec.encode(Connect("a", 60)) == (
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01a")


def test_connect_with_everything_round_trips() -> None:
    p = Connect("dev-1", 30, False, "user", b"pw\x00", Will("torpor/dev-1/status", b"gone", 1, True))
    raw = codec.encode(p)
    assert raw[9] == 0x80 | 0x40 | 0x20 | 0x08 | 0x04  # user, password, retain, QoS 1, will
    assert decode_all(raw) == [p]


def test_publish_and_acks_bytes() -> None:
    assert codec.encode_publish("a/b", b"hi") == b"\x30\x07\x00\x03a/bhi"
    assert codec.encode_publish("a/b", b"hi", 1, 10, retain=True) == b"\x33\x09\x00\x03a/b\x00\x0ahi"
    assert codec.encode_puback(0x1234) == b"\x40\x02\x12\x34"
    assert codec.encode(PingReq()) == b"\xc0\x00"
    assert codec.encode(Disconnect()) == b"\xe0\x00"
    assert codec.encode(Subscribe(1, (("a/+", 1),))) == b"\x82\x08\x00\x01\x00\x03a/+\x01"
    assert codec.encode(Unsubscribe(2, ("a/#",))) == b"\xa2\x07\x00\x02\x00\x03a/#"


@pytest.mark.parametrize("n, size", [
    (0, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3), (2_097_151, 3), (2_097_152, 4),
    (268_435_455, 4),
])
def test_remaining_length_sizes(n: int, size: int) -> None:
    enc = codec.encode_remaining_length(n)
    assert len(enc) == size
    # the decoder reads the same length back from the header alone
    whole = 1 + size + n
    Decoder(whole).feed(b"\x30" + enc)
    if n == 0:
        return
    with pytest.raises(PacketTooLarge) as e:
        Decoder(whole - 1).feed(b"\x30" + enc)
    assert e.value.announced == whole


def test_remaining_length_above_the_maximum_is_an_encode_error() -> None:
    with pytest.raises(EncodeError) as e:
        codec.encode_remaining_length(268_435_456)
    assert e.value.code is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("payload_len", [0, 120, 200, 16_400, 2_100_000])
def test_publish_with_1_to_4_byte_lengths_decodes(payload_len: int) -> None:
    p = Publish("torpor/d/up", bytes(range(256)) * (payload_len // 256) + bytes(payload_len % 256),
                1, packet_id=7)
    raw = codec.encode(p)
    assert decode_all(raw) == [p]


# --- bounds and malformed input -------------------------------------------------------------

def test_oversized_announced_length_is_refused_from_the_header_alone() -> None:
    d = Decoder(max_packet=4096)
    # 268 MB announced; only the fixed header is fed
    with pytest.raises(PacketTooLarge) as e:
        d.feed(b"\x30\xff\xff\xff\x7f")
    assert e.value.code is ErrorCode.PACKET_TOO_LARGE
    assert e.value.announced == 268_435_455 + 5 and e.value.bound == 4096
    assert d.buffered == 5
    # the stream is out of step: the decoder keeps refusing
    with pytest.raises(PacketTooLarge):
        d.feed(b"\x00" * 10)


def test_bound_counts_the_whole_packet() -> None:
    raw = codec.encode_publish("t", b"x" * 100)
    assert decode_all(raw, max_packet=len(raw))
    with pytest.raises(PacketTooLarge):
        decode_all(raw, max_packet=len(raw) - 1)


def test_max_publish_packet_fits_the_largest_publish() -> None:
    bound = codec.max_publish_packet(4096, 40)
    raw = codec.encode_publish("t" * 40, b"x" * 4096, 1, 1)
    assert len(raw) == bound
    assert decode_all(raw, bound)


def test_a_fifth_length_byte_is_malformed() -> None:
    d = Decoder(BIG)
    with pytest.raises(MalformedPacket) as e:
        d.feed(b"\x30\x80\x80\x80\x80\x01")
    assert e.value.code is ErrorCode.MALFORMED_REMAINING_LENGTH


@pytest.mark.parametrize("raw, code", [
    (b"\x00\x00", ErrorCode.UNKNOWN_PACKET_TYPE),
    (b"\xf0\x00", ErrorCode.UNKNOWN_PACKET_TYPE),
    (b"\x41\x02\x00\x01", ErrorCode.BAD_FLAGS),
    (b"\x40\x02\x00\x00", ErrorCode.BAD_PACKET_ID),
    (b"\x40\x01\x00", ErrorCode.TRUNCATED),
    (b"\x40\x03\x00\x01\x00", ErrorCode.TRAILING_BYTES),
    (b"\x36\x05\x00\x01a\x00\x01", ErrorCode.BAD_QOS),
    (b"\x38\x04\x00\x01ax", ErrorCode.BAD_FLAGS),  # DUP on QoS 0
    (b"\x30\x04\x00\x01+x", ErrorCode.BAD_TOPIC),
    (b"\x30\x02\x00\x00", ErrorCode.BAD_TOPIC),
    (b"\x30\x04\x00\x02\xff\xfe", ErrorCode.BAD_STRING),
    (b"\x30\x04\x00\x02a\x00", ErrorCode.BAD_STRING),
    (b"\x32\x04\x00\x01a\x00", ErrorCode.TRUNCATED),
    (b"\x32\x05\x00\x01a\x00\x00", ErrorCode.BAD_PACKET_ID),
    (b"\x20\x02\x02\x00", ErrorCode.BAD_FLAGS),
    (b"\x90\x02\x00\x01", ErrorCode.TRUNCATED),
    (b"\x90\x03\x00\x01\x03", ErrorCode.BAD_RETURN_CODE),
    (b"\x10\x0c\x00\x04MQTT\x03\x02\x00\x3c\x00\x00", ErrorCode.BAD_CONNECT),
    (b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x3c\x00\x00", ErrorCode.BAD_CONNECT),
    (b"\x10\x0c\x00\x04MQTT\x04\x03\x00\x3c\x00\x00", ErrorCode.BAD_FLAGS),
    (b"\x82\x06\x00\x01\x00\x01a\x03", ErrorCode.BAD_QOS),
])
def test_malformed_packets_raise_with_their_code(raw: bytes, code: ErrorCode) -> None:
    with pytest.raises(MalformedPacket) as e:
        decode_all(raw)
    assert e.value.code is code
    assert isinstance(e.value, TransportError)


def test_packets_before_a_bad_one_are_not_lost() -> None:
    good = codec.encode_publish("a", b"1") + codec.encode_puback(5)
    d = Decoder(BIG)
    d.feed(good + b"\x00\x00")
    assert d.next_packet() == Publish("a", b"1")
    assert d.next_packet() == PubAck(5)
    with pytest.raises(MalformedPacket):
        d.next_packet()


@pytest.mark.parametrize("bad", [
    lambda: codec.encode_publish("a/+", b""),
    lambda: codec.encode_publish("", b""),
    lambda: codec.encode_publish("a", b"", 1, 0),
    lambda: codec.encode_publish("a", b"", 0, 3),
    lambda: codec.encode_publish("a", b"", 3, 1),
    lambda: codec.encode_publish("a", b"", 0, dup=True),
    lambda: codec.encode_publish("a\x00", b""),
    lambda: codec.encode_publish("x" * 70_000, b""),
    lambda: codec.encode(Subscribe(1, (("a/#/b", 0),))),
    lambda: codec.encode(Subscribe(1, (("a+", 0),))),
    lambda: codec.encode(Subscribe(1, ())),
    lambda: codec.encode(Connect("", clean_session=False)),
    lambda: codec.encode(Connect("a", keepalive=70_000)),
    lambda: codec.encode(Connect("a", password=b"x")),
])
def test_encoder_refuses_what_mqtt_forbids(bad: object) -> None:
    with pytest.raises(EncodeError) as e:
        bad()  # type: ignore[operator]
    assert e.value.code is ErrorCode.INVALID_ARGUMENT


def test_decoding_byte_by_byte_is_linear() -> None:
    # 2,000 packets fed one byte at a time, and one 1 MB packet in 1-byte chunks: a
    # quadratic buffer would take minutes here.
    stream = b"".join(codec.encode_publish("t/x", bytes(100), 1, i % 65535 + 1)
                      for i in range(2000))
    big = codec.encode_publish("t/big", bytes(1 << 20))
    t0 = time.process_time()
    d = Decoder(2 << 20)
    got = 0
    for data in (stream, big):
        mv = memoryview(data)
        for i in range(len(mv)):
            d.feed(mv[i:i + 1])
            if d.next_packet() is not None:
                got += 1
    assert got == 2001
    assert time.process_time() - t0 < 30  # generous: about 1.3 M feeds


# --- hypothesis ---------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=20)
topic_name = text.filter(lambda s: s and "+" not in s and "#" not in s)
level = st.one_of(st.just("+"), text.filter(lambda s: "/" not in s and "+" not in s and "#" not in s))
topic_filter = st.builds(
    lambda levels, hash_: "/".join(levels + (["#"] if hash_ else [])),
    st.lists(level, min_size=0, max_size=4), st.booleans(),
).filter(bool)
pid = st.integers(1, 65535)
qos = st.integers(0, 2)

publish = st.one_of(
    st.builds(Publish, topic_name, st.binary(max_size=300), st.just(0), st.booleans()),
    st.builds(Publish, topic_name, st.binary(max_size=300), st.integers(1, 2), st.booleans(),
              st.booleans(), pid),
)
packets = st.one_of(
    st.builds(Connect, text.filter(bool), st.integers(0, 65535), st.just(True),
              st.none() | text, st.none(),
              st.none() | st.builds(Will, topic_name, st.binary(max_size=50), qos, st.booleans())),
    st.builds(Connect, text.filter(bool), st.integers(0, 65535), st.booleans(), text,
              st.binary(max_size=30)),
    st.builds(ConnAck, st.booleans(), st.integers(0, 5)),
    publish,
    st.builds(PubAck, pid), st.builds(PubRec, pid), st.builds(PubRel, pid),
    st.builds(PubComp, pid), st.builds(UnsubAck, pid),
    st.builds(Subscribe, pid, st.lists(st.tuples(topic_filter, qos), min_size=1, max_size=4)
              .map(tuple)),
    st.builds(SubAck, pid, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=4)
              .map(tuple)),
    st.builds(Unsubscribe, pid, st.lists(topic_filter, min_size=1, max_size=4).map(tuple)),
    st.just(PingReq()), st.just(PingResp()), st.just(Disconnect()),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packets, min_size=1, max_size=12), st.lists(st.integers(0, 1 << 16), max_size=30))
def test_round_trip_in_any_chunking(ps: list[codec.Packet], cuts: list[int]) -> None:
    stream = b"".join(codec.encode(p) for p in ps)
    d = Decoder(BIG)
    got: list[codec.Packet] = []
    for chunk in chunked(stream, cuts):
        d.feed(chunk)
        got.extend(d)
    assert got == ps
    assert d.buffered == 0


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 400), max_size=10),
       st.integers(2, 300))
def test_random_bytes_only_raise_the_codec_error(data: bytes, cuts: list[int], bound: int) -> None:
    d = Decoder(bound)
    try:
        for chunk in chunked(data, cuts):
            d.feed(chunk)
            for p in d:
                # whatever decodes re-encodes to a packet that decodes the same
                assert decode_all(codec.encode(p)) == [p]
    except MalformedPacket as exc:
        assert isinstance(exc.code, ErrorCode)
        if isinstance(exc, PacketTooLarge):
            assert exc.announced > bound
    assert d.buffered <= len(data)


@settings(max_examples=500, deadline=None)
@given(st.lists(publish, min_size=1, max_size=5), st.integers(0, 2000), st.integers(0, 255))
def test_a_flipped_byte_never_escapes_the_hierarchy(ps: list[Publish], at: int, xor: int) -> None:
    stream = bytearray(b"".join(codec.encode(p) for p in ps))
    stream[at % len(stream)] ^= xor
    d = Decoder(4096)
    try:
        d.feed(bytes(stream))
        list(d)
    except MalformedPacket:
        pass
