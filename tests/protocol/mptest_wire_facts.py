# The node's generated codec inside the unix port: a refused frame carries the error_code of
# its ERROR answer, and the in-place reader of ACK / SLEEP_NOW takes only frames the decoder
# accepts, reading the same values.
import mpunit
import proto


def _code(p):
    try:
        proto.decode(p)
    except proto.ProtocolError as e:
        return e.code
    return None


def test_protocol_error_carries_its_error_code():
    buf = bytearray(proto.MAX_SLEEP_NOW)
    p = bytes(buf[: proto.encode_sleep_now(buf, 5, 600, 0)])
    mpunit.eq(_code(p), None)
    mpunit.eq(_code(p[:4]), proto.ERROR_CODE_MALFORMED)
    mpunit.eq(_code(p[:-1]), proto.ERROR_CODE_MALFORMED)
    mpunit.eq(_code(b"\x21" + p[1:]), proto.ERROR_CODE_UNSUPPORTED_VERSION)
    mpunit.eq(_code(p[:1] + b"\xee" + p[2:]), proto.ERROR_CODE_UNKNOWN_FRAME)
    mpunit.eq(_code(p + bytes(proto.MAX_FRAME)), proto.ERROR_CODE_TOO_LARGE)
    try:
        proto.decode(p[:4])
    except proto.ProtocolError as e:
        mpunit.eq("truncated" in str(e), True)  # the message still says why


def _in_place(p):
    # What the node takes from a frame in place: the generated reader's fields.
    end = proto.in_place(p)
    if not end:
        return None
    if p[1] == proto.ACK:
        cumulative, t, pending = proto.read_ack(p, end)
        return (proto.ACK, cumulative, [], t, pending)
    return (proto.SLEEP_NOW,) + proto.read_sleep_now(p, end)


def _decoded(p):
    try:
        t, f = proto.decode(p)
    except proto.ProtocolError:
        return "refused"
    if t == proto.ACK:
        return (t, f[proto.ACK_CUMULATIVE], f[proto.ACK_SELECTIVE], f[proto.ACK_TIME], f[proto.ACK_PENDING])
    if t == proto.SLEEP_NOW:
        return (t, f[proto.SLEEP_NOW_SLEEP_S], f[proto.SLEEP_NOW_PENDING])
    return "other"


def test_in_place_reads_what_the_decoder_reads():
    buf = bytearray(proto.MAX_ACK)
    frames = [bytes(buf[: proto.encode_ack(buf, 1, c, [], t, n)])
              for c, t, n in ((7, 0, 0), (0xFFFFFFFF, 1767225600, 3), (64, 0, 255), (1, 5, 0))]
    frames += [bytes(buf[: proto.encode_sleep_now(buf, 5, s, n)]) for s, n in ((0, 0), (600, 4))]
    for p in frames:
        mpunit.eq(_in_place(p), _decoded(p))
    with_ids = bytes(buf[: proto.encode_ack(buf, 1, 9, [11, 12], 0, 0)])
    mpunit.eq(proto.in_place(with_ids), 0)  # selective ids: for the decoder
    taken = 0
    for p in frames:
        for i in range(len(p)):
            for v in (0x00, 0x01, 0x02, 0x03, 0x04, 0x21, 0xFF):
                q = p[:i] + bytes((v,)) + p[i + 1:]
                mine = _in_place(q)
                if mine is not None:
                    taken += 1
                    mpunit.eq(mine, _decoded(q))
        for k in range(len(p)):
            mpunit.eq(_in_place(p[:k]) is None or _in_place(p[:k]) == _decoded(p[:k]), True)
    mpunit.eq(taken > 50, True)
