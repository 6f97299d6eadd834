"""Fixtures of the whole-stack tests: `stack` is tests.system.stack.Stack on the test's own
Mosquitto (external mode), with fast expiry sweeps; the gateway is stopped afterwards."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.fixtures.broker import RunningBroker
from tests.system.stack import Stack


@pytest.fixture
def stack(tmp_path: Path, broker: RunningBroker) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack", broker, downlink={"sweep_interval_s": 0.2})
    try:
        yield s
    finally:
        s.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    s = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(s, Stack):
        report.sections.append(("gateway log", s.log_text()[-20000:]))
        for node in s.nodes.values():
            report.sections.append((f"node {node.id} log", node.log_text()[-8000:]))
    return report
