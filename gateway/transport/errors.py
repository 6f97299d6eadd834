"""The transport package's exception hierarchy: every error carries an `ErrorCode`.

Callers branch on `exc.code` (or the class), never on the message; the message says what
happened in words an operator can act on.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Why the transport failed. Codes below 100 are wire-format faults found by the
    decoder; 100-199 are caller mistakes found by the encoder; 200 and up are connection
    faults found by the client."""

    MALFORMED_REMAINING_LENGTH = 1
    PACKET_TOO_LARGE = 2
    UNKNOWN_PACKET_TYPE = 3
    BAD_FLAGS = 4
    TRUNCATED = 5
    TRAILING_BYTES = 6
    BAD_STRING = 7
    BAD_QOS = 8
    BAD_PACKET_ID = 9
    BAD_TOPIC = 10
    BAD_CONNECT = 11
    BAD_RETURN_CODE = 12

    INVALID_ARGUMENT = 100

    CONNECT_REFUSED = 200
    CONNECTION_LOST = 201
    NOT_CONNECTED = 202
    TIMEOUT = 203
    KEEPALIVE_TIMEOUT = 204
    SUBSCRIBE_REFUSED = 205
    PROTOCOL_VIOLATION = 206
    CONNECT_FAILED = 207


class TransportError(Exception):
    """Base of every error the transport raises on purpose."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {str(self)!r})"


class MalformedPacket(TransportError):
    """The peer sent bytes that are not valid MQTT 3.1.1. The stream cannot be trusted
    after this: close the connection."""


class PacketTooLarge(MalformedPacket):
    """A packet announced a remaining length above the configured bound; refused before
    its body was buffered."""

    def __init__(self, announced: int, bound: int) -> None:
        super().__init__(
            ErrorCode.PACKET_TOO_LARGE,
            f"packet of {announced} bytes announced; the limit is {bound} bytes",
        )
        self.announced = announced
        self.bound = bound


class EncodeError(TransportError, ValueError):
    """A packet could not be encoded: a field is out of range for MQTT 3.1.1."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INVALID_ARGUMENT, message)


class ConnectRefused(TransportError):
    """The broker answered CONNECT with a non-zero CONNACK return code."""

    def __init__(self, return_code: int, message: str) -> None:
        super().__init__(ErrorCode.CONNECT_REFUSED, message)
        self.return_code = return_code


class ConnectionLost(TransportError):
    """The connection ended (closed by the broker, reset, keepalive timeout, bad bytes);
    every pending operation fails with this error."""


class NotConnected(TransportError):
    """An operation was attempted without a live connection."""

    def __init__(self, message: str = "not connected to the broker: call connect() first") -> None:
        super().__init__(ErrorCode.NOT_CONNECTED, message)


class TransportTimeout(TransportError, TimeoutError):
    """The broker did not answer within the allotted time."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.TIMEOUT, message)


class SubscribeRefused(TransportError):
    """The broker refused at least one topic filter of a SUBSCRIBE (return code 0x80)."""

    def __init__(self, refused: tuple[str, ...]) -> None:
        super().__init__(
            ErrorCode.SUBSCRIBE_REFUSED,
            f"broker refused the subscription to {', '.join(refused)}: check its ACL",
        )
        self.refused = refused
