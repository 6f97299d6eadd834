"""Progress of long work: a live bar on a terminal (a real pty), one plain line per interval
otherwise; and `torpor ota status N --watch` following a campaign until it stops."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from gateway.ops import ota as ota_ops
from gateway.store import db, devices, ota_store
from tools.progress import ProgressLine

ROOT = Path(__file__).resolve().parents[2]
TORPOR = str(Path(sys.executable).parent / "torpor")


def test_plain_lines_once_per_interval_and_the_last_one() -> None:
    out = io.StringIO()
    with ProgressLine("wakes", 200, stream=out, interval_s=0.2) as bar:
        assert not bar.live
        t0 = time.monotonic()
        for i in range(1, 201):
            bar.update(i, f"last: sleep {i}")
            time.sleep(0.003)
        wall = time.monotonic() - t0
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0].startswith("[wakes] 1/200 last: sleep 1 ")
    assert lines[-1].startswith("[wakes] 200/200 last: sleep 200 ")
    # one line at the start, one per interval, and the final one
    assert 2 <= len(lines) <= wall / 0.2 + 3, lines


def test_a_terminal_gets_a_live_bar() -> None:
    code = (
        "import time\n"
        "from tools.progress import ProgressLine\n"
        "with ProgressLine('wakes', 3) as bar:\n"
        "    for i in range(1, 4):\n"
        "        bar.update(i, f'wake {i}')\n"
        "        time.sleep(0.15)\n"
    )
    master, slave = os.openpty()
    env = dict(os.environ, TERM="xterm", COLUMNS="100")
    env.pop("NO_COLOR", None)
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        os.close(slave)
        data = bytearray()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0, bytes(data)
    finally:
        os.close(master)
    text = bytes(data).decode("utf-8", "replace")
    assert "3/3" in text and "wake 3" in text, text
    # drawn in place: cursor movement or carriage returns, and the bar's block characters
    assert "\x1b[" in text or "\r" in text, text
    assert "━" in text, text


def test_ota_status_watch_follows_a_campaign_until_it_stops(tmp_path: Path) -> None:
    from tools.fw import image, keys

    kp = keys.keygen(tmp_path / "keys")
    img = tmp_path / "v2"
    image.build_image("sim", 2, img)
    image.sign_image(img, keys.load_private(kp.private))
    conf = tmp_path / "gateway.toml"
    conf.write_text(f'[gateway]\ndata_dir = "{tmp_path / "gw"}"\n')
    (tmp_path / "gw").mkdir()
    dbp = tmp_path / "gw" / "gateway.db"
    conn = db.open_db(dbp)
    devices.add_missing(conn, {"n1": "1a", "n2": "1b"})
    cid = ota_store.create_campaign(conn, ota_ops.import_image(conn, img).id, ["n1", "n2"], rate=2)
    conn.close()
    watch = subprocess.Popen(
        [TORPOR, "ota", "status", str(cid), "--config", str(conf), "--watch", "--interval", "0.2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # It starts and draws the running campaign before anything changes.
        assert watch.stderr is not None
        ready, _, _ = select.select([watch.stderr], [], [], 60)
        assert ready, "the watch drew nothing within 60 s"
        first = watch.stderr.readline()
        assert watch.poll() is None, watch.communicate()
        conn = db.open_db(dbp)
        ota_store.cancel_campaign(conn, cid)
        conn.close()
        out, err = watch.communicate(timeout=60)
        err = first + err
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, out + err
    lines = err.splitlines()
    assert lines[0].startswith(f"[campaign {cid}] 0/2 settled, running: queued 2"), err
    assert lines[-1].startswith(f"[campaign {cid}] 2/2 settled, cancelled: cancelled 2"), err
    assert len(lines) == 2, err  # a line per change, not per look
    assert f"campaign {cid}: v2 cancelled" in out
