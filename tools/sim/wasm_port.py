"""Installs MicroPython's WebAssembly port from the npm registry, without npm.

`make wasm` (which `make test` runs) calls `python -m tools.sim.wasm_port`: it reads the
registry's metadata of the pinned version, downloads the tarball, refuses it unless its sha512
matches the registry's `dist.integrity`, and unpacks it where Node.js resolves the package
(build/wasm/node_modules/<package>), where tools/sim/wasm.py runs it. The verified tarball and
its integrity stay beside it, so a later run finds a present, intact copy without the network.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WASM_DIR = ROOT / "build" / "wasm"
PACKAGE = "@micropython/micropython-webassembly-pyscript"
# The same MicroPython as the unix port the firmware tests run on.
VERSION = "1.29.0-6"
REGISTRY = "https://registry.npmjs.org"
TIMEOUT_S = 60.0


class FetchError(Exception):
    """The port could not be installed; `kind` says which step failed."""

    NETWORK = "network"
    METADATA = "metadata"
    INTEGRITY = "integrity"
    ARCHIVE = "archive"

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def package_dir(root: Path = WASM_DIR) -> Path:
    return root / "node_modules" / PACKAGE


def port_script(root: Path = WASM_DIR) -> Path:
    return package_dir(root) / "micropython.mjs"


def _tarball_path(root: Path) -> Path:
    return root / f"{PACKAGE.rsplit('/', 1)[-1]}-{VERSION}.tgz"


def _integrity_path(root: Path) -> Path:
    return _tarball_path(root).with_suffix(".integrity")


def registry() -> str:
    # npm's own setting, so a mirror configured for npm serves this step too.
    return (os.environ.get("npm_config_registry") or REGISTRY).rstrip("/")


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            data: bytes = resp.read()
            return data
    except urllib.error.HTTPError as exc:
        raise FetchError(FetchError.NETWORK, f"GET {url} answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(FetchError.NETWORK, f"GET {url} failed: {reason}") from exc


def metadata(base: str) -> tuple[str, str]:
    """The pinned version's tarball URL and SRI integrity, as the registry states them."""
    url = f"{base}/{PACKAGE.replace('/', '%2f')}/{VERSION}"
    try:
        doc: Any = json.loads(_get(url))
        name, version, dist = doc["name"], doc["version"], doc["dist"]
        tarball, integrity = dist["tarball"], dist["integrity"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FetchError(FetchError.METADATA, f"{url} is not the registry's version document ({exc!r})") from exc
    if (name, version) != (PACKAGE, VERSION):
        raise FetchError(FetchError.METADATA, f"{url} describes {name}@{version}, not {PACKAGE}@{VERSION}")
    if not isinstance(tarball, str) or not isinstance(integrity, str):
        raise FetchError(FetchError.METADATA, f"{url}: dist.tarball and dist.integrity must be strings")
    return tarball, integrity


def sri_sha512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def check_integrity(data: bytes, integrity: str, source: str) -> None:
    """Refuses `data` unless one sha512 of the SRI string `integrity` matches it."""
    wanted = [h for h in integrity.split() if h.startswith("sha512-")]
    if not wanted:
        raise FetchError(FetchError.INTEGRITY, f"{source}: the registry gives no sha512 integrity ({integrity!r})")
    got = sri_sha512(data)
    if got not in wanted:
        raise FetchError(FetchError.INTEGRITY, f"{source}: sha512 is {got}, the registry states {' '.join(wanted)}")


def _files(data: bytes) -> dict[str, bytes]:
    """The package's regular files by path, from an npm tarball (everything under `package/`).

    Only plain files and folders with relative paths inside the package are accepted, so the
    archive cannot write anywhere else (Debian 12's Python has no tarfile extraction filter)."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for m in tar.getmembers():
                path = PurePosixPath(m.name)
                if path.is_absolute() or ".." in path.parts or path.parts[:1] != ("package",):
                    raise FetchError(FetchError.ARCHIVE, f"member {m.name!r} is outside the package")
                if m.isdir():
                    continue
                if not m.isfile() or len(path.parts) < 2:
                    raise FetchError(FetchError.ARCHIVE, f"member {m.name!r} is not a regular file")
                f = tar.extractfile(m)
                assert f is not None  # a regular file always has contents
                files[str(PurePosixPath(*path.parts[1:]))] = f.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FetchError(FetchError.ARCHIVE, f"the tarball does not unpack: {exc}") from exc
    if "package.json" not in files:
        raise FetchError(FetchError.ARCHIVE, "the tarball has no package/package.json")
    return files


def intact(root: Path = WASM_DIR) -> bool:
    """Whether the pinned tarball is present, still matches the integrity it was installed
    with, and every file of it is unpacked unchanged."""
    tgz, sri, pkg = _tarball_path(root), _integrity_path(root), package_dir(root)
    if not (tgz.is_file() and sri.is_file() and pkg.is_dir()):
        return False
    data = tgz.read_bytes()
    try:
        check_integrity(data, sri.read_text().strip(), str(tgz))
        files = _files(data)
    except FetchError:
        return False
    return all((pkg / rel).is_file() and (pkg / rel).read_bytes() == body for rel, body in files.items())


def _unpack(files: dict[str, bytes], root: Path) -> None:
    dest = package_dir(root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Unpacked beside the destination and swapped in, so an interrupted run leaves no half copy
    # under the name Node.js resolves.
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's folder is private; the package is not
        for rel, body in files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install(root: Path = WASM_DIR, base: str | None = None) -> bool:
    """Makes the pinned port present and intact under `root`; True when it had to be fetched."""
    if intact(root):
        return False
    tarball, integrity = metadata(base or registry())
    data = _get(tarball)
    check_integrity(data, integrity, tarball)
    files = _files(data)
    root.mkdir(parents=True, exist_ok=True)
    _unpack(files, root)
    _tarball_path(root).write_bytes(data)
    _integrity_path(root).write_text(integrity + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.sim.wasm_port",
        description=f"Install {PACKAGE}@{VERSION} from the npm registry into build/wasm, checked against its sha512.",
    )
    ap.add_argument("--dir", type=Path, default=WASM_DIR, help="install root (default: build/wasm)")
    ap.add_argument("--registry", default=None, help=f"registry URL (default: $npm_config_registry or {REGISTRY})")
    args = ap.parse_args(argv)
    try:
        fetched = install(args.dir, args.registry)
    except FetchError as exc:
        print(f"wasm: {PACKAGE}@{VERSION} not installed: {exc}", file=sys.stderr)
        return 1
    state = "installed" if fetched else "present and intact"
    print(f"wasm: {PACKAGE}@{VERSION} {state} in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
