"""Edge rules across the whole stack: sim nodes running the real firmware, a real Mosquitto
with mutual TLS and the real gateway process. A rule on the nodes' readings raises an alert
and queues a command for the whole group, which a sleeping node of the group runs at its
next wake; a bad rules file sent with SIGHUP is refused and the rules in force kept."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import pytest

from gateway import proto
from gateway.store import alerts
from gateway.store import downlink_queue as q
from tests.mpharness import micropython_binary
from tests.system.stack import Stack

pytestmark = [
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
]

# The sim board's temperatures stay within -40..85 °C: "above -100" holds for every reading.
RULES = """
[groups]
greenhouse = ["gh-*"]

[[rule]]
name = "greenhouse-warm"
condition = "threshold"
group = "greenhouse"
measurement = "temperature"
above = -100.0
for_readings = 2
action = { command = "set_interval", args = [60], target = "group" }
"""


async def until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not met within {timeout:g}s: {what}"
        await asyncio.sleep(0.05)


def test_a_rule_acts_on_the_group_and_a_bad_file_keeps_it(stack: Stack) -> None:
    rules_file = stack.root / "rules.toml"  # beside gateway.toml: the default place
    rules_file.write_text(RULES)

    def open_alerts() -> list[alerts.Alert]:
        with stack.db() as conn:
            return alerts.open_alerts(conn)

    def queued(device: str) -> list[q.Item]:
        with stack.db() as conn:
            return q.history(conn, device)

    async def main() -> None:
        stack.start()
        warm = stack.add_node("gh-1", seed=1)
        other = stack.add_node("gh-2", seed=2)
        await until(lambda: "rules: 1 in force" in stack.log_text(), "the rules loaded")
        await warm.wake()  # one reading: not yet 2 in a row
        await asyncio.sleep(0.5)
        assert open_alerts() == []
        await warm.wake()
        await until(lambda: len(open_alerts()) == 1, "the alert")
        [a] = open_alerts()
        assert (a.rule, a.device) == ("greenhouse-warm", "gh-1")
        # Queued once for each member of the group, whatever the member's state.
        for dev in ("gh-1", "gh-2"):
            [item] = queued(dev)
            assert (item.op, item.args) == (proto.CommandOp.SET_INTERVAL, (60,))
        # gh-2 runs it at its next wake.
        await other.wake()
        await until(lambda: [e.op for e in other.executions()] == [int(proto.CommandOp.SET_INTERVAL)],
                    "gh-2 ran set_interval")
        # A bad file on SIGHUP: refused, named, the rule kept (gh-2's readings now count).
        rules_file.write_text(RULES.replace("above = -100.0", "above = \"warm\""))
        assert stack.proc is not None
        os.kill(stack.proc.pid, signal.SIGHUP)
        await until(lambda: "rules not reloaded" in stack.log_text(), "the refusal")
        assert "rule[1] (greenhouse-warm).above: expected a number" in stack.log_text()
        await other.wake()
        await until(lambda: len(open_alerts()) == 2, "gh-2's alert under the kept rule")
        # The group's episode was already acted on: nothing more queued.
        assert len(queued("gh-1")) == 1 and len(queued("gh-2")) == 1

    asyncio.run(asyncio.wait_for(main(), 120))
