"""The Campaigns page, its API and the campaign metrics, on a real SQLite file with a real
signed sim image and a campaign moved by real OTA_STATUS frames through the gateway's
OTA delivery."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway import proto
from gateway.config import WebConfig
from gateway.ops import ota as ota_ops
from gateway.pipeline.ota_delivery import OtaHandler
from gateway.store import db
from gateway.store import ota_store as ota
from gateway.web.app import make_app
from tests.gateway.web.fleetdb import fill
from tools.fw import image, keys


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    root = tmp_path_factory.mktemp("img")
    kp = keys.keygen(root / "keys")
    img = root / "v8"
    image.build_image("sim", 8, img)
    image.sign_image(img, keys.load_private(kp.private))
    return img, keys.load_public(kp.public)


def _status(conn: object, device: str, state: proto.OtaState, chunks: int = 0,
            reason: proto.OtaReason = proto.OtaReason.NONE) -> None:
    h = OtaHandler()
    with db.transaction(conn):  # type: ignore[arg-type]
        h.handle(conn, [(device, proto.OtaStatus(1, 8, state, chunks, reason))], [],  # type: ignore[arg-type]
                 time.time())
    assert h.errors == 0


def test_campaign_progress_per_state(tmp_path: Path, signed: tuple[Path, bytes]) -> None:
    path = tmp_path / "gateway.db"
    ids = fill(path, devices=8, readings_per_device=0)
    conn = db.open_db(path)
    img = ota_ops.import_image(conn, signed[0], public_key=signed[1])
    served = [d for d in ids if d != "node-001"]  # node-001 is quarantined
    first = ota.create_campaign(conn, img.id, served[:2], rate=2)
    ota.cancel_campaign(conn, first)
    cid = ota.create_campaign(conn, img.id, served[2:], rate=3, abort_threshold=50)
    _status(conn, served[2], proto.OtaState.DOWNLOADING, 3)
    _status(conn, served[3], proto.OtaState.FAILED, 0, proto.OtaReason.BAD_SIGNATURE)
    want = {d.status: 0 for d in ota.get_campaign(conn, cid).devices}
    for d in ota.get_campaign(conn, cid).devices:
        want[d.status] += 1
    conn.close()
    assert want == {"downloading": 1, "failed": 1, "queued": 1, "pending": 2}, want

    async def main() -> None:
        c_conn = db.connect(path)
        c = TestClient(TestServer(make_app(WebConfig(enabled=True), c_conn)))
        await c.start_server()
        try:
            r = await c.get("/api/v1/campaigns")
            doc = await r.json()
            assert [x["id"] for x in doc["campaigns"]] == [cid, first]
            now = doc["campaigns"][0]
            assert now["status"] == "running" and now["version"] == 8
            assert {k: v for k, v in now["counts"].items() if v} == want
            assert now["total"] == 5 and now["finished"] == 1 and now["bad"] == 1
            assert "devices" not in now
            assert doc["campaigns"][1]["status"] == "cancelled"
            r = await c.get(f"/api/v1/campaigns/{cid}")
            one = await r.json()
            assert [d["device"] for d in one["devices"]] == served[2:]
            r = await c.get("/api/v1/campaigns/999")
            assert r.status == 404 and (await r.json())["field"] == "campaign"
            r = await c.get("/api/v1/campaigns/x")
            assert r.status == 400 and (await r.json())["field"] == "campaign"

            html = await (await c.get("/campaigns")).text()
            assert f'data-campaign="{cid}"' in html and f'data-campaign="{first}"' in html
            for state in want:
                assert f'data-state="{state}"' in html
            html = await (await c.get(f"/campaigns/{cid}", params={"state": "failed"})).text()
            assert f'data-device="{served[3]}"' in html and f'data-device="{served[2]}"' not in html
            r = await c.get(f"/campaigns/{cid}", params={"state": "asleep"})
            assert r.status == 400 and "state" in await r.text()

            text = await (await c.get("/metrics")).text()
            m = {(s.name, tuple(s.labels.items())): s.value
                 for f in text_string_to_metric_families(text) for s in f.samples}
            assert m[("torpor_ota_campaigns", (("state", "running"),))] == 1
            assert m[("torpor_ota_campaigns", (("state", "cancelled"),))] == 1
            for state, n in want.items():
                assert m[("torpor_ota_campaign_devices", (("state", state),))] == n
        finally:
            await c.close()
            c_conn.close()

    asyncio.run(asyncio.wait_for(main(), 60))
