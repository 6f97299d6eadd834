"""paho's per-packet costs trimmed for the gateway's busy MQTT clients (ingest, relay).

aiomqtt keeps the connection (connect, TLS, subscribe, keepalive, disconnect) and paho the
protocol state. On a connected MQTT 3.1.1 client, `lean(client)` takes over the packets
the gateway sends and receives by the thousand, where paho's own code costs more CPU than
the gateway's work per burst:

- Reading. paho reads a packet with one `recv` per header byte and one for the rest (each
  a trip through the ssl module), then takes two locks and resets a dictionary of read
  state. The replacement reads what the socket holds at once and splits it into packets
  in one loop. With `received` given, a QoS 0 or 1 PUBLISH goes straight to
  `received(topic, payload)`: paho would build a message object (with a lock and a
  condition variable in it), run a topic matcher and log a debug line. Its PUBACK is
  queued as four bytes. A PUBACK of a `Publisher` message goes to the publisher. Every
  other packet (CONNACK, SUBACK, PINGRESP, QoS 2, PUBACKs of paho's own publishes,
  anything malformed) goes to paho's handler exactly as paho would have read it.
- Publishing. paho's `publish` builds a message and an info object (a condition variable
  again), checks the topic, logs, and takes locks; its PUBACK builds a ReasonCode and a
  Properties object that MQTT 3.1.1 does not carry. `Publisher.publish` queues the
  PUBLISH packet and, at QoS 1, notes its packet id; its PUBACK is a dictionary lookup.
- Writing. paho writes each queued packet with a `send` of its own: one TLS record and one
  system call per ACK and per PUBACK. The replacement writes the queued packets joined (up
  to WRITE_SIZE bytes) in one `send`. Packets whose completion paho acts on (a QoS 0
  PUBLISH: `on_publish`; DISCONNECT: closing the socket) still go through paho's writer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import aiomqtt
from paho.mqtt.client import (
    DISCONNECT,
    MQTT_ERR_AGAIN,
    MQTT_ERR_CONN_LOST,
    MQTT_ERR_PROTOCOL,
    MQTT_ERR_SUCCESS,
    MQTT_LOG_DEBUG,
    MQTT_LOG_ERR,
    PUBACK,
    PUBLISH,
    MQTTv311,
    time_func,
)
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.broker import MAX_PACKET_SIZE

log = logging.getLogger(__name__)

READ_SIZE = 65536
WRITE_SIZE = 65536
_SUCCESS = ReasonCode(PacketTypes.PUBACK)  # "Success": the only PUBACK of MQTT 3.1.1
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
_MISSING = object()

Received = Callable[[str, bytes], None]


class Publisher:
    """QoS 1 publishes straight into paho's packet queue (see the module). `inflight`
    maps each unacknowledged packet id to the caller's token, oldest first; `on_ack`
    gets the token when the PUBACK arrives. Nothing is sent again after a reconnect:
    the callers keep what matters (the relay its outbox, ingest the nodes' resends)."""

    def __init__(self, paho: Any) -> None:
        self._paho = paho
        self.inflight: dict[int, Any] = {}
        self.on_ack: Callable[[Any], None] | None = None
        self.oversized = 0  # packets dropped unread for exceeding the bound

    def publish(self, topic: bytes, payload: bytes, token: Any = None, qos: int = 1) -> bool:
        """Queue one PUBLISH (QoS 1, or 0: no packet id, nothing tracked); False when the
        client is not connected. `send()` writes what is queued."""
        paho = self._paho
        if paho._sock is None:
            return False
        if qos:
            mid = paho._mid_generate()
            packet = b"".join((_fixed_header(0x32, len(topic) + len(payload) + 4),
                               len(topic).to_bytes(2, "big"), topic, mid.to_bytes(2, "big"),
                               payload))
            self.inflight[mid] = token
        else:
            mid = 0
            packet = b"".join((_fixed_header(0x30, len(topic) + len(payload) + 2),
                               len(topic).to_bytes(2, "big"), topic, payload))
        # "qos": 1 even for QoS 0: paho's writer reads that field only to report a QoS 0
        # write to `on_publish` and to a message-info object, which these do not have.
        paho._out_packet.append({"command": packet[0], "mid": mid, "qos": 1, "pos": 0,
                                 "to_process": len(packet), "packet": packet, "info": None})
        return True

    def send(self) -> None:
        """Write the queued packets now; what the socket does not take waits for it."""
        if self._paho._out_packet:
            self._paho.loop_write()

    def acked(self, mid: int) -> bool:
        """A PUBACK arrived: hand its token to `on_ack`. False: not one of ours."""
        token = self.inflight.pop(mid, _MISSING)
        if token is _MISSING:
            return False
        if self.on_ack is not None:
            self.on_ack(token)
        return True


def _fixed_header(command: int, remaining: int) -> bytes:
    out = bytearray((command,))
    while True:
        byte, remaining = remaining & 0x7F, remaining >> 7
        out.append(byte | (0x80 if remaining else 0))
        if not remaining:
            return bytes(out)


def lean(client: aiomqtt.Client, received: Received | None = None,
         max_packet: int = MAX_PACKET_SIZE) -> Publisher:
    """Take over the busy packets of a connected MQTT 3.1.1 client (see the module) and
    return its `Publisher`; once per connection, later calls return the same publisher.
    `received(topic, payload)`: where QoS 0 and 1 messages go instead of `on_message`.
    A packet longer than `max_packet` (remaining length) is dropped unread."""
    paho = client._client
    publisher: Publisher | None = getattr(paho, "_torpor_publisher", None)
    if publisher is not None:
        return publisher
    if paho._protocol != MQTTv311:
        raise ValueError("gateway.mqtt.lean takes MQTT 3.1.1 clients only")
    if paho._sock is None:
        raise aiomqtt.MqttError("disconnected from the broker")
    publisher = paho._torpor_publisher = Publisher(paho)  # type: ignore[attr-defined]
    paho._packet_read = _reader(paho, received, publisher, max_packet)  # type: ignore[method-assign]
    paho._packet_write = _joined_writer(paho)  # type: ignore[method-assign]
    return publisher


def _reader(paho: Any, received: Received | None, publisher: Publisher,
            max_packet: int = MAX_PACKET_SIZE) -> Any:
    """paho's `_packet_read`, splitting everything one `recv` returns (see the module).

    Bounded and linear: a packet whose announced remaining length exceeds `max_packet` is
    never buffered. Its first bytes (topic and packet id, at most 65,539) are read so a QoS 1
    PUBLISH can be acknowledged (else the broker would send it again on every reconnect),
    and the rest is discarded as it arrives. The start of a packet whose rest has not
    arrived is kept in a bytearray that grows in place, and parsed only once the bytes it
    needs are there, so each byte is copied a bounded number of times."""
    own_read = paho._packet_read
    held = bytearray()  # the start of a packet whose rest has not arrived
    need = 0  # how many bytes `held` must have before parsing can go on
    skip = 0  # bytes of an oversized packet still to be discarded
    sock = paho._sock

    def to_paho(command: int, body: bytes) -> MQTTErrorCode:
        paho._in_packet = {
            "command": command, "have_remaining": 1, "remaining_count": [],
            "remaining_mult": 1, "remaining_length": len(body), "packet": bytearray(body),
            "to_process": 0, "pos": 0,
        }
        try:
            rc: MQTTErrorCode = paho._packet_handle()
        except MalformedPacket as exc:
            paho._easy_log(MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTT_ERR_PROTOCOL
        paho._in_packet = {
            "command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
            "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0,
        }
        return rc

    def packet_read() -> MQTTErrorCode:
        nonlocal held, need, skip, sock
        if paho._in_packet["command"]:
            return own_read()  # type: ignore[no-any-return]  # paho began it: paho ends it
        if paho._sock is not sock:  # a new connection on the same client
            sock, held, need, skip = paho._sock, bytearray(), 0, 0
        try:
            data = paho._sock_recv(READ_SIZE)
        except BlockingIOError:
            return MQTT_ERR_AGAIN
        except OSError as err:
            paho._easy_log(MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return MQTT_ERR_CONN_LOST
        if not data:
            return MQTT_ERR_CONN_LOST
        paho._last_bytes_received = time_func()
        if skip:
            if len(data) <= skip:
                skip -= len(data)
                return MQTT_ERR_SUCCESS
            data, skip = data[skip:], 0
        if held:
            held += data
            if len(held) < need:
                return MQTT_ERR_SUCCESS
            data, held = bytes(held), bytearray()
        end = len(data)
        pos = 0
        need = 0
        acks = paho._out_packet
        queued = len(acks)
        rc = MQTT_ERR_SUCCESS
        while pos + 2 <= end:
            command = data[pos]
            # Remaining length: at most four bytes, seven bits each.
            start = pos + 1
            size = data[start] & 0x7F
            if data[start] & 0x80:
                shift = 7
                while True:
                    start += 1
                    if start >= end:
                        break
                    if start - pos > 4:
                        paho._easy_log(MQTT_LOG_ERR, "remaining length of more than 4 bytes")
                        held = bytearray()
                        return MQTT_ERR_PROTOCOL
                    size |= (data[start] & 0x7F) << shift
                    shift += 7
                    if not data[start] & 0x80:
                        break
                if start >= end:
                    need = end - pos + 1
                    break
            start += 1
            stop = start + size
            kind = command & 0xF0
            if size > max_packet:
                # Read the topic and packet id, no more, then let the rest go by.
                head = start + 2
                if kind == PUBLISH and head <= end:
                    head += data[start] << 8 | data[start + 1]
                    head += 2 if (command >> 1) & 3 == 1 else 0
                if head > end:
                    need = head - pos
                    break
                _oversized(paho, publisher, command, data[start:head], size, max_packet)
                pos = min(stop, end)
                skip = stop - pos
                continue
            if stop > end:
                need = stop - pos
                break
            pos = stop
            if kind == PUBLISH and received is not None and size >= 4 and not paho._manual_ack:
                qos = (command >> 1) & 3
                topic_end = start + 2 + (data[start] << 8 | data[start + 1])
                if qos < 2 and topic_end > start + 2 and topic_end + 2 * qos <= stop:
                    try:
                        topic = data[start + 2:topic_end].decode("utf-8")
                    except UnicodeDecodeError:
                        pass
                    else:
                        if qos:
                            mid = data[topic_end] << 8 | data[topic_end + 1]
                            received(topic, data[topic_end + 2:stop])
                            acks.append({"command": PUBACK, "mid": mid, "qos": 1, "pos": 0,
                                         "to_process": 4, "info": None,
                                         "packet": bytes((PUBACK, 2, mid >> 8, mid & 0xFF))})
                        else:
                            received(topic, data[topic_end:stop])
                        continue
            elif kind == PUBACK and size == 2:
                mid = data[start] << 8 | data[start + 1]
                if publisher.acked(mid):
                    continue
                with paho._out_message_mutex:
                    if mid in paho._out_messages:
                        paho._do_on_publish(mid, _SUCCESS, _NO_PROPERTIES)
                continue
            rc = to_paho(command, data[start:stop])
            if rc != MQTT_ERR_SUCCESS or paho._sock is not sock:
                held = bytearray()
                return rc
        if pos < end:
            held = bytearray(data[pos:] if pos else data)
            need = max(need, 2)
        if len(acks) > queued:
            paho.loop_write()
        return rc

    return packet_read


def _oversized(paho: Any, publisher: Publisher, command: int, head: bytes, size: int,
               limit: int) -> None:
    """A packet over the bound: count it, acknowledge it if it is a QoS 1 PUBLISH (so it
    is not sent again), and say which topic it came on."""
    publisher.oversized += 1
    topic = "?"
    if command & 0xF0 == PUBLISH and len(head) >= 2:
        end = 2 + (head[0] << 8 | head[1])
        topic = head[2:end].decode("utf-8", "replace")
        if (command >> 1) & 3 == 1 and len(head) >= end + 2:
            mid = head[end] << 8 | head[end + 1]
            paho._out_packet.append({"command": PUBACK, "mid": mid, "qos": 1, "pos": 0,
                                     "to_process": 4, "info": None,
                                     "packet": bytes((PUBACK, 2, mid >> 8, mid & 0xFF))})
    device = topic.split("/")[1] if topic.count("/") == 2 else ""
    log.warning("dropped a packet of %d bytes on %r: over the %d-byte bound", size, topic[:80],
                limit, extra={"device_id": device} if device else None)


def _joined_writer(paho: Any) -> Any:
    """paho's `_packet_write`, sending the queued packets joined (see the module)."""
    queue = paho._out_packet
    one_by_one = paho._packet_write

    def packet_write() -> MQTTErrorCode:
        while queue:
            batch = []
            size = 0
            for packet in queue:
                kind = packet["command"] & 0xF0
                if kind == DISCONNECT or (kind == PUBLISH and packet["qos"] == 0):
                    break
                batch.append(packet)
                size += packet["to_process"]
                if size >= WRITE_SIZE:
                    break
            if len(batch) < 2:
                return one_by_one()  # type: ignore[no-any-return]
            data = b"".join([bytes(p["packet"][p["pos"]:]) for p in batch])
            try:
                sent = paho._sock_send(data)
            except (AttributeError, ValueError):
                return MQTT_ERR_SUCCESS
            except BlockingIOError:
                return MQTT_ERR_AGAIN
            except OSError as err:
                paho._easy_log(MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return MQTT_ERR_CONN_LOST
            if sent <= 0:
                break
            paho._last_msg_out = time_func()
            # Retire what went out; a packet sent in part keeps its place and position.
            # The next attempt sends the same bytes first, as TLS requires of a retry.
            for packet in batch:
                left = packet["to_process"]
                if sent < left:
                    packet["to_process"] = left - sent
                    packet["pos"] += sent
                    break
                queue.popleft()
                sent -= left
        return MQTT_ERR_SUCCESS

    return packet_write
