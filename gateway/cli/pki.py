"""`torpor pki ...`: create the fleet CA, issue, rotate, revoke and list certificates."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError, PkiError
from gateway.ops import pki as pki_ops
from gateway.ops.pki import (
    CRL_DAYS,
    DEFAULT_GATEWAY_CN,
    DEVICE_DAYS,
    ISSUING_DAYS,
    DeviceCredentials,
    Lifetime,
)


def register(sub: Any) -> None:
    pki = sub.add_parser("pki", help="fleet CA: issue, rotate, revoke and list certificates")
    psub = pki.add_subparsers(dest="pki_command", metavar="ACTION", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = psub.add_parser(name, help=help, description=help)
        p.add_argument("--dir", default="var/pki", help="PKI directory (default: var/pki)")
        p.add_argument("--ca-key-dir", default=None,
                       help="directory holding ca.key when it is kept offline (default: --dir)")
        return p

    p = action("init", "create the fleet CA (ECDSA P-256) and an empty CRL")
    p.set_defaults(func=_init)

    p = action("issuing", "make (or renew) the online issuing CA with the root key; it then "
                          "signs certificates and the CRL so the gateway renews them itself")
    p.add_argument("--days", type=int, default=ISSUING_DAYS, help="validity in days")
    p.set_defaults(func=_issuing)

    p = action("status", "every credential's end of validity with its days left")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--soonest", type=int, default=5, metavar="N",
                   help="how many of the devices expiring soonest to list (default: 5)")
    p.set_defaults(func=_status)

    p = action("server", "issue the broker's server certificate")
    # Either form: `--san a --san b` or `--san a,b` (or both); each value adds names.
    p.add_argument("--san", action="append", default=None, metavar="NAMES",
                   help="DNS names and IP addresses nodes connect to: repeat the flag or give "
                        "a comma-separated list (default: localhost,127.0.0.1,::1)")
    p.set_defaults(func=_server)

    p = action("gateway", "issue the gateway service's client certificate")
    p.add_argument("--cn", default=DEFAULT_GATEWAY_CN, help="its broker username")
    p.set_defaults(func=_gateway)

    p = action("device", "issue a device certificate (CN = device id), PEM and DER")
    p.add_argument("device_id", help="the device's id, its certificate's CN")
    p.add_argument("--days", type=int, default=DEVICE_DAYS, help="validity in days")
    p.set_defaults(func=_device)

    p = action("rotate", "issue a new certificate for a device; the old one stays valid until revoked")
    p.add_argument("device_id", help="the device's id, its certificate's CN")
    p.add_argument("--days", type=int, default=DEVICE_DAYS, help="validity in days")
    p.set_defaults(func=_rotate)

    p = action("revoke", "revoke a device (all its certificates) or one serial; rewrite the CRL")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("device_id", nargs="?", help="revoke every certificate of this device")
    target.add_argument("--serial", help="hexadecimal serial of one certificate")
    p.set_defaults(func=_revoke)

    p = action("crl", "re-issue the CRL (once it expires the broker refuses everyone; "
                      "the gateway renews it on its own)")
    p.add_argument("--days", type=float, default=CRL_DAYS, help="validity in days")
    p.set_defaults(func=_crl)

    p = action("list", "list every certificate issued")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_list)


def _where(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The PKI folder and the folder of the CA keys, when elsewhere."""
    return Path(args.dir), Path(args.ca_key_dir) if args.ca_key_dir else None


def _fail(exc: GatewayError) -> int:
    import sys

    print(f"torpor: error: {exc}", file=sys.stderr)
    return 2


def _init(args: argparse.Namespace) -> int:
    try:
        path = pki_ops.init_ca(*_where(args))
    except GatewayError as exc:
        return _fail(exc)
    print(f"created CA {path}")
    return 0


DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


def san_list(values: list[str] | None) -> list[str]:
    """Every name of every `--san` (repeated flags and comma lists alike), in order, once."""
    if not values:
        return list(DEFAULT_SANS)
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def _server(args: argparse.Namespace) -> int:
    try:
        creds = pki_ops.issue_server(*_where(args), san_list(args.san))
    except GatewayError as exc:
        return _fail(exc)
    print(f"issued server certificate {creds.cert_pem} (serial {creds.serial:x})")
    return 0


def _gateway(args: argparse.Namespace) -> int:
    try:
        creds = pki_ops.issue_gateway(*_where(args), args.cn)
    except GatewayError as exc:
        return _fail(exc)
    print(f"issued gateway certificate {creds.cert_pem} for {creds.cn} (serial {creds.serial:x})")
    return 0


def _show_device(creds: DeviceCredentials) -> None:
    print(f"issued certificate {creds.serial:x} for {creds.device_id}, valid until "
          f"{creds.not_after:%Y-%m-%d}")
    for label, path in (("cert", creds.cert_der), ("key", creds.key_der), ("ca", creds.ca_der)):
        print(f"  {label:4} {path}")


def _device(args: argparse.Namespace) -> int:
    try:
        _show_device(pki_ops.issue_device(*_where(args), args.device_id, args.days))
    except GatewayError as exc:
        return _fail(exc)
    return 0


def _rotate(args: argparse.Namespace) -> int:
    try:
        _show_device(pki_ops.rotate(*_where(args), args.device_id, args.days))
    except GatewayError as exc:
        return _fail(exc)
    print("revoke the old certificate once the node uses the new one: "
          "`torpor pki revoke --serial <old serial>`")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    try:
        if args.serial is not None:
            try:
                target: str | int = int(args.serial, 16)
            except ValueError:
                raise PkiError(f"--serial {args.serial!r} is not a hexadecimal number") from None
        else:
            target = args.device_id
        revoked = pki_ops.revoke(*_where(args), target)
    except GatewayError as exc:
        return _fail(exc)
    for serial in revoked.serials:
        print(f"revoked {serial:x}")
    if not revoked.serials:
        print("already revoked")
    print(f"wrote {revoked.crl}; reload the broker (SIGHUP / `systemctl reload mosquitto`) "
          "so it refuses new connections")
    return 0


def _crl(args: argparse.Namespace) -> int:
    try:
        path = pki_ops.write_crl(*_where(args), days=args.days)
    except GatewayError as exc:
        return _fail(exc)
    print(f"wrote {path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    try:
        records = pki_ops.records(*_where(args))
    except GatewayError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=1))
        return 0
    print(f"{'SERIAL':<42} {'KIND':<8} {'CN':<32} {'NOT AFTER':<10} REVOKED")
    for r in records:
        revoked = f"{r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "-"
        print(f"{r.serial_hex:<42} {r.kind:<8} {r.cn:<32} {r.not_after:%Y-%m-%d} {revoked}")
    return 0


def _issuing(args: argparse.Namespace) -> int:
    try:
        made = pki_ops.init_issuing(*_where(args), args.days)
    except GatewayError as exc:
        return _fail(exc)
    print(f"made issuing CA {made.path}; it now signs certificates and the CRL")
    print(f"restart the broker so that it trusts it (its cafile is now {made.chain})")
    if made.legacy_root:
        print("the root was re-certified to allow an issuing CA: nodes provisioned before hold "
              "the old root, so the root keeps signing the broker's certificate until every node "
              "holds the new ca.der (see the PKI guide)")
    return 0


def _when(life: Lifetime) -> str:
    days = life.days_left
    mark = "EXPIRED" if days <= 0 else ("!" if days <= 30 else "")
    return f"{life.not_after:%Y-%m-%d %H:%M}  {days:>9.1f} {mark}".rstrip()


def _status(args: argparse.Namespace) -> int:
    try:
        st = pki_ops.status(*_where(args), soonest=args.soonest)
    except GatewayError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(st.to_json(), indent=1))
        return 0
    print(f"{'CREDENTIAL':<11} {'SUBJECT':<24} {'SERIAL':<12} {'NOT AFTER (UTC)':<16}  DAYS LEFT")
    for life in st.credentials:
        serial = life.serial[:12] or "-"
        print(f"{life.name:<11} {life.subject[:24]:<24} {serial:<12} {_when(life)}")
    print(f"devices: {st.devices_total} with a valid certificate, {st.devices_expiring} "
          f"expire within {st.within_days:g} days")
    for life in st.devices:
        print(f"  {life.subject:<32} {life.serial[:12]:<12} {_when(life)}")
    return 0
