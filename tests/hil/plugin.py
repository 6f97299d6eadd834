"""pytest plugin: `pytest --hil-port PORT [--hil-board B]` runs the on-device suite on a board.

With the option, each module of the on-device suite (tools/hil.py, SUITE) that pytest collects
is collected from the board instead of the unix port: the suite is deployed to /hil once per
session, and each `test_*` function becomes one pytest item run there over the raw REPL
(through HilRunner). A failure shows the MicroPython traceback, a skip its reason; items are
marked `hil`, so `pytest --hil-port PORT -m hil` runs only them. Time and heap measured on the
board are printed after the run. Without the option nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNNER_KEY = pytest.StashKey["_Session"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hardware in the loop")
    group.addoption(
        "--hil-port", default=None, metavar="PORT",
        help="run the on-device suite on the MicroPython board on this serial port "
        "(/dev/ttyUSB0, /dev/ttyACM0, a virtual board's pty)",
    )
    group.addoption(
        "--hil-board", default=None, metavar="BOARD",
        help="the board expected on --hil-port (esp32, pico_w, sim, ...; default: detect)",
    )


class _Session:
    """The one connection to the board, opened (and the suite deployed) at first use."""

    def __init__(self, port: str, board: str | None) -> None:
        self.port = port
        self.board = board
        self.runner: Any = None
        self.error = ""
        self.current = ""  # module whose state the board's RAM holds
        self.tests: list[tuple[str, str]] | None = None
        self.results: list[Any] = []

    def get(self) -> Any:
        if self.runner is None and not self.error:
            from mpremote.transport import TransportError

            from tools.flash import FlashError
            from tools.hil import HilError, HilRunner

            try:
                runner = HilRunner(self.port, self.board)
            except FlashError as exc:
                self.error = str(exc)
            else:
                try:
                    runner.deploy()
                except (HilError, TransportError, OSError) as exc:
                    runner.close()
                    self.error = f"could not deploy the suite to {self.port}: {exc}"
                else:
                    self.runner = runner
        if self.runner is None:
            raise HilUsageError(self.error)
        return self.runner

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None


class HilUsageError(Exception):
    """The board could not be used (no board, not MicroPython, wrong board, lost REPL)."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "hil: runs on the board given with --hil-port")
    port = config.getoption("hil_port")
    if not port:
        return
    if getattr(config.option, "numprocesses", None):
        raise pytest.UsageError("--hil-port drives one serial port: run it without -n")
    config.stash[RUNNER_KEY] = _Session(port, config.getoption("hil_board"))


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(RUNNER_KEY, None)
    if session is not None:
        session.close()


def _suite() -> set[Path]:
    from tools.hil import SUITE

    return {(ROOT / rel).resolve() for rel in SUITE}


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Collector | None:
    if RUNNER_KEY in parent.config.stash and file_path.resolve() in _suite():
        return HilModule.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The suite's modules also run on the unix port (tests/mpharness.py); with a board
    # given, the board's run replaces that one.
    if RUNNER_KEY not in config.stash:
        return
    suite = _suite()
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        on_unix_port = item.get_closest_marker("micropython") is not None
        (drop if on_unix_port and item.path.resolve() in suite else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


class HilModule(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        from mpremote.transport import TransportError

        from tools.hil import HilError

        session = self.config.stash[RUNNER_KEY]
        rel = self.path.resolve().relative_to(ROOT).as_posix()
        try:
            runner = session.get()
            if session.tests is None:
                session.tests = runner.collect()
            names = [name for mod, name in session.tests if mod == rel]
        except (HilUsageError, HilError, TransportError) as exc:
            raise pytest.Collector.CollectError(f"{session.port}: {exc}") from exc
        for name in names:
            yield HilItem.from_parent(self, name=f"{name}[board]", rel=rel, func=name)


class HilItem(pytest.Item):
    def __init__(self, *, rel: str, func: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rel = rel
        self.func = func
        self.add_marker(pytest.mark.hil)

    def runtest(self) -> None:
        session = self.config.stash[RUNNER_KEY]
        runner = session.get()
        if session.current != self.rel:
            runner.fresh()  # a clean heap and fresh module state for each module
            session.current = self.rel
        result = runner.run(self.rel, self.func)
        session.results.append(result)
        self.user_properties += [
            ("board_ms", result.ms), ("mem_before", result.mem_before),
            ("mem_after", result.mem_after), ("mem_after_gc", result.mem_after_gc),
        ]
        if result.outcome == "skipped":
            # Reported at the test's own location, like a skip marker, not at this line.
            raise pytest.skip.Exception(
                result.detail or "skipped on the board", _use_item_location=True
            )
        if result.outcome == "failed":
            raise HilFailure(result.detail)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, HilFailure):
            return f"on the board: {self.rel}::{self.func}\n{excinfo.value.args[0]}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"{self.rel}::{self.func} [board]"


class HilFailure(Exception):
    pass


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = config.stash.get(RUNNER_KEY, None)
    if session is None or not session.results:
        return
    from tools.hil import summary_lines

    board = session.runner.machine if session.runner is not None else session.port
    terminalreporter.section(f"on the board: {board}")
    for line in summary_lines(session.results, 0.0)[:-1]:
        terminalreporter.write_line(line)
