"""The web page in its own process (`[web] process = true`), in the real gateway against a
real Mosquitto: the page answers from a child of the gateway, an operator action it takes
lands in the gateway's database, its event stream sees a change, a `kill -9` of it is
repaired by the supervisor, and stopping the gateway leaves no page behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gateway.store import downlink_queue as q
from gateway.store.status import read_status
from tests.fixtures.broker import free_port
from tests.system.stack import Stack
from tests.system.test_relay_process import _alive

pytestmark = pytest.mark.slow

TOKEN = "web-process-token-0123456789"
DEVICE = "wp-1"


def _request(url: str, method: str = "GET", body: dict[str, Any] | None = None
             ) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _until(cond: Any, timeout: float, what: str, stack: Stack) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = cond()
        except OSError:
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}:\n{stack.log_text()[-4000:]}"
        time.sleep(0.1)


def _web_pid(stack: Stack) -> int | None:
    with stack.db() as conn:
        st = read_status(conn)
    if st is None or not st.running:
        return None
    pid = st.detail.get("web_pid")
    return int(pid) if pid else None


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


class Events:
    """The page's event stream, read on a thread: every `fleet` event's data."""

    def __init__(self, url: str) -> None:
        self.got: list[dict[str, Any]] = []
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        self.resp = urllib.request.urlopen(req, timeout=30)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        event = ""
        try:
            for raw in self.resp:
                line = raw.decode().strip()
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "fleet":
                    self.got.append(json.loads(line.split(":", 1)[1]))
        except (OSError, ValueError, AttributeError):  # closed under the reading thread
            pass

    def close(self) -> None:
        self.resp.close()


def test_web_child_process_serves_acts_streams_restarts_and_ends(stack: Stack) -> None:
    port = free_port()
    with open(stack.config_path, "a") as f:
        f.write(f'[web]\nenabled = true\nprocess = true\nhost = "127.0.0.1"\nport = {port}\n'
                f'token = "{TOKEN}"\n')
    base = f"http://127.0.0.1:{port}"
    stack.cli("device", "add", DEVICE)
    stack.start()
    assert stack.proc is not None
    gateway_pid = stack.proc.pid

    # The page answers, and it is served by a child of the gateway, not the gateway.
    _until(lambda: _request(base + "/api/v1/health")[0] == 200, 20, "the page never answered",
           stack)
    web_pid = _until(lambda: _web_pid(stack), 10, "no web_pid in the status row", stack)
    assert web_pid != gateway_pid and _ppid(web_pid) == gateway_pid
    assert b"gateway.web.process" in Path(f"/proc/{web_pid}/cmdline").read_bytes()
    status, body = _request(base + f"/api/v1/devices/{DEVICE}")
    assert status == 200 and DEVICE in body.decode(), body[:300]

    # The event stream sees an action the page took, and the action is in the database.
    events = Events(base + "/api/v1/events")
    try:
        _until(lambda: events.got, 10, "no first event", stack)
        assert events.got[0]["queued"] == 0
        status, body = _request(base + f"/api/v1/devices/{DEVICE}/commands", "POST",
                                {"op": "ping"})
        assert status == 201, body
        command_id = json.loads(body)["command_id"]
        with stack.db() as conn:
            assert [i.command_id for i in q.pending(conn, DEVICE)] == [command_id]
        _until(lambda: events.got[-1]["queued"] == 1, 10, "the stream missed the command",
               stack)
    finally:
        events.close()

    # /metrics carries the gateway's own counters, asked of the gateway at each scrape.
    status, body = _request(base + "/metrics")
    assert status == 200 and b"torpor_ingest_commit_seconds_count" in body, body[:500]
    assert b"torpor_gateway_running 1.0" in body

    # kill -9 of the page: the supervisor starts another, which answers.
    os.kill(web_pid, signal.SIGKILL)
    new_pid = _until(lambda: (p := _web_pid(stack)) not in (None, web_pid) and p, 20,
                     "the web process was not restarted", stack)
    assert _ppid(new_pid) == gateway_pid
    _until(lambda: _request(base + "/api/v1/health")[0] == 200, 20,
           "the restarted page never answered", stack)
    assert not _alive(web_pid)
    assert "web failed" in stack.log_text()

    # Stopping the gateway stops its page: no web process is left.
    stack.stop()
    assert stack.proc.returncode == 0, stack.log_text()[-3000:]
    _until(lambda: not _alive(new_pid), 10, "the web process outlived its gateway", stack)
    try:
        _request(base + "/api/v1/health")
    except OSError:
        pass
    else:
        raise AssertionError("something still answers on the page's port")

