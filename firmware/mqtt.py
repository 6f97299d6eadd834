# MQTT 3.1.1 client for the node: plain TCP or TLS with a client certificate, every
# read and write bounded by a deadline so a dead network costs the caller's budget, no more.
#
# Deadlines are absolute `time.ticks_ms()` values (see `deadline(ms)`), so one budget can
# span a whole wake: connect, burst, downlink, disconnect.
#
# Sockets are non-blocking and waits go through select.poll on the stream the bytes come
# from (the TLS object when TLS is on, so data mbedtls already buffered is seen). With TLS
# the raw TCP socket is wrapped in a small counting stream so `bytes_in`/`bytes_out` are
# the bytes on the wire, TLS records and handshake included.
import errno
import io
import select
import socket
import time

from micropython import const

try:
    import tls
except ImportError:  # a port built without TLS can still use plain TCP
    tls = None

# Packet types (upper nibble of the fixed header).
_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_SUBSCRIBE = const(0x82)  # SUBSCRIBE carries the mandatory flags 0b0010
_SUBACK = const(0x90)
_PINGREQ = const(0xC0)
_PINGRESP = const(0xD0)
_DISCONNECT = const(0xE0)

_POLLIN = const(0x0001)
_POLLOUT = const(0x0004)
_POLLERR = const(0x0008)
_POLLHUP = const(0x0010)
_STREAM_POLL = const(3)  # stream ioctl request numbers shared by the ports
_STREAM_CLOSE = const(4)

_DEFAULT_WRITE_MS = const(10000)
# Longest single poll while the TLS handshake waits: mbedtls may want to read or to write,
# and only the read side can be waited on without spinning, so the write side is retried
# this often.
_HS_POLL_MS = const(50)
_MAX_INFLIGHT = const(32)
_MAX_INBOX = const(8)

# MQTTError codes. 1..5 are CONNACK return codes, 0x80 a refused subscription;
# negative codes are failures on this side of the wire.
TIMEOUT = const(-1)
CLOSED = const(-2)
NETWORK = const(-3)
TLS_FAILED = const(-4)
PROTOCOL = const(-5)
TOO_BIG = const(-6)
NOT_CONNECTED = const(-7)
SUB_REFUSED = const(0x80)

_CONNACK_NAMES = (
    "accepted",
    "unacceptable protocol version",
    "identifier rejected",
    "server unavailable",
    "bad user name or password",
    "not authorized",
)


# mbedtls's MBEDTLS_ERR_SSL_FATAL_ALERT_MESSAGE: the peer sent a fatal TLS alert, i.e. it
# answered and refused (a certificate it does not accept, among others). Any other TLS
# failure (the connection closed or reset mid-handshake, EOF) is not an answer.
TLS_ALERT = const(-0x7780)


class MQTTError(OSError):
    """A transport failure: `code` (see the module constants) and a readable `reason`;
    `tls` is mbedtls's own error code for a TLS_FAILED that carried one (else 0)."""

    tls = 0

    def __init__(self, code, reason, tls=0):
        super().__init__("MQTT error %d: %s" % (code, reason))
        self.code = code
        self.reason = reason
        if tls:
            self.tls = tls


def _ipv4(sockaddr):
    # The 4 address bytes of an IPv4 socket address: a (host, port) tuple on the ESP32 and
    # RP2 ports, a struct sockaddr_in (family, port, address) on the unix port.
    if isinstance(sockaddr, tuple):
        parts = sockaddr[0].split(".")
        if len(parts) == 4:
            try:
                return bytes(int(x) for x in parts)
            except ValueError:
                pass
        return b""
    if len(sockaddr) >= 8 and sockaddr[0] == socket.AF_INET and sockaddr[1] == 0:
        return bytes(sockaddr[4:8])
    return b""


def deadline(ms):
    """The deadline `ms` milliseconds from now, as the methods below take it."""
    return time.ticks_add(time.ticks_ms(), ms)


def make_tls_context(cert_der, key_der, ca_der):
    """A client TLS context: our certificate and key, the fleet CA, peer verified."""
    if tls is None:
        raise MQTTError(TLS_FAILED, "this firmware has no tls module")
    ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(cert_der, key_der)
    # The port's SSLContext takes cadata positionally only.
    ctx.load_verify_locations(ca_der)
    ctx.verify_mode = tls.CERT_REQUIRED  # type: ignore[attr-defined]  # real on every port, absent from the stubs
    return ctx


class _Wire(io.IOBase):
    # The raw TCP socket as a stream that counts bytes. mbedtls reads and writes through
    # it; an OSError is kept and reported as end of stream, because an exception must not
    # unwind through mbedtls' own C frames.
    def __init__(self, sock, owner):
        self.sock = sock
        self.owner = owner
        self.err = None
        self.poller = select.poll()
        self.poller.register(sock, _POLLIN | _POLLOUT)

    def readinto(self, buf):
        try:
            n = self.sock.readinto(buf)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return None
            self.err = e
            return 0
        if n:
            self.owner.bytes_in += n
        return n

    def write(self, buf):
        try:
            n = self.sock.write(buf)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return None
            self.err = e
            return 0
        if n:
            self.owner.bytes_out += n
        return n

    def ioctl(self, req, arg):
        if req == _STREAM_POLL:
            # ipoll reuses its result tuple: this runs on every poll of the TLS stream and
            # must not allocate.
            ev = 0
            for _, e in self.poller.ipoll(0):
                ev |= e
            return ev & (arg | _POLLERR | _POLLHUP)
        if req == _STREAM_CLOSE:
            self.sock.close()
            return 0
        return 0


class MQTTClient:
    # Defaults on the class: the instance dict holds only what a client changes, so it is
    # smaller and grows through fewer sizes.
    bytes_out = 0
    bytes_in = 0
    dropped = 0  # QoS 1 messages left unacknowledged because the inbox was full
    _sock = None  # what MQTT bytes go through: TLS object or raw socket
    _raw = None
    _wire = None
    _pid = 0
    _suback = -1  # granted QoS of the awaited SUBACK, -1 while none arrived
    _sub_pid = 0
    _sub_topic = None
    _pingresp = False
    _last_tx = 0
    _hs = False  # the TLS handshake has not completed yet
    _direct = False  # a PUBLISH is left in the receive buffer for wait_payload, not queued
    _poff = 0  # where that PUBLISH's payload lies in the receive buffer
    _plen = 0

    def __init__(
        self,
        client_id,
        host,
        port,
        *,
        ssl=None,
        server_hostname=None,
        keepalive=60,
        clean_session=True,
        max_packet=4096,
        rbuf=None,
        tbuf=None,
        headroom=0,
        addr=None,
    ):
        # rbuf/tbuf: the caller's preallocated packet buffers (at least max_packet bytes
        # each), so a client made every wake allocates no kilobytes of its own.
        # headroom: bytes kept at the front of the transmit buffer for a PUBLISH header;
        # `out` is the rest, where the caller builds payloads for publish_out().
        self.client_id = client_id
        self.host = host
        # addr: the host's IPv4 address (4 bytes) from an earlier resolution, so that a wake
        # does no DNS; ip: the address connect() used (b"" when not IPv4).
        self.addr = addr
        self.ip = b""
        self.port = port
        self.ssl = ssl
        # The name checked against the broker's certificate; the host by default.
        self.server_hostname = server_hostname or host
        self.keepalive = keepalive
        self.clean_session = clean_session
        self.max_packet = max_packet
        self._poll = select.poll()
        # The buffers are kept through views only (indexing a view writes the buffer).
        self._hmv = memoryview(bytearray(8))
        # Views made once: reading a packet's first bytes allocates nothing.
        self._h0 = self._hmv[0:1]
        self._h1 = self._hmv[1:2]
        self._rmv = memoryview(rbuf if rbuf is not None and len(rbuf) >= max_packet else bytearray(max_packet))
        self._tmv = memoryview(tbuf if tbuf is not None and len(tbuf) >= max_packet else bytearray(max_packet))
        self._headroom = headroom
        self.out = self._tmv[headroom:max_packet]
        self._pending = []  # packet ids of QoS 1 publishes awaiting PUBACK
        self._inbox = []  # (topic, payload) received while waiting for something else

    # ---- connection ---------------------------------------------------------------

    def connect(self, deadline_ms, will=None):
        """Open TCP (+TLS) and MQTT; `will` is (topic, payload[, qos[, retain]]).

        Returns the broker's session-present flag. The whole handshake, TLS included,
        ends by `deadline_ms` or raises MQTTError(TIMEOUT).
        """
        self.close()
        try:
            self._open(deadline_ms)
            return self._handshake(deadline_ms, will)
        except BaseException:
            self.close()
            raise

    def _handshake(self, deadline_ms, will):
        # CONNECT/CONNACK on an open stream.
        self._pending.clear()
        self._inbox.clear()
        try:
            n = self._connect_packet(will)
            self._write(self._tmv, n, deadline_ms)
            t, ln = self._read_packet(deadline_ms, False)
            if t != _CONNACK:
                raise MQTTError(PROTOCOL, "expected CONNACK, got packet type 0x%02x" % t)
            if ln != 2:
                raise MQTTError(PROTOCOL, "CONNACK of length %d" % ln)
            rc = self._rmv[1]
            if rc:
                name = _CONNACK_NAMES[rc] if rc < len(_CONNACK_NAMES) else "unknown"
                raise MQTTError(rc, "broker refused the connection: " + name)
            return bool(self._rmv[0] & 1)
        except BaseException:
            self.close()
            raise

    def _open(self, deadline_ms):
        # Name resolution cannot be bounded on the ports: the caller keeps the address
        # (self.ip) and resolves again only when it fails; the watchdog bounds a hung one.
        a = self.addr
        host = "%d.%d.%d.%d" % (a[0], a[1], a[2], a[3]) if a else self.host
        addr = socket.getaddrinfo(host, self.port, 0, socket.SOCK_STREAM)[0][-1]
        self.ip = _ipv4(addr)
        raw = socket.socket()
        self._raw = raw
        raw.setblocking(False)
        try:
            raw.connect(addr)
        except OSError as e:
            if e.errno != errno.EINPROGRESS:
                raise self._net_error(e)
        self._poll.register(raw, _POLLOUT)
        ev = self._wait_raw(deadline_ms, "TCP connect")
        self._poll.unregister(raw)
        if ev & (_POLLERR | _POLLHUP):
            raise MQTTError(NETWORK, "TCP connect to %s:%d refused or reset" % (self.host, self.port))
        if self.ssl is None:
            self._attach(raw)
            return
        self._wire = _Wire(raw, self)
        self._hs = True
        try:
            # The handshake runs inside the first write, under the caller's deadline.
            self._sock = self.ssl.wrap_socket(
                self._wire, server_hostname=self.server_hostname, do_handshake_on_connect=False
            )
        except OSError as e:
            raise self._net_error(e)
        self._poll.register(self._sock, _POLLIN)

    def _attach(self, sock):
        # Use an already connected, non-blocking plain socket.
        self._raw = sock
        self._sock = sock
        self._wire = None
        self._poll.register(sock, _POLLIN)

    def _wait_raw(self, deadline_ms, what):
        while True:
            rem = time.ticks_diff(deadline_ms, time.ticks_ms())
            if rem <= 0:
                raise MQTTError(TIMEOUT, what + " timed out")
            for _, ev in self._poll.ipoll(rem):
                return ev

    def disconnect(self):
        """Planned end (sleep): DISCONNECT, so the broker drops the Will, then close."""
        if self._sock is not None:
            try:
                self._hmv[0] = _DISCONNECT
                self._hmv[1] = 0
                self._write(self._hmv, 2, deadline(2000))
            except OSError:
                pass
        self.close()

    def close(self):
        """Drop the connection without DISCONNECT, as a crash would: the Will fires."""
        for s in (self._sock, self._raw):
            if s is not None:
                try:
                    self._poll.unregister(s)
                except (OSError, KeyError, ValueError):
                    pass
                try:
                    s.close()
                except OSError:
                    pass
        self._sock = None
        self._raw = None
        self._wire = None

    def is_connected(self):
        return self._sock is not None

    # ---- operations ---------------------------------------------------------------

    def _pub_start(self, qos, deadline_ms):
        # Checks common to both publish calls; the packet id for QoS 1 (0 for QoS 0), once
        # the in-flight window has room.
        if qos != 0 and qos != 1:
            raise ValueError("qos must be 0 or 1")
        self._check()
        if not qos:
            return 0
        while len(self._pending) >= _MAX_INFLIGHT:
            self._process(deadline_ms, True, "PUBACK (in-flight window full)")
        return self._next_pid()

    def publish(self, topic, payload, qos=0, retain=False, deadline_ms=None):
        """Send a PUBLISH; returns its packet id for QoS 1 (PUBACK awaited later), else 0."""
        if deadline_ms is None:
            deadline_ms = deadline(_DEFAULT_WRITE_MS)
        pid = self._pub_start(qos, deadline_ms)
        topic = memoryview(topic)
        payload = memoryview(payload)
        tl = len(topic)
        pl = len(payload)
        rem = 2 + tl + (2 if qos else 0) + pl
        b = self._tmv
        b[0] = _PUBLISH | (qos << 1) | (1 if retain else 0)
        i = self._put_len(b, 1, rem)
        b[i] = tl >> 8
        b[i + 1] = tl & 0xFF
        i += 2
        # One write per packet when it fits, so TLS sends one record, not three.
        if i + rem - 2 <= len(b):
            b[i : i + tl] = topic
            i += tl
            if qos:
                b[i] = pid >> 8
                b[i + 1] = pid & 0xFF
                i += 2
            b[i : i + pl] = payload
            self._write(self._tmv, i + pl, deadline_ms)
        else:
            self._write(self._tmv, i, deadline_ms)
            self._write(topic, tl, deadline_ms)
            if qos:
                self._hmv[0] = pid >> 8
                self._hmv[1] = pid & 0xFF
                self._write(self._hmv, 2, deadline_ms)
            self._write(payload, pl, deadline_ms)
        if qos:
            self._pending.append(pid)
        return pid

    def publish_out(self, topic, n, qos=0, retain=False, deadline_ms=None):
        """Send the first n bytes of `out`, where the caller built the payload, as a
        PUBLISH: its header goes into the headroom just before them, so the packet leaves
        in one write without a copy. Returns the packet id for QoS 1, else 0."""
        h = self._headroom
        if n > self.max_packet - h:
            raise MQTTError(TOO_BIG, "payload of %d bytes exceeds the transmit buffer" % n)
        if deadline_ms is None:
            deadline_ms = deadline(_DEFAULT_WRITE_MS)
        pid = self._pub_start(qos, deadline_ms)
        tl = len(topic)
        rem = 2 + tl + (2 if qos else 0) + n
        # The header ends where the payload starts: one type byte, the remaining length
        # (1..4 bytes), the topic and the packet id.
        s = h - (rem - n) - 2
        v = rem >> 7
        while v:
            s -= 1
            v >>= 7
        if s < 0:
            raise MQTTError(TOO_BIG, "topic longer than the headroom")
        b = self._tmv
        b[s] = _PUBLISH | (qos << 1) | (1 if retain else 0)
        i = self._put_len(b, s + 1, rem)
        b[i] = tl >> 8
        b[i + 1] = tl & 0xFF
        i += 2
        b[i : i + tl] = topic
        if qos:
            b[i + tl] = pid >> 8
            b[i + tl + 1] = pid & 0xFF
        self._write(self._tmv[s:], h + n - s, deadline_ms)
        if qos:
            self._pending.append(pid)
        return pid

    def spare(self, n):
        """n bytes of the receive buffer for the caller's own use, or None when it is
        smaller: valid only until the next call on the client, which may receive into
        it."""
        return self._rmv[:n] if n <= len(self._rmv) else None

    def pending(self):
        """How many QoS 1 publishes still wait for their PUBACK."""
        return len(self._pending)

    def wait_pubacks(self, deadline_ms):
        """Return once every QoS 1 publish sent so far is acknowledged."""
        while self._pending:
            self._check()
            self._process(deadline_ms, True, "PUBACKs")

    def subscribe(self, topic, qos, deadline_ms, wait=True):
        """SUBSCRIBE; returns the granted QoS from the SUBACK. With wait=False it returns
        -1 once the packet is written and `suback()` takes the answer later: the broker
        handles a connection's packets in order, so what is published after the SUBSCRIBE
        finds the subscription in place, and the SUBACK's round trip overlaps those
        publishes instead of keeping the radio on for it."""
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        self._check()
        pid = self._next_pid()
        tv = memoryview(topic)
        tl = len(tv)
        b = self._tmv
        b[0] = _SUBSCRIBE
        i = self._put_len(b, 1, 2 + 2 + tl + 1)
        if i + 5 + tl > len(b):
            raise MQTTError(TOO_BIG, "topic longer than the packet buffer")
        b[i] = pid >> 8
        b[i + 1] = pid & 0xFF
        b[i + 2] = tl >> 8
        b[i + 3] = tl & 0xFF
        i += 4
        b[i : i + tl] = tv
        i += tl
        b[i] = qos
        self._sub_pid = pid
        self._sub_topic = topic
        self._suback = -1
        self._write(self._tmv, i + 1, deadline_ms)
        return self.suback(deadline_ms) if wait else -1

    def suback(self, deadline_ms):
        """The granted QoS of the last SUBSCRIBE, reading on until its SUBACK if it has not
        come yet (a PUBLISH meanwhile goes to the inbox); MQTTError on a refusal."""
        while self._suback < 0:
            self._process(deadline_ms, True, "SUBACK")
        self._sub_pid = 0
        if self._suback == SUB_REFUSED:
            raise MQTTError(SUB_REFUSED, "broker refused the subscription to %s" % self._sub_topic)
        return self._suback

    def wait_msg(self, deadline_ms):
        """The next (topic str, payload bytes) from the broker, or None at the deadline.

        PUBACKs and PINGRESPs that arrive meanwhile are handled here without returning; a
        PINGREQ goes out when nothing was sent for half the keepalive. With a deadline of
        now it returns what is already readable, then None.
        """
        while True:
            if self._inbox:
                return self._inbox.pop(0)
            self._check()
            if self.keepalive and time.ticks_diff(time.ticks_ms(), self._last_tx) >= self.keepalive * 500:
                self._send_pingreq(deadline_ms)
            # A PUBACK or PINGRESP is handled and the wait goes on: only the deadline
            # (with nothing left to read) returns None.
            if self._process(deadline_ms, False, None) < 0:
                return None

    def wait_payload(self, deadline_ms):
        """Like wait_msg, without allocating: the next payload as a memoryview into the
        client's receive buffer (valid until the next call on the client), or None at the
        deadline. The topic is not returned: for a client subscribed to one topic."""
        while True:
            if self._inbox:
                return memoryview(self._inbox.pop(0)[1])
            self._check()
            if self.keepalive and time.ticks_diff(time.ticks_ms(), self._last_tx) >= self.keepalive * 500:
                self._send_pingreq(deadline_ms)
            self._direct = True
            try:
                r = self._process(deadline_ms, False, None)
            finally:
                self._direct = False
            if r < 0:
                return None
            if r == 2:
                return self._rmv[self._poff : self._poff + self._plen]

    def ping(self, deadline_ms):
        """PINGREQ and wait for the PINGRESP."""
        self._check()
        self._pingresp = False
        self._send_pingreq(deadline_ms)
        while not self._pingresp:
            self._process(deadline_ms, True, "PINGRESP")

    # ---- internals ----------------------------------------------------------------

    def _check(self):
        if self._sock is None:
            raise MQTTError(NOT_CONNECTED, "not connected")

    def _send_pingreq(self, deadline_ms):
        self._hmv[0] = _PINGREQ
        self._hmv[1] = 0
        self._write(self._hmv, 2, deadline_ms)

    def _next_pid(self):
        while True:
            self._pid = self._pid + 1 if self._pid < 0xFFFF else 1
            if self._pid not in self._pending:
                return self._pid

    @staticmethod
    def _put_len(b, i, n):
        while True:
            d = n & 0x7F
            n >>= 7
            if n:
                b[i] = d | 0x80
                i += 1
            else:
                b[i] = d
                return i + 1

    def _connect_packet(self, will):
        b = self._tmv
        cid = self.client_id
        flags = 0x02 if self.clean_session else 0
        rem = 10 + 2 + len(memoryview(cid))
        if will is not None:
            wt, wp = will[0], will[1]
            wq = will[2] if len(will) > 2 else 0
            wr = will[3] if len(will) > 3 else False
            if wq not in (0, 1):
                raise ValueError("will qos must be 0 or 1")
            flags |= 0x04 | (wq << 3) | (0x20 if wr else 0)
            rem += 2 + len(memoryview(wt)) + 2 + len(memoryview(wp))
        if rem + 5 > len(b):
            raise MQTTError(TOO_BIG, "CONNECT larger than the packet buffer")
        b[0] = _CONNECT
        i = self._put_len(b, 1, rem)
        b[i : i + 7] = b"\x00\x04MQTT\x04"
        b[i + 7] = flags
        b[i + 8] = self.keepalive >> 8
        b[i + 9] = self.keepalive & 0xFF
        i = self._put_str(b, i + 10, cid)
        if will is not None:
            i = self._put_str(b, i, wt)
            i = self._put_str(b, i, wp)
        return i

    @staticmethod
    def _put_str(b, i, s):
        s = memoryview(s)
        n = len(s)
        b[i] = n >> 8
        b[i + 1] = n & 0xFF
        b[i + 2 : i + 2 + n] = s
        return i + 2 + n

    def _process(self, deadline_ms, must, what):
        # Read and handle one packet. At the deadline with no packet started: raise
        # TIMEOUT naming `what` when `must`, else return -1. 1 when a PUBLISH was queued
        # in the inbox, 2 when it was left in the receive buffer (_direct), 0 for any other packet.
        t, ln = self._read_packet(deadline_ms, True)
        if t < 0:
            if must:
                # At a packet boundary: the connection stays usable.
                raise MQTTError(TIMEOUT, "timed out waiting for " + what)
            return -1
        b = self._rmv
        kind = t & 0xF0
        if kind == _PUBLISH:
            return self._on_publish(t, ln, deadline_ms)
        if kind == _PUBACK:
            if ln != 2:
                self._fail(PROTOCOL, "PUBACK of length %d" % ln)
            pid = (b[0] << 8) | b[1]
            if pid in self._pending:
                self._pending.remove(pid)
        elif kind == _SUBACK:
            if ln != 3:
                self._fail(PROTOCOL, "SUBACK of length %d" % ln)
            if ((b[0] << 8) | b[1]) == self._sub_pid:
                self._suback = b[2]
        elif kind == _PINGRESP:
            self._pingresp = True
        else:
            self._fail(PROTOCOL, "unexpected packet type 0x%02x" % t)
        return 0

    def _on_publish(self, t, ln, deadline_ms):
        b = self._rmv
        qos = (t >> 1) & 3
        if qos > 1:
            self._fail(PROTOCOL, "QoS %d PUBLISH, we never subscribe above QoS 1" % qos)
        tl = (b[0] << 8) | b[1]
        i = 2 + tl
        if i + (2 if qos else 0) > ln:
            self._fail(PROTOCOL, "PUBLISH shorter than its topic")
        pid = 0
        if qos:
            pid = (b[i] << 8) | b[i + 1]
            i += 2
        if self._direct:
            self._poff = i
            self._plen = ln - i
        elif len(self._inbox) >= _MAX_INBOX:
            # Not acknowledged means not received: a persistent session redelivers it.
            self.dropped += 1
            return 0
        else:
            self._inbox.append((str(self._rmv[2 : 2 + tl], "utf-8"), bytes(self._rmv[i:ln])))
        if qos:
            self._hmv[0] = _PUBACK
            self._hmv[1] = 2
            self._hmv[2] = pid >> 8
            self._hmv[3] = pid & 0xFF
            self._write(self._hmv, 4, deadline_ms)
        return 2 if self._direct else 1

    def _fail(self, code, reason):
        self.close()
        raise MQTTError(code, reason)

    def _read_packet(self, deadline_ms, soft):
        # One whole packet: (type byte, length) with the body in self._rmv. With `soft`,
        # a deadline before the first byte returns (-1, 0); once a packet has started,
        # a timeout leaves the stream out of step, so the connection is closed.
        if not self._read(self._h0, deadline_ms, soft):
            return -1, 0
        t = self._hmv[0]
        n = 0
        shift = 0
        while True:
            self._read(self._h1, deadline_ms, False)
            d = self._hmv[1]
            n |= (d & 0x7F) << shift
            if not d & 0x80:
                break
            shift += 7
            if shift > 21:
                self._fail(PROTOCOL, "malformed remaining length")
        if n > self.max_packet:
            self._fail(TOO_BIG, "incoming packet of %d bytes exceeds max_packet %d" % (n, self.max_packet))
        if n:
            self._read(self._rmv[0:n], deadline_ms, False)
        return t, n

    def _read(self, mv, deadline_ms, soft):
        # Fill `mv` completely. Returns False only when `soft` and nothing was read by
        # the deadline; raises MQTTError otherwise.
        want = len(mv)
        got = 0
        while got < want:
            n = self._rd(mv if got == 0 else mv[got:])
            if n is None:
                rem = time.ticks_diff(deadline_ms, time.ticks_ms())
                if rem <= 0:
                    if soft and got == 0:
                        return False
                    self.close()
                    raise MQTTError(TIMEOUT, "read timed out mid-packet")
                self._wait(rem, _POLLIN)
                continue
            if n == 0:
                err = self._wire.err if self._wire is not None else None
                self.close()
                if err is not None:
                    raise self._net_error(err)
                raise MQTTError(CLOSED, "broker closed the connection")
            if self._wire is None:
                self.bytes_in += n
            got += n
        return True

    # One non-blocking socket read or write: None when it would block; a TLS or network
    # failure closes the connection and raises MQTTError. The stream's method is called
    # directly (no bound method object per call).
    def _rd(self, buf):
        try:
            return self._sock.readinto(buf)
        except (ValueError, OSError) as e:
            return self._io_failed(e)

    def _wr(self, buf):
        try:
            return self._sock.write(buf)
        except (ValueError, OSError) as e:
            return self._io_failed(e)

    def _io_failed(self, e):
        if isinstance(e, ValueError):
            # mbedtls reports a certificate that fails verification this way.
            self.close()
            raise MQTTError(TLS_FAILED, "TLS: %s" % str(e).strip())
        if e.errno == errno.EAGAIN:
            return None
        self.close()
        raise self._net_error(e)

    def _write(self, mv, n, deadline_ms):
        sent = 0
        while sent < n:
            w = self._wr(mv if sent == 0 and n == len(mv) else mv[sent:n])
            if w is None:
                rem = time.ticks_diff(deadline_ms, time.ticks_ms())
                if rem <= 0:
                    self.close()
                    raise MQTTError(TIMEOUT, "write timed out")
                self._wait(rem, _POLLOUT)
                continue
            if w == 0:
                err = self._wire.err if self._wire is not None else None
                self.close()
                if err is not None:
                    raise self._net_error(err)
                raise MQTTError(CLOSED, "connection closed while writing")
            if self._wire is None:
                self.bytes_out += w
            self._hs = False  # TLS wrote application data: the handshake is done
            sent += w
        self._last_tx = time.ticks_ms()

    def _wait(self, rem, ev):
        # Block until the stream can go on, without allocating (ipoll). While the TLS
        # handshake runs, mbedtls reports "would block" through write() whether it waits
        # to read or to write: wait for the peer's bytes on the raw socket, in short
        # slices so a full send buffer is retried too. Polling the TLS stream for
        # POLLOUT then would return at once and spin until the deadline.
        pm = self._poll
        w = self._wire
        if self._hs and w is not None:
            w.poller.modify(w.sock, _POLLIN)
            for _ in w.poller.ipoll(min(rem, _HS_POLL_MS)):
                break
            w.poller.modify(w.sock, _POLLIN | _POLLOUT)
            return
        if ev != _POLLIN:
            pm.modify(self._sock, ev)
        for _ in pm.ipoll(rem):
            break
        if ev != _POLLIN:
            pm.modify(self._sock, _POLLIN)

    def _net_error(self, e):
        if isinstance(e, MQTTError):
            return e
        a = e.args
        # mbedtls failures carry a negative code and the mbedtls error name.
        if a and isinstance(a[0], int) and a[0] < 0:
            return MQTTError(TLS_FAILED, "TLS: %s" % (a[1] if len(a) > 1 else a[0]), a[0])
        if self._wire is not None and self._wire.err is not None:
            e = self._wire.err
        code = e.errno if isinstance(e.errno, int) else 0
        name = errno.errorcode.get(code, str(code)) if hasattr(errno, "errorcode") else str(code)
        return MQTTError(NETWORK, "socket error %s talking to %s:%d" % (name, self.host, self.port))
