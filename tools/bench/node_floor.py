# The floor of a sending wake, run by `torpor bench node` in the MicroPython unix port: the
# least a node allocates to send one burst over MQTT 3.1.1 with mutual TLS. No firmware
# code; hand-built packets in one buffer, blocking socket calls bounded by a timeout.
# mypy: ignore-errors
# (MicroPython: its tls and micropython modules have no CPython stubs here.)
import gc
import socket

import tls
from micropython import const

_TIMEOUT_S = const(10)
_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PUBLISH_QOS1 = const(0x32)
_PUBACK = const(0x40)
_KEEPALIVE_S = const(60)


def _read(f):
    with open(f, "rb") as h:
        return h.read()


def _exactly(s, buf, n):
    # readinto may return fewer bytes than asked: TLS records and TCP segments split packets.
    got = 0
    while got < n:
        k = s.readinto(buf, n) if not got else s.readinto(memoryview(buf)[got:n])
        if not k:
            raise OSError("connection closed mid-packet")
        got += k


def run(certs, host, port, hostname, client_id, topic, payload):
    """Send `payload` as one QoS 1 PUBLISH on `topic`; returns the bytes each step
    allocated (gc.mem_alloc deltas; the caller keeps the heap roomy, so nothing collects).
    certs: the folder holding cert.der, key.der and ca.der."""
    m = gc.mem_alloc
    a = m()
    # One buffer for every packet: the PUBLISH is the largest (header, topic, id, payload).
    tl = len(topic)
    pl = len(payload)
    rem = 2 + tl + 2 + pl
    buf = bytearray(5 + rem)
    b = m()
    # MicroPython's tls takes certificates as bytes only: each file is read whole.
    cert = _read(certs + "/cert.der")
    key = _read(certs + "/key.der")
    ca = _read(certs + "/ca.der")
    c = m()
    ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
    d = m()
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = tls.CERT_REQUIRED
    e = m()
    addr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0][-1]
    raw = socket.socket()
    raw.settimeout(_TIMEOUT_S)
    raw.connect(addr)
    f = m()
    s = ctx.wrap_socket(raw, server_hostname=hostname)  # the handshake runs here
    g = m()
    # CONNECT: protocol name and level, clean session, keepalive, client id.
    cl = len(client_id)
    buf[0] = _CONNECT
    buf[1] = 12 + cl
    buf[2:9] = b"\x00\x04MQTT\x04"
    buf[9] = 0x02
    buf[10] = 0
    buf[11] = _KEEPALIVE_S
    buf[12] = 0
    buf[13] = cl
    buf[14 : 14 + cl] = client_id
    s.write(buf, 14 + cl)
    _exactly(s, buf, 4)
    if buf[0] != _CONNACK or buf[3] != 0:
        raise OSError("broker refused the CONNECT")
    h = m()
    # PUBLISH, QoS 1, packet id 1: one write, so TLS sends one record.
    buf[0] = _PUBLISH_QOS1
    i = 1
    n = rem
    while True:
        if n > 0x7F:
            buf[i] = (n & 0x7F) | 0x80
        else:
            buf[i] = n
        i += 1
        n >>= 7
        if not n:
            break
    buf[i] = 0
    buf[i + 1] = tl
    buf[i + 2 : i + 2 + tl] = topic
    i += 2 + tl
    buf[i] = 0
    buf[i + 1] = 1
    buf[i + 2 : i + 2 + pl] = payload
    s.write(buf, i + 2 + pl)
    _exactly(s, buf, 4)
    if buf[0] != _PUBACK or buf[3] != 1:
        raise OSError("expected PUBACK for packet 1")
    j = m()
    buf[0] = 0xE0  # DISCONNECT
    buf[1] = 0
    s.write(buf, 2)
    s.close()
    k = m()
    return (
        ("buffer", b - a),
        ("certificates", c - b),
        ("ssl_context", d - c),
        ("load_certificates", e - d),
        ("tcp_connect", f - e),
        ("tls_wrap_handshake", g - f),
        ("mqtt_connect", h - g),
        ("publish", j - h),
        ("close", k - j),
        ("buffer_bytes", len(buf)),
    )
