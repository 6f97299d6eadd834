"""`torpor demo` at a small scale, as a user runs it: the whole stack in child processes,
a summary that adds up (sampled = stored = relayed, nothing lost or duplicated in the
store), and no process left behind, also when interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mpharness import micropython_binary

ROOT = Path(__file__).resolve().parents[2]
TORPOR = "import sys; from tools.cli import main; sys.exit(main(sys.argv[1:]))"

pytestmark = [
    pytest.mark.skipif(micropython_binary() is None, reason="no MicroPython unix port"),
    pytest.mark.skipif(
        shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
        reason="mosquitto is not installed (`make mosquitto`)",
    ),
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin"
    return env


def _processes_under(folder: Path) -> list[str]:
    """Live processes whose command line mentions `folder` (brokers, gateway) or that run
    in it (the nodes' micropython processes run in their node directories)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            cwd = ""
        if str(folder) in cmd or cwd.startswith(str(folder)):
            found.append(f"{proc.name}: {cmd}")
    return found


def _demo(tmp: Path, *args: str, timeout: float = 300) -> tuple[int, dict[str, object], str]:
    work = tmp / "demo"
    r = subprocess.run(
        [sys.executable, "-c", TORPOR, "demo", "--dir", str(work), "--json", *args],
        cwd=tmp, env=_env(), capture_output=True, text=True, timeout=timeout,
    )
    doc = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
    return r.returncode, doc, r.stderr


def test_demo_delivers_every_reading_once_and_upstream(tmp_path: Path) -> None:
    code, doc, err = _demo(tmp_path, "--nodes", "5", "--wakes", "10", "--time-scale", "60")
    assert code == 0, err[-4000:]
    fleet = doc["fleet"]
    assert isinstance(fleet, dict)
    sampled = doc["sampled"]
    assert isinstance(sampled, int) and sampled >= 5 * 10
    assert doc["stored"] == sampled and doc["relayed"] == sampled
    assert doc["missing_in_store"] == 0 and doc["duplicates_in_store"] == 0
    assert doc["lost_upstream"] == 0 and doc["outbox_depth"] == 0 and doc["ok"] is True
    assert fleet["acked"] == sampled and fleet["left_on_nodes"] == 0
    assert fleet["bytes_per_reading"] and fleet["child_cpu_ms_per_wake"]
    assert "working in" in err and "sampled" in err  # where it works, and live progress
    # The last status line shows what the summary reports.
    last = [line for line in err.splitlines() if " outbox " in line][-1]
    assert f" outbox {doc['outbox_depth']} " in last and f"stored {doc['stored']} " in last, last
    # Without --keep the throwaway directory is gone, and so are its processes.
    assert not (tmp_path / "demo").exists()
    assert not _processes_under(tmp_path / "demo")


def test_demo_with_senml_and_power_cuts(tmp_path: Path) -> None:
    code, doc, err = _demo(tmp_path, "--nodes", "3", "--wakes", "8", "--time-scale", "60",
                           "--format", "senml-cbor", "--power-cuts", "3", "--keep", "--quiet")
    assert code == 0, err[-4000:]
    assert doc["ok"] is True and doc["stored"] == doc["sampled"] == doc["relayed"]
    work = tmp_path / "demo"
    assert (work / "gateway.log").exists() and (work / "gateway" / "gateway.db").exists()
    assert len(list((work / "nodes").glob("*/node.log"))) == 3
    assert not _processes_under(work)


def test_demo_interrupted_leaves_no_process(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-c", TORPOR, "demo", "--dir", str(work), "--nodes", "3",
         "--wakes", "100", "--time-scale", "30", "--keep"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        # Interrupt once the nodes run (their logs appear).
        while time.monotonic() < deadline and not list(work.glob("nodes/*/node.log")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        time.sleep(2)
        assert _processes_under(work), "the demo's children should be running"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    # Child processes may take a moment to be reaped by the kernel after their parent.
    for _ in range(50):
        if not _processes_under(work):
            break
        time.sleep(0.1)
    assert not _processes_under(work)
