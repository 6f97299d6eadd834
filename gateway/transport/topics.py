"""MQTT topic names: the only place they are built or parsed.

`torpor/<device>/up` carries a node's frames to the gateway, `torpor/<device>/down` the
gateway's frames to the node, `torpor/<device>/status` its last state. The broker's ACL
lets a node use only its own `<device>` segment, so the segment is the node's identity.
"""

from __future__ import annotations

from gateway.errors import GatewayError

ROOT = "torpor"
UP_ALL = f"{ROOT}/+/up"
DOWN_ALL = f"{ROOT}/+/down"
STATUS_ALL = f"{ROOT}/+/status"


class TopicError(GatewayError):
    """A topic is not one of Torpor's."""


def up(device: str) -> str:
    return f"{ROOT}/{device}/up"


def down(device: str) -> str:
    return f"{ROOT}/{device}/down"


def status(device: str) -> str:
    return f"{ROOT}/{device}/status"


def _parse(topic: str, leaf: str) -> str:
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != ROOT or parts[2] != leaf or not parts[1]:
        raise TopicError(f"not a torpor/<device>/{leaf} topic: {topic!r}")
    if parts[1] in ("+", "#"):
        raise TopicError(f"wildcard in place of a device id: {topic!r}")
    return parts[1]


def parse_up(topic: str) -> str:
    """The device id of a `torpor/<device>/up` topic."""
    return _parse(topic, "up")


def parse_down(topic: str) -> str:
    return _parse(topic, "down")


def parse_status(topic: str) -> str:
    return _parse(topic, "status")
