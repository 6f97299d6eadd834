"""The gateway package's exception hierarchy.

Every error raised on purpose by gateway code derives from `GatewayError`, and its message
says what went wrong and what the operator can do about it, so the CLI can print it as is.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every deliberate gateway error; the message is meant for the operator."""


class ConfigError(GatewayError):
    """The configuration is invalid; the message names the bad key or value."""


class PkiError(GatewayError):
    """A certificate authority operation failed (missing CA, bad device id, unknown serial...)."""


class BrokerError(GatewayError):
    """The MQTT broker could not be configured, started, reached or controlled."""
