"""A sans-I/O MQTT 3.1.1 codec: packets to bytes, and bytes (in any chunking) to packets.

No sockets, no event loop: the asyncio client (`transport.client`), the broker tools and the
load generator drive it. Every packet type of MQTT 3.1.1 is decoded, so a test broker or a
fuzzer can use the same decoder the client does; every violation of the standard raises a
`MalformedPacket` with its `ErrorCode`, and a remaining length above the decoder's bound is
refused as soon as its header is read, before the body is buffered.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final, NewType, TypeAlias

from gateway.transport.errors import EncodeError, ErrorCode, MalformedPacket, PacketTooLarge

# MQTT 3.1.1 section 2.2.3: at most four bytes of remaining length.
MAX_REMAINING_LENGTH: Final = 268_435_455
# A fixed header is one type byte plus one to four remaining-length bytes.
MAX_FIXED_HEADER: Final = 5
PROTOCOL_NAME: Final = b"MQTT"
PROTOCOL_LEVEL: Final = 4  # 3.1.1


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnackCode(IntEnum):
    """CONNACK return codes (3.2.2.3), with the operator's reading of each."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


SUBACK_FAILURE: Final = 0x80


# --- packets ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    keepalive: int = 60
    clean_session: bool = True
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None


@dataclass(frozen=True, slots=True)
class ConnAck:
    session_present: bool
    return_code: int


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0  # 0 for QoS 0, 1..65535 otherwise


@dataclass(frozen=True, slots=True)
class PubAck:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PubRec:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PubRel:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PubComp:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, int], ...]  # (filter, requested QoS)


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    return_codes: tuple[int, ...]  # granted QoS, or SUBACK_FAILURE


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnsubAck:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    pass


Packet: TypeAlias = (
    Connect | ConnAck | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | SubAck
    | Unsubscribe | UnsubAck | PingReq | PingResp | Disconnect
)


@dataclass(frozen=True, slots=True)
class Oversized:
    """A packet over a dropping `Decoder`'s bound, let go unread: what its first bytes
    said. `size` is the whole packet as announced; `topic` (a PUBLISH's, decoded with
    replacement characters) and `packet_id` (a QoS 1 or 2 PUBLISH's) are empty/0 when the
    packet is of another type. The reader still owes a QoS 1 PUBLISH its PUBACK."""

    kind: int  # PacketType value
    size: int
    topic: str = ""
    qos: int = 0
    packet_id: int = 0


PINGREQ_BYTES: Final = b"\xc0\x00"
PINGRESP_BYTES: Final = b"\xd0\x00"
DISCONNECT_BYTES: Final = b"\xe0\x00"


def max_publish_packet(max_payload: int, max_topic: int) -> int:
    """The largest whole PUBLISH packet carrying at most `max_payload` bytes on a topic of
    at most `max_topic` UTF-8 bytes: the bound to give a `Decoder` that reads them."""
    body = 2 + max_topic + 2 + max_payload  # topic length, topic, packet id, payload
    return 1 + len(encode_remaining_length(body)) + body


# --- encoding ---------------------------------------------------------------------------

def encode_remaining_length(n: int) -> bytes:
    """MQTT's variable byte integer (2.2.3): 1 byte up to 127, 4 bytes up to 268,435,455."""
    if n < 0x80:
        if n < 0:
            raise EncodeError(f"remaining length {n} is negative")
        return bytes((n,))
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n < 0x200000:
        return bytes((n & 0x7F | 0x80, (n >> 7) & 0x7F | 0x80, n >> 14))
    if n <= MAX_REMAINING_LENGTH:
        return bytes((n & 0x7F | 0x80, (n >> 7) & 0x7F | 0x80, (n >> 14) & 0x7F | 0x80, n >> 21))
    raise EncodeError(f"packet body of {n} bytes exceeds MQTT's {MAX_REMAINING_LENGTH}")


def _string(s: str, what: str) -> bytes:
    b = _utf8(s, what)
    return len(b).to_bytes(2, "big") + b


def _utf8(s: str, what: str) -> bytes:
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError:
        raise EncodeError(f"{what} {s!r} is not encodable as UTF-8") from None
    if len(b) > 0xFFFF:
        raise EncodeError(f"{what} of {len(b)} bytes exceeds MQTT's 65535")
    if "\x00" in s:
        raise EncodeError(f"{what} {s!r} contains U+0000, which MQTT forbids")
    return b


def _binary(b: bytes, what: str) -> bytes:
    if len(b) > 0xFFFF:
        raise EncodeError(f"{what} of {len(b)} bytes exceeds MQTT's 65535")
    return len(b).to_bytes(2, "big") + b


def _check_qos(qos: int, allowed: tuple[int, ...] = (0, 1, 2)) -> None:
    if qos not in allowed:
        raise EncodeError(f"QoS {qos!r} is not one of {allowed}")


def _check_packet_id(pid: int) -> None:
    if not 1 <= pid <= 0xFFFF:
        raise EncodeError(f"packet id {pid!r} is outside 1..65535")


def check_topic_name(topic: str) -> None:
    """A PUBLISH topic: non-empty, no wildcards, no U+0000 (4.7.3)."""
    if not topic:
        raise EncodeError("topic name is empty")
    if "+" in topic or "#" in topic:
        raise EncodeError(f"topic name {topic!r} contains a wildcard")


def check_topic_filter(flt: str) -> None:
    """A SUBSCRIBE/UNSUBSCRIBE filter: '#' only as a whole last level, '+' only as a
    whole level (4.7.1)."""
    if not flt:
        raise EncodeError("topic filter is empty")
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise EncodeError(f"topic filter {flt!r}: '#' must be a whole last level")
        if "+" in level and level != "+":
            raise EncodeError(f"topic filter {flt!r}: '+' must be a whole level")


def encode_connect(p: Connect) -> bytes:
    flags = 0x02 if p.clean_session else 0
    if not 0 <= p.keepalive <= 0xFFFF:
        raise EncodeError(f"keepalive {p.keepalive!r} is outside 0..65535 s")
    if not p.client_id and not p.clean_session:
        raise EncodeError("an empty client id needs a clean session (3.1.3.1)")
    payload = _string(p.client_id, "client id")
    if p.will is not None:
        _check_qos(p.will.qos)
        check_topic_name(p.will.topic)
        flags |= 0x04 | (p.will.qos << 3) | (0x20 if p.will.retain else 0)
        payload += _string(p.will.topic, "will topic") + _binary(p.will.payload, "will payload")
    if p.username is not None:
        flags |= 0x80
        payload += _string(p.username, "username")
    if p.password is not None:
        if p.username is None:
            raise EncodeError("a password needs a username in MQTT 3.1.1")
        flags |= 0x40
        payload += _binary(p.password, "password")
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + p.keepalive.to_bytes(2, "big") + payload
    return b"\x10" + encode_remaining_length(len(body)) + body


def encode_connack(p: ConnAck) -> bytes:
    if not 0 <= p.return_code <= 0xFF:
        raise EncodeError(f"CONNACK return code {p.return_code!r} is outside 0..255")
    return bytes((0x20, 2, 1 if p.session_present else 0, p.return_code))


EncodedTopic = NewType("EncodedTopic", bytes)


def encode_topic(topic: str | bytes) -> EncodedTopic:
    """A PUBLISH topic name checked once and encoded with its length prefix, for
    `publish_packet` (the hot path publishes to the same few topics)."""
    if isinstance(topic, bytes):
        try:
            topic = topic.decode("utf-8")
        except UnicodeDecodeError:
            raise EncodeError(f"topic {topic!r} is not UTF-8") from None
    check_topic_name(topic)
    t = _utf8(topic, "topic")
    return EncodedTopic(len(t).to_bytes(2, "big") + t)


def publish_packet(topic: EncodedTopic, payload: bytes, qos: int = 0, packet_id: int = 0,
                   retain: bool = False, dup: bool = False) -> bytes:
    """One PUBLISH on a topic from `encode_topic`."""
    if qos:
        if qos != 1 and qos != 2:
            raise EncodeError(f"QoS {qos!r} is not one of (0, 1, 2)")
        if not 0 < packet_id <= 0xFFFF:
            raise EncodeError(f"packet id {packet_id!r} is outside 1..65535")
        n = len(topic) + 2 + len(payload)
        tail = topic + bytes((packet_id >> 8, packet_id & 0xFF)) + payload
    else:
        if packet_id:
            raise EncodeError("a QoS 0 PUBLISH has no packet id")
        if dup:
            raise EncodeError("a QoS 0 PUBLISH cannot be a duplicate (3.3.1.1)")
        n = len(topic) + len(payload)
        tail = topic + payload
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    if n < 0x80:
        return bytes((first, n)) + tail
    return bytes((first,)) + encode_remaining_length(n) + tail


def encode_publish(
    topic: str | bytes,
    payload: bytes,
    qos: int = 0,
    packet_id: int = 0,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    """One PUBLISH; `topic` as text or UTF-8 bytes, checked on every call."""
    return publish_packet(encode_topic(topic), payload, qos, packet_id, retain, dup)


def _ack(first: int, pid: int) -> bytes:
    _check_packet_id(pid)
    return bytes((first, 2, pid >> 8, pid & 0xFF))


def encode_puback(packet_id: int) -> bytes:
    return _ack(0x40, packet_id)


def encode_subscribe(p: Subscribe) -> bytes:
    _check_packet_id(p.packet_id)
    if not p.topics:
        raise EncodeError("a SUBSCRIBE needs at least one topic filter (3.8.3)")
    body = p.packet_id.to_bytes(2, "big")
    for flt, qos in p.topics:
        check_topic_filter(flt)
        _check_qos(qos)
        body += _string(flt, "topic filter") + bytes((qos,))
    return b"\x82" + encode_remaining_length(len(body)) + body


def encode_suback(p: SubAck) -> bytes:
    _check_packet_id(p.packet_id)
    for rc in p.return_codes:
        if rc not in (0, 1, 2, SUBACK_FAILURE):
            raise EncodeError(f"SUBACK return code {rc!r} is not 0, 1, 2 or 0x80")
    if not p.return_codes:
        raise EncodeError("a SUBACK needs at least one return code")
    body = p.packet_id.to_bytes(2, "big") + bytes(p.return_codes)
    return b"\x90" + encode_remaining_length(len(body)) + body


def encode_unsubscribe(p: Unsubscribe) -> bytes:
    _check_packet_id(p.packet_id)
    if not p.topics:
        raise EncodeError("an UNSUBSCRIBE needs at least one topic filter (3.10.3)")
    body = p.packet_id.to_bytes(2, "big")
    for flt in p.topics:
        check_topic_filter(flt)
        body += _string(flt, "topic filter")
    return b"\xa2" + encode_remaining_length(len(body)) + body


def encode(packet: Packet) -> bytes:
    """Any packet to its bytes."""
    match packet:
        case Publish(topic, payload, qos, retain, dup, pid):
            return encode_publish(topic, payload, qos, pid, retain, dup)
        case PubAck(pid):
            return _ack(0x40, pid)
        case PubRec(pid):
            return _ack(0x50, pid)
        case PubRel(pid):
            return _ack(0x62, pid)
        case PubComp(pid):
            return _ack(0x70, pid)
        case UnsubAck(pid):
            return _ack(0xB0, pid)
        case Connect():
            return encode_connect(packet)
        case ConnAck():
            return encode_connack(packet)
        case Subscribe():
            return encode_subscribe(packet)
        case SubAck():
            return encode_suback(packet)
        case Unsubscribe():
            return encode_unsubscribe(packet)
        case PingReq():
            return PINGREQ_BYTES
        case PingResp():
            return PINGRESP_BYTES
        case Disconnect():
            return DISCONNECT_BYTES
    raise EncodeError(f"not an MQTT packet: {packet!r}")


# --- decoding ---------------------------------------------------------------------------

# The low nibble each type must carry (2.2.2); PUBLISH's is free-form and checked apart.
_FLAGS: Final = {1: 0, 2: 0, 4: 0, 5: 0, 6: 2, 7: 0, 8: 2, 9: 0, 10: 2, 11: 0, 12: 0, 13: 0, 14: 0}


def _bad(code: ErrorCode, message: str) -> MalformedPacket:
    return MalformedPacket(code, message)


class _Reader:
    """Field reader over one packet's body."""

    __slots__ = ("body", "pos", "kind")

    def __init__(self, body: bytes, kind: str) -> None:
        self.body = body
        self.pos = 0
        self.kind = kind

    def need(self, n: int, what: str) -> None:
        if len(self.body) - self.pos < n:
            raise _bad(ErrorCode.TRUNCATED, f"{self.kind} ends inside its {what}")

    def u8(self, what: str) -> int:
        self.need(1, what)
        v = self.body[self.pos]
        self.pos += 1
        return v

    def u16(self, what: str) -> int:
        self.need(2, what)
        b, p = self.body, self.pos
        self.pos = p + 2
        return (b[p] << 8) | b[p + 1]

    def binary(self, what: str) -> bytes:
        n = self.u16(what + " length")
        self.need(n, what)
        v = self.body[self.pos:self.pos + n]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        return _decode_str(self.binary(what), self.kind, what)

    def packet_id(self) -> int:
        pid = self.u16("packet id")
        if pid == 0:
            raise _bad(ErrorCode.BAD_PACKET_ID, f"{self.kind} carries packet id 0")
        return pid

    def rest(self) -> bytes:
        v = self.body[self.pos:]
        self.pos = len(self.body)
        return v

    def left(self) -> int:
        return len(self.body) - self.pos

    def end(self) -> None:
        if self.pos != len(self.body):
            raise _bad(ErrorCode.TRAILING_BYTES,
                       f"{self.kind} has {len(self.body) - self.pos} bytes after its last field")


def _decode_str(raw: bytes, kind: str, what: str) -> str:
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(ErrorCode.BAD_STRING, f"{kind}'s {what} is not valid UTF-8") from None
    if "\x00" in s:
        raise _bad(ErrorCode.BAD_STRING, f"{kind}'s {what} contains U+0000")
    return s


def _filter(raw: str, kind: str) -> str:
    try:
        check_topic_filter(raw)
    except EncodeError as exc:
        raise _bad(ErrorCode.BAD_TOPIC, f"{kind}: {exc}") from None
    return raw


# A frozen dataclass's __init__ goes through object.__setattr__ once per field, which made
# building the Publish cost as much as decoding it. The decoder fills the slots directly:
# same class, same frozen instances, a third of the cost.
_new = object.__new__
_PUBLISH_SLOTS = tuple(Publish.__dict__[f].__set__ for f in Publish.__slots__)
_PUBACK_ID = PubAck.__dict__["packet_id"].__set__


def _publish(topic: str, payload: bytes, qos: int, retain: bool, dup: bool, pid: int) -> Publish:
    p = _new(Publish)
    s_topic, s_payload, s_qos, s_retain, s_dup, s_pid = _PUBLISH_SLOTS
    s_topic(p, topic)
    s_payload(p, payload)
    s_qos(p, qos)
    s_retain(p, retain)
    s_dup(p, dup)
    s_pid(p, pid)
    return p


def _puback(pid: int) -> PubAck:
    p = _new(PubAck)
    _PUBACK_ID(p, pid)
    return p


def _decode_publish(first: int, body: bytes) -> Publish:
    qos = (first >> 1) & 3
    if qos == 3:
        raise _bad(ErrorCode.BAD_QOS, "PUBLISH with QoS 3")
    n = len(body)
    if n < 2:
        raise _bad(ErrorCode.TRUNCATED, "PUBLISH ends inside its topic length")
    end = 2 + ((body[0] << 8) | body[1])
    if n < end + (2 if qos else 0):
        raise _bad(ErrorCode.TRUNCATED, "PUBLISH ends inside its topic or packet id")
    topic = _decode_str(body[2:end], "PUBLISH", "topic")
    if not topic or "+" in topic or "#" in topic:
        raise _bad(ErrorCode.BAD_TOPIC, f"PUBLISH topic {topic!r} is empty or has a wildcard")
    dup = bool(first & 0x08)
    if qos:
        pid = (body[end] << 8) | body[end + 1]
        if pid == 0:
            raise _bad(ErrorCode.BAD_PACKET_ID, "PUBLISH carries packet id 0")
        return _publish(topic, body[end + 2:], qos, bool(first & 1), dup, pid)
    if dup:
        raise _bad(ErrorCode.BAD_FLAGS, "QoS 0 PUBLISH with the DUP flag")
    return _publish(topic, body[end:], 0, bool(first & 1), False, 0)


def _decode_connect(r: _Reader) -> Connect:
    if r.binary("protocol name") != PROTOCOL_NAME:
        raise _bad(ErrorCode.BAD_CONNECT, "CONNECT's protocol name is not MQTT")
    level = r.u8("protocol level")
    if level != PROTOCOL_LEVEL:
        raise _bad(ErrorCode.BAD_CONNECT, f"CONNECT asks for protocol level {level}, not 4")
    flags = r.u8("flags")
    if flags & 0x01:
        raise _bad(ErrorCode.BAD_FLAGS, "CONNECT's reserved flag is set")
    keepalive = r.u16("keepalive")
    client_id = r.string("client id")
    if not client_id and not flags & 0x02:
        raise _bad(ErrorCode.BAD_CONNECT, "CONNECT with an empty client id needs a clean session")
    will = None
    will_qos = (flags >> 3) & 3
    if flags & 0x04:
        if will_qos == 3:
            raise _bad(ErrorCode.BAD_QOS, "CONNECT's will has QoS 3")
        wtopic = r.string("will topic")
        if not wtopic or "+" in wtopic or "#" in wtopic:
            raise _bad(ErrorCode.BAD_TOPIC,
                       f"CONNECT's will topic {wtopic!r} is empty or has a wildcard")
        will = Will(wtopic, r.binary("will payload"), will_qos, bool(flags & 0x20))
    elif will_qos or flags & 0x20:
        raise _bad(ErrorCode.BAD_FLAGS, "CONNECT has will QoS or retain without a will")
    username = r.string("username") if flags & 0x80 else None
    if flags & 0x40 and not flags & 0x80:
        raise _bad(ErrorCode.BAD_FLAGS, "CONNECT has a password without a username")
    password = r.binary("password") if flags & 0x40 else None
    r.end()
    return Connect(client_id, keepalive, bool(flags & 0x02), username, password, will)


def _decode_body(first: int, body: bytes) -> Packet:
    kind = first >> 4
    if kind == 3:
        return _decode_publish(first, body)
    if first == 0x40 and len(body) == 2:  # PUBACK, the other hot packet
        pid = (body[0] << 8) | body[1]
        if pid:
            return _puback(pid)
    if kind == 0 or kind == 15:
        raise _bad(ErrorCode.UNKNOWN_PACKET_TYPE, f"packet type {kind} is reserved")
    if first & 0x0F != _FLAGS[kind]:
        raise _bad(ErrorCode.BAD_FLAGS, f"{PacketType(kind).name} with flags {first & 0x0F:#x}")
    r = _Reader(body, PacketType(kind).name)
    packet: Packet
    if kind == 4:
        packet = PubAck(r.packet_id())
    elif kind == 2:
        ack_flags = r.u8("flags")
        if ack_flags & 0xFE:
            raise _bad(ErrorCode.BAD_FLAGS, f"CONNACK with flags {ack_flags:#x}")
        packet = ConnAck(bool(ack_flags), r.u8("return code"))
    elif kind == 9:
        pid = r.packet_id()
        codes = r.rest()
        if not codes:
            raise _bad(ErrorCode.TRUNCATED, "SUBACK has no return code")
        for c in codes:
            if c not in (0, 1, 2, SUBACK_FAILURE):
                raise _bad(ErrorCode.BAD_RETURN_CODE, f"SUBACK return code {c:#x}")
        packet = SubAck(pid, tuple(codes))
    elif kind == 11:
        packet = UnsubAck(r.packet_id())
    elif kind in (12, 13, 14):
        packet = (PingReq(), PingResp(), Disconnect())[kind - 12]
    elif kind == 5:
        packet = PubRec(r.packet_id())
    elif kind == 6:
        packet = PubRel(r.packet_id())
    elif kind == 7:
        packet = PubComp(r.packet_id())
    elif kind == 8:
        pid = r.packet_id()
        subs: list[tuple[str, int]] = []
        while r.left() or not subs:
            flt = _filter(r.string("topic filter"), "SUBSCRIBE")
            opts = r.u8("requested QoS")
            if opts > 2:
                raise _bad(ErrorCode.BAD_QOS, f"SUBSCRIBE asks for QoS byte {opts:#x}")
            subs.append((flt, opts))
        packet = Subscribe(pid, tuple(subs))
    elif kind == 10:
        pid = r.packet_id()
        flts: list[str] = []
        while r.left() or not flts:
            flts.append(_filter(r.string("topic filter"), "UNSUBSCRIBE"))
        packet = Unsubscribe(pid, tuple(flts))
    else:  # kind == 1
        return _decode_connect(r)
    r.end()
    return packet


def decode_packet(data: bytes, max_packet: int = MAX_REMAINING_LENGTH + MAX_FIXED_HEADER) -> Packet:
    """Exactly one whole packet from `data` (convenience for tests and probes)."""
    d = Decoder(max_packet)
    d.feed(data)
    p = d.next_packet()
    if p is None:
        raise _bad(ErrorCode.TRUNCATED, f"{len(data)} bytes are not a whole packet")
    if d.buffered:
        raise _bad(ErrorCode.TRAILING_BYTES, f"{d.buffered} bytes after the packet")
    return p


class Decoder:
    """Incremental decoder: `feed()` byte chunks of any size, then take packets with
    `next_packet()` (None when the next one is incomplete) or iterate.

    The buffer is a bytearray read from an offset and compacted only once the consumed
    part is the larger half, so reading is amortized linear in the bytes fed, however they
    are chunked. `max_packet` bounds a whole packet (fixed header included); an announced
    length above it raises `PacketTooLarge` as soon as the header is complete, or, with
    `drop_oversized`, is let go: only its first bytes (a PUBLISH's topic and packet id) are
    read, `next_item()` returns them as an `Oversized`, and the rest of the packet is
    discarded as it is fed, never buffered; the stream stays in step. After any
    `MalformedPacket` the stream is out of step: the decoder re-raises the same error and
    the connection must be closed.
    """

    __slots__ = ("max_packet", "drop_oversized", "_buf", "_pos", "_need", "_head", "_error",
                 "_big", "_skip")

    def __init__(self, max_packet: int, drop_oversized: bool = False) -> None:
        if max_packet < 2:
            raise ValueError(f"max_packet {max_packet} is below the smallest MQTT packet (2 bytes)")
        self.max_packet = max_packet
        self._buf = bytearray()
        self._pos = 0
        self._need = 0  # whole size of the packet at _pos once its header is read, else 0
        self._head = 0  # its fixed header's size
        self._error: MalformedPacket | None = None
        self.drop_oversized = drop_oversized
        self._big = 0  # announced size of an oversized packet at _pos, being dropped
        self._skip = 0  # bytes of a dropped packet still to come, to discard

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as packets."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append `data`. Raises `PacketTooLarge` (or `MalformedPacket` for a bad length)
        right away if the packet being assembled announces too much."""
        if self._error is not None:
            raise self._error
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip:]
            self._skip = 0
        self._buf += data
        if not self._need and not self._big:
            self._header()

    def _header(self) -> bool:
        """Parse the fixed header at _pos if complete; True when _need is known."""
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < 2:
            return False
        b = buf[pos + 1]
        if b < 0x80:  # the common case: one length byte
            length, head = b, 2
        else:
            length, mult, i = b & 0x7F, 128, pos + 2
            while True:
                if i - pos >= MAX_FIXED_HEADER:
                    self._error = _bad(ErrorCode.MALFORMED_REMAINING_LENGTH,
                                       "remaining length runs past four bytes")
                    raise self._error
                if i >= len(buf):
                    return False
                b = buf[i]
                length += (b & 0x7F) * mult
                i += 1
                if b < 0x80:
                    break
                mult <<= 7
            head = i - pos
        if length + head > self.max_packet:
            if self.drop_oversized:
                self._big = length + head
                self._head = head
                return True
            self._error = PacketTooLarge(length + head, self.max_packet)
            raise self._error
        self._need = length + head
        self._head = head
        return True

    def next_packet(self) -> Packet | None:
        """The next whole packet, or None until more bytes are fed."""
        item = self.next_item()
        if isinstance(item, Oversized):
            raise PacketTooLarge(item.size, self.max_packet)
        return item

    def next_item(self) -> Packet | Oversized | None:
        """`next_packet`, with the packets a dropping decoder let go as `Oversized`."""
        if self._error is not None:
            raise self._error
        if self._big:
            return self._drop()
        if not self._need and not self._header():
            return None
        if self._big:
            return self._drop()
        buf, pos, need = self._buf, self._pos, self._need
        end = pos + need
        if len(buf) < end:
            return None
        first = buf[pos]
        body = bytes(buf[pos + self._head:end])
        self._need = 0
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end > 4096 and end * 2 > len(buf):
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end
        try:
            return _decode_body(first, body)
        except MalformedPacket as exc:
            self._error = exc
            raise

    def _drop(self) -> Oversized | None:
        """The oversized packet at _pos, once the bytes that describe it are here."""
        buf, pos, head, size = self._buf, self._pos, self._head, self._big
        avail = len(buf) - pos
        first = buf[pos]
        kind, qos, topic, pid = first >> 4, (first >> 1) & 3, "", 0
        if kind == PacketType.PUBLISH and size >= head + 2:
            start = pos + head
            if avail < head + 2:
                return None
            end = start + 2 + (buf[start] << 8 | buf[start + 1])
            want = end - pos + (2 if qos else 0)
            if want > size:  # a topic longer than the packet: nothing to trust in it
                qos = 0
                want = end = start
            if avail < want:
                return None  # at most 65,541 bytes wait for the topic and packet id
            topic = bytes(buf[start + 2:end]).decode("utf-8", "replace")
            if qos:
                pid = buf[end] << 8 | buf[end + 1]
        take = min(size, avail)
        del buf[:pos + take]
        self._pos = 0
        self._skip = size - take
        self._big = 0
        return Oversized(kind, size, topic, qos, pid)

    def __iter__(self) -> Decoder:
        return self

    def __next__(self) -> Packet:
        p = self.next_packet()
        if p is None:
            raise StopIteration
        return p
