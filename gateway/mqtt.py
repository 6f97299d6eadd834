"""paho's per-packet costs trimmed for the gateway's busy MQTT clients (ingest, relay).

aiomqtt keeps the connection and paho the protocol; two of paho's habits cost the gateway
more CPU than its own work per burst, and `lean(client)` replaces them on a connected
client (MQTT 3.1.1 only; anything else is left to paho):

- paho reads every packet with one `recv` per header byte and one for the rest (a PUBLISH
  of a burst: four; a PUBACK: three), each a trip through the ssl module or, on a plain
  socket, a system call. `BufferedSocket` reads what is there at once and hands paho its
  small reads from memory; `pending()` tells aiomqtt's read loop that bytes are left.
- For each PUBACK paho builds a ReasonCode and a Properties object (MQTT 5 fields that a
  3.1.1 PUBACK does not carry) and logs a debug line. The replacement reads the packet id
  and hands paho one shared, empty ReasonCode and Properties.
- For each PUBLISH received paho builds a message object (with a lock and a condition
  variable in it), runs a topic matcher and logs a debug line. With `received` given, a
  QoS 0 or 1 PUBLISH goes straight to `received(topic, payload)`, and the PUBACK is queued
  as paho queues it.
- paho writes each queued packet with a `send` of its own: one TLS record and one system
  call per ACK and per PUBACK. The replacement writes the queued packets joined (up to
  WRITE_SIZE bytes) in one `send`. Packets whose completion paho acts on (a QoS 0 PUBLISH:
  `on_publish`; DISCONNECT: closing the socket) still go through paho's own writer.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import aiomqtt
from paho.mqtt.client import (
    DISCONNECT,
    MQTT_ERR_AGAIN,
    MQTT_ERR_CONN_LOST,
    MQTT_ERR_SUCCESS,
    MQTT_LOG_ERR,
    PUBACK,
    PUBLISH,
    MQTTv311,
)
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

READ_SIZE = 65536
WRITE_SIZE = 65536
_SUCCESS = ReasonCode(PacketTypes.PUBACK)  # "Success": the only PUBACK of MQTT 3.1.1
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


class BufferedSocket:
    """A connected (ssl) socket that reads ahead. Everything but `recv` and `pending`
    goes to the socket itself."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        data, pos = self._data, self._pos
        if pos >= len(data):
            # May raise (ssl.SSLWantReadError, BlockingIOError, OSError): paho handles
            # those exactly as from the socket itself.
            data = self._sock.recv(READ_SIZE)
            if len(data) <= n:
                return bytes(data)
            self._data, pos = data, 0
        out = data[pos:pos + n]
        self._pos = pos + len(out)
        return bytes(out)

    def pending(self) -> int:
        """Bytes readable without waiting for the network: ours, then the TLS layer's."""
        left = len(self._data) - self._pos
        if isinstance(self._sock, ssl.SSLSocket):
            left += self._sock.pending()
        return left

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def lean(client: aiomqtt.Client, received: Callable[[str, bytes], None] | None = None) -> None:
    """Trim paho's per-packet costs on a connected MQTT 3.1.1 client (see the module).
    `received(topic, payload)`: where QoS 0 and 1 messages go instead of `on_message`."""
    paho = client._client
    if paho._protocol != MQTTv311 or paho._sock is None:
        return
    if not isinstance(paho._sock, BufferedSocket):
        paho._sock = BufferedSocket(paho._sock)
    full = paho._handle_pubackcomp

    def handle_pubackcomp(cmd: Any) -> MQTTErrorCode:
        packet = paho._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:
            return full(cmd)  # PUBCOMP, or a malformed PUBACK for paho to refuse
        mid = packet[0] << 8 | packet[1]
        with paho._out_message_mutex:
            if mid in paho._out_messages:
                return paho._do_on_publish(mid, _SUCCESS, _NO_PROPERTIES)
        return MQTT_ERR_SUCCESS

    paho._handle_pubackcomp = handle_pubackcomp  # type: ignore[method-assign]
    paho._packet_write = _joined_writer(paho)  # type: ignore[method-assign]
    if received is not None:
        paho._handle_publish = _direct_publish(paho, received)  # type: ignore[method-assign]


def _direct_publish(paho: Any, received: Callable[[str, bytes], None]) -> Any:
    """paho's `_handle_publish` for QoS 0 and 1 without the message object (see the module);
    QoS 2, manual acknowledgement and anything malformed are left to paho."""
    full = paho._handle_publish

    def handle_publish() -> MQTTErrorCode:
        qos = (paho._in_packet["command"] & 0x06) >> 1
        packet = paho._in_packet["packet"]
        size = len(packet)
        end = 2 + (packet[0] << 8 | packet[1]) if size >= 2 else size + 1
        if qos > 1 or paho._manual_ack or end == 2 or end + 2 * qos > size:
            return full()  # type: ignore[no-any-return]
        try:
            topic = bytes(packet[2:end]).decode("utf-8")
        except UnicodeDecodeError:
            return full()  # type: ignore[no-any-return]
        if not qos:
            received(topic, bytes(packet[end:]))
            return MQTT_ERR_SUCCESS
        received(topic, bytes(packet[end + 2:]))
        return paho._send_command_with_mid(PUBACK, packet[end] << 8 | packet[end + 1], False)  # type: ignore[no-any-return]

    return handle_publish


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
