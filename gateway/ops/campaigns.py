"""OTA campaigns for the operator: each campaign's progress per device state."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from gateway.store import ota_store as ota

# Device states in the order a device moves through them, then the ways it ends.
STATES = (ota.PENDING, *ota.IN_FLIGHT, ota.CONFIRMED, *ota.BAD, ota.CANCELLED)


class NotFound(LookupError):
    """No such campaign (the message names it)."""


@dataclass(frozen=True, slots=True)
class Progress:
    campaign: ota.Campaign  # `devices` empty in a list, every device in one campaign's view
    counts: dict[str, int]  # devices by state

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        """Devices whose part in the campaign is over (updated, failed or cancelled)."""
        return sum(n for s, n in self.counts.items() if s in ota.TERMINAL)

    @property
    def bad(self) -> int:
        return sum(n for s, n in self.counts.items() if s in ota.BAD)

    def as_dict(self, devices: bool = False) -> dict[str, Any]:
        d = self.campaign.as_dict()
        d["counts"] = {s: self.counts.get(s, 0) for s in STATES}
        d["total"], d["finished"], d["bad"] = self.total, self.finished, self.bad
        if not devices:
            del d["devices"]
        return d


def campaigns(conn: sqlite3.Connection) -> list[Progress]:
    """Every campaign, newest first."""
    return [Progress(c, counts) for c, counts in ota.summaries(conn)]


def campaign(conn: sqlite3.Connection, cid: int) -> Progress:
    """One campaign with every device's state."""
    try:
        c = ota.get_campaign(conn, cid)
    except ota.OtaError:
        raise NotFound(f"no campaign {cid}") from None
    return Progress(c, c.counts())
