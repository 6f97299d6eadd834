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
