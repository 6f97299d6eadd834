"""`torpor soak`'s refusals before anything starts (no libfaketime, a wake interval the
protocol does not allow), its schedule, and how its verdict reads the gateway's store."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import proto
from gateway.store import db, readings
from tools.sim import soak
from tools.sim.soak import (
    KEY_LIST_SHARE,
    Soak,
    SoakError,
    SoakOptions,
    find_libfaketime,
    format_offset,
)


def soak_args(argv: list[str]) -> SoakOptions:
    parser = argparse.ArgumentParser()
    soak.register(parser.add_subparsers())
    return soak.options_from(parser.parse_args(["soak", *argv]))


# The installed entry point (`python -m tools.cli` would load a second copy of the CLI
# module, whose error class the command's own import does not see).
TORPOR = str(Path(sys.executable).parent / "torpor")


def test_without_libfaketime_the_soak_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(soak, "FAKETIME_GLOBS", ())
    monkeypatch.delenv("TORPOR_LIBFAKETIME", raising=False)
    with pytest.raises(SoakError, match=r"Debian package `faketime`"):
        find_libfaketime()


@pytest.mark.parametrize("args", [["--wake-interval", "48"], ["--nodes", "1"],
                                  ["--send-every", "0"], ["--revoke-at", "1.5"],
                                  ["--key-rotation-at", "soon"], ["--upstream-outage", "0.4"],
                                  ["--upstream-outage", "0.4:-1"], ["--gateway-kills", "-1"]])
def test_bad_options_are_refused_with_exit_2(args: list[str]) -> None:
    done = subprocess.run([TORPOR, "soak", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "torpor: error:" in done.stderr
    assert args[0] in done.stderr or args[0] == "--nodes" or args[0] == "--send-every" \
        or args[0] == "--wake-interval", done.stderr


def test_the_events_are_placed_from_the_command_line() -> None:
    # What the CI test sets in SoakOptions, an operator sets on the command line.
    args = soak_args(["--revoke-at", "0.55", "--key-rotation-at", "none",
                      "--upstream-outage", "0.45:3", "--gateway-kills", "1",
                      "--broker-kills", "0"])
    plan = [kind for _day, kind in Soak(args).schedule()]
    assert "key_rotation" not in plan and "broker_kill" not in plan
    assert plan.count("gateway_kill") == 1 and "revoke" in plan and "upstream_down" in plan
    days = {kind: day for day, kind in Soak(args).schedule()}
    assert days["revoke"] == pytest.approx(0.55 * args.days)
    assert days["upstream_down"] == pytest.approx(0.45 * args.days)


@pytest.mark.parametrize(("ms", "text"), [(0, "+0.000"), (1500, "+1.500"), (-250, "-0.250"),
                                          (94_608_000_000, "+94608000.000")])
def test_offsets_are_written_as_libfaketime_reads_them(ms: int, text: str) -> None:
    assert format_offset(ms) == text


def test_the_key_rotation_follows_the_revocation_and_leaves_the_campaign_its_sends() -> None:
    # The revoked device is left out of the key rotation only if it is revoked first; the
    # campaign (about 11 sends at the sensor class, a send a week) needs field days after
    # the key list's share of what is left.
    o = SoakOptions()
    plan = {kind: day for day, kind in Soak(o).schedule()}
    assert plan["revoke"] < plan["key_rotation"]
    left = o.days - plan["key_rotation"]
    days_a_send = o.send_every[0] * o.sample_interval_s / 86400
    assert (1 - KEY_LIST_SHARE) * left >= 11 * days_a_send


def _burst(first: int, ts: tuple[int, ...]) -> proto.Burst:
    cols = (tuple(2000 for _ in ts), tuple(5000 for _ in ts), tuple(3700 for _ in ts))
    return proto.Burst(first, proto.SCHEMA_ENV3, 0, proto.Series(ts, cols))


def test_the_revoked_device_is_judged_by_what_the_gateway_committed_after(
        tmp_path: Path) -> None:
    # A reading sampled and stored before the revocation whose stamp runs ahead of the
    # field's clock (the node's clock, set from the gateway's ACK, plus its wake's real
    # duration at the time scale) is not one that got in: judged by the store's contents
    # when `torpor device revoke` returned, not by stamps. One committed later is.
    revoked_at = 1_800_000_000
    s = Soak(SoakOptions())
    s.db_path = tmp_path / "gateway.db"
    conn = db.open_db(s.db_path)
    try:
        readings.commit_bursts(conn, [("sim-003", _burst(1, (revoked_at - 3600,
                                                             revoked_at + 3 * 86400)))])
        s.revoked, s.revoked_at_ms = "sim-003", revoked_at * 1000
        s.revoked_ids = s.stored_ids("sim-003")  # what the revocation step reads
        assert s.revoked_ids == {1, 2}
        assert s.revoked_admitted(conn) == 0
        readings.commit_bursts(conn, [("sim-003", _burst(3, (revoked_at + 60,)))])
        assert s.revoked_admitted(conn) == 1
    finally:
        conn.close()
