"""What the Home Assistant publisher announced, on a real SQLite file: a database written
before the model was recorded keeps its rows and records the model from then on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gateway.store import db
from gateway.store import hass as store


def test_an_old_announced_row_gains_a_model(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    steps = store._STEPS  # noqa: SLF001  (white-box: the schema before the model)
    conn = db.connect(path)
    db.apply(conn, store.STORE, steps[:1])
    conn.execute("INSERT INTO hass_devices(device, expire_after, fw_version, schemas, online, "
                 "problem, updated_at) VALUES ('n1', 1000, 3, '1,2', 1, 0, 5.0)")
    conn.commit()
    conn.close()
    conn = db.open_db(path)
    assert db.version(conn, store.STORE) == len(steps) == 2
    a = store.announced(conn)["n1"]
    # No model recorded: the publisher compares it with the board's name and republishes
    # the configs of a device that has a board.
    assert (a.expire_after, a.fw_version, a.schemas, a.online, a.model) == (
        1000, 3, (1, 2), True, None)
    store.save(conn, dataclasses.replace(a, model="ESP32-C3", updated_at=6.0))
    assert store.announced(conn)["n1"].model == "ESP32-C3"
    conn.close()
