"""`torpor gateway run|status|config-example|backup|restore|config` and
`torpor device add|list|show|board|release|revoke`.

Exit codes: 0 success, 1 the gateway is not running (`status`), 2 an error the operator can
act on (bad configuration, unknown device, a restore target in use...), 3 a backup archive
refused by `restore` (corrupt, truncated, checksum mismatch, unknown manifest version).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import config as gwconfig
from gateway.cli import downlink as downlink_cli
from gateway.cli.common import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    fail,
    load_config,
    open_db,
    when,
)
from gateway.errors import GatewayError
from gateway.ops import devices as devices_ops
from gateway.ops import downlink as downlink_ops
from gateway.ops import health as health_ops
from gateway.ops import keylists as keylists_ops


def register(sub: Any) -> None:
    gw = sub.add_parser("gateway", help="run the gateway service or show its state")
    gsub = gw.add_subparsers(dest="gateway_command", metavar="ACTION", required=True)

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", default=None,
                       help=f"gateway TOML file (default: ${CONFIG_ENV} or {DEFAULT_CONFIG})")

    p = gsub.add_parser("run", help="run the gateway until SIGTERM/SIGINT")
    config_arg(p)
    p.set_defaults(func=_run)
    p = gsub.add_parser("status", help="state from the database: nodes, readings, dead letters")
    config_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)
    p = gsub.add_parser("config-example", help="print a configuration file with every default")
    p.set_defaults(func=_example)
    from gateway.web import command as web_command  # `torpor gateway web`

    web_command.register(gsub, config_arg, load_config)
    _register_ops(gsub, config_arg)

    dev = sub.add_parser("device", help="the device registry, and commands and configuration for devices")
    dsub = dev.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    p = dsub.add_parser("add", help="register a device (provisioned until its first HELLO)")
    config_arg(p)
    p.add_argument("device_id", help="the device's id, its certificate's CN")
    p.add_argument("--class", dest="device_class", default="sensor",
                   choices=devices_ops.CLASSES, help="device class (default: sensor)")
    p.add_argument("--issue-cert", action="store_true",
                   help="also issue its certificate from the fleet CA in [broker] pki_dir")
    p.add_argument("--board", default=None, metavar="NAME",
                   help="the device's board, a profile of boards/profiles.toml (esp32, "
                   "esp32c3...): its energy model and its model upstream (default: none, "
                   "[energy] board stands in)")
    p.set_defaults(func=_add)
    p = dsub.add_parser("board", help="set a registered device's board (its energy model)")
    config_arg(p)
    p.add_argument("device_id", help="the device's id")
    p.add_argument("board", metavar="NAME",
                   help="a profile of boards/profiles.toml; \"\" for none")
    p.set_defaults(func=_board)
    p = dsub.add_parser("list", help="list devices")
    config_arg(p)
    p.add_argument("--status", choices=devices_ops.STATUSES, default=None,
                   help="only devices in this state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    downlink_cli.list_args(p)
    p.set_defaults(func=_list)
    p = dsub.add_parser("show", help="one device: state, last HELLO, readings, dead letters")
    config_arg(p)
    p.add_argument("device_id", help="the device's id (see `torpor device list`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_show)
    p = dsub.add_parser("release", help="serve a quarantined device again")
    config_arg(p)
    p.add_argument("device_id", help="the quarantined device's id")
    p.set_defaults(func=_release)
    p = dsub.add_parser(
        "revoke", help="revoke a device: CRL, broker reload, cut its live session, registry")
    config_arg(p)
    p.add_argument("device_id", help="the device's id")
    p.add_argument("--broker-pid", type=int, default=None,
                   help="[broker] mode = external: the mosquitto process to reload "
                   f"(default: `systemctl reload {devices_ops.EXTERNAL_BROKER_UNIT}`)")
    p.set_defaults(func=_revoke)
    p = dsub.add_parser(
        "rotate", help="rotate a device's key over the air: the node makes a new key, the "
        "gateway certifies it and revokes the old certificate once the new one is in use")
    config_arg(p)
    p.add_argument("device_id", help="the device's id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_rotate)
    # Downlink to sleeping nodes: send, config, cancel (gateway/cli/downlink.py).
    downlink_cli.register(dsub, config_arg)
    # The edge rules: `device group`, `gateway rules check`, `gateway alerts`.
    from gateway.cli import rules as rules_cli

    rules_cli.register(gsub, dsub, config_arg, load_config)


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args)
    except GatewayError as exc:
        return fail(str(exc))
    logging.basicConfig(
        level=cfg.gateway.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from gateway import service

    try:
        service.run(cfg)
    except GatewayError as exc:
        return fail(str(exc))
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        cfg, conn = open_db(args)
        try:
            st = health_ops.status(conn)
        finally:
            conn.close()
    except GatewayError as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps(st.as_dict(), indent=1, default=str))
    else:
        print(f"gateway:        {'running' if st.running else 'not running'} ({st.state}"
              + (f", pid {st.pid}" if st.running else "") + ")")
        print(f"database:       {cfg.db_path}")
        if st.running:
            print(f"mqtt:           {'connected' if st.detail.get('mqtt_connected') else 'disconnected'}")
        devices = ", ".join(f"{k} {v}" for k, v in sorted(st.devices.items())) or "none"
        print(f"devices:        {devices}")
        print(f"seen (10 min):  {st.seen_recently}")
        print(f"last seen:      {when(st.last_seen)}")
        print(f"readings:       {st.readings_total} stored, {st.readings_per_min:.0f}/min")
        print(f"dead letters:   {st.dead_letters}")
        print(f"outbox depth:   {'-' if st.outbox_depth is None else st.outbox_depth}")
    return 0 if st.running else 1


def _example(args: argparse.Namespace) -> int:
    print(gwconfig.example())
    return 0


def _add(args: argparse.Namespace) -> int:
    try:
        cfg, conn = open_db(args)
        try:
            added = devices_ops.add(conn, cfg, args.device_id, args.device_class,
                                    issue_cert=args.issue_cert, board=args.board)
        finally:
            conn.close()
    except GatewayError as exc:
        return fail(str(exc))
    dev = added.device
    print(f"{dev.id}: {dev.status} ({dev.device_class}"
          + (f", board {dev.board}" if dev.board else "") + ")"
          + (f", certificate {added.serial}" if added.serial else ""))
    return 0


def _board(args: argparse.Namespace) -> int:
    try:
        cfg, conn = open_db(args)
        try:
            dev = devices_ops.set_board(conn, cfg, args.device_id, args.board)
        finally:
            conn.close()
    except GatewayError as exc:
        return fail(str(exc))
    print(f"{dev.id}: board {dev.board or 'none ([energy] board stands in)'}")
    return 0


def _list(args: argparse.Namespace) -> int:
    try:
        _cfg, conn = open_db(args)
        try:
            if args.pending:
                return downlink_cli.print_pending(conn, args.json)
            devices = devices_ops.listing(conn, args.status)
        finally:
            conn.close()
    except GatewayError as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps([d.as_dict() for d in devices], indent=1))
        return 0
    print(f"{'DEVICE':<24} {'CLASS':<10} {'BOARD':<8} {'STATUS':<14} {'FW':>6} {'BATT':>6}  "
          "LAST SEEN")
    for d in devices:
        print(f"{d.id:<24} {d.device_class:<10} {d.board or '-':<8} {d.status:<14} "
              f"{'-' if d.fw_version is None else d.fw_version:>6} "
              f"{'-' if d.battery_mv is None else d.battery_mv:>6}  {when(d.last_seen)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        _cfg, conn = open_db(args)
        try:
            shown = devices_ops.detail(conn, args.device_id)
            down = downlink_ops.gather(conn, shown.device.id)
            fw_keys = keylists_ops.node_status(conn, shown.device.id)
        finally:
            conn.close()
    except GatewayError as exc:
        return fail(str(exc))
    dev, hwm, above, total = shown.device, shown.ack_cumulative, shown.committed_above, shown.readings
    nletters, letters = shown.dead_letters, shown.recent_dead_letters
    rot = shown.rotation
    if args.json:
        doc = dev.as_dict() | {"ack_cumulative": hwm, "committed_above": above,
                               "readings": total, "dead_letters": nletters, "downlink": down,
                               "rotation": rot.as_dict() if rot else None,
                               "session_key": _session_key(shown.session_key),
                               "fw_keys": fw_keys.as_dict()}
        print(json.dumps(doc, indent=1))
        return 0
    print(f"device:          {dev.id} ({dev.device_class})")
    print(f"board:           {dev.board or '-'}")
    print(f"status:          {dev.status}" + (f" ({dev.status_reason})" if dev.status_reason else ""))
    print(f"certificate:     {dev.cert_serial or '-'}")
    print(f"last seen:       {when(dev.last_seen)}")
    print(f"last HELLO:      {when(dev.last_hello_at)}")
    print(f"next wake:       {when(dev.next_wake_at)}")
    wakes = down.get("wakes") or {}
    stay = wakes.get("awake_until")
    if stay is not None and stay > time.time():
        print(f"awake until:     {when(stay)} (stay_awake: items are sent at once)")
    else:
        print(f"awake until:     {when(dev.awake_until)}")
    if dev.safe_mode:
        print("safe mode:       yes (reports, takes OTA and configuration; runs no commands)")
    if dev.clock_unset:
        print("clock:           not set yet (readings corrected from its HELLO time)")
    print(f"firmware:        {'-' if dev.fw_version is None else dev.fw_version}")
    print(f"firmware keys:   {fw_keys.line}")
    print(f"battery:         {'-' if dev.battery_mv is None else f'{dev.battery_mv} mV'}")
    print(f"rssi:            {'-' if dev.rssi is None else f'{dev.rssi} dBm'}")
    print(f"boot cause:      {dev.boot_cause or '-'}")
    print(f"queue / dropped: {dev.queue_depth if dev.queue_depth is not None else '-'} / "
          f"{dev.dropped if dev.dropped is not None else '-'}")
    print(f"readings:        {total} stored, acknowledged up to id {hwm} (+{above} above)")
    if shown.rotation is not None:
        r = shown.rotation
        print(f"key rotation:    {r.id} {r.state}" + (f" (new certificate {r.new_serial})"
                                                      if r.new_serial else "")
              + (f" {r.outcome}" if r.outcome else "") + (f": {r.detail}" if r.detail else ""))
    psk = _session_key(shown.session_key)
    if psk is not None:
        left = psk["days_left"]
        print(f"session key:     {psk['key_id']} {psk['state']}"
              + ("" if left is None else f", {left:.1f} days left"))
    print(f"dead letters:    {nletters}")
    for letter in letters:
        print(f"  {when(letter.at)}  {letter.reason}: {letter.detail}")
    downlink_cli.print_show(down)
    return 0


def _session_key(k: Any) -> dict[str, Any] | None:
    """The TLS-PSK session key's id, state and days left (never the key itself)."""
    if k is None:
        return None
    left = k.days_left(time.time()) if k.state == "active" else None
    return {"key_id": k.key_id, "state": k.state, "days_left": None if left is None else round(left, 2)}


def _release(args: argparse.Namespace) -> int:
    try:
        cfg, conn = open_db(args)
        try:
            dev = devices_ops.release(conn, cfg, args.device_id)
        finally:
            conn.close()
    except GatewayError as exc:
        return fail(str(exc))
    print(f"{dev.id}: {dev.status}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    try:
        cfg, conn = open_db(args)
        try:
            revoked = devices_ops.revoke(conn, cfg, args.device_id, broker_pid=args.broker_pid)
        finally:
            conn.close()
        names = ", ".join(format(s, "x") for s in revoked.serials) or "none new"
        print(f"{revoked.device.id}: revoked (certificates: {names})")
        if not revoked.broker_running:
            print("broker: not running; it reads the new CRL when the gateway starts")
            return 0
        refused = devices_ops.cut_off(cfg, revoked)
    except GatewayError as exc:
        return fail(str(exc))
    print("broker: reloaded, new connections "
          + ("refused" if refused else "refused once the reload is done (not checked: no key)"))
    print("broker: live sessions cut")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    """Queue a rotation: a rotate_key command waits for the node's next wake."""
    from gateway.ops import actions

    try:
        cfg, conn = open_db(args)
        try:
            rot = actions.rotate_key(conn, cfg.pki_dir, args.device_id)
        finally:
            conn.close()
    except GatewayError as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps(rot.as_dict(), indent=1))
        return 0
    print(f"{rot.device}: rotation {rot.id} queued (command {rot.command_id}); the node makes "
          "its new key at its next wake")
    return 0


# ---------------------------------------------------------------- backup, restore, config

def _register_ops(gsub: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    p = gsub.add_parser("backup", help="online backup: database, PKI folder and configuration "
                        "in one archive with a manifest and checksums")
    config_arg(p)
    p.add_argument("file", nargs="?", default=None,
                   help="the archive to write (.tar, .tar.gz, .tar.xz or .tar.bz2)")
    p.add_argument("--rotate", metavar="DIR", default=None,
                   help="write torpor-backup-YYYYMMDD-HHMMSS.tar.gz (UTC) into DIR instead")
    p.add_argument("--keep", type=int, default=7,
                   help="with --rotate: keep the newest N backups of DIR (default: 7)")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=_backup)
    p = gsub.add_parser("restore", help="verify a backup archive and unpack it as a gateway "
                        "folder that `torpor gateway run --config DIR/gateway.toml` resumes")
    p.add_argument("file", help="the backup archive")
    p.add_argument("--dir", required=True, help="the folder to restore into (new or empty)")
    p.add_argument("--force", action="store_true",
                   help="restore into a non-empty DIR, moving its content aside first")
    p.set_defaults(func=_restore)
    p = gsub.add_parser("config", help="show the effective configuration or set one key")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    q = csub.add_parser("show", help="the effective configuration, defaults filled in")
    config_arg(q)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--secrets", action="store_true",
                   help="also print the web token, password hash and upstream password")
    q.set_defaults(func=_config_show)
    q = csub.add_parser("set", help="set SECTION.KEY=VALUE after validating the new file; the "
                        "previous file is kept as gateway.toml.YYYYMMDD-HHMMSS")
    config_arg(q)
    q.add_argument("assignment", metavar="SECTION.KEY=VALUE",
                   help="e.g. ingest.rate_limit_frames_per_min=600")
    q.set_defaults(func=_config_set)


def _backup(args: argparse.Namespace) -> int:
    from gateway.ops import backup

    if (args.file is None) == (args.rotate is None):
        return fail("give either FILE or --rotate DIR")
    try:
        cfg = load_config(args)
        if args.rotate is not None:
            result = backup.backup_rotating(cfg, Path(args.rotate), args.keep)
        else:
            result = backup.backup(cfg, Path(args.file))
    except GatewayError as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps(result.manifest, indent=1))
        return 0
    m = result.manifest
    counts = m["database"]["row_counts"]
    print(f"backup:   {result.path} ({result.size} bytes, {len(m['files'])} files)")
    print(f"database: snapshot at {m['captured']['db_snapshot_at']}, "
          f"{counts.get('readings', 0)} readings, {counts.get('devices', 0)} devices")
    for old in result.rotated_out:
        print(f"rotated:  {old} deleted")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from gateway.ops import backup

    try:
        result = backup.restore(Path(args.file), Path(args.dir), force=args.force)
    except backup.BackupError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return backup.EXIT_TARGET if exc.code == "target" else backup.EXIT_REFUSED
    except GatewayError as exc:
        return fail(str(exc))
    print(f"restored: {result.dir} (backup of {result.manifest.get('created')})")
    if result.replaced is not None:
        print(f"previous: moved aside to {result.replaced}")
    print(f"resume:   torpor gateway run --config {result.config}")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from gateway.ops import config_ops

    try:
        cfg = load_config(args)
    except GatewayError as exc:
        return fail(str(exc))
    doc = config_ops.show(cfg, secrets=args.secrets)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"# effective configuration of {doc.pop('source') or '-'} (defaults filled in)")
    print(gwconfig.dumps(doc), end="")
    return 0


def _config_set(args: argparse.Namespace) -> int:
    from gateway.ops import config_ops

    path = Path(args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        result = config_ops.set_key(path, args.assignment)
    except GatewayError as exc:
        return fail(str(exc))
    print(f"{result.section}.{result.key}: {result.old!r} -> {result.new!r} in {result.path}")
    print(f"previous file kept as {result.backup}")
    print("a running gateway applies it on SIGHUP (systemctl reload torpor-gateway)"
          if result.live else "takes effect when the gateway restarts")
    return 0
