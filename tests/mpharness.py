"""pytest plugin: runs MicroPython test modules inside the MicroPython unix port.

A file named `mptest_*.py` anywhere under tests/ is a MicroPython module. Each of its
`test_*` functions becomes one pytest item, run in a fresh `micropython` process with
firmware/, boards/ and tests/mp_support/ on its path. A failure shows MicroPython's own
traceback; `raise mpunit.SkipTest("reason")` becomes a pytest skip.

Module-level knobs read before running: `TIMEOUT = <seconds>` (default 120) and
`HEAPSIZE = "<n>K"` (the GC heap, default the port's 2 MB).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tools import venvbin

ROOT = Path(__file__).resolve().parent.parent
MP_PATH = [".frozen", str(ROOT / "firmware"), str(ROOT / "boards"), str(ROOT / "tests" / "mp_support")]
SKIP_MARK = "\x00MPTEST-SKIP:"


def micropython_binary() -> str | None:
    return venvbin.find("micropython")


def mp_env(extra_path: list[str] | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["MICROPYPATH"] = ":".join(MP_PATH + (extra_path or []))
    env.update(extra)
    return env


def run_micropython(
    code: str,
    *,
    cwd: Path | None = None,
    timeout: float = 120,
    heapsize: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `code` in the unix port with the firmware path set; used by CPython-side tests too."""
    binary = micropython_binary()
    if binary is None:
        pytest.skip("the MicroPython unix port (`micropython`) is not installed")
    argv = [binary]
    if heapsize:
        argv += ["-X", f"heapsize={heapsize}"]
    argv += ["-c", code]
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env or mp_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_LIST = """
import sys
import {mod} as m
for n in sorted(dir(m)):
    if n.startswith('test_') and callable(getattr(m, n)):
        print('T', n)
print('TIMEOUT', getattr(m, 'TIMEOUT', 120))
print('HEAPSIZE', getattr(m, 'HEAPSIZE', ''))
"""

_RUN = """
import sys
try:
    import {mod} as m
    f = getattr(m, {name!r})
    f()
except Exception as e:
    if type(e).__name__ == 'SkipTest':
        print({skip!r}, e.args[0] if e.args else '')
        sys.exit(0)
    sys.print_exception(e)
    sys.exit(1)
"""


class MicroPythonFile(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        mod = self.path.stem
        extra = [str(self.path.parent)]
        proc = run_micropython(_LIST.format(mod=mod), env=mp_env(extra), timeout=60)
        if proc.returncode != 0:
            raise pytest.Collector.CollectError(
                f"MicroPython could not import {self.path.name}:\n{proc.stdout}{proc.stderr}"
            )
        timeout, heapsize = 120.0, ""
        names: list[str] = []
        for line in proc.stdout.splitlines():
            key, _, value = line.partition(" ")
            if key == "T":
                names.append(value)
            elif key == "TIMEOUT":
                timeout = float(value)
            elif key == "HEAPSIZE":
                heapsize = value.strip()
        for name in names:
            yield MicroPythonItem.from_parent(
                self, name=name, mod=mod, extra=extra, timeout=timeout, heapsize=heapsize
            )


class MicroPythonItem(pytest.Item):
    def __init__(
        self, *, mod: str, extra: list[str], timeout: float, heapsize: str, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.mod = mod
        self.extra = extra
        self.timeout = timeout
        self.heapsize = heapsize or None
        self.add_marker(pytest.mark.micropython)

    def runtest(self) -> None:
        tmp = self.config._tmp_path_factory.mktemp(self.name)  # type: ignore[attr-defined]
        code = _RUN.format(mod=self.mod, name=self.name, skip=SKIP_MARK)
        proc = run_micropython(
            code,
            cwd=tmp,
            timeout=self.timeout,
            heapsize=self.heapsize,
            env=mp_env(self.extra, MPTEST_TMP=str(tmp), MPTEST_ROOT=str(ROOT)),
        )
        for line in proc.stdout.splitlines():
            if line.startswith(SKIP_MARK):
                pytest.skip(line[len(SKIP_MARK):].strip() or "skipped in MicroPython")
        if proc.returncode != 0:
            raise MicroPythonFailure(proc.stdout, proc.stderr)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, MicroPythonFailure):
            out, err = excinfo.value.args
            return f"MicroPython test {self.mod}.{self.name} failed:\n{out}{err}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"{self.mod}.{self.name} [micropython]"


class MicroPythonFailure(Exception):
    pass


def _is_mp(file_path: Path) -> bool:
    return file_path.suffix == ".py" and file_path.name.startswith("mptest_")


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Collector | None:
    # Files named on the command line reach pytest_pycollect_makemodule instead.
    if _is_mp(file_path) and not parent.session.isinitpath(file_path):
        return MicroPythonFile.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if _is_mp(module_path):
        return MicroPythonFile.from_parent(parent, path=module_path)
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "micropython: runs inside the MicroPython unix port")
