"""The virtual board: a pseudo-terminal that behaves like a MicroPython board on USB serial.

Behind the pty runs a `micropython` child (the unix port) with the sim board: its root
filesystem is the node's littlefs flash image, `machine`, `board` and `os.uname()` look like a
device's, and it executes code sent by this process. The REPL protocol itself (friendly REPL,
raw REPL, raw-paste, Ctrl-C/Ctrl-D) is spoken here, so plain `mpremote connect <pty> ...`
works: a soft reset restarts the child (fresh RAM, same flash), a deep sleep is the port going
quiet for the interval and then a boot with cause TIMER.

Node directory layout:

    flash.img   the board's flash: littlefs, mounted at / on the board
    simfiles/   the sim board's own files (sim.json, state.json, rtc.bin, battery.json, ...),
                mounted at /.sim on the board
    agent.py    the child's program (rewritten at every start)
    board.log   everything the board printed on its port

`simfiles/sim.json` may hold `"identity": {"implementation": ..., "version": [1, 19, 1]}`:
what the board then claims to run (`sys.implementation`), read at every boot. It lets the
refusals of `torpor flash` be tried on a board that is really there.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import selectors
import signal
import subprocess
import tempfile
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Any

from gateway.proto import BootCause
from tools.sim.field import FieldModel, add_field_args, fields_from_args
from tools.sim.node import BOARDS_DIR, BoardModel, micropython_binary

log = logging.getLogger(__name__)

MACHINE = "Torpor virtual board (sim) with unix port"
BANNER_TAIL = "Type \"help()\" for more information.\r\n"
RAW_BANNER = b"raw REPL; CTRL-B to exit\r\n>"
SOFT_REBOOT = b"MPY: soft reboot\r\n"
PASTE_WINDOW = 512
# Input kept while the REPL cannot read it (a program runs, the board restarts or sleeps).
HELD_LIMIT = 4096
# Output kept for a reader that is not there, like a USB CDC buffer; older bytes are dropped.
OUT_LIMIT = 256 * 1024

# Boot causes: the protocol's boot_cause enum (the sim board module exports the same).
POWER_ON = int(BootCause.POWER_ON)
TIMER = int(BootCause.TIMER)
CRASH = int(BootCause.CRASH)
SOFT_RESET = int(BootCause.SOFT_RESET)
WATCHDOG = int(BootCause.WATCHDOG)
EXIT_DEEP_SLEEP = 75
EXIT_RESET = 76
EXIT_SOFT_RESET = 77

# The child's program. It runs on the unix port: it imports what it needs from the host,
# then swaps the root filesystem for the flash image so the board sees only its own flash.
AGENT = r'''
import sys, os, vfs, io, gc
import simflash, sim

NONCE = sys.argv[1].encode()
MACHINE = sys.argv[2]
NODE = sys.argv[3]
_stdout = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else sys.stdout
_stdin = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin


def token(kind):
    _stdout.write(b"\x00\x1bVB" + NONCE + kind)


with open(NODE + "/simfiles/sim.json") as f:
    import json
    cfg = json.load(f)
bdev = simflash.FileBlockDev(NODE + "/flash.img", cfg.get("block_size", 4096), cfg.get("block_count", 512))
if bdev.created:
    vfs.VfsLfs2.mkfs(bdev)
simdir = vfs.VfsPosix(NODE + "/simfiles")
vfs.umount("/")
try:
    vfs.mount(simflash.filesystem(bdev), "/")
except OSError:
    # A flash image that does not mount is formatted, as MicroPython's _boot.py does.
    vfs.VfsLfs2.mkfs(bdev)
    vfs.mount(simflash.filesystem(bdev), "/")
vfs.mount(simdir, "/.sim")
os.chdir("/")

_os = os


class _SimOs:
    # VfsPosix with a root mangles absolute paths in rename(); rename relative to the dir.
    def __getattr__(self, name):
        return getattr(_os, name)

    def rename(self, a, b):
        cwd = _os.getcwd()
        _os.chdir("/.sim")
        try:
            _os.rename(a.rsplit("/", 1)[-1], b.rsplit("/", 1)[-1])
        finally:
            _os.chdir(cwd)


class _Uname:
    sysname = "sim"
    nodename = "sim"
    release = "%d.%d.%d" % sys.implementation.version[:3]
    version = "v" + release + " on unix"
    machine = MACHINE

    def __getitem__(self, i):
        return (self.sysname, self.nodename, self.release, self.version, self.machine)[i]

    def __repr__(self):
        return "(sysname=%r, nodename=%r, release=%r, version=%r, machine=%r)" % (
            self.sysname, self.nodename, self.release, self.version, self.machine)


class _Os:
    def __getattr__(self, name):
        return getattr(_os, name)

    def uname(self):
        return _Uname()


class _Machine:
    PWRON_RESET = 1
    HARD_RESET = 2
    WDT_RESET = 3
    DEEPSLEEP_RESET = 4
    SOFT_RESET = 5

    def reset(self):
        sim.reset()

    def soft_reset(self):
        raise SystemExit(77)

    def deepsleep(self, ms=0):
        sim.deep_sleep(ms)

    def lightsleep(self, ms=0):
        import time
        time.sleep_ms(ms)

    def idle(self):
        pass

    def unique_id(self):
        return sim.unique_id()

    def freq(self, hz=None):
        return 240000000

    def reset_cause(self):
        c = sim.boot_cause()
        return {1: 4, 2: 3, 4: 5, 5: 2}.get(c, 1)

    def bootloader(self):
        sim.reset()


sim.os = _SimOs()
sim.configure("/.sim")
sim._bdev = bdev
sim.FS_ROOT = "/"
sim.init()
sys.modules["os"] = _Os()
_ident = cfg.get("identity")
if _ident:
    # sim.json may make the board claim another implementation or version: how a flasher's
    # refusals are tried against a board that is really there.
    _sys = sys

    class _Impl:
        name = _ident.get("implementation", _sys.implementation.name)
        version = tuple(_ident.get("version", _sys.implementation.version[:3])) + (0,)
        _machine = MACHINE

    class _IdentSys:
        implementation = _Impl()

        def __getattr__(self, name):
            return getattr(_sys, name)

    sys.modules["sys"] = _IdentSys()
sys.modules["machine"] = _Machine()
sys.modules["board"] = sim
sys.path[:] = ["", ".frozen", "/lib"]
g = {"__name__": "__main__"}
gc.collect()


def _read(n):
    # A Ctrl-C (SIGINT) that lands while the frame is read must not lose bytes of it: the
    # frame runs as interrupted instead.
    out = b""
    intr = False
    while len(out) < n:
        try:
            part = _stdin.read(n - len(out))
        except KeyboardInterrupt:
            intr = True
            continue
        if not part:
            raise SystemExit(0)
        out += part
    return out, intr


def _run(kind, body, intr):
    try:
        if intr:
            raise KeyboardInterrupt
        if kind == b"S":
            code = compile(body, "<stdin>", "single")
        elif kind == b"R":
            try:
                with open(body) as f:
                    src = f.read()
            except OSError:
                return
            code = compile(src, body, "exec")
        else:
            code = compile(body, "<stdin>", "exec")
        exec(code, g)
    except SystemExit as e:
        c = e.args[0] if e.args else 0
        if c in (75, 76, 77):
            raise
        token(b"E")
        sys.print_exception(e)
    except BaseException as e:
        token(b"E")
        sys.print_exception(e)


def _frame(kind, body, intr):
    # A Ctrl-C that lands outside the program (just before or after it) is the program's
    # KeyboardInterrupt all the same; the frame always ends with its D token.
    try:
        try:
            _run(kind, body, intr)
        except KeyboardInterrupt as e:
            token(b"E")
            sys.print_exception(e)
    except KeyboardInterrupt:
        pass  # a second Ctrl-C while the first is reported
    done = False
    while not done:
        try:
            token(b"D")
            done = True
        except KeyboardInterrupt:
            pass


token(b"R")
while True:
    try:
        head = _stdin.readline()
    except KeyboardInterrupt:
        continue  # nothing runs: a late Ctrl-C
    if not head:
        break
    kind, _, n = head.strip().partition(b" ")
    body, intr = _read(int(n))
    try:
        _frame(kind, body.decode(), intr)
    except SystemExit as e:
        sys.exit(e.args[0])
    except KeyboardInterrupt:
        pass  # after the D token: nothing runs any more
'''

TOKEN_LEN = 4 + 16 + 1

# Front-end modes
FRIENDLY, RAW, PASTE = "friendly", "raw", "paste"


class VirtualBoardError(Exception):
    """A virtual board set-up problem the user can fix."""


class VirtualBoard:
    """A MicroPython board on a pseudo-terminal, backed by the unix port and a sim node dir.

    `port` is the /dev/pts path to hand to mpremote. `time_scale` divides deep sleeps in
    real time. `heap` is the child's GC heap (an ESP32 without PSRAM has about 110 KB free).
    """

    def __init__(
        self,
        node_dir: str | os.PathLike[str] | None = None,
        *,
        seed: int | None = None,
        time_scale: float = 1.0,
        heap: str = "512K",
        block_count: int = 512,
        field: FieldModel | None = None,
    ) -> None:
        if node_dir is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
                prefix="torpor-vboard-"
            )
            node_dir = self._tmp.name
        else:
            self._tmp = None
        self.dir = Path(node_dir).resolve()
        self.time_scale = time_scale
        self.heap = heap
        self.binary = micropython_binary()
        self.dir.mkdir(parents=True, exist_ok=True)
        simdir = self.dir / "simfiles"
        simdir.mkdir(exist_ok=True)
        cfg_path = simdir / "sim.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            if seed is not None and cfg.get("seed") != seed:
                raise VirtualBoardError(
                    f"{self.dir} belongs to a board with seed {cfg.get('seed')}, not {seed}"
                )
            self.seed = int(cfg.get("seed", 1))
        else:
            self.seed = 1 if seed is None else seed
            model = BoardModel(seed=self.seed, block_count=block_count)
            cfg_path.write_text(json.dumps(model.to_json()))
        self.field = field
        self._rtc_offset_ms: int | None = None  # node RTC minus true time (profile boards)
        if field is not None:
            cfg = json.loads(cfg_path.read_text())
            cfg.update(field.sim_json(self.seed))
            cfg_path.write_text(json.dumps(cfg))
            if field.profile.heap_for_unix_port():
                # The agent and REPL plumbing are the sim's own; the 512K default covers them.
                self.heap = str(field.profile.heap_for_unix_port() + 64 * 1024)
        self._wdt_deadline: float | None = None
        self._wdt_ms = 0
        self.nonce = secrets.token_hex(8).encode()
        self._master = -1
        self._slave = -1
        self.port = ""
        self._child: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._lock = threading.Lock()
        # front-end state (only touched by the I/O thread)
        self.mode = FRIENDLY
        self._busy = False  # the child is executing a frame
        self._booting = False  # boot.py / main.py of this boot are being run
        self._ready = False
        self._pending: list[tuple[bytes, bytes]] = []  # frames waiting for the child
        self._current = b""  # kind of the frame in progress
        self._exc = False
        self._line = bytearray()
        self._held = bytearray()
        self._cont: list[str] = []
        self._raw = bytearray()
        self._paste_count = 0
        self._cbuf = bytearray()
        self._out = bytearray()
        self._sleep_until: float | None = None
        self._wake_cause = TIMER
        self._sleep_ms = 0
        self._cause = POWER_ON
        self._after_boot = FRIENDLY
        self._interrupted = False
        self._vt_offset_ms = 0
        self._log: Any = None
        self.boots = 0
        self.sleeps = 0

    # ---- lifecycle ----

    def start(self) -> VirtualBoard:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        attrs = termios.tcgetattr(self._slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(self._slave, termios.TCSANOW, attrs)
        os.set_blocking(self._master, False)
        self.port = os.ttyname(self._slave)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._log = open(self.dir / "board.log", "ab")
        (self.dir / "agent.py").write_text(AGENT)
        self._boot(POWER_ON, run_main=True, soft=False)
        self._thread = threading.Thread(target=self._loop, name="vboard", daemon=True)
        self._thread.start()
        log.info("virtual board on %s (dir %s)", self.port, self.dir)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._kill_child()
        for fd in (self._master, self._slave, self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._master = self._slave = self._wake_r = self._wake_w = -1
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> VirtualBoard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- child process ----

    def _kill_child(self) -> None:
        child = self._child
        self._child = None
        if child is None:
            return
        if child.poll() is None:
            child.kill()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (child.stdin, child.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass

    def _write_state(self, cause: int) -> None:
        state: dict[str, Any] = {
            "vt_ms": int(time.time() * 1000) + self._vt_offset_ms,
            "cause": cause,
            "runs": self.boots,
        }
        cold = self.field.profile.cold_boot_ms if self.field is not None else None
        if cold is not None:
            if cause == POWER_ON or self._rtc_offset_ms is None:
                self._rtc_offset_ms = cold - state["vt_ms"]  # the RTC starts cold
            state["rtc_ms"] = state["vt_ms"] + self._rtc_offset_ms
        tmp = self.dir / "simfiles" / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.dir / "simfiles" / "state.json")

    def _boot(self, cause: int, *, run_main: bool, soft: bool) -> None:
        """Start a fresh child (RAM lost); run boot.py and, in friendly mode, main.py."""
        self._kill_child()
        self._wdt_deadline = None
        self._wdt_ms = 0
        if cause in (POWER_ON,):
            for name in ("rtc.bin", "clock.json"):
                (self.dir / "simfiles" / name).unlink(missing_ok=True)
        self._write_state(cause)
        self.boots += 1
        self._cause = cause
        env = dict(os.environ)
        env["MICROPYPATH"] = ":".join([".frozen", str(BOARDS_DIR)])
        env["TORPOR_SIM_DIR"] = str(self.dir / "simfiles")
        argv = [self.binary]
        if self.heap:
            argv += ["-X", f"heapsize={self.heap}"]
        argv += [str(self.dir / "agent.py"), self.nonce.decode(), MACHINE, str(self.dir)]
        self._child = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            env=env,
            start_new_session=True,
        )
        assert self._child.stdout is not None
        os.set_blocking(self._child.stdout.fileno(), False)
        self._ready = False
        self._busy = False
        self._booting = True
        self._exc = False
        self._cbuf.clear()
        self._pending = [(b"R", b"boot.py")]
        if run_main:
            self._pending.append((b"R", b"main.py"))
        self._pending.append((b"B", b""))  # end of boot: show the prompt
        self._interrupted = False
        if soft:
            self._emit(SOFT_REBOOT)

    def _send_next(self) -> None:
        child = self._child
        if child is None or not self._ready or self._busy or not self._pending:
            return
        kind, body = self._pending.pop(0)
        if kind == b"B":
            self._booting = False
            self._interrupted = False  # the REPL is up: a Ctrl-C got what it asked for
            self._prompt()
            self._replay_held()
            return
        if kind == b"R" and body == b"main.py" and self._interrupted:
            self._send_next()
            return
        self._busy = True
        self._current = kind
        self._exc = False
        assert child.stdin is not None
        try:
            child.stdin.write(kind + b" %d\n" % len(body) + body)
            child.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the exit is seen on stdout

    def _exec(self, kind: bytes, body: bytes) -> None:
        self._pending.append((kind, body))
        self._send_next()

    # ---- output ----

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        if self._log is not None:
            self._log.write(data)
            self._log.flush()
        self._out += data
        if len(self._out) > OUT_LIMIT:
            del self._out[: len(self._out) - OUT_LIMIT]
        self._flush_out()

    def _flush_out(self) -> None:
        while self._out:
            try:
                n = os.write(self._master, self._out)
            except BlockingIOError:
                # Nobody reads the port: keep the newest OUT_LIMIT bytes (see _emit).
                return
            except OSError:
                return
            del self._out[:n]

    def _cooked(self, data: bytes) -> bytes:
        return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    def _prompt(self) -> None:
        if self.mode == FRIENDLY:
            self._emit(self._banner() + b">>> ")
        else:
            self._emit(RAW_BANNER)

    def _banner(self) -> bytes:
        return (
            f"MicroPython v1.29.0 on unix; {MACHINE}\r\n{BANNER_TAIL}".encode()
        )

    def _child_output(self, data: bytes) -> None:
        self._cbuf += data
        buf = self._cbuf
        while buf:
            i = buf.find(b"\x00")
            if i < 0:
                self._emit(self._cooked(bytes(buf)))
                buf.clear()
                break
            if i:
                self._emit(self._cooked(bytes(buf[:i])))
                del buf[:i]
            # buf starts with NUL: a token, a sim control line, or plain output
            if buf.startswith(b"\x00\x1bVB"):
                if len(buf) < TOKEN_LEN:
                    break
                if buf[4:20] == self.nonce:
                    kind = bytes(buf[20:21])
                    del buf[:TOKEN_LEN]
                    self._token(kind)
                    continue
            elif buf.startswith(b"\x00sim:"):
                j = buf.find(b"\n")
                if j < 0:
                    break
                self._control(bytes(buf[5:j]).decode("ascii", "replace").strip())
                del buf[: j + 1]
                continue
            elif len(buf) < 5 and (b"\x00sim:".startswith(bytes(buf)) or b"\x00\x1bVB".startswith(bytes(buf))):
                break
            self._emit(b"\x00")
            del buf[:1]

    def _control(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        if verb == "sleep":
            self._sleep_ms = max(int(arg or 0), 0)
            self._wdt_deadline = None  # deep sleep stops the chip's watchdog
        elif verb == "wdt":
            self._wdt_ms = max(int(arg or 0), 1)
            self._wdt_deadline = time.monotonic() + self._wdt_ms / 1000.0
        elif verb == "feed" and self._wdt_ms:
            self._wdt_deadline = time.monotonic() + self._wdt_ms / 1000.0

    def _token(self, kind: bytes) -> None:
        if kind == b"R":
            self._ready = True
            self._send_next()
            return
        raw = self.mode != FRIENDLY and not self._booting and self._current == b"X"
        if kind == b"E":
            if raw and not self._exc:
                self._emit(b"\x04")
            self._exc = True
            return
        if kind == b"D":
            self._busy = False
            if raw:
                self._emit(b"\x04" if self._exc else b"\x04\x04")
                self._emit(b">")
            elif self._current == b"S":
                self._emit(b">>> ")
            if not self._booting:
                self._interrupted = False  # the program it was meant for has ended
            self._send_next()
            self._replay_held()

    def _child_exited(self) -> None:
        child = self._child
        rc = child.poll() if child is not None else None
        ready = self._ready
        self._kill_child()
        self._busy = False
        self._ready = False
        if not ready:
            # Died before it could run anything: a boot loop; retry slowly, as a chip would.
            log.warning("virtual board child exited during start (rc %s)", rc)
            self._wake_cause, self._sleep_until = CRASH, time.monotonic() + 2.0
            return
        if rc == EXIT_DEEP_SLEEP and self._interrupted:
            # Ctrl-C came while this wake was ending: it wakes the board into the REPL at
            # once, as a Ctrl-C during the sleep does (a busy main.py would never let it in).
            self.sleeps += 1
            self.mode = FRIENDLY
            self._boot(TIMER, run_main=False, soft=False)
            return
        if rc == EXIT_DEEP_SLEEP:
            self.sleeps += 1
            delay = self._sleep_ms / 1000.0 / self.time_scale if self.time_scale > 0 else 0.0
            self._vt_offset_ms += self._sleep_ms - int(delay * 1000)
            if self._rtc_offset_ms is not None and self.field is not None:
                # The RTC counted the sleep at its own rate: fast or slow by the drift.
                drift = self.field.drift_ppm(self.seed)
                self._rtc_offset_ms += int(self._sleep_ms * drift / 1e6)
            self._wake_cause, self._sleep_until = TIMER, time.monotonic() + delay
            return
        # A Ctrl-C that came too late to interrupt the program keeps main.py from running
        # after the restart, so the REPL it was typed for answers.
        run_main = not self._interrupted
        if rc == EXIT_SOFT_RESET:
            self._boot(SOFT_RESET, run_main=run_main and self.mode == FRIENDLY, soft=True)
            return
        # machine.reset(), a crash or a kill: a hard reset, the REPL starts over friendly.
        cause = SOFT_RESET if rc == EXIT_RESET else CRASH
        self.mode = FRIENDLY
        self._boot(cause, run_main=run_main, soft=False)

    # ---- input ----

    def _input(self, data: bytes) -> None:
        for b in data:
            self._byte(b)

    def _replay_held(self) -> None:
        """Hand what was typed while the REPL could not read to the REPL, once it can."""
        if not self._held or self._busy or self._booting or self._sleep_until is not None:
            return
        held = bytes(self._held)
        self._held.clear()
        # Bytes that make the board busy again are held again, in order, by _byte.
        self._input(held)

    def _interrupt(self) -> None:
        if self._sleep_until is not None:
            # Ctrl-C while asleep: the board wakes into the REPL without running main.py.
            self._sleep_until = None
            self.mode = FRIENDLY
            self._boot(TIMER, run_main=False, soft=False)
            return
        # Remembered until the REPL is up: a Ctrl-C whose SIGINT lands too late (the program
        # was already ending, or the child was not running code yet) still skips main.py.
        self._interrupted = True
        child = self._child
        if self._busy and child is not None and child.poll() is None:
            child.send_signal(signal.SIGINT)

    def _soft_reset(self) -> None:
        self._boot(SOFT_RESET, run_main=self.mode == FRIENDLY, soft=True)

    def _byte(self, b: int) -> None:
        if self.mode == PASTE:
            self._paste_byte(b)
            return
        if b == 0x03:
            self._raw.clear()
            self._line.clear()
            self._cont.clear()
            if self._busy or self._booting or self._sleep_until is not None:
                self._interrupt()
            elif self.mode == FRIENDLY:
                self._emit(b"\r\n>>> ")
            return
        if self._busy or self._booting or self._sleep_until is not None:
            # Typed while a program runs or the board restarts: handled once the REPL reads
            # again, as from a UART's receive FIFO (only Ctrl-C acts at once).
            if len(self._held) < HELD_LIMIT:
                self._held.append(b)
            return
        if self.mode == RAW:
            self._raw_byte(b)
        else:
            self._friendly_byte(b)

    def _raw_byte(self, b: int) -> None:
        if bytes(self._raw) in (b"\x05", b"\x05A"):
            self._raw.append(b)
            if self._raw == b"\x05A\x01":
                # raw-paste request: accept, announce the window size
                self._raw.clear()
                self.mode = PASTE
                self._paste_count = 0
                self._emit(b"R\x01" + PASTE_WINDOW.to_bytes(2, "little"))
            return
        if b == 0x01:
            self._raw.clear()
            self._emit(RAW_BANNER)
        elif b == 0x02:
            self._raw.clear()
            self.mode = FRIENDLY
            self._emit(b"\r\n" + self._banner() + b">>> ")
        elif b == 0x04:
            if not self._raw:
                self._soft_reset()
                return
            code = bytes(self._raw)
            self._raw.clear()
            self._emit(b"OK")
            self._exec(b"X", code)
        else:
            self._raw.append(b)

    def _paste_byte(self, b: int) -> None:
        if b == 0x04:
            code = bytes(self._raw)
            self._raw.clear()
            self.mode = RAW
            self._emit(b"\x04")
            self._exec(b"X", code)
            return
        if b == 0x03:
            self._raw.clear()
            self.mode = RAW
            self._emit(b"\x04")
            return
        self._raw.append(b)
        self._paste_count += 1
        if self._paste_count >= PASTE_WINDOW:
            self._paste_count -= PASTE_WINDOW
            self._emit(b"\x01")

    def _friendly_byte(self, b: int) -> None:
        if b == 0x01:
            self._line.clear()
            self._cont.clear()
            self.mode = RAW
            self._raw.clear()
            self._emit(b"\r\n" + RAW_BANNER)
        elif b == 0x02:
            self._line.clear()
            self._emit(b"\r\n" + self._banner() + b">>> ")
        elif b == 0x04:
            if not self._line and not self._cont:
                self._emit(b"\r\n")
                self._soft_reset()
        elif b in (0x08, 0x7F):
            if self._line:
                self._line.pop()
                self._emit(b"\x08 \x08")
        elif b == 0x0D:
            line = self._line.decode("utf-8", "replace")
            self._line.clear()
            self._emit(b"\r\n")
            if self._cont or line.rstrip().endswith(":"):
                if line.strip() or not self._cont:
                    self._cont.append(line)
                    self._emit(b"... ")
                    return
                src = "\n".join(self._cont) + "\n"
                self._cont.clear()
                self._exec(b"S", src.encode())
                return
            if not line.strip():
                self._emit(b">>> ")
                return
            self._exec(b"S", line.encode())
        elif b == 0x0A:
            pass
        elif b >= 0x20:
            self._line.append(b)
            self._emit(bytes([b]))

    # ---- the I/O loop ----

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._master, selectors.EVENT_READ, "pty")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        registered: Any = None
        try:
            while not self._stop.is_set():
                child = self._child
                out = child.stdout if child is not None else None
                if out is not registered:
                    if registered is not None:
                        try:
                            sel.unregister(registered)
                        except (KeyError, ValueError):
                            pass
                    if out is not None:
                        sel.register(out, selectors.EVENT_READ, "child")
                    registered = out
                timeout = 0.2 if self._out else 1.0
                if self._sleep_until is not None:
                    timeout = min(timeout, max(self._sleep_until - time.monotonic(), 0.0))
                if self._wdt_deadline is not None:
                    timeout = min(timeout, max(self._wdt_deadline - time.monotonic(), 0.0))
                for key, _ in sel.select(timeout):
                    if key.data == "pty":
                        try:
                            data = os.read(self._master, 4096)
                        except BlockingIOError:
                            data = b""
                        except OSError as exc:
                            if exc.errno != errno.EIO:
                                raise
                            data = b""
                        if data:
                            self._input(data)
                    elif key.data == "child":
                        try:
                            data = os.read(key.fd, 65536)
                        except BlockingIOError:
                            continue
                        if data:
                            self._child_output(data)
                        else:
                            sel.unregister(key.fileobj)
                            registered = None
                            if child is not None:
                                try:
                                    child.wait(timeout=5)
                                except subprocess.TimeoutExpired:
                                    child.kill()
                            self._child_exited()
                    else:
                        try:
                            os.read(self._wake_r, 64)
                        except BlockingIOError:
                            pass
                if self._wdt_deadline is not None and time.monotonic() >= self._wdt_deadline:
                    # Not fed in time: the chip resets, as after a hard reset but with
                    # cause WATCHDOG; RAM is lost, RTC memory and flash are kept.
                    log.info("virtual board: watchdog reset")
                    self.mode = FRIENDLY
                    self._boot(WATCHDOG, run_main=True, soft=False)
                if self._sleep_until is not None and time.monotonic() >= self._sleep_until:
                    self._sleep_until = None
                    self.mode = FRIENDLY
                    self._boot(self._wake_cause, run_main=True, soft=False)
                self._flush_out()
        except Exception:  # the board must not die silently: log and let stop() clean up
            log.exception("virtual board I/O loop failed")
        finally:
            sel.close()


def register(actions: Any) -> None:
    """Register `torpor sim board`."""
    p = actions.add_parser(
        "board",
        help="a virtual MicroPython board on a pseudo-terminal (for mpremote and torpor flash)",
        description=(
            "Serve a virtual MicroPython board on a pty until interrupted: the sim board on the "
            "unix port, with the node's littlefs flash as its filesystem. Use the printed "
            "/dev/pts path with mpremote, `torpor flash` or `torpor hil`."
        ),
    )
    p.add_argument("--pty", action="store_true", required=True, help="serve on a pseudo-terminal")
    p.add_argument("--dir", default=None, help="node directory (flash image, sim files); default a temp dir")
    p.add_argument("--seed", type=int, default=None, help="node seed (sensors, identity)")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="divide deep sleeps by this in real time (default 1)"
    )
    p.add_argument("--heap", default="512K", help="MicroPython heap size (default 512K)")
    p.add_argument("--link", default=None, help="also make this symlink to the pty (e.g. ./board.tty)")
    add_field_args(p)
    p.set_defaults(func=_board_cmd)


def _board_cmd(args: Any) -> int:
    from tools.cli import CliError
    from tools.sim.node import SimError
    from tools.sim.profiles import ProfileError

    try:
        field = fields_from_args(args, int(time.time() * 1000))[0]
        board = VirtualBoard(args.dir, seed=args.seed, time_scale=args.time_scale, heap=args.heap,
                             field=field)
        board.start()
    except (SimError, VirtualBoardError, ProfileError) as exc:
        raise CliError(str(exc)) from exc
    link = Path(args.link) if args.link else None
    if link is not None:
        link.unlink(missing_ok=True)
        link.symlink_to(board.port)
    print(f"virtual board on {board.port} (dir {board.dir}); Ctrl-C to stop", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        board.stop()
        if link is not None:
            link.unlink(missing_ok=True)
    return 0
