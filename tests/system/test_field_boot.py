"""The bootloader and safe mode against the real stack: a trial image across a Wi-Fi
outage is kept, a confirmed slot that fails its check falls back to the other one, and a
node in a crash loop enters safe mode, stays there across power loss, runs no commands,
and leaves it when the operator's configuration arrives.

The outage is the sim board's own radio switch (sim.json `radio.available`); the crash is a
command the test's hook module turns into an exception, as a firmware bug would."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from gateway.store import downlink_queue as q
from tests.firmware.test_bootloader_sim import on_flash
from tests.firmware.test_ota_delivery import last_run, wake_bound
from tests.system.stack import Stack, StackNode
from tests.system.test_ota_campaign import Images, boot_node, campaign, images  # noqa: F401
from tests.system.test_sleeping_nodes import aio, item, send, show, until
from tools.sim.field import FieldModel

# On the hostile sim board: an ESP32-C3's cold clock, drift, association and TLS times
# (charged at a tenth in real time), heap and watchdog.
HOSTILE = FieldModel.named("esp32c3", awake_scale=10.0)


@pytest.fixture(autouse=True)
def _hostile_board(stack: Stack) -> None:
    stack.field = HOSTILE

_CORRUPT = """
import os
d = '/flash/fw/{slot}'
for name in os.listdir(d):
    if name.endswith('.mpy'):
        with open(d + '/' + name, 'ab') as f:
            f.write(b'\\x00')
"""


def _boots(node: StackNode) -> list[str]:
    """The node log, one piece per boot."""
    return re.split(r"^--- run \d+ cause=", node.log_text(), flags=re.M)[1:]


def _radio(node: StackNode, available: bool) -> None:
    path = node.sim.dir / "sim.json"
    cfg = json.loads(path.read_text())
    cfg["radio"] = {"available": available}
    path.write_text(json.dumps(cfg))


def test_a_trial_across_an_outage_is_kept_then_a_bad_slot_falls_back(
        stack: Stack, images: Images) -> None:  # noqa: F811
    stack.start()
    # A short budget: each wake of the outage waits for the radio until it is spent.
    node = boot_node(stack, images, "fb1", 91, awake_budget_ms=3000)

    async def run() -> None:
        await node.wake()
        stack.cli("ota", "campaign", "create", "--image", str(images.build(2)), "--devices",
                  "fb1", "--rate", "1", "--timeout", "1h", "--pubkey", str(images.pubkey_path))
        # The download, a chunk a wake (the image's size sets it); the wake that finishes it
        # resets into the trial (a wake that checked the manifest at its start resets too).
        for _ in range(wake_bound(stack, 1)):
            s = await node.wake()
            if s.runs[-1].kind == "soft_reset" and "trial set" in last_run(node):
                break
        else:
            raise AssertionError(node.log_text()[-3000:])
        _radio(node, False)  # Wi-Fi down for the trial's first boots
        await node.wake(3)
        text = node.log_text()
        assert text.count("boot: slot b v2 trial=1") == 3, text[-3000:]
        assert "boot: revert" not in text
        assert "gateway out of reach, not held against it" in text
        _radio(node, True)
        await node.wake()
        await until(lambda: campaign(stack, 1)["status"] == "completed", "campaign done")
        assert show(stack, "fb1")["fw_version"] == 2
        # The confirmed slot (b, v2) is damaged: the bootloader starts slot a (v1), which
        # still verifies, instead of sleeping.
        on_flash(node.sim, _CORRUPT.format(slot="b"))
        await node.wake(2)
        text = node.log_text()
        assert "boot: confirmed slot b does not check out" in text
        assert "boot: falling back to slot a v1" in text
        doc = show(stack, "fb1")
        assert (doc["fw_version"], doc["ota_state"]) in ((1, "reverted"), (1, "idle")), doc

    asyncio.run(run())


# The real commands module, plus a poisoned command: `ping 13` raises, as a firmware bug
# would, wherever the real module would run it.
_POISON = """
for _p in sys.path:
    if _p.endswith('/firmware'):
        with open(_p + '/commands.py') as _f:
            exec(_f.read(), globals())
        break

_real = execute


def execute(cmd, cfg, st, board, effects, buf, msg_id, safe=False):
    if not safe and cmd[proto.COMMAND_OP] == proto.COMMAND_OP_PING and list(cmd[proto.COMMAND_ARGS]) == [13]:
        raise RuntimeError('poisoned command')
    return _real(cmd, cfg, st, board, effects, buf, msg_id, safe)
"""


def test_a_crash_loop_ends_in_safe_mode_that_survives_power_loss_until_a_fix(
        stack: Stack) -> None:
    async def main() -> None:
        stack.start()
        node = stack.add_node("fs1", seed=92, safe_mode_after=2)
        (node.hooks / "lib" / "commands.py").write_text("import sys\n" + _POISON)
        poison = send(stack, "fs1", "ping", 13)
        await node.wake(2)  # the command crashes both wakes
        assert node.log_text().count("wake failed: RuntimeError('poisoned command'") == 2
        await node.wake()  # the third boot in a row that failed: safe mode
        assert " safe=1 " in _boots(node)[2]
        await until(lambda: item(stack, "fs1", poison).status not in q.ACTIVE, "poison answered")
        it = item(stack, "fs1", poison)
        assert (it.status, it.result_status) == (q.FAILED, "refused"), it
        assert show(stack, "fs1")["safe_mode"] == 1
        assert "safe mode:       yes" in stack.cli("device", "show", "fs1").stdout
        # Safe mode stays: on the next wake, and after a power cut (no alternating).
        ping = send(stack, "fs1", "ping")
        await node.wake()
        node.sim.power_cycle()
        await node.wake()
        runs = _boots(node)[2:]
        assert len(runs) == 3 and all(" safe=1 " in r for r in runs), runs
        assert item(stack, "fs1", ping).result_status == "refused"
        # The operator's configuration is the fix: the node leaves safe mode and samples.
        stack.cli("device", "config", "fs1", "sample_interval_s=120")
        await node.wake()
        await node.wake()
        last = _boots(node)[-1]
        assert " safe=0 " in last and "\nR id=" in last, last
        assert show(stack, "fs1")["safe_mode"] == 0

    aio(main())
