"""Configuration at run time: `torpor gateway config set|show` and SIGHUP on a real gateway
process behind a real Mosquitto. A good file's live keys take effect on the next frame, a
restart-only key is named as such, and a bad file is refused with the key named while
the gateway keeps running on its previous configuration."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import config as gwconfig
from gateway.errors import ConfigError
from gateway.ops import config_ops
from gateway.store import db, devices
from gateway.transport import topics
from tests.fixtures.broker import RunningBroker, mqtt_client
from tests.gateway.test_service import burst, provision, start_gateway, wait_running, write_config

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", "gateway", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def wait_log(log: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace")
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in the gateway log:\n{log.read_text()[-3000:]}")


def test_set_in_text_keeps_comments_and_adds_what_is_missing() -> None:
    text = ("# site config\n[gateway]\nlog_level = \"info\"  # chatty\n\n"
            "[ingest]\n# the limit\nrate_limit_frames_per_min = 300\n")
    out = gwconfig.set_in_text(text, "ingest", "rate_limit_frames_per_min", 600)
    assert "rate_limit_frames_per_min = 600\n" in out and "# the limit" in out
    assert out.count("rate_limit_frames_per_min") == 1
    out = gwconfig.set_in_text(out, "gateway", "deadletter_max_rows", 10)
    assert out.index("deadletter_max_rows = 10") < out.index("[ingest]")
    out = gwconfig.set_in_text(out, "downlink", "grace_s", 5.0)
    assert out.rstrip().endswith("[downlink]\ngrace_s = 5.0")
    import tomllib

    doc = tomllib.loads(out)
    assert doc["ingest"]["rate_limit_frames_per_min"] == 600
    assert doc["gateway"] == {"log_level": "info", "deadletter_max_rows": 10}


def test_set_key_validates_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[ingest]\nrate_limit_frames_per_min = 300\n")
    before = path.read_bytes()
    for bad, key in (("ingest.rate_limit_frames_per_min=0", "rate_limit_frames_per_min"),
                     ("ingest.nope=1", "nope"), ("gateway.log_level=loud", "log_level"),
                     ("ingest.batch_max_frames=many", "batch_max_frames")):
        with pytest.raises(ConfigError, match=key):
            config_ops.set_key(path, bad)
    # Valid alone, invalid together: the whole new file is checked.
    with pytest.raises(ConfigError, match="reconnect_max_s"):
        config_ops.set_key(path, "mqtt.reconnect_max_s=0.1")
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    res = config_ops.set_key(path, "gateway.log_level=debug", now=1_800_000_000.0)
    assert res.backup.read_bytes() == before and res.live
    assert res.backup.name.startswith("gateway.toml.2027")
    assert gwconfig.load_config(path).gateway.log_level == "debug"
    assert not config_ops.set_key(path, "broker.port=9999").live


def test_show_hides_credentials_unless_asked() -> None:
    cfg = gwconfig.parse_config({"web": {"token": "t" * 20},
                                 "upstream": {"host": "up", "password": "hunter2"}})
    doc = config_ops.show(cfg)
    assert doc["web"]["token"] == doc["upstream"]["password"] == config_ops.REDACTED
    assert doc["web"]["password_hash"] == ""  # unset: shown as it is
    assert config_ops.show(cfg, secrets=True)["upstream"]["password"] == "hunter2"


def test_plan_reload_applies_only_live_keys() -> None:
    old = gwconfig.parse_config({"ingest": {"rate_limit_frames_per_min": 300}})
    new = gwconfig.parse_config({"ingest": {"rate_limit_frames_per_min": 5},
                                 "broker": {"port": 9999}, "gateway": {"log_level": "debug"}})
    plan = config_ops.plan_reload(old, new)
    assert {c.name for c in plan.live} == {"ingest.rate_limit_frames_per_min", "gateway.log_level"}
    assert {c.name for c in plan.restart} == {"broker.port"}
    assert plan.applied.ingest.rate_limit_frames_per_min == 5
    assert plan.applied.broker.port == old.broker.port


def test_sighup_reloads_a_good_file_and_refuses_a_bad_one(broker: RunningBroker,
                                                          tmp_path: Path) -> None:
    assert broker.pki is not None
    config = write_config(broker, tmp_path)
    db_path = tmp_path / "data" / "gateway.db"
    provision(broker.pki, db_path, "r1")
    log = tmp_path / "gateway.log"
    proc = start_gateway(config, log)
    try:
        wait_running(db_path)
        # config show: the effective configuration, defaults filled in.
        shown = cli("config", "show", "--json", "--config", str(config))
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert doc["ingest"]["rate_limit_frames_per_min"] == 100000
        assert doc["downlink"]["max_attempts"] >= 1

        # A good file: a live key and a restart-only key, set through the CLI.
        done = cli("config", "set", "ingest.rate_limit_frames_per_min=5", "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert "SIGHUP" in done.stdout
        backups = list(tmp_path.glob("gateway.toml.2*"))
        assert len(backups) == 1 and "100000" in backups[0].read_text()
        done = cli("config", "set", "mqtt.keepalive=45", "--config", str(config))
        assert done.returncode == 0 and "restart" in done.stdout
        os.kill(proc.pid, signal.SIGHUP)
        text = wait_log(log, "ingest.rate_limit_frames_per_min = 5 (was 100000)")
        assert "mqtt.keepalive = 45 (was 30) takes effect only after a restart" in text

        # ...and the new limit holds from the next frames: a 6th frame within a minute
        # quarantines the device.
        async def send(n: int) -> None:
            async with mqtt_client(broker, broker.pki.device_credentials("r1")) as c:  # type: ignore[union-attr]
                for i in range(n):
                    await c.publish(topics.up("r1"), burst(1 + i * 32), qos=1)

        deadline = time.monotonic() + 15
        dev = None
        while time.monotonic() < deadline:
            asyncio.run(send(8))
            conn = db.open_db(db_path)
            try:
                dev = devices.get(conn, "r1")
            finally:
                conn.close()
            if dev.status == devices.QUARANTINED:
                break
            time.sleep(0.2)
        assert dev is not None and dev.status == devices.QUARANTINED, dev
        assert "over 5 frames/min" in (dev.status_reason or "")

        # A bad file: refused, the key named, the gateway still running on the old values.
        good = config.read_text()
        config.write_text(good.replace("rate_limit_frames_per_min = 5",
                                       'rate_limit_frames_per_min = "lots"'))
        os.kill(proc.pid, signal.SIGHUP)
        text = wait_log(log, "configuration reload refused")
        assert "[ingest] rate_limit_frames_per_min" in text
        config.write_text(good.replace("[ingest]", "[ingest]\nbogus_key = 1"))
        os.kill(proc.pid, signal.SIGHUP)
        wait_log(log, "[ingest] bogus_key: unknown key")
        time.sleep(0.5)
        assert proc.poll() is None
        wait_running(db_path, timeout=5)
        # The good file back: nothing live changed, the restart-only key is named again.
        config.write_text(good)
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while log.read_text().count("mqtt.keepalive = 45 (was 30)") < 2:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
