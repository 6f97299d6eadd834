"""`torpor hil`: run the on-device test suite on a board over its serial port.

The suite is MicroPython test modules (tests/hil/ plus the tests/firmware and tests/protocol
modules that run on a device). The runner copies them and the firmware modules they import
to /hil on the board, runs each `test_*` function there over the raw REPL, and reports each
one like pytest does (pass, fail with the MicroPython traceback, skip with its reason) with
the time (ticks_ms) and heap (gc.mem_free before/after) measured on the target.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import hashlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.flash import BOARDS, ROOT, Board, FlashError, _mpy_cross

# Test modules run on the board, in this order.
SUITE: tuple[str, ...] = (
    "tests/hil/mptest_board_api.py",
    "tests/firmware/mptest_harness.py",
    "tests/protocol/mptest_codec.py",
    "tests/firmware/mptest_ed25519.py",
)
# Modules the suite imports: compiled with mpy-cross for real boards.
MODULES: tuple[str, ...] = (
    "tests/mp_support/mpunit.py",
    "firmware/proto.py",
    "firmware/sha512.py",
    "firmware/ed25519.py",
)
# Data files the tests read relative to their working directory (/hil).
DATA: tuple[str, ...] = (
    "tests/firmware/vectors/rfc8032.txt",
    "firmware/sha512.py",
    "firmware/ed25519.py",
)
REMOTE = "/hil"
MARK = "\x00HIL "

_LIST = """
import sys
if {remote!r} not in sys.path:
    sys.path.insert(0, {remote!r})
import {mod} as _m
print({mark!r} + repr([n for n in dir(_m) if n.startswith('test_')]))
"""

_RUN = """
import sys, gc, time, io, os
os.chdir({remote!r})
import {mod} as _m
gc.collect()
_m0 = gc.mem_free()
_t0 = time.ticks_ms()
_r = 'passed'
_d = ''
try:
    getattr(_m, {name!r})()
except Exception as _e:
    if type(_e).__name__ == 'SkipTest':
        _r = 'skipped'
        _d = _e.args[0] if _e.args else ''
    else:
        _r = 'failed'
        _s = io.StringIO()
        sys.print_exception(_e, _s)
        _d = _s.getvalue()
_ms = time.ticks_diff(time.ticks_ms(), _t0)
_m1 = gc.mem_free()
gc.collect()
print({mark!r} + repr((_r, _ms, _m0, _m1, gc.mem_free(), _d)))
"""


@dataclass(frozen=True, slots=True)
class HilResult:
    module: str  # repository path of the test module
    name: str
    outcome: str  # passed, failed, skipped
    ms: int
    mem_before: int
    mem_after: int  # right after the test, before a collection
    mem_after_gc: int
    detail: str  # traceback or skip reason

    @property
    def nodeid(self) -> str:
        return f"{self.module}::{self.name}"


class HilError(Exception):
    """The board could not run the suite (deployment failed, lost the REPL)."""


def _parse(out: bytes) -> Any:
    text = out.decode("utf-8", "replace")
    i = text.rfind(MARK)
    if i < 0:
        raise HilError(f"no result from the board; it printed:\n{text}")
    return ast.literal_eval(text[i + len(MARK):].strip())


class HilRunner:
    """Deploys the suite to the board on `port` and runs its tests one by one."""

    def __init__(self, port: str, board: str | None = None, *, timeout: float = 300.0) -> None:
        self.port = port
        self.timeout = timeout
        self.b = Board(port)
        info = self.b.info()
        self.board = board or info.board
        if self.board is None:
            self.b.close()
            raise FlashError(f"unknown board {info.machine!r}; pass --board", 5)
        if board is not None and info.board is not None and info.board != board:
            self.b.close()
            raise FlashError(f"the board on the port is {info.board}, not {board}", 5)
        self.machine = info.machine

    def close(self) -> None:
        self.b.close()

    def __enter__(self) -> HilRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def deploy(self) -> int:
        """Copy the suite to /hil; files already there with the same SHA-256 are skipped."""
        march = BOARDS[self.board or "sim"]
        files: list[tuple[str, bytes]] = []
        for rel in SUITE + MODULES:
            src = ROOT / rel
            if march and rel in MODULES:
                files.append((f"{REMOTE}/{src.stem}.mpy", _mpy_cross(src, march)))
            else:
                files.append((f"{REMOTE}/{src.name}", src.read_bytes()))
        for rel in DATA:
            files.append((f"{REMOTE}/{rel}", (ROOT / rel).read_bytes()))
        written = 0
        for remote, data in files:
            try:
                same = self.b.sha256(remote) == hashlib.sha256(data).digest()
            except Exception:
                same = False
            if not same:
                self.b.write(remote, data)
                written += 1
        return written

    def collect(self, keyword: str | None = None) -> list[tuple[str, str]]:
        tests: list[tuple[str, str]] = []
        for rel in SUITE:
            mod = Path(rel).stem
            names = _parse(self.b.exec(_LIST.format(remote=REMOTE, mod=mod, mark=MARK), timeout=60))
            for name in sorted(names):
                if keyword_matches(keyword, f"{rel}::{name}"):
                    tests.append((rel, name))
        return tests

    def run(self, rel: str, name: str) -> HilResult:
        mod = Path(rel).stem
        code = f"import sys\nif {REMOTE!r} not in sys.path:\n sys.path.insert(0, {REMOTE!r})\n"
        code += _RUN.format(remote=REMOTE, mod=mod, name=name, mark=MARK)
        out = self.b.exec(code, timeout=self.timeout)
        outcome, ms, m0, m1, m2, detail = _parse(out)
        return HilResult(rel, name, outcome, int(ms), int(m0), int(m1), int(m2), str(detail))

    def fresh(self) -> None:
        """Soft reset: a clean heap and fresh module state for the next module."""
        self.b.t.enter_raw_repl(soft_reset=True)


def keyword_matches(expr: str | None, nodeid: str) -> bool:
    """A small `-k`: words joined by `and`/`or`/`not`, each a case-insensitive substring."""
    if not expr:
        return True
    words = re.findall(r"\(|\)|[^\s()]+", expr)
    py: list[str] = []
    for w in words:
        if w in ("and", "or", "not", "(", ")"):
            py.append(w)
        else:
            py.append(repr(fnmatch.fnmatch(nodeid.lower(), f"*{w.lower()}*")))
    try:
        return bool(eval(" ".join(py), {"__builtins__": {}}))  # noqa: S307 - only True/False/and/or/not
    except SyntaxError:
        raise FlashError(f"bad -k expression {expr!r}") from None


def summary_lines(results: list[HilResult], wall_s: float) -> list[str]:
    # The test column is as wide as the longest id: an id cut short names no test.
    w = max([len("test"), *(len(r.nodeid) for r in results)])
    lines = [f"{'test':{w}} {'result':8} {'ms':>7} {'mem before':>11} {'mem delta':>10} {'leak':>6}"]
    for r in results:
        lines.append(
            f"{r.nodeid:{w}} {r.outcome:8} {r.ms:7d} {r.mem_before:11d} "
            f"{r.mem_before - r.mem_after:10d} {r.mem_before - r.mem_after_gc:6d}"
        )
    counts = {k: sum(1 for r in results if r.outcome == k) for k in ("passed", "failed", "skipped")}
    parts = [f"{v} {k}" for k, v in counts.items() if v]
    lines.append(f"{'=' * 20} {', '.join(parts) or 'no tests ran'} in {wall_s:.2f}s {'=' * 20}")
    return lines


def run_suite(port: str, board: str | None, keyword: str | None, verbose: bool = True) -> tuple[list[HilResult], float]:
    t0 = time.monotonic()
    results: list[HilResult] = []
    with HilRunner(port, board) as runner:
        print(f"board: {runner.machine} ({runner.board}) on {port}")
        n = runner.deploy()
        print(f"deployed the suite to {REMOTE} ({n} files changed)")
        tests = runner.collect(keyword)
        print(f"collected {len(tests)} items")
        last_mod = ""
        for rel, name in tests:
            if rel != last_mod:
                runner.fresh()
                last_mod = rel
            r = runner.run(rel, name)
            results.append(r)
            word = r.outcome.upper()
            extra = f" ({r.detail})" if r.outcome == "skipped" else ""
            print(f"{r.nodeid} {word}{extra} [{r.ms} ms]", flush=True)
    failures = [r for r in results if r.outcome == "failed"]
    if failures:
        print(f"{'=' * 30} FAILURES {'=' * 30}")
        for r in failures:
            print(f"{'_' * 10} {r.nodeid} {'_' * 10}")
            print(r.detail.rstrip())
    return results, time.monotonic() - t0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "hil",
        help="run the on-device test suite on a board (hardware in the loop)",
        description=(
            "Deploy the on-device suite to /hil on the board at PORT, run every test there over "
            "the raw REPL and report each like pytest, with time and heap measured on the "
            "board. Exit code 0 all passed or skipped, 1 a test failed, 2+ the board could "
            "not be used (see `torpor flash` exit codes)."
        ),
    )
    p.add_argument("--port", required=True, help="serial port of the board (or a virtual board's pty)")
    p.add_argument("--board", default=None, choices=sorted(BOARDS), help="expected board (default: detect)")
    p.add_argument("-k", dest="keyword", default=None, help="only tests whose id matches (pytest -k style)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from mpremote.transport import TransportError

    try:
        results, wall = run_suite(args.port, args.board, args.keyword)
    except FlashError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return exc.code
    except (HilError, TransportError) as exc:
        print(f"torpor: error: the board stopped answering: {exc}", file=sys.stderr)
        return 2
    for line in summary_lines(results, wall):
        print(line)
    return 1 if any(r.outcome == "failed" for r in results) else 0
