"""The real `torpor` in a subprocess: a closed pipe, a Ctrl-C and an operator's mistake each
end with a documented exit code and at most one line on stderr, never a Python traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.security.pki import Pki
from gateway.store import db
from gateway.store import devices as registry
from tools.cli import EXIT_INTERRUPTED, EXIT_OPERATOR, EXIT_PIPE_CLOSED

ROOT = Path(__file__).resolve().parents[2]
# The installed console script, as a user runs it (the module itself where it is missing).
_SCRIPT = Path(sys.executable).parent / "torpor"
TORPOR = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "tools.cli"]
DEVICES = 1500  # `device list` prints ~120 kB: more than a pipe holds, so `head` cuts it


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin"
    env.pop("TORPOR_CONFIG", None)
    return env


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gateway configuration with many devices, and a PKI with a few certificates."""
    root = tmp_path_factory.mktemp("cli")
    (root / "gateway.toml").write_text(f'[gateway]\ndata_dir = "{root / "data"}"\n')
    (root / "data").mkdir()
    conn = db.open_db(root / "data" / "gateway.db")
    with db.transaction(conn):
        for i in range(DEVICES):
            registry.add(conn, f"n{i}")
    conn.close()
    pki = Pki(root / "pki")
    pki.init_ca()
    for i in range(3):
        pki.issue_device(f"n{i}")
    return root


def _closed_early(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run torpor with its stdout a pipe nobody reads: our end is closed before it writes."""
    proc = subprocess.Popen([*TORPOR, *argv], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(timeout=60), err


@pytest.mark.parametrize("argv", [
    ["device", "list"],
    ["device", "list", "--json"],
    ["device", "show", "n1"],
    ["device", "show", "n1", "--json"],
    ["pki", "list"],
    ["gateway", "config-example"],
    ["--help"],
    ["device", "send", "--help"],
], ids=" ".join)
def test_a_closed_pipe_ends_quietly_with_141(site: Path, argv: list[str]) -> None:
    if argv[0] == "pki":
        argv = [*argv, "--dir", str(site / "pki")]
    elif "--help" not in argv and argv[0] != "gateway":
        argv = [*argv, "--config", str(site / "gateway.toml")]
    code, err = _closed_early(argv, site)
    assert (code, err) == (EXIT_PIPE_CLOSED, "")


def test_device_list_into_head(site: Path) -> None:
    """What a user types: the shell reports 141 for torpor, as for any tool `head` cuts."""
    done = subprocess.run(
        ["bash", "-c", f"{' '.join(TORPOR)} device list --config {site / 'gateway.toml'} "
         "| head -1; exit ${PIPESTATUS[0]}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("DEVICE") and done.stdout.count("\n") == 1
    assert (done.returncode, done.stderr) == (EXIT_PIPE_CLOSED, "")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def test_ctrl_c_while_a_command_runs_a_child(tmp_path: Path) -> None:
    """A Ctrl-C reaches the whole foreground process group: torpor and the compiler it runs."""
    proc = subprocess.Popen(
        [*TORPOR, "fw", "build", "--board", "sim", "--version", "2", "--out", str(tmp_path / "img")],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    deadline = time.monotonic() + 60
    while not _children(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the build ended before it ran the compiler"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, (out, err)
    assert "Traceback" not in err and err.strip() == "torpor: interrupted"


def test_ctrl_c_during_the_demo(tmp_path: Path) -> None:
    """An asyncio command with brokers and nodes as children: they stop in order, quietly."""
    work = tmp_path / "demo"
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(
            [*TORPOR, "demo", "--nodes", "2", "--wakes", "50", "--dir", str(work)],
            cwd=ROOT, env=_env(), stdout=out, stderr=err, start_new_session=True)
    deadline = time.monotonic() + 90
    while not (work / "nodes").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the nodes' folder appears once the gateway is up
    assert proc.poll() is None, (tmp_path / "err").read_text()
    time.sleep(1.5)  # the fleet is waking
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=90)
    text = (tmp_path / "out").read_text() + (tmp_path / "err").read_text()
    assert proc.returncode == EXIT_INTERRUPTED, text
    assert "Traceback" not in text
    leftovers = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True)
    assert leftovers.stdout == "", "processes left running"


@pytest.mark.parametrize(("argv", "message"), [
    (["device", "show", "nope"], "no device 'nope' in the registry"),
    (["device", "add", "bad id"], "invalid device id 'bad id'"),
    (["device", "send", "n1", "stay_awake", "900"], "must be in 0..600 s, got 900"),
    (["device", "list", "--config", "{site}/missing.toml"], "missing.toml"),
    (["device", "list", "--config", "{site}/bad.toml"], "[gateway] data_dir: expected a string"),
    (["gateway", "status", "--config", "{site}/bad.toml"], "[gateway] data_dir"),
    (["pki", "list", "--dir", "{site}/nowhere"], "no CA in"),
    (["fw", "verify", "--pubkey", "{site}/nokey", "{site}/noimage"], "nokey"),
    (["ota", "campaign", "create", "--image", "{site}/noimage", "--group", "all"], "noimage"),
    (["fw", "build", "--board", "sim", "--version", "3", "--out", "{site}/afile/img"],
     "Not a directory: {site}/afile/img"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_operator_errors_are_one_line(site: Path, argv: list[str], message: str) -> None:
    (site / "bad.toml").write_text("[gateway]\ndata_dir = 5\n")
    (site / "afile").write_text("")
    argv = [a.replace("{site}", str(site)) for a in argv]
    message = message.replace("{site}", str(site))
    if argv[0] in ("device", "ota") and "--config" not in argv:
        argv += ["--config", str(site / "gateway.toml")]
    done = subprocess.run([*TORPOR, *argv], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == EXIT_OPERATOR, done
    assert done.stderr.startswith("torpor: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_proto_gen_runs_when_the_generated_gateway_codec_cannot_be_imported() -> None:
    """`torpor proto gen` repairs a broken gateway/proto.py, so it must not need it."""
    code = ("import sys; sys.modules['gateway.proto'] = None\n"
            "from tools.cli import main; sys.exit(main(['proto', 'check']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, ""), done
    assert "generated files match the spec" in done.stdout
