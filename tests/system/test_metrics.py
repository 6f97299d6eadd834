"""`/metrics` scraped from the real gateway process (its web page enabled) after real sim
nodes sent readings through a real Mosquitto: the exposition parses with prometheus_client's
own parser and its figures are what the store holds."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.store import downlink_queue as q
from gateway.store import readings
from tests.fixtures.broker import free_port
from tests.system.stack import Stack

TOKEN = "metrics-test-token-0123456789"


def _get(url: str, token: str = "") -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def _scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {sorted labels: value} of every sample."""
    status, ctype, text = _get(url)
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype, text[:200])
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _one(m: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return m[name][tuple(sorted(labels.items()))]


# In the gateway's process the page reads its counters in memory; from its own process
# (`[web] process = true`) it asks the gateway for them at each scrape.
@pytest.mark.parametrize("process", [False, True], ids=["in-process", "web-process"])
def test_metrics_match_what_the_gateway_ingested(stack: Stack, process: bool) -> None:
    port = free_port()
    with open(stack.config_path, "a") as f:
        f.write(f"[web]\nenabled = true\nhost = \"127.0.0.1\"\nport = {port}\n"
                f"process = {'true' if process else 'false'}\n")
    url = f"http://127.0.0.1:{port}/metrics"

    async def main() -> None:
        stack.start()
        nodes = [stack.add_node(f"met-{i}", seed=40 + i, send_every=1) for i in range(2)]
        stack.cli("device", "add", "met-silent")  # provisioned, never heard from
        for node in nodes:
            await node.wake(3)

    asyncio.run(asyncio.wait_for(main(), 180))
    with stack.db() as conn:
        stored = readings.count_rows(conn)
        q.enqueue_command(conn, "met-0", "ping")
        q.enqueue_command(conn, "met-1", "ping")
        q.cancel(conn, "met-1", q.pending(conn, "met-1")[0].command_id)
        low = min(int(r[0]) for r in conn.execute(
            "SELECT battery_mv FROM devices WHERE battery_mv IS NOT NULL"))
    assert stored > 0

    deadline = time.monotonic() + 20
    while True:  # the page comes up with the gateway; the counters lag the commit by nothing
        try:
            m = _scrape(url)
            if m["torpor_ingest_readings_total"][()] == stored:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the readings counter never reached the store's count"
        time.sleep(0.2)

    assert _one(m, "torpor_ingest_readings_total") == stored
    # Each wake sends a HELLO and one burst; every frame is counted, retries included.
    assert _one(m, "torpor_ingest_hellos_total") >= 6
    assert _one(m, "torpor_ingest_bursts_total") >= 6
    assert _one(m, "torpor_ingest_frames_total") >= 12
    commits = _one(m, "torpor_ingest_commits_total")
    assert commits >= 1
    assert _one(m, "torpor_ingest_commit_seconds_count") == commits
    assert 0 < _one(m, "torpor_ingest_commit_seconds_sum") < commits * 5
    assert _one(m, "torpor_ingest_commit_seconds_bucket", le="+Inf") == commits
    assert _one(m, "torpor_devices", status="active") == 2
    assert _one(m, "torpor_devices", status="provisioned") == 1
    assert _one(m, "torpor_devices", status="quarantined") == 0
    assert _one(m, "torpor_downlink_items", state="queued") == 1
    assert _one(m, "torpor_downlink_items", state="cancelled") == 1
    assert _one(m, "torpor_battery_lowest_volts") == low / 1000.0
    assert _one(m, "torpor_broker_up") == 1
    assert _one(m, "torpor_gateway_running") == 1
    assert _one(m, "torpor_alerts_open") == 0
    assert _one(m, "torpor_outbox_items") == 0  # no upstream configured...
    assert "torpor_upstream_connected" not in m  # ...so no upstream to be connected to
    assert _one(m, "torpor_dead_letters") == 0
    assert _one(m, "torpor_ota_campaigns", state="running") == 0
    # The stack's PKI has a CRL and the gateway's certificates: their time left, in seconds.
    deadline = time.monotonic() + 10
    while "torpor_credential_expiry_seconds" not in m:
        assert time.monotonic() < deadline, "no credential lifetimes exported"
        time.sleep(0.2)
        m = _scrape(url)
    crl = _one(m, "torpor_credential_expiry_seconds", credential="crl")
    assert 0 < crl < 400 * 86400


def test_metrics_need_the_login_like_the_page(stack: Stack) -> None:
    port = free_port()
    with open(stack.config_path, "a") as f:
        f.write(f"[web]\nenabled = true\nhost = \"127.0.0.1\"\nport = {port}\n"
                f"token = \"{TOKEN}\"\n")
    stack.start()
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 20
    while True:
        try:
            status, _, body = _get(url)
            break
        except OSError:
            assert time.monotonic() < deadline, "the web page did not come up"
            time.sleep(0.1)
    assert status == 401 and "Authorization" in body
    status, ctype, text = _get(url, TOKEN)
    assert status == 200 and "torpor_devices" in text
