"""No reading is lost: a sim node runs 100 wakes against a real Mosquitto with mutual TLS
while the supervisor cuts its power (SIGKILL, RTC memory lost) 50 times at random moments
of its awake time. Every reading the node logged as durable reaches the acking gateway,
first seen in message-id order. Nodes with a foreign-CA or a revoked certificate get
nothing accepted.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from tests.firmware.test_node_cycle import (
    TestGateway,
    make_node,
    node_config,
    provision,
    read_log,
    received_in_order,
)
from tests.fixtures.broker import RunningBroker, make_pki
from tests.mpharness import micropython_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
]


def cut_phases(path: Path) -> dict[str, int]:
    """How many power cuts hit each phase of a wake, from the node log."""
    phases = {"before_reading": 0, "after_reading": 0, "in_session": 0}
    block: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("--- run") and "ended:" in line:
            if "power_cut" in line:
                if any(b.startswith("I ") and "connected" in b for b in block):
                    phases["in_session"] += 1
                elif any(b.startswith("R ") for b in block):
                    phases["after_reading"] += 1
                else:
                    phases["before_reading"] += 1
            block = []
        else:
            block.append(line)
    return phases


def test_100_wakes_with_50_power_cuts_lose_no_reading(tmp_path: Path, broker: RunningBroker) -> None:
    assert broker.pki is not None
    creds = broker.pki.issue_device("node-p")
    node = make_node(tmp_path, "p", seed=21)
    provision(node, node_config(broker, "node-p", send_every=1, awake_window_ms=2000), creds)

    async def main() -> None:
        async with TestGateway(broker) as gw:
            # A cut drawn for a wake that ends sooner is carried to the next one, so a few
            # may be left over after 100 wakes: top up until 50 cuts happened.
            cuts = wakes = 0
            for attempt in range(10):
                want = 50 - cuts
                cycles = 100 if attempt == 0 else 2 * want
                summary = await node.run(cycles, power_cuts=want, cut_seed=1234 + attempt, wall_limit_s=150)
                assert not summary.stopped_by_wall_limit, summary.as_dict()
                assert set(summary.kinds) <= {"sleep", "power_cut"}, summary.as_dict()
                cuts += summary.power_cuts
                wakes += len(summary.runs)
                if cuts >= 50:
                    break
            assert cuts == 50 and wakes >= 100
            phases = cut_phases(node.dir / "node.log")
            # The cuts hit every phase of a wake: before the reading was durable, after it,
            # and during the MQTT session.
            assert phases["before_reading"] and phases["after_reading"] and phases["in_session"], phases
            # Drain: send on every wake until the queue is empty.
            provision(node, node_config(broker, "node-p", send_every=1), None)
            await node.run(3, wall_limit_s=60)
            await asyncio.sleep(0.3)
            log = read_log(node)
            assert len(log.readings) >= 40, "too few wakes got as far as a durable reading"
            got = gw.readings.get("node-p", {})
            missing = sorted(set(log.readings) - set(got))
            assert not missing, f"readings never delivered: {missing}"
            for i, values in log.readings.items():
                assert got[i] == values, i
            first = received_in_order(gw, "node-p")
            assert first == sorted(first), "first deliveries out of message-id order"
            # Ids are dense: nothing between the first and the last was skipped.
            assert first == list(range(1, max(first) + 1))
            assert log.timings[-1]["depth"] == 0

    asyncio.run(main())


def test_foreign_ca_and_revoked_certificates_are_refused(tmp_path: Path, broker: RunningBroker) -> None:
    assert broker.pki is not None
    # Its own certificate comes from another CA; it trusts our broker's CA, so only the
    # broker's check of the client certificate stands between it and the fleet.
    foreign = dataclasses.replace(
        make_pki(tmp_path / "foreign").issue_device("node-f"), ca_der=broker.pki.ca_der
    )
    revoked = broker.pki.issue_device("node-r")
    broker.pki.revoke("node-r")
    broker.reload()
    nf = make_node(tmp_path, "f", seed=31)
    nr = make_node(tmp_path, "r", seed=32)
    provision(nf, node_config(broker, "node-f", send_every=1, awake_budget_ms=3000), foreign)
    provision(nr, node_config(broker, "node-r", send_every=1, awake_budget_ms=3000), revoked)

    async def main() -> None:
        async with TestGateway(broker) as gw:
            await asyncio.gather(nf.run(2, wall_limit_s=60), nr.run(2, wall_limit_s=60))
            await asyncio.sleep(0.3)
            assert not any(d in ("node-f", "node-r") for d, _ in gw.frames)
            for n in (nf, nr):
                log = read_log(n)
                assert "send failed" in log.text
                assert log.timings[-1]["depth"] == 2, "readings stay in flash"

    asyncio.run(main())
