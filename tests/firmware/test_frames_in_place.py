"""Frames the node builds in place (in the MQTT client's transmit buffer, readings gathered
from the flash queue into its receive buffer) leave as PUBLISH packets that the gateway's
CPython codec decodes to what was queued."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

from gateway import proto
from tests.mpharness import run_micropython

# The node side: a queue on a littlefs image, a plain MQTT client attached to a socket
# connected to the test, HELLO and BURST built in client.out and sent with publish_out.
_NODE = """
import socket, struct
import simflash, mqtt, proto
from flashq import FlashQueue
simflash.mount({img!r}, '/flash', 4096, 64)
q = FlashQueue('/flash/q', 10, 500)
for n in range(40):
    q.append(struct.pack('<IhHH', 1767225600 + 60 * n, 2000 + n, 5000 - n, 4100))
q.ack(0, (17,))
s = socket.socket()
s.connect(socket.getaddrinfo('127.0.0.1', {port})[0][-1])
s.setblocking(False)
c = mqtt.MQTTClient('node-1', '127.0.0.1', {port}, max_packet=1024 + 96, headroom=96)
c._attach(s)
topic = memoryview(b'torpor/node-1/up')
n = proto.encode_hello(c.out, 0x80000001, 7, 1, 4100, -60, 12345, q.depth, 0, 60, 3000,
                       1767228000, 0, ota_state=4, first_id=q.floor + 1)
c.publish_out(topic, n, 1)
after = 0
while True:
    recs = c.spare(40 * 10)
    k = q.read_run(recs, after)
    if not k:
        break
    n = proto.encode_burst(c.out, q.run_first, proto.SCHEMA_ENV3, 60, recs, k)
    c.publish_out(topic, n, 1)
    after = q.run_first + k - 1
s.close()
print('OK')
"""


def _packets(data: bytes) -> list[tuple[int, bytes, int, bytes]]:
    # (first byte, topic, packet id, payload) of each PUBLISH in data.
    out = []
    i = 0
    while i < len(data):
        t = data[i]
        n = shift = 0
        i += 1
        while True:
            d = data[i]
            i += 1
            n |= (d & 0x7F) << shift
            shift += 7
            if not d & 0x80:
                break
        body = data[i : i + n]
        i += n
        tl = struct.unpack_from(">H", body)[0]
        topic = body[2 : 2 + tl]
        pid = struct.unpack_from(">H", body, 2 + tl)[0]
        out.append((t, topic, pid, body[4 + tl :]))
    return out


def test_hello_and_bursts_built_in_place_decode_with_the_cpython_codec(tmp_path: Path) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = bytearray()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while chunk := conn.recv(65536):
                got.extend(chunk)

    th = threading.Thread(target=serve)
    th.start()
    try:
        proc = run_micropython(_NODE.format(img=str(tmp_path / "flash.img"), port=srv.getsockname()[1]))
        th.join(30)
    finally:
        srv.close()
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    packets = _packets(bytes(got))
    assert [(t, topic, pid) for t, topic, pid, _ in packets] == [
        (0x32, b"torpor/node-1/up", 1), (0x32, b"torpor/node-1/up", 2), (0x32, b"torpor/node-1/up", 3),
    ]
    hello = proto.decode(packets[0][3])
    assert isinstance(hello, proto.Hello)
    assert (hello.msg_id, hello.fw_version, hello.queue_depth, hello.first_id) == (0x80000001, 7, 39, 1)
    assert hello.ota_state == 4
    # Reading 17 is acknowledged: two bursts, split at the gap.
    bursts = [proto.decode(p[3]) for p in packets[1:]]
    assert all(isinstance(b, proto.Burst) for b in bursts)
    assert [(b.msg_id, len(b.readings)) for b in bursts] == [(1, 16), (18, 23)]
    rows = bursts[0].readings.rows() + bursts[1].readings.rows()
    want = [(1767225600 + 60 * n, 2000 + n, 5000 - n, 4100) for n in range(40) if n != 16]
    assert rows == want
