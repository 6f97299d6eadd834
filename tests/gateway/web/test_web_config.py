"""[web] in gateway.toml, and `torpor gateway web` as a process: loopback by default, a
login required anywhere else, HTTPS with the operator's certificate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gateway.config import ConfigError, parse_config
from gateway.web.auth import check_password, hash_password
from tests.fixtures.broker import free_port
from tests.gateway.web.fleetdb import fill

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "0123456789abcdef-token"


def test_defaults_bind_loopback_without_login() -> None:
    cfg = parse_config({"web": {"enabled": True}})
    assert (cfg.web.host, cfg.web.port, cfg.web.auth_required) == ("127.0.0.1", 8080, False)


@pytest.mark.parametrize(("web", "key"), [
    ({"enabled": True, "host": "0.0.0.0"}, "[web] host"),
    ({"enabled": True, "host": "192.168.1.10"}, "[web] host"),
    ({"token": "short"}, "[web] token"),
    ({"password_hash": "hunter2"}, "[web] password_hash"),
    ({"tls_cert": "cert.pem"}, "[web] tls_key"),
    ({"port": 70000}, "[web] port"),
    ({"colour": "blue"}, "[web] colour"),
    ({"process": "yes"}, "[web] process"),
    ({"process": 1}, "[web] process"),
])
def test_bad_web_config_names_the_key(web: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"web": web})
    assert str(err.value).startswith(key), str(err.value)


def test_process_mode_survives_the_trip_to_the_child() -> None:
    """The child process gets the validated configuration as JSON and reads back the same."""
    from gateway.config import as_plain, from_plain

    cfg = parse_config({"web": {"enabled": True, "process": True, "port": 0, "token": TOKEN},
                        "gateway": {"data_dir": "/srv/torpor"}}, source="gateway.toml")
    back = from_plain(json.loads(json.dumps(as_plain(cfg))))
    assert back == cfg and back.web.process and back.db_path == cfg.db_path


def test_non_loopback_with_a_login_is_accepted() -> None:
    h = hash_password("a good password", n=2**10)
    cfg = parse_config({"web": {"enabled": True, "host": "0.0.0.0", "password_hash": h}})
    assert cfg.web.auth_required and check_password("a good password", cfg.web.password_hash)
    assert not check_password("a bad password", cfg.web.password_hash)
    cfg = parse_config({"web": {"enabled": True, "host": "::", "token": TOKEN}})
    assert cfg.web.auth_required


def _torpor(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_hash_password_command() -> None:
    out = _torpor("gateway", "web", "--hash-password", stdin="correct horse battery\n")
    assert out.returncode == 0, out.stderr
    h = out.stdout.strip()
    assert check_password("correct horse battery", h)
    parse_config({"web": {"password_hash": h}})
    out = _torpor("gateway", "web", "--hash-password", stdin="short\n")
    assert out.returncode == 2 and "at least 8" in out.stderr


def _config(tmp: Path, web: str) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(f'[gateway]\ndata_dir = "{tmp / "data"}"\n[web]\n{web}')
    return path


def test_refuses_a_public_address_without_login(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 'host = "0.0.0.0"\n')
    out = _torpor("gateway", "web", "--config", str(cfg))
    assert out.returncode == 2
    assert "[web] host" in out.stderr and "password_hash or token" in out.stderr


def test_https_with_a_token(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "web.pem", tmp_path / "web.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    (tmp_path / "data").mkdir(mode=0o700)
    fill(tmp_path / "data" / "gateway.db", devices=3, readings_per_device=5)
    port = free_port()
    cfg = _config(tmp_path, f'port = {port}\ntoken = "{TOKEN}"\ntls_cert = "{cert}"\n'
                            f'tls_key = "{key}"\n')
    log = open(tmp_path / "web.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "gateway", "web", "--config",
                             str(cfg)], stdout=subprocess.PIPE, stderr=log,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.strip() == f"web page at https://127.0.0.1:{port}/", line
        ctx = ssl.create_default_context(cafile=str(cert))
        req = urllib.request.Request(f"https://127.0.0.1:{port}/api/v1/devices",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            doc = json.loads(r.read())
        assert doc["total"] == 3
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/api/v1/devices", context=ctx,
                                   timeout=10)
        assert err.value.code == 401
        # Plain HTTP on the TLS port gets no page.
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/devices", timeout=5).read()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_stops_promptly_with_an_event_stream_open(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir(mode=0o700)
    fill(tmp_path / "data" / "gateway.db", devices=2, readings_per_device=2)
    port = free_port()
    cfg = _config(tmp_path, f"port = {port}\n")
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "gateway", "web", "--config",
                             str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        assert "web page at" in proc.stdout.readline().decode()
        stream = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/events", timeout=10)
        assert stream.readline() == b"event: fleet\n"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        took = time.monotonic() - t0
        stream.close()
        assert took < 10, f"{took:.1f}s to stop with an event stream open"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_gateway_refuses_to_start_with_a_bad_certificate(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    cfg = _config(tmp_path, f'enabled = true\ntoken = "{TOKEN}"\ntls_cert = "cert.pem"\n'
                            'tls_key = "key.pem"\n')
    out = _torpor("gateway", "run", "--config", str(cfg))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "[web] tls_cert" in out.stderr and "cert.pem" in out.stderr
