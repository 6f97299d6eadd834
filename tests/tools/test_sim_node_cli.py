"""`torpor sim node` refuses an unprovisioned node at once, provisions one it is given a
gateway for, shows progress, and exits 1 with the most frequent errors when every wake
failed."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from gateway.security.pki import Pki

ROOT = Path(__file__).resolve().parents[2]


def torpor(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("TORPOR_CONFIG", None)
    # The installed entry point (under `python -m tools.cli` the module is __main__, and the
    # CliError that subcommands import is another class).
    exe = str(Path(sys.executable).parent / "torpor")
    return subprocess.run([exe, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unprovisioned_node_is_refused_at_once_with_the_command(tmp_path: Path) -> None:
    t0 = time.monotonic()
    p = torpor("sim", "node", "--dir", str(tmp_path / "n1"), "--cycles", "5")
    assert p.returncode == 2, p.stdout + p.stderr
    assert time.monotonic() - t0 < 20
    assert "not provisioned" in p.stderr
    assert (f"torpor sim node --dir {tmp_path / 'n1'} --gateway-config /etc/torpor/gateway.toml "
            "--cycles 5") in p.stderr
    assert not (tmp_path / "n1" / "node.log").exists()  # not one wake ran


def test_every_wake_failing_exits_1_with_its_reasons(tmp_path: Path) -> None:
    Pki(tmp_path / "pki").init_ca()
    p = torpor("sim", "node", "--dir", str(tmp_path / "n2"), "--cycles", "3", "--time-scale", "0",
               "--gateway", f"127.0.0.1:{closed_port()}", "--pki", str(tmp_path / "pki"))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "provisioned n2: broker 127.0.0.1:" in p.stderr
    # progress: one plain line per interval when stderr is not a terminal, and the last one
    assert "[wakes] 3/3 last: sleep" in p.stderr, p.stderr
    # The node may wait out its retry delay in a wake (no send, no failure): at least two
    # of the three wakes tried and failed, and none delivered.
    m = re.search(r"every wake failed: (\d) of 3 failed, none delivered readings", p.stderr)
    assert m and int(m.group(1)) >= 2, p.stderr
    assert f"{m.group(1)}x  send failed" in p.stderr, p.stderr
    assert f"failed_runs            {m.group(1)}" in p.stdout
