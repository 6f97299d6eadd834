"""`torpor gateway ...` and `torpor device ...`: output and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway import proto
from gateway.store import db, devices
from tools.cli import build_parser, main


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n')
    return path


def test_device_add_list_show_release(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = ["--config", str(config)]
    assert main(["device", "add", "n1", *c]) == 0
    assert "n1: provisioned (sensor)" in capsys.readouterr().out
    assert main(["device", "add", "n2", "--class", "monitor", *c]) == 0
    assert main(["device", "add", "n1", *c]) == 2
    assert "already registered" in capsys.readouterr().err
    assert main(["device", "list", *c]) == 0
    out = capsys.readouterr().out
    assert "n1" in out and "monitor" in out
    assert main(["device", "list", "--status", "quarantined", "--json", *c]) == 0
    assert json.loads(capsys.readouterr().out) == []
    conn = db.open_db(config.parent / "data" / "gateway.db")
    devices.quarantine(conn, "n1", "3 malformed frames in 60s")
    assert main(["device", "show", "n1", *c]) == 0
    assert "quarantined (3 malformed frames in 60s)" in capsys.readouterr().out
    assert main(["device", "release", "n1", *c]) == 0
    assert "n1: active" in capsys.readouterr().out
    assert main(["device", "release", "n1", *c]) == 2
    assert "not quarantined" in capsys.readouterr().err
    assert main(["device", "show", "nope", *c]) == 2
    assert "no device 'nope'" in capsys.readouterr().err
    assert main(["device", "show", "n2", "--json", *c]) == 0
    assert json.loads(capsys.readouterr().out)["device_class"] == "monitor"


def test_device_add_can_issue_the_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.security.pki import Pki

    pki = Pki(tmp_path / "pki")
    pki.init_ca()
    path = tmp_path / "g.toml"
    path.write_text(f'[gateway]\ndata_dir = "{tmp_path}"\n[broker]\npki_dir = "{pki.path}"\n')
    assert main(["device", "add", "n9", "--issue-cert", "--config", str(path)]) == 0
    serial = format(pki.device_credentials("n9").serial, "x")
    assert f"certificate {serial}" in capsys.readouterr().out


def test_device_board_from_add_and_board_and_refusals(config: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    c = ["--config", str(config)]
    assert main(["device", "add", "n1", "--board", "esp32c3", *c]) == 0
    assert "n1: provisioned (sensor, board esp32c3)" in capsys.readouterr().out
    # An unknown board is refused before anything is written, naming the known ones.
    assert main(["device", "add", "n2", "--board", "esp8266", *c]) == 2
    err = capsys.readouterr().err
    assert "unknown board 'esp8266'" in err
    for board in ("esp32", "esp32s3", "esp32c3", "pico_w", "pico2_w"):
        assert board in err
    conn = db.open_db(config.parent / "data" / "gateway.db")
    assert devices.find(conn, "n2") is None
    conn.close()
    assert main(["device", "board", "n1", "pico2_w", *c]) == 0
    assert "n1: board pico2_w" in capsys.readouterr().out
    assert main(["device", "board", "n1", "nope", *c]) == 2
    assert "unknown board 'nope'" in capsys.readouterr().err
    assert main(["device", "board", "zz", "esp32", *c]) == 2
    assert "no device 'zz'" in capsys.readouterr().err
    assert main(["device", "show", "n1", *c]) == 0
    assert "board:           pico2_w" in capsys.readouterr().out
    assert main(["device", "show", "n1", "--json", *c]) == 0
    assert json.loads(capsys.readouterr().out)["board"] == "pico2_w"
    assert main(["device", "board", "n1", "", *c]) == 0
    assert "n1: board none" in capsys.readouterr().out


def test_config_errors_and_status_of_a_stopped_gateway(tmp_path: Path, config: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest]\nbatch_max_ms = \"fast\"\n")
    assert main(["gateway", "run", "--config", str(bad)]) == 2
    assert "[ingest] batch_max_ms: expected a number" in capsys.readouterr().err
    assert main(["gateway", "status", "--config", str(tmp_path / "missing.toml")]) == 2
    assert main(["gateway", "status", "--config", str(config)]) == 1
    assert "not running (never started)" in capsys.readouterr().out
    assert main(["gateway", "status", "--json", "--config", str(config)]) == 1
    assert json.loads(capsys.readouterr().out)["running"] is False
    assert main(["gateway", "config-example"]) == 0
    example = capsys.readouterr().out
    assert "[upstream]" in example and "# batch_max_frames = 512" in example


def test_device_send_checks_arguments_before_queueing(config: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.store import downlink_queue as q

    c = ["--config", str(config)]
    assert main(["device", "add", "n1", *c]) == 0
    capsys.readouterr()
    assert main(["device", "send", "n1", "stay_awake", "900", *c]) == 2
    err = capsys.readouterr().err
    assert "torpor: error: stay_awake: argument 1 (seconds) must be in 0..600 s, got 900" in err
    assert main(["device", "send", "n1", "set_thresholds", "100", *c]) == 2
    assert "set_thresholds takes 2 to 3 arguments, got 1" in capsys.readouterr().err
    assert main(["device", "send", "n1", "ping", "1", "2", *c]) == 2
    assert "ping takes 0 to 1 arguments, got 2 (usage: ping [TAG])" in capsys.readouterr().err
    assert main(["device", "send", "n1", "ping", "x", *c]) == 2
    assert "ping: argument 1: 'x' is not an integer" in capsys.readouterr().err
    conn = db.open_db(config.parent / "data" / "gateway.db")
    assert q.pending(conn, "n1") == []
    assert main(["device", "send", "n1", "stay_awake", "600", *c]) == 0
    assert "n1: queued command" in capsys.readouterr().out
    assert [(i.op, i.args) for i in q.pending(conn, "n1")] == [(proto.CommandOp.STAY_AWAKE, (600,))]


def test_device_send_help_lists_every_op_from_the_spec(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["device", "send", "--help"])
    out = capsys.readouterr().out
    for op, table in proto.OP_ARGS.items():
        assert f"  {table.usage}\n" in out, op
        for a in table.args:
            assert f"{a.name.upper()}: {a.span}" in out
    assert "SECONDS: 0..600 s" in out
