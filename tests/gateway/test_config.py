"""Configuration: defaults, validation errors naming the key, paths relative to the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import ConfigError, GatewayConfig, load_config, parse_config


def test_defaults_and_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / "g.toml").write_text("")
    cfg = load_config(tmp_path / "g.toml")
    assert isinstance(cfg, GatewayConfig)
    assert cfg.broker.mode == "supervised" and cfg.upstream.enabled is False
    assert cfg.upstream.topic_readings == "torpor/{device}/readings"
    assert cfg.db_path == Path("/var/lib/torpor/gateway.db")


def test_values_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "g.toml").write_text(
        '[gateway]\ndata_dir = "data"\n[ingest]\nbatch_max_ms = 2\nbatch_max_frames = 100\n'
        '[broker]\nmode = "external"\nport = 1883\n[upstream]\nenabled = true\nhost = "up"\n'
        'format = "senml-cbor"\n'
    )
    cfg = load_config(tmp_path / "g.toml")
    assert cfg.db_path == tmp_path / "data" / "gateway.db"
    assert cfg.ingest.batch_max_ms == 2.0 and isinstance(cfg.ingest.batch_max_ms, float)
    assert cfg.mqtt_port == 1883 and cfg.mqtt_files()[0] == tmp_path / "data" / "pki" / "gateway.pem"
    assert cfg.upstream.format == "senml-cbor"


@pytest.mark.parametrize("doc, message", [
    ({"ingest": {"batch_max_frame": 3}}, r"\[ingest\] batch_max_frame: unknown key"),
    ({"ingest": {"batch_max_frames": "3"}}, r"\[ingest\] batch_max_frames: expected an integer"),
    ({"ingest": {"batch_max_frames": 0}}, r"\[ingest\] batch_max_frames: 0 is below"),
    ({"broker": {"mode": "docker"}}, r"\[broker\] mode: 'docker' is not one of"),
    ({"broker": {"port": 70000}}, r"\[broker\] port: 70000 is above"),
    ({"upstream": {"enabled": "yes"}}, r"\[upstream\] enabled: expected true or false"),
    ({"upstream": {"enabled": True}}, r"\[upstream\] host: required"),
    ({"upstream": {"topic_readings": "x/readings"}}, r"\[upstream\] topic_readings: .* \{device\}"),
    ({"brokr": {}}, r"\[brokr\]: unknown section"),
    ({"gateway": 3}, r"\[gateway\]: expected a table"),
])
def test_errors_name_the_key(doc: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message):
        parse_config(doc)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[ingest\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_downlink_section_reaches_the_service(tmp_path: Path) -> None:
    from gateway.config import DownlinkConfig
    from gateway.service import Service

    (tmp_path / "g.toml").write_text(
        "[downlink]\nmax_attempts = 2\nframe_cost_ms = 50\nwindow_reserve_ms = 0\n"
        "grace_s = 5\nsweep_interval_s = 0.5\n")
    cfg = load_config(tmp_path / "g.toml")
    assert cfg.downlink == DownlinkConfig(2, 50, 0, 5.0, 0.5)
    assert Service(cfg).downlink.cfg == cfg.downlink
    for doc, message in (({"max_attempts": 0}, "[downlink] max_attempts: 0 is below"),
                         ({"grace_s": "1"}, "[downlink] grace_s: expected a number"),
                         ({"retries": 3}, "[downlink] retries: unknown key")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({"downlink": doc})
