"""The whole Torpor stack for system tests: fleet PKI, Mosquitto with mutual TLS, the real
gateway as a process, and sim nodes running the real firmware, registered and provisioned.

    stack = Stack(tmp_path, broker)           # broker: the `broker` fixture (external mode)
    stack = Stack(tmp_path)                   # or None: the gateway supervises its own
                                              # Mosquitto on a free port, fresh PKI
    stack = Stack(tmp_path, broker, downlink={"sweep_interval_s": 0.2}, ingest={...})
    stack.start()                             # `torpor gateway run --config gateway.toml`
    node = stack.add_node("n1", seed=3, send_every=1)   # `torpor device add --issue-cert`,
                                              # config + DER credentials into its flash
    await node.wake()                         # one boot of the node (HELLO, bursts, downlink)
    stack.cli("device", "send", "n1", "ping") # the real CLI in a process; CompletedProcess
    with stack.db() as conn: ...              # the gateway's SQLite file (read it, or queue
                                              # through gateway.store.downlink_queue)
    stack.kill()  /  stack.stop()             # SIGKILL / SIGTERM the gateway; start() again
    stack.close()                             # stop the gateway (the `stack` fixture does it)

Nodes run with `time_scale=0` and are asleep between `wake()` calls: a sleeping node is no
process at all, and its virtual clock moves on by the interval it slept. `node.executions()`
lists every command the firmware ran (`hold_next()` / `wait_held()` / `release()` pause the
node right after a command ran and before its result is published, for fault injection).
`stack.log_text()` is the gateway's log, for assertion messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.security.pki import DeviceCredentials, Pki
from gateway.store import db
from tests.firmware.test_node_cycle import START_MS, NodeLog, provision, read_log
from tests.fixtures.broker import RunningBroker, free_port, make_pki
from tools.sim.field import FieldModel
from tools.sim.node import RunSummary, SimNode

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0

# Shadows firmware/commands.py on the node's path: the real module runs unchanged; each
# execution is appended to exec.log ("<command id> <op> <result status>"), and when a `hold`
# file exists the node writes `held` ("<pid> <command id>") after the command ran and its
# result was recorded, then waits (at most 30 s) for `release` before it publishes the result.
# A `hold` file naming a command id holds at that command only.
_HOOK = """\
# Written by the system tests: the real commands module plus an execution record.
import os
import sys
import time

for _p in sys.path:
    if _p.endswith('/firmware'):
        with open(_p + '/commands.py') as _f:
            exec(_f.read(), globals())
        break

_real_execute = execute
_DIR = os.getenv('TORPOR_HOOK_DIR')


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def execute(cmd, cfg, st, board, effects, buf, msg_id, *more):
    n = _real_execute(cmd, cfg, st, board, effects, buf, msg_id, *more)
    with open(_DIR + '/exec.log', 'a') as f:
        f.write('%d %d %d\\n' % (cmd[proto.COMMAND_COMMAND_ID], cmd[proto.COMMAND_OP], buf[10]))
    want = None
    if _exists(_DIR + '/hold'):
        with open(_DIR + '/hold') as f:
            want = f.read().strip()
    if want is not None and (not want or int(want) == cmd[proto.COMMAND_COMMAND_ID]):
        os.unlink(_DIR + '/hold')
        with open('/proc/self/stat') as f:
            pid = f.read().split()[0]
        with open(_DIR + '/held.tmp', 'w') as f:
            f.write('%s %d\\n' % (pid, cmd[proto.COMMAND_COMMAND_ID]))
        os.rename(_DIR + '/held.tmp', _DIR + '/held')
        t0 = time.ticks_ms()
        while not _exists(_DIR + '/release') and time.ticks_diff(time.ticks_ms(), t0) < 30000:
            time.sleep_ms(5)
    return n
"""


@dataclass(frozen=True, slots=True)
class Execution:
    """One COMMAND the node's firmware handled: its id, op and the result status it made."""

    command_id: int
    op: int
    status: int


class StackNode:
    """A sim node of the stack: its device id, SimNode, credentials and hook folder."""

    def __init__(self, device_id: str, sim: SimNode, creds: DeviceCredentials, hooks: Path) -> None:
        self.id = device_id
        self.sim = sim
        self.creds = creds
        self.hooks = hooks

    async def wake(self, cycles: int = 1, wall_limit_s: float = 60.0) -> RunSummary:
        """`cycles` boots of the node, back to back in virtual time."""
        return await self.sim.run(cycles, wall_limit_s=wall_limit_s)

    def log(self) -> NodeLog:
        return read_log(self.sim)

    def log_text(self) -> str:
        path = self.sim.dir / "node.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def executions(self) -> list[Execution]:
        path = self.hooks / "exec.log"
        if not path.exists():
            return []
        return [Execution(*map(int, line.split())) for line in path.read_text().splitlines() if line]

    def hold_next(self, command_id: int | None = None) -> None:
        """Pause the node after the next command it executes (or after command
        `command_id`), before it reports."""
        for name in ("held", "release"):
            (self.hooks / name).unlink(missing_ok=True)
        (self.hooks / "hold").write_text("" if command_id is None else str(command_id))

    async def wait_held(self, timeout: float = 20.0) -> tuple[int, int]:
        """(pid of the paused node process, command id it executed)."""
        deadline = time.monotonic() + timeout
        path = self.hooks / "held"
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.id} never executed a command:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.005)
        pid, cid = path.read_text().split()
        return int(pid), int(cid)

    def release(self) -> None:
        (self.hooks / "release").write_text("")


class Stack:
    """PKI, broker, gateway process and sim nodes under one folder (see the module doc)."""

    def __init__(self, root: Path, broker: RunningBroker | None = None, *,
                 downlink: Mapping[str, Any] | None = None,
                 ingest: Mapping[str, Any] | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.broker = broker
        if broker is not None:
            assert broker.pki is not None, "the stack needs a TLS broker"
            self.pki = broker.pki
            self.host, self.port = broker.host, broker.port
        else:
            self.pki = make_pki(root / "pki")
            self.host, self.port = "127.0.0.1", free_port()
        self.data_dir = root / "data"
        self.config_path = root / "gateway.toml"
        self.log_path = root / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.nodes: dict[str, StackNode] = {}
        # The board profile of the nodes add_node makes (None: the kind sim board).
        self.field: FieldModel | None = None
        self._write_config(dict(downlink or {}), {"batch_max_ms": 2,
                                                   "rate_limit_frames_per_min": 100_000,
                                                   **(ingest or {})})

    # ---- configuration and database ----
    def _write_config(self, downlink: dict[str, Any], ingest: dict[str, Any]) -> None:
        def table(name: str, values: Mapping[str, Any]) -> str:
            rows = "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
            return f"[{name}]\n{rows}"

        broker: dict[str, Any] = {
            "mode": "external" if self.broker is not None else "supervised",
            "host": self.host, "port": self.port, "pki_dir": str(self.pki.path)}
        text = (table("gateway", {"data_dir": str(self.data_dir), "status_interval_s": 0.2,
                                  "log_level": "info"})
                + table("broker", broker) + table("ingest", ingest)
                + (table("downlink", downlink) if downlink else ""))
        self.config_path.write_text(text)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "gateway.db"

    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        """The gateway's database (migrated), closed on exit."""
        conn = db.open_db(self.db_path)
        try:
            yield conn
        finally:
            conn.close()

    def cli(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """`torpor <args> --config <the stack's file>` as a process."""
        proc = subprocess.run(
            [sys.executable, "-m", "tools.cli", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"torpor {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- the gateway process ----
    def start(self) -> None:
        """Start the gateway and return once it is connected to the broker."""
        assert self.proc is None or self.proc.poll() is not None, "the gateway is running"
        # Up means subscribed: ingest logs this line once its subscription is granted.
        ready = "INFO gateway.pipeline.ingest: ingesting "
        before = self.log_text().count(ready)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.cli", "gateway", "run", "--config",
                 str(self.config_path)], stdout=out, stderr=out, cwd=ROOT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.log_text().count(ready) <= before:
            if self.proc.poll() is not None:
                raise AssertionError(f"the gateway exited {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the gateway did not come up:\n{self.log_text()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the gateway (a power cut of the gateway host's process)."""
        assert self.proc is not None and self.proc.poll() is None, "the gateway is not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait for a clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        self.stop()

    # ---- nodes ----
    def add_node(self, device_id: str, seed: int, *, device_class: str = "sensor",
                 time_scale: float = 0, start_ms: int | None = START_MS,
                 field: FieldModel | None = None, **config: Any) -> StackNode:
        """Register `device_id` with a certificate through the CLI and provision a sim node
        with it. `config` overrides firmware config.json keys (send_every, ...).
        time_scale=1 and start_ms=None run the node in real time, on the gateway's clock."""
        self.cli("device", "add", device_id, "--class", device_class, "--issue-cert")
        creds = Pki(self.pki.path).device_credentials(device_id)
        hooks = self.root / "nodes" / f"{device_id}.hooks"
        hooks.mkdir(parents=True, exist_ok=True)
        (hooks / "lib").mkdir(exist_ok=True)
        (hooks / "lib" / "commands.py").write_text(_HOOK)
        sim = SimNode(self.root / "nodes" / device_id, seed=seed, time_scale=time_scale,
                      start_ms=start_ms,
                      extra_path=(str(hooks / "lib"),), env={"TORPOR_HOOK_DIR": str(hooks)},
                      awake_limit_s=60.0, field=field or self.field)
        cfg: dict[str, Any] = {
            "device_id": device_id, "broker_host": self.host, "broker_port": self.port,
            "server_hostname": "localhost", "sample_interval_s": 60, "send_every": 1,
            "send_max_age_s": 86400, "awake_window_ms": 3000, "awake_budget_ms": 8000,
            "align_s": 60,
        }
        cfg.update(config)
        provision(sim, cfg, creds)
        node = StackNode(device_id, sim, creds, hooks)
        self.nodes[device_id] = node
        return node


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def kill_node_process(pid: int) -> None:
    """SIGKILL a node process the stack's SimNode started (a power cut mid-wake)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
