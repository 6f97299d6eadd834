"""Online backup of a gateway (database, PKI folder, configuration) into one archive, and
its restore into a fresh folder that `torpor gateway run` resumes from.

Consistency: the database is copied with SQLite's backup API in one read transaction (the
state as of one commit; ingest keeps committing meanwhile in WAL mode). The PKI folder and
the configuration file are read before and verified unchanged after that copy: when a
certificate, key or CRL was written meanwhile, the whole capture is taken again. So the
archive holds a PKI and a configuration that were current for the whole instant of the
database snapshot. The manifest records when each part was captured.

Nothing here prints: results and `BackupError`s (with a code) go back to the caller.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import config as gwconfig
from gateway.errors import GatewayError
from gateway.store import db

FORMAT = "torpor-gateway-backup"
MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
DB_NAME = "db/gateway.db"
CONFIG_NAME = "config/gateway.toml"
RULES_NAME = "config/rules.toml"  # the edge rules (gateway.pipeline.rules), when the file exists
PKI_PREFIX = "pki/"
CAPTURE_ATTEMPTS = 5
ROTATE_PATTERN = re.compile(r"torpor-backup-(\d{8}-\d{6})\.tar\.gz")
# Exit codes of `torpor gateway restore`: the archive is refused / the target is in use.
EXIT_REFUSED = 3
EXIT_TARGET = 2


class BackupError(GatewayError):
    """A backup could not be made, or an archive is refused; `code` says which case."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    size: int
    manifest: dict[str, Any]
    attempts: int
    rotated_out: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class RestoreResult:
    dir: Path
    config: Path
    manifest: dict[str, Any]
    replaced: Path | None = None  # the previous content of DIR (--force), moved aside


@dataclass(slots=True)
class _Capture:
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # name -> (data, mode)
    db_file: Path | None = None  # the snapshot, streamed into the archive (it may be large)
    pki_at: float = 0.0
    db_at: float = 0.0
    verified_at: float = 0.0


def gateway_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("torpor")
    except metadata.PackageNotFoundError:
        return "unknown"


CHUNK = 1 << 20


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _read_tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every regular file under `root` (relative name -> (bytes, mode)); the writers'
    temporary files (.name.pid.tmp) are skipped."""
    out: dict[str, tuple[bytes, int]] = {}
    if not root.is_dir():
        return out
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue
        try:
            data = path.read_bytes()
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:  # replaced while we listed: the re-read decides
            continue
        out[path.relative_to(root).as_posix()] = (data, mode)
    return out


def _fingerprint(files: dict[str, tuple[bytes, int]]) -> dict[str, str]:
    return {name: _sha(data) for name, (data, _mode) in files.items()}


def _capture(cfg: gwconfig.GatewayConfig, staging: Path) -> tuple[_Capture, int]:
    config_path = Path(cfg.source) if cfg.source else None
    rules_path = cfg.rules_path
    for attempt in range(1, CAPTURE_ATTEMPTS + 1):
        cap = _Capture()
        cap.pki_at = time.time()
        pki = _read_tree(cfg.pki_dir)
        conf = config_path.read_bytes() if config_path is not None else b""
        rules = _read_optional(rules_path)
        snap = staging / f"gateway.{attempt}.db"
        cap.db_at = time.time()
        db.backup_to(cfg.db_path, snap)
        cap.verified_at = time.time()
        pki_after = _read_tree(cfg.pki_dir)
        conf_after = config_path.read_bytes() if config_path is not None else b""
        if (_fingerprint(pki) == _fingerprint(pki_after) and conf == conf_after
                and rules == _read_optional(rules_path)):
            for name, item in pki.items():
                cap.files[PKI_PREFIX + name] = item
            if config_path is not None:
                cap.files[CONFIG_NAME] = (conf, 0o600)
            if rules is not None:
                cap.files[RULES_NAME] = (rules, 0o600)
            cap.db_file = snap
            return cap, attempt
        snap.unlink()
    raise BackupError("busy", f"the PKI folder {cfg.pki_dir} or the configuration changed during "
                      f"each of {CAPTURE_ATTEMPTS} database snapshots; try again")


def _read_optional(path: Path | None) -> bytes | None:
    try:
        return path.read_bytes() if path is not None else None
    except FileNotFoundError:
        return None


def _tar_mode(path: Path) -> str:
    name = path.name
    if name.endswith((".tar.gz", ".tgz")):
        return "w:gz"
    if name.endswith((".tar.xz", ".txz")):
        return "w:xz"
    if name.endswith((".tar.bz2", ".tbz2")):
        return "w:bz2"
    if name.endswith(".tar"):
        return "w"
    raise BackupError("usage", f"{path}: name the archive .tar, .tar.gz, .tar.xz or .tar.bz2")


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(mtime)
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path, size: int, mode: int,
              mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = int(mtime)
    with open(path, "rb") as f:
        tar.addfile(info, f)


def backup(cfg: gwconfig.GatewayConfig, out: Path, *, now: float | None = None) -> BackupResult:
    """Write the archive `out` (mode 0600; replaced atomically when it exists)."""
    out = Path(out)
    mode = _tar_mode(out)
    if not cfg.db_path.exists():
        raise BackupError("usage", f"no database at {cfg.db_path}: nothing to back up")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".torpor-backup-", dir=out.parent) as tmp:
        staging = Path(tmp)
        os.chmod(staging, 0o700)
        cap, attempts = _capture(cfg, staging)
        assert cap.db_file is not None
        versions, counts = db.describe(cap.db_file)
        db_size, db_sha = _sha_file(cap.db_file)
        digests = {name: (len(data), _sha(data), fmode)
                   for name, (data, fmode) in cap.files.items()}
        digests[DB_NAME] = (db_size, db_sha, 0o600)
        created = time.time() if now is None else now
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": MANIFEST_VERSION,
            "created": _iso(created),
            "gateway_version": gateway_version(),
            "source": {"config": cfg.source, "data_dir": cfg.gateway.data_dir,
                       "db": str(cfg.db_path), "pki_dir": str(cfg.pki_dir)},
            "captured": {"pki_read_at": _iso(cap.pki_at), "db_snapshot_at": _iso(cap.db_at),
                         "pki_verified_unchanged_at": _iso(cap.verified_at),
                         "attempts": attempts},
            "database": {"schema_versions": versions, "row_counts": counts},
            "files": [{"name": name, "size": size, "sha256": digest, "mode": format(fmode, "04o")}
                      for name, (size, digest, fmode) in sorted(digests.items())],
        }
        manifest_bytes = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        sums = "".join(f"{digest}  {name}\n" for name, (_s, digest, _m) in sorted(digests.items()))
        sums = f"{_sha(manifest_bytes)}  {MANIFEST}\n" + sums
        part = staging / "archive.part"
        fd = os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode=mode) as tar:  # type: ignore[call-overload]
                _add(tar, MANIFEST, manifest_bytes, 0o600, created)
                _add(tar, SUMS, sums.encode(), 0o600, created)
                _add_file(tar, DB_NAME, cap.db_file, db_size, 0o600, created)
                for name, (data, fmode) in sorted(cap.files.items()):
                    _add(tar, name, data, fmode, created)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(part, out)
    _fsync_dir(out.parent)
    return BackupResult(out, out.stat().st_size, manifest, attempts)


def rotate_name(now: float | None = None) -> str:
    stamp = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    return f"torpor-backup-{stamp:%Y%m%d-%H%M%S}.tar.gz"


def backup_rotating(cfg: gwconfig.GatewayConfig, folder: Path, keep: int,
                    *, now: float | None = None) -> BackupResult:
    """A backup named by its UTC date in `folder`; then only the newest `keep` of the
    folder's backups are kept (older ones deleted, only after the new one is complete)."""
    if keep < 1:
        raise BackupError("usage", "--keep: at least 1")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    result = backup(cfg, folder / rotate_name(now), now=now)
    ours = sorted((p for p in folder.iterdir() if ROTATE_PATTERN.fullmatch(p.name)),
                  key=lambda p: p.name, reverse=True)
    gone = tuple(ours[keep:])
    for old in gone:
        old.unlink(missing_ok=True)
    return BackupResult(result.path, result.size, result.manifest, result.attempts, gone)


# ---------------------------------------------------------------- restore

@dataclass(frozen=True, slots=True)
class _Member:
    path: Path  # where it was unpacked (in the staging folder)
    size: int
    sha256: str


def read_archive(path: Path, into: Path) -> tuple[dict[str, Any], dict[str, _Member]]:
    """Unpack `path` into the folder `into` (raw entry names below it), hashing as it goes,
    then verify: the manifest and its files against SHA256SUMS and each other. Returns the
    manifest and the files it lists; BackupError when anything is off."""
    path = Path(path)
    if not path.is_file():
        raise BackupError("missing", f"{path}: no such archive")
    members: dict[str, _Member] = {}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for n, info in enumerate(tar):
                if not info.isfile():
                    raise BackupError("corrupt", f"{path}: unexpected entry {info.name!r} "
                                      "(not a regular file)")
                name = info.name
                if name.startswith("/") or ".." in Path(name).parts or name in members:
                    raise BackupError("corrupt", f"{path}: refused entry name {name!r}")
                f = tar.extractfile(info)
                assert f is not None
                dest = into / f"{n:06d}"
                h = hashlib.sha256()
                size = 0
                fd = os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                with os.fdopen(fd, "wb") as out:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                if size != info.size:
                    raise BackupError("truncated", f"{path}: {name} is cut short")
                members[name] = _Member(dest, size, h.hexdigest())
    except BackupError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        # gzip/lzma/bz2 and tar framing errors of a damaged or cut file
        said = str(exc).lower()
        kind = "truncated" if isinstance(exc, EOFError) or "end of" in said else "corrupt"
        raise BackupError(kind, f"{path}: not a readable backup archive "
                          f"({kind}: {exc})") from None
    except Exception as exc:  # zlib.error, lzma.LZMAError: damaged compressed data
        raise BackupError("corrupt", f"{path}: damaged compressed data ({exc})") from None
    for needed in (MANIFEST, SUMS):
        if needed not in members:
            raise BackupError("missing", f"{path}: {needed} is missing: not a complete "
                              "Torpor gateway backup")
    sums = _parse_sums(path, members[SUMS].path.read_bytes())
    for name, digest in sums.items():
        if name not in members:
            raise BackupError("missing", f"{path}: {name} is listed in {SUMS} but missing")
        if members[name].sha256 != digest:
            raise BackupError("checksum", f"{path}: {name} does not match its SHA-256 in {SUMS}")
    try:
        manifest = json.loads(members[MANIFEST].path.read_bytes())
    except ValueError as exc:
        raise BackupError("corrupt", f"{path}: {MANIFEST} is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError("version", f"{path}: not a Torpor gateway backup (format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != MANIFEST_VERSION:
        raise BackupError("version", f"{path}: manifest version {manifest.get('version')!r} "
                          f"is unknown to this gateway (it reads version {MANIFEST_VERSION}); "
                          "restore it with the Torpor version that wrote it")
    listed: dict[str, dict[str, Any]] = {}
    entries = manifest.get("files")
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
        raise BackupError("corrupt", f"{path}: {MANIFEST} has no valid list of files")
    for entry in entries:
        listed[entry["name"]] = entry
    for name, entry in listed.items():
        held = members.get(name)
        if held is None:
            raise BackupError("missing", f"{path}: {name} is in the manifest but missing")
        if held.size != entry.get("size") or held.sha256 != entry.get("sha256"):
            raise BackupError("checksum", f"{path}: {name} does not match the manifest's "
                              "size and SHA-256")
        if sums.get(name) != entry.get("sha256"):
            raise BackupError("checksum", f"{path}: {name}: {SUMS} and the manifest disagree")
    extra = set(members) - set(listed) - {MANIFEST, SUMS}
    if extra:
        raise BackupError("corrupt", f"{path}: entries not in the manifest: {sorted(extra)}")
    if DB_NAME not in listed:
        raise BackupError("missing", f"{path}: the archive holds no database")
    return manifest, {name: members[name] for name in listed}


def _parse_sums(path: Path, data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise BackupError("corrupt", f"{path}: {SUMS} is not text") from None
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BackupError("corrupt", f"{path}: {SUMS}: bad line {line!r}")
        out[name] = digest
    return out


def restore(archive: Path, target: Path, *, force: bool = False) -> RestoreResult:
    """Verify `archive` and unpack it as the gateway folder `target` (database, pki/,
    gateway.toml pointing at it). Everything is written in a sibling temporary folder that
    is renamed into place once complete: a refused archive leaves nothing behind."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise BackupError("target", f"{target} exists and is not a folder")
    non_empty = target.is_dir() and any(target.iterdir())
    if non_empty and not force:
        raise BackupError("target", f"{target} is not empty: restore into a new folder, or "
                          "pass --force to move its content aside")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent))
    try:
        os.chmod(staging, 0o700)
        raw = staging / ".unpacked"
        raw.mkdir(mode=0o700)
        manifest, files = read_archive(archive, raw)
        for name, member in files.items():
            entry = next(e for e in manifest["files"] if e["name"] == name)
            mode = int(str(entry.get("mode", "0600")), 8) & 0o777
            if name == DB_NAME:
                dest = staging / "gateway.db"
                mode = 0o600
            elif name.startswith(PKI_PREFIX):
                dest = staging / "pki" / name[len(PKI_PREFIX):]
            elif name == CONFIG_NAME:
                dest = staging / "gateway.toml.orig"
                mode = 0o600
            elif name == RULES_NAME:
                dest = staging / "rules.toml"
                mode = 0o600
            else:
                continue
            _move(member.path, dest, mode, staging)
        problems = db.integrity_check(staging / "gateway.db")
        if problems:
            raise BackupError("integrity", f"{archive}: the database fails PRAGMA "
                              f"integrity_check: {'; '.join(problems[:5])}")
        original = (staging / "gateway.toml.orig").read_bytes() if CONFIG_NAME in files else None
        config_text = _restored_config(original, manifest, target,
                                       rules=RULES_NAME in files)
        shutil.rmtree(raw)
        _write(staging / "gateway.toml", config_text.encode(), 0o600, staging)
        # The configuration must load as the restored gateway will load it.
        gwconfig.parse_config(tomllib.loads(config_text), base=target, source="")
        replaced = None
        if target.exists():
            if non_empty:
                replaced = target.with_name(
                    f"{target.name}.replaced-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}")
                os.rename(target, replaced)
            else:
                target.rmdir()
        os.rename(staging, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RestoreResult(target, target / "gateway.toml", manifest, replaced)


def _restored_config(original: bytes | None, manifest: dict[str, Any], target: Path,
                     *, rules: bool = False) -> str:
    """The backed-up configuration with the data folder, database and PKI folder moved to
    `target`; file paths that pointed into the old PKI folder follow it; with `rules`, the
    rules file is the restored one beside it."""
    try:
        data: dict[str, Any] = tomllib.loads(original.decode()) if original else {}
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BackupError("corrupt", f"the archive's configuration is not valid TOML: {exc}") \
            from None
    old_pki = Path(str(manifest.get("source", {}).get("pki_dir", "")))
    new_pki = target / "pki"
    data.setdefault("gateway", {})
    data["gateway"]["data_dir"] = str(target)
    data["gateway"].pop("db", None)
    data.setdefault("broker", {})
    data["broker"]["pki_dir"] = str(new_pki)
    data["broker"].pop("config_dir", None)
    if rules and "file" in data.get("rules", {}):
        del data["rules"]["file"]  # default: rules.toml beside gateway.toml
    for section in ("mqtt", "web", "upstream"):
        for key, value in list(data.get(section, {}).items()):
            if isinstance(value, str) and value and old_pki.parts:
                with contextlib.suppress(ValueError):
                    rel = Path(value).relative_to(old_pki)
                    data[section][key] = str(new_pki / rel)
    head = (f"# Restored by `torpor gateway restore` from a backup made "
            f"{manifest.get('created', '?')}.\n")
    return head + gwconfig.dumps(data)


def _move(src: Path, dest: Path, mode: int, root: Path) -> None:
    from gateway.security.pki import private_dir

    private_dir(dest.parent, within=root)
    os.chmod(src, mode)
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.rename(src, dest)


def _write(dest: Path, data: bytes, mode: int, root: Path) -> None:
    from gateway.security.pki import private_dir

    private_dir(dest.parent, within=root)
    fd = os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(dest, mode)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")
