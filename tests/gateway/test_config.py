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


def test_board_models_of_the_profiles_file(tmp_path: Path) -> None:
    """Every profile of boards/profiles.toml is a board with a readable name and an energy
    model; [energy] board is the default of devices with none, and must be a profile."""
    from gateway.config import board_models

    models = board_models(parse_config({"energy": {"board": "pico_w"}}))
    assert {"esp32", "esp32s3", "esp32c3", "pico_w", "pico2_w"} <= set(models.names)
    assert models.title("esp32c3") == "ESP32-C3" and models.title("esp32") == "ESP32"
    assert models.title("pico2_w") == "Raspberry Pi Pico 2 W" and models.title(None) is None
    default, own = models.energy(None), models.energy("esp32s3")
    assert default is not None and default.board == "pico_w"
    assert own is not None and own.board == "esp32s3" and own.cpu_active_ma != default.cpu_active_ma
    assert models.energy("gone") is None  # a board the profiles no longer have: no estimate
    assert models.check("esp32") == "esp32"
    with pytest.raises(ConfigError, match=r"unknown board 'esp8266': one of .*esp32c3"):
        models.check("esp8266")
    with pytest.raises(ConfigError, match=r"\[energy\] board: 'esp8266' is not a profile"):
        parse_config({"energy": {"board": "esp8266"}})
    # A profile without the model's figures is a board without an energy model.
    (tmp_path / "p.toml").write_text('[a]\ndescription = "Board A (rev 2)"\ncpu_active_ma = 1.0\n')
    few = board_models(parse_config({"energy": {"profiles": str(tmp_path / "p.toml")}}))
    assert few.names == ("a",) and few.title("a") == "Board A" and few.energy("a") is None
