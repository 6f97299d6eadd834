"""Expiry events: 30, 7 and 1 days before a credential lapses, once each, across restarts,
upstream and in the gateway's status."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest

from gateway.config import UpstreamConfig, parse_config
from gateway.errors import ConfigError
from gateway.security import lifetimes
from gateway.security.pki import Pki
from gateway.store import db
from gateway.store import events as events_store
from gateway.store import status as status_store


class Clock:
    def __init__(self) -> None:
        self.t = dt.datetime.now(dt.UTC).replace(microsecond=0)

    def __call__(self) -> dt.datetime:
        return self.t


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Pki, Clock]:
    clock = Clock()
    pki = Pki(tmp_path / "pki", clock=clock)
    pki.init_ca()
    pki.issue_server(["localhost"], days=40)
    pki.issue_gateway(days=400)
    pki.init_issuing()
    pki.write_crl(days=400)
    pki.issue_device("node-1", days=35)
    pki.issue_device("node-2", days=400)
    return pki, clock


def _expiring(events: list[events_store.CredentialEvent]) -> list[tuple[str, str, int | None]]:
    return sorted((e.name, e.subject, e.threshold_days) for e in events if e.kind == "expiring")


def test_each_threshold_is_raised_once_even_across_restarts(fleet: tuple[Pki, Clock], tmp_path: Path) -> None:
    pki, clock = fleet
    path = tmp_path / "gateway.db"
    conn = db.open_db(path)
    events_store.migrate(conn)

    def check() -> list[tuple[str, str, int | None]]:
        events, _ = lifetimes.record(conn, pki.status(), now=time.time())
        return _expiring(events)

    assert check() == []  # server 40 days, node-1 35 days: nothing yet
    clock.t += dt.timedelta(days=6)  # node-1 29 days left
    assert check() == [("device", "node-1", 30)]
    assert check() == []
    clock.t += dt.timedelta(days=5)  # server 29 days left
    assert check() == [("server", "torpor-broker", 30)]
    conn.close()  # the gateway restarts: nothing is said twice
    conn = db.open_db(path)
    events_store.migrate(conn)
    assert check() == []
    clock.t += dt.timedelta(days=22)  # node-1 2 days, server 7 days left
    assert check() == [("device", "node-1", 7), ("server", "torpor-broker", 7)]
    clock.t += dt.timedelta(days=1, hours=12)  # node-1 12 hours left
    assert check() == [("device", "node-1", 1)]
    assert check() == []
    stored = lifetimes.recent(conn, 100)
    assert len(stored) == 5 and all(e.kind == "expiring" for e in stored)
    assert stored[0].subject == "node-1" and stored[0].days_left == pytest.approx(0.5, abs=0.01)
    conn.close()


def test_a_late_look_tells_the_tightest_threshold_once(fleet: tuple[Pki, Clock], tmp_path: Path) -> None:
    """A gateway that was off for weeks says "under 1 day" once, not 30, 7 and 1."""
    pki, clock = fleet
    conn = db.open_db(tmp_path / "gateway.db")
    events_store.migrate(conn)
    clock.t += dt.timedelta(days=34, hours=12)
    events, _ = lifetimes.record(conn, pki.status(), now=time.time())
    assert _expiring(events) == [("device", "node-1", 1), ("server", "torpor-broker", 7)]
    clock.t += dt.timedelta(hours=1)
    assert lifetimes.record(conn, pki.status(), now=time.time())[0] == []
    conn.close()


def test_a_renewed_credential_starts_afresh_and_events_go_upstream(
        fleet: tuple[Pki, Clock], tmp_path: Path) -> None:
    pki, clock = fleet
    conn = db.open_db(tmp_path / "gateway.db")
    events_store.migrate(conn)
    up = UpstreamConfig(enabled=True, host="upstream.example")
    clock.t += dt.timedelta(days=34)  # server 6 days left
    events, queued = lifetimes.record(conn, pki.status(), upstream=up, gateway_id="gw-1",
                                      now=time.time())
    assert _expiring(events) == [("device", "node-1", 1), ("server", "torpor-broker", 7)]
    rows = conn.execute("SELECT topic, payload FROM outbox ORDER BY id").fetchall()
    assert len(queued) == len(rows) == 2
    topics = sorted(r[0] for r in rows)
    # The default template torpor/{device}/events: the gateway's under its own id.
    assert topics == ["torpor/gw-1/events", "torpor/node-1/events"]
    by_topic = {r[0]: json.loads(r[1]) for r in rows}
    server_event = next(v for k, v in by_topic.items() if "gw-1" in k)
    assert "torpor-broker" in json.dumps(server_event) and "expiring" in json.dumps(server_event)
    # The server certificate is renewed: its renewal is an event, its successor is new.
    cfg = parse_config({"pki": {"server_lead_days": 30, "server_days": 90}}).pki
    report = lifetimes.renew_due(pki, cfg)
    assert [r.name for r in report.renewed] == ["server"]
    events, _ = lifetimes.record(conn, pki.status(), report, upstream=up, now=time.time())
    assert [(e.kind, e.name) for e in events] == [("renewed", "server")]
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 3
    status = status_store.read_status(conn)
    assert [e["kind"] for e in status.credential_events][:2] == ["renewed", "expiring"]
    assert json.dumps(status.as_dict(), default=str)  # `torpor gateway status --json`
    conn.close()


def test_status_without_the_table_yet(tmp_path: Path) -> None:
    conn = db.open_db(tmp_path / "old.db")
    conn.execute("DROP TABLE IF EXISTS credential_events")
    assert lifetimes.recent(conn) == []
    conn.close()


@pytest.mark.parametrize("section, message", [
    ({"server_lead_days": 90, "server_days": 90}, "server_lead_days"),
    ({"gateway_lead_days": 900}, "gateway_lead_days"),
    ({"crl_renew_at": 1.0}, "crl_renew_at"),
    ({"crl_days": 0}, "crl_days"),
    ({"check_interval_s": "soon"}, "check_interval_s"),
    ({"renew_everything": True}, "renew_everything: unknown key"),
])
def test_pki_section_is_validated(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"pki": section})


def test_a_threshold_applies_only_to_a_credential_that_lived_longer(
        fleet: tuple[Pki, Clock], tmp_path: Path) -> None:
    """The gateway's 30-day CRL is not "30 days from expiry" when it is issued; if its
    renewal keeps failing it reaches 7 and 1 days."""
    pki, clock = fleet
    conn = db.open_db(tmp_path / "gateway.db")
    events_store.migrate(conn)
    pki.write_crl(days=30)
    pki.issue_server(["localhost"], days=400)
    pki.issue_device("node-1", days=400)
    assert lifetimes.record(conn, pki.status(), now=time.time())[0] == []
    clock.t += dt.timedelta(days=23, hours=1)
    assert _expiring(lifetimes.record(conn, pki.status(), now=time.time())[0]) == [
        ("crl", "Torpor issuing CA", 7)]
    conn.close()


def test_a_failing_renewal_is_told_once_a_day_and_the_table_is_bounded(
        fleet: tuple[Pki, Clock], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki, clock = fleet
    conn = db.open_db(tmp_path / "gateway.db")
    events_store.migrate(conn)
    (pki.path / "issuing.key").unlink()  # the key is lost: nothing can be renewed
    cfg = parse_config({"pki": {"server_lead_days": 30, "server_days": 90}}).pki
    clock.t += dt.timedelta(days=20)  # server 20 days left: due
    t0 = time.time()
    told = []
    for hour in range(30):
        report = lifetimes.renew_due(pki, cfg)
        assert [f[0].name for f in report.failed] == ["server"]
        events, _ = lifetimes.record(conn, pki.status(), report, now=t0 + hour * 3600)
        told += [e for e in events if e.kind == "renewal_failed"]
    assert [round((e.at - t0) / 3600) for e in told] == [0, 24]
    assert "issuing CA key" in told[0].detail
    monkeypatch.setattr(events_store, "MAX_ROWS", 3)
    lifetimes.record(conn, pki.status(), lifetimes.renew_due(pki, cfg), now=t0 + 48 * 3600)
    assert conn.execute("SELECT count(*) FROM credential_events").fetchone()[0] <= 4
    conn.close()
