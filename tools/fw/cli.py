"""`torpor fw ...`: firmware signing keys and signed A/B images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tools.fw import image, keys


def register(sub: Any) -> None:
    fw = sub.add_parser("fw", help="firmware images: keys, build, sign, verify, install")
    actions = fw.add_subparsers(dest="fw_command", metavar="ACTION", required=True)

    p = actions.add_parser(
        "keygen",
        help="create an Ed25519 firmware signing key pair",
        description="Write firmware-signing.key (mode 0600: keep it off the gateway), "
        "firmware-signing.pub and fleet_keys.py (the bootloader's baked-in key) into DIR.",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="directory for the three files (created if missing)")
    p.set_defaults(func=_keygen)

    _register_keys(actions)

    p = actions.add_parser("build", help="compile an image for a board (unsigned manifest)")
    p.add_argument("--board", required=True, choices=sorted(image.BOARD_ARCH),
                   help="target board (its mpy-cross architecture)")
    p.add_argument("--version", required=True, type=int, help="monotonic integer version")
    p.add_argument("--display", default=None, help="human-readable version string")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="image directory to write: one .mpy per module and manifest.json")
    p.set_defaults(func=_build)

    p = actions.add_parser("sign", help="sign an image's manifest")
    p.add_argument("--key", required=True, type=Path, help="private key file (PEM)")
    p.add_argument("image", type=Path, metavar="IMAGE_DIR", help="image built by `torpor fw build`")
    p.set_defaults(func=_sign)

    p = actions.add_parser("verify", help="check an image as the bootloader would")
    p.add_argument("--pubkey", required=True, type=Path, help="public key file")
    p.add_argument("image", type=Path, metavar="IMAGE_DIR", help="signed image directory")
    p.set_defaults(func=_verify)

    p = actions.add_parser(
        "install",
        help="write a signed image into a sim node's flash as its confirmed image",
    )
    p.add_argument("--node-dir", required=True, type=Path, metavar="D",
                   help="the sim node's directory (as `torpor sim node --dir`)")
    p.add_argument("--slot", choices=image.SLOTS, default=None, help="default: the free slot")
    p.add_argument(
        "--pubkey", type=Path, default=None,
        help="verify with this key first and bake it into the node's bootloader",
    )
    p.add_argument("image", type=Path, metavar="IMAGE_DIR", help="signed image directory")
    p.set_defaults(func=_install)


def _register_keys(actions: Any) -> None:
    from gateway.cli.common import CONFIG_ENV
    from gateway.cli.ota import add_targets

    keys_p = actions.add_parser(
        "keys", help="rotate the keys nodes trust: sign a key list and send it through the gateway")
    ksub = keys_p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    for name in ("add", "retire"):
        if name == "add":
            p = ksub.add_parser(
                "add", help="trust one more firmware signing key",
                description="Sign the next key list (the gateway's newest plus KEY) with a key "
                "trusted now and queue it for devices through the gateway's store. Images "
                "signed by the new key are accepted once a node reports the list. Every device in "
                "service gets it unless --group or --devices narrows it.")
            p.add_argument("--key", required=True, type=Path, metavar="DIR_OR_PUB",
                           help="the new public key: a .pub/PEM file or a `fw keygen` directory")
        else:
            p = ksub.add_parser(
                "retire", help="stop trusting a firmware signing key",
                description="Sign the next key list (the gateway's newest without KEY_ID). "
                "Refused for the last key, and for a key that signed an image a node runs or "
                "is being updated to. Every device in service gets it unless --group or --devices "
                "narrows it.")
            p.add_argument("key_id", metavar="KEY_ID", help="8 hex digits (see `torpor ota keys status`)")
        p.add_argument("--signing-key", required=True, type=Path, metavar="PRIVATE_KEY",
                       help="a private key file trusted now (stays on this machine)")
        p.add_argument("--gateway-config", "--config", "-c", dest="config", default=None,
                       help=f"gateway TOML: send through its store (default: ${CONFIG_ENV} "
                       "unless --out is given)")
        add_targets(p, required=False)  # default: --all
        p.add_argument("--out", type=Path, default=None, metavar="FILE",
                       help="also write the signed list here (for `torpor ota keys push`)")
        p.add_argument("--current", type=Path, default=None, metavar="LIST_FILE",
                       help="without a gateway: the list trusted now (default: the baked keys)")
        p.add_argument("--baked", action="append", default=[], type=Path, metavar="PUB",
                       help="a key the nodes were provisioned with, when no list was sent yet "
                       "(repeat; default: the signing key's public key)")
        p.add_argument("--image", action="append", default=[], type=Path, metavar="DIR",
                       help="an image nodes run: refuse to retire its key (repeat)")
        p.set_defaults(func=_keys_change, keys_action=name)


def _keys_change(args: argparse.Namespace) -> int:
    import os

    from gateway.cli.common import CONFIG_ENV, run_with_db
    from gateway.cli.ota import print_pushed, targets
    from gateway.errors import GatewayError
    from gateway.ops import keylists
    from gateway.security import manifest

    try:
        signing = keys.load_private(args.signing_key)
        new_pub = keys.public_of(args.key) if args.keys_action == "add" else None
        baked = {keys.key_id(k): k for k in (keys.public_of(b) for b in args.baked)}
        if not baked:
            raw = keys.public_raw(signing.public_key())
            baked = {keys.key_id(raw): raw}
        local = [(str(d), manifest.read_manifest(d).key_id) for d in args.image]
    except (keys.KeyFileError, manifest.ImageError, OSError) as exc:
        raise _fail(exc) from exc
    retire = args.key_id.lower() if args.keys_action == "retire" else None
    if retire is not None:
        for label, kid in local:
            if kid == retire:
                raise _fail(keys.KeyListError(f"key {retire} signed image {label}: retiring it "
                                              "is refused; ship an image signed by another key first"))
    group, devices = targets(args)
    send = bool(args.config or os.environ.get(CONFIG_ENV) or args.out is None)

    def sign(current: dict[str, bytes], seq: int) -> tuple[keys.KeyList, bytes]:
        return keys.next_list(current, seq, signing, add=new_pub, retire=retire)

    def write(blob: bytes) -> None:
        if args.out is not None:
            args.out.write_bytes(blob)

    if not send:
        try:
            if args.current is not None:
                cur, _data, _sig = keys.split(args.current.read_bytes())
                kl, blob = sign(cur.keys, cur.seq)
            else:
                kl, blob = sign(baked, 0)
            write(blob)
        except (keys.KeyListError, OSError) as exc:
            raise _fail(exc) from exc
        print(f"key list seq {kl.seq} ({', '.join(kl.key_ids)}) signed by {kl.signer}: {args.out}")
        return 0
    if group is None and devices is None:
        group = "all"  # a key list is fleet-wide by nature; --group/--devices narrow it

    def body(conn: Any) -> int:
        cur = keylists.current(conn)
        try:
            kl, blob = sign(cur.keys, cur.seq) if cur is not None else sign(baked, 0)
        except keys.KeyListError as exc:
            raise keylists.KeyListRefused(str(exc)) from exc
        r = keylists.push(conn, blob, group=group, devices=devices, baked=baked,
                          local_images=local)
        write(blob)  # once the gateway took it: a refused list leaves no file behind
        print(f"signed by {kl.signer}")
        print_pushed(r)
        return 2 if r.failed else 0

    try:
        return run_with_db(args, body)
    except GatewayError as exc:
        raise _fail(exc) from exc


def _fail(exc: Exception) -> Exception:
    from tools.cli import CliError

    return CliError(str(exc))


def _keygen(args: argparse.Namespace) -> int:
    try:
        paths = keys.keygen(args.out)
    except (keys.KeyFileError, OSError) as exc:
        raise _fail(exc) from exc
    print(f"key id {paths.key_id}")
    print(f"private key {paths.private} (mode 0600; keep it off the gateway)")
    print(f"public key {paths.public}; bootloader keys {paths.fleet_keys}")
    return 0


def _build(args: argparse.Namespace) -> int:
    try:
        m = image.build_image(args.board, args.version, args.out, display=args.display)
    except image.ImageError as exc:
        raise _fail(exc) from exc
    print(f"built {m.board} v{m.version} ({m.display}): {len(m.files)} files, {m.total_size} bytes")
    return 0


def _sign(args: argparse.Namespace) -> int:
    try:
        m = image.sign_image(args.image, keys.load_private(args.key))
    except (image.ImageError, keys.KeyFileError) as exc:
        raise _fail(exc) from exc
    print(f"signed {m.board} v{m.version} with key {m.key_id}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        m = image.verify_image(args.image, keys.load_public(args.pubkey))
    except (image.ImageError, keys.KeyFileError) as exc:
        raise _fail(exc) from exc
    print(f"ok: {m.board} v{m.version} ({m.display}), key {m.key_id}, {len(m.files)} files")
    return 0


def _install(args: argparse.Namespace) -> int:
    try:
        pub = keys.load_public(args.pubkey) if args.pubkey else None
        slot = image.install_sim(args.node_dir, args.image, slot=args.slot, public_key=pub)
    except (image.ImageError, keys.KeyFileError) as exc:
        raise _fail(exc) from exc
    print(f"installed into slot {slot} of {args.node_dir}")
    return 0
