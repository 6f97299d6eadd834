# MQTT packet encoding and decoding of firmware/mqtt.py, byte for byte against the 3.1.1
# spec, over a real loopback TCP pair: the test plays the broker on the accepted socket.
import errno
import select
import socket
import time

import mpunit
import mqtt

TIMEOUT = 60


def _listen():
    # The unix port has no getsockname(), so take the first free port from a range; bind
    # is atomic, so parallel tests cannot get the same one.
    base = 40000 + (time.ticks_us() % 20000)
    for i in range(200):
        port = base + i
        srv = socket.socket()
        try:
            srv.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
        except OSError:
            srv.close()
            continue
        srv.listen(1)
        return srv, port
    raise AssertionError("no free loopback port")


class Pair:
    # A client MQTTClient attached to one end of a loopback connection, `peer` the other.
    def __init__(self, max_packet=4096, keepalive=60, clean_session=True, headroom=0):
        srv, port = _listen()
        cli = socket.socket()
        cli.setblocking(False)
        try:
            cli.connect(socket.getaddrinfo("127.0.0.1", port)[0][-1])
        except OSError as e:
            if e.errno != errno.EINPROGRESS:
                raise
        peer, _ = srv.accept()
        srv.close()
        peer.setblocking(False)
        self.port = port
        self.peer = peer
        self.poll = select.poll()
        self.poll.register(peer, select.POLLIN)
        self.c = mqtt.MQTTClient(
            "node-1", "127.0.0.1", port,
            keepalive=keepalive, clean_session=clean_session, max_packet=max_packet,
            headroom=headroom,
        )
        self.c._attach(cli)

    def send(self, data):
        self.peer.write(data)

    def recv(self, n, ms=2000):
        # Exactly n bytes the client wrote.
        out = b""
        end = mqtt.deadline(ms)
        while len(out) < n:
            chunk = self.peer.read(n - len(out))
            if chunk:
                out += chunk
                continue
            if chunk == b"":
                raise AssertionError("client closed after %r" % out)
            if time.ticks_diff(end, time.ticks_ms()) <= 0:
                raise AssertionError("only %r of %d bytes" % (out, n))
            self.poll.poll(50)
        return out

    def nothing(self, ms=100):
        self.poll.poll(ms)
        mpunit.eq(self.peer.read(64), None, "client sent something unexpected")

    def close(self):
        self.c.close()
        self.peer.close()


def _connected(will=None, connack=b"\x20\x02\x00\x00", **kw):
    pr = Pair(**kw)
    pr.send(connack)
    sp = pr.c._handshake(mqtt.deadline(2000), will)
    return pr, sp


# ---- encoding ---------------------------------------------------------------------


def test_connect_packet_plain():
    pr, sp = _connected(keepalive=60)
    mpunit.eq(sp, False)
    # 0x10, len 18, "MQTT" level 4, flags clean session, keepalive 60, client id.
    mpunit.eq(pr.recv(20), b"\x10\x12\x00\x04MQTT\x04\x02\x00\x3c\x00\x06node-1")
    pr.close()


def test_connect_packet_with_will_and_persistent_session():
    pr, sp = _connected(
        will=("t/s", b"gone", 1, True), connack=b"\x20\x02\x01\x00", keepalive=300,
        clean_session=False,
    )
    mpunit.eq(sp, True, "session present flag")
    # flags: will 0x04 | will qos 1 << 3 | will retain 0x20, no clean session.
    mpunit.eq(
        pr.recv(31),
        b"\x10\x1d\x00\x04MQTT\x04\x2c\x01\x2c\x00\x06node-1\x00\x03t/s\x00\x04gone",
    )
    pr.close()


def test_publish_qos0_and_qos1_bytes():
    pr, _ = _connected()
    pr.recv(20)
    mpunit.eq(pr.c.publish("a/b", b"hi"), 0)
    mpunit.eq(pr.recv(9), b"\x30\x07\x00\x03a/bhi")
    pid = pr.c.publish("a/b", b"hi", qos=1, retain=True)
    mpunit.eq(pid, 1)
    mpunit.eq(pr.recv(11), b"\x33\x09\x00\x03a/b\x00\x01hi")
    mpunit.eq(pr.c.pending(), 1)
    pr.send(b"\x40\x02\x00\x01")
    pr.c.wait_pubacks(mqtt.deadline(1000))
    mpunit.eq(pr.c.pending(), 0)
    pr.close()


def test_remaining_length_varint_boundaries():
    # 127 fits one byte, 128 needs two, 16384 needs three (spec 2.2.3).
    for size, enc in ((127 - 5, b"\x7f"), (128 - 5, b"\x80\x01"), (16384 - 5, b"\x80\x80\x01")):
        pr, _ = _connected(max_packet=20000)
        pr.recv(20)
        payload = bytes(size)
        pr.c.publish("a/b", payload)
        got = pr.recv(1 + len(enc) + 5 + size)
        mpunit.eq(got[: 1 + len(enc)], b"\x30" + enc, "size %d" % size)
        mpunit.eq(got[1 + len(enc) :], b"\x00\x03a/b" + payload)
        pr.close()


def test_publish_larger_than_buffer_is_sent_in_pieces():
    pr, _ = _connected(max_packet=64)
    pr.recv(20)
    payload = bytes(range(200))
    pid = pr.c.publish("a/b", payload, qos=1)
    mpunit.eq(pr.recv(3 + 5 + 2 + 200), b"\x32\xcf\x01\x00\x03a/b" + bytes([0, pid]) + payload)
    pr.close()


def test_subscribe_ping_disconnect_bytes():
    pr, _ = _connected()
    pr.recv(20)
    pr.send(b"\x90\x03\x00\x01\x01")
    mpunit.eq(pr.c.subscribe("d/#", 1, mqtt.deadline(1000)), 1)
    mpunit.eq(pr.recv(10), b"\x82\x08\x00\x01\x00\x03d/#\x01")
    pr.send(b"\xd0\x00")
    pr.c.ping(mqtt.deadline(1000))
    mpunit.eq(pr.recv(2), b"\xc0\x00")
    pr.c.disconnect()
    mpunit.eq(pr.recv(2), b"\xe0\x00")
    mpunit.eq(pr.c.is_connected(), False)
    pr.peer.close()


def test_subscribe_without_waiting_takes_its_suback_after_the_publishes():
    pr, _ = _connected()
    pr.recv(20)
    mpunit.eq(pr.c.subscribe("d/#", 1, mqtt.deadline(1000), False), -1)
    pid = pr.c.publish("u", b"x", qos=1)  # goes out before any SUBACK came back
    mpunit.eq(pr.recv(10 + 8), b"\x82\x08\x00\x01\x00\x03d/#\x01" + b"\x32\x06\x00\x01u" + bytes([0, pid]) + b"x")
    # The broker's answers in its order: SUBACK, a PUBLISH for us, the PUBACK.
    pr.send(b"\x90\x03\x00\x01\x01" + b"\x30\x07\x00\x03d/1hi" + bytes([0x40, 2, 0, pid]))
    mpunit.eq(pr.c.suback(mqtt.deadline(1000)), 1)
    mpunit.eq(pr.c.wait_msg(mqtt.deadline(1000)), ("d/1", b"hi"))
    pr.c.wait_pubacks(mqtt.deadline(1000))
    mpunit.eq(pr.c.pending(), 0)
    # A refusal is an error when the answer is taken.
    pr.c.subscribe("x/#", 1, mqtt.deadline(1000), False)
    pr.recv(10)
    pr.send(b"\x90\x03\x00\x03\x80")
    try:
        pr.c.suback(mqtt.deadline(1000))
        raise AssertionError("a refused subscription passed")
    except mqtt.MQTTError as e:
        mpunit.eq(e.code, mqtt.SUB_REFUSED)
    pr.close()


def test_twenty_in_flight_distinct_ids_acked_out_of_order():
    pr, _ = _connected()
    pr.recv(20)
    pids = [pr.c.publish("u", b"x", qos=1) for _ in range(20)]
    mpunit.eq(len(set(pids)), 20)
    mpunit.eq(pr.c.pending(), 20)
    pr.recv(20 * 8)
    for pid in reversed(pids):
        pr.send(bytes([0x40, 2, pid >> 8, pid & 0xFF]))
    pr.c.wait_pubacks(mqtt.deadline(1000))
    mpunit.eq(pr.c.pending(), 0)
    pr.close()


def test_bytes_counted_both_ways():
    pr, _ = _connected()
    mpunit.eq(pr.c.bytes_out, 20)
    mpunit.eq(pr.c.bytes_in, 4)
    pr.close()


# ---- decoding and broker errors ---------------------------------------------------


def test_receive_qos1_publish_sends_puback():
    pr, _ = _connected()
    pr.recv(20)
    pr.send(b"\x32\x0c\x00\x03d/x\x12\x34hello")
    mpunit.eq(pr.c.wait_msg(mqtt.deadline(1000)), ("d/x", b"hello"))
    mpunit.eq(pr.recv(4), b"\x40\x02\x12\x34")
    pr.send(b"\x30\x04\x00\x01zQ")
    mpunit.eq(pr.c.wait_msg(mqtt.deadline(1000)), ("z", b"Q"))
    pr.nothing()
    pr.close()


def test_message_during_puback_wait_is_kept():
    pr, _ = _connected()
    pr.recv(20)
    pid = pr.c.publish("u", b"x", qos=1)
    pr.send(b"\x30\x04\x00\x01dM" + bytes([0x40, 2, 0, pid]))
    pr.c.wait_pubacks(mqtt.deadline(1000))
    mpunit.eq(pr.c.wait_msg(mqtt.deadline(10)), ("d", b"M"))
    pr.close()


def test_wait_msg_returns_none_at_deadline_and_stays_connected():
    pr, _ = _connected()
    pr.recv(20)
    t0 = time.ticks_ms()
    mpunit.eq(pr.c.wait_msg(mqtt.deadline(150)), None)
    took = time.ticks_diff(time.ticks_ms(), t0)
    if not 140 <= took <= 400:
        raise AssertionError("wait_msg took %d ms for a 150 ms deadline" % took)
    mpunit.eq(pr.c.is_connected(), True)
    pr.close()


def test_wait_msg_waits_past_a_puback_until_a_publish():
    pr, _ = _connected()
    pr.recv(20)
    pid = pr.c.publish("u", b"x", qos=1)
    pr.recv(8)
    # A PUBACK alone does not end the wait: only a PUBLISH or the deadline does.
    pr.send(bytes([0x40, 2, 0, pid]))
    t0 = time.ticks_ms()
    mpunit.eq(pr.c.wait_msg(mqtt.deadline(150)), None)
    took = time.ticks_diff(time.ticks_ms(), t0)
    if took < 140:
        raise AssertionError("wait_msg returned after %d ms, before its 150 ms deadline" % took)
    mpunit.eq(pr.c.pending(), 0)
    pid = pr.c.publish("u", b"y", qos=1)
    pr.recv(8)
    pr.send(bytes([0x40, 2, 0, pid]) + b"\x30\x04\x00\x01dM")
    mpunit.eq(pr.c.wait_msg(mqtt.deadline(1000)), ("d", b"M"))
    mpunit.eq(pr.c.pending(), 0)
    pr.close()


def test_wait_msg_now_reads_everything_already_there():
    pr, _ = _connected()
    pr.recv(20)
    pid = pr.c.publish("u", b"x", qos=1)
    pr.recv(8)
    pr.send(bytes([0x40, 2, 0, pid]) + b"\x30\x04\x00\x01dN")
    time.sleep_ms(50)
    # A deadline of now: the PUBACK is handled and the PUBLISH behind it still returned.
    mpunit.eq(pr.c.wait_msg(time.ticks_ms()), ("d", b"N"))
    mpunit.eq(pr.c.wait_msg(time.ticks_ms()), None)
    pr.close()


def test_missing_puback_times_out():
    pr, _ = _connected()
    pr.recv(20)
    pr.c.publish("u", b"x", qos=1)
    e = mpunit.raises(mqtt.MQTTError, pr.c.wait_pubacks, mqtt.deadline(100))
    mpunit.eq(e.code, mqtt.TIMEOUT)
    mpunit.eq(pr.c.pending(), 1)
    pr.close()


def test_connack_codes_are_named():
    pr = Pair()
    pr.send(b"\x20\x02\x00\x05")
    e = mpunit.raises(mqtt.MQTTError, pr.c._handshake, mqtt.deadline(1000), None)
    mpunit.eq(e.code, 5)
    if "not authorized" not in str(e):
        raise AssertionError(str(e))
    mpunit.eq(pr.c.is_connected(), False)
    pr.peer.close()


def test_subscription_refused():
    pr, _ = _connected()
    pr.recv(20)
    pr.send(b"\x90\x03\x00\x01\x80")
    e = mpunit.raises(mqtt.MQTTError, pr.c.subscribe, "other/#", 1, mqtt.deadline(1000))
    mpunit.eq(e.code, mqtt.SUB_REFUSED)
    pr.close()


def test_oversized_packet_rejected_without_reading_it():
    pr, _ = _connected(max_packet=256)
    pr.recv(20)
    # A PUBLISH claiming 100000 bytes: refused from the header alone.
    pr.send(b"\x30\xa0\x8d\x06\x00\x01z")
    e = mpunit.raises(mqtt.MQTTError, pr.c.wait_msg, mqtt.deadline(1000))
    mpunit.eq(e.code, mqtt.TOO_BIG)
    mpunit.eq(pr.c.is_connected(), False)
    pr.peer.close()


def test_malformed_length_rejected():
    pr, _ = _connected()
    pr.recv(20)
    pr.send(b"\x30\xff\xff\xff\xff\x01")
    e = mpunit.raises(mqtt.MQTTError, pr.c.wait_msg, mqtt.deadline(1000))
    mpunit.eq(e.code, mqtt.PROTOCOL)
    pr.peer.close()


def test_truncated_packet_times_out_and_closes():
    pr, _ = _connected()
    pr.recv(20)
    pr.send(b"\x30\x10\x00\x03d/x")
    e = mpunit.raises(mqtt.MQTTError, pr.c.wait_msg, mqtt.deadline(150))
    mpunit.eq(e.code, mqtt.TIMEOUT)
    mpunit.eq(pr.c.is_connected(), False)
    pr.peer.close()


def test_broker_closing_is_reported():
    pr, _ = _connected()
    pr.recv(20)
    pr.peer.close()
    e = mpunit.raises(mqtt.MQTTError, pr.c.ping, mqtt.deadline(1000))
    if e.code not in (mqtt.CLOSED, mqtt.NETWORK):
        raise AssertionError(str(e))


def test_full_inbox_leaves_qos1_unacknowledged():
    pr, _ = _connected()
    pr.recv(20)
    pid = pr.c.publish("u", b"x", qos=1)
    pr.recv(8)
    for i in range(9):
        pr.send(bytes([0x32, 6, 0, 1, 0x64, 0, i + 1, 0x30 + i]))
    pr.send(bytes([0x40, 2, 0, pid]))
    pr.c.wait_pubacks(mqtt.deadline(1000))
    acks = pr.recv(8 * 4)
    mpunit.eq(acks[-4:], bytes([0x40, 2, 0, 8]))
    pr.nothing()
    mpunit.eq(pr.c.dropped, 1)
    got = []
    while True:
        m = pr.c.wait_msg(mqtt.deadline(20))
        if m is None:
            break
        got.append(m[1])
    mpunit.eq(got, [bytes([0x30 + i]) for i in range(8)])
    pr.close()


def test_operations_need_a_connection():
    c = mqtt.MQTTClient("n", "127.0.0.1", 1)
    e = mpunit.raises(mqtt.MQTTError, c.publish, "t", b"x")
    mpunit.eq(e.code, mqtt.NOT_CONNECTED)
    mpunit.raises(ValueError, c.publish, "t", b"x", 2)


def test_publish_allocates_little():
    import gc

    pr, _ = _connected()
    pr.recv(20)
    payload = bytes(200)
    pr.c.publish("torpor/node-1/up", payload)
    pr.recv(220)
    gc.collect()
    before = gc.mem_free()
    for _ in range(10):
        pr.c.publish("torpor/node-1/up", payload)
    used = before - gc.mem_free()
    pr.recv(10 * 220)
    # A few memoryview slices per packet, never a copy of the payload.
    if used > 10 * 200:
        raise AssertionError("10 publishes allocated %d bytes" % used)
    pr.close()


def test_publish_out_sends_the_payload_built_in_place_with_its_header():
    pr, _ = _connected(max_packet=400, headroom=32)
    pr.recv(20)
    out = pr.c.out
    mpunit.eq(len(out), 400 - 32)
    for i in range(200):
        out[i] = i
    pid = pr.c.publish_out(b"t/up", 200, qos=1)
    mpunit.eq(pid, 1)
    # 0x32 (QoS 1), remaining length 208 in two bytes, topic, packet id, the payload.
    mpunit.eq(pr.recv(211), b"\x32\xd0\x01\x00\x04t/up\x00\x01" + bytes(range(200)))
    out[0:2] = b"hi"
    mpunit.eq(pr.c.publish_out(memoryview(b"t/up"), 2), 0)
    mpunit.eq(pr.recv(10), b"\x30\x08\x00\x04t/uphi")
    mpunit.eq(pr.c.pending(), 1)
    e = mpunit.raises(mqtt.MQTTError, pr.c.publish_out, b"t" * 40, 2)
    mpunit.eq(e.code, mqtt.TOO_BIG)
    e = mpunit.raises(mqtt.MQTTError, pr.c.publish_out, b"t/up", 369)
    mpunit.eq(e.code, mqtt.TOO_BIG)
    pr.nothing()
    pr.close()


def test_publish_out_allocates_little_and_spare_lends_the_receive_buffer():
    import gc

    pr, _ = _connected(max_packet=300, headroom=32)
    pr.recv(20)
    topic = memoryview(b"torpor/node-1/up")
    pr.c.publish_out(topic, 200)
    pr.recv(220)
    gc.collect()
    before = gc.mem_alloc()
    for _ in range(10):
        pr.c.publish_out(topic, 200)
    used = gc.mem_alloc() - before
    pr.recv(10 * 220)
    # One view of the packet per publish, no copy of it.
    if used > 10 * 64:
        raise AssertionError("10 publishes allocated %d bytes" % used)
    mpunit.eq(len(pr.c.spare(300)), 300)
    mpunit.eq(pr.c.spare(301), None)
    pr.close()
