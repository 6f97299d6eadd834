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
"""

from __future__ import annotations

import ssl
from typing import Any

import aiomqtt
from paho.mqtt.client import MQTT_ERR_SUCCESS, MQTTv311
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

READ_SIZE = 65536
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


def lean(client: aiomqtt.Client) -> None:
    """Trim paho's per-packet costs on a connected MQTT 3.1.1 client (see the module)."""
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
