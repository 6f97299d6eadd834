"""Fixtures of the whole-stack tests: `stack` is tests.system.stack.Stack on the test's own
Mosquitto (external mode), `supervised_stack` one whose gateway starts its own Mosquitto;
both sweep expired items every 0.2 s, and the gateway is stopped afterwards. A failing test
shows the gateway's and the nodes' logs."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.transport.broker import find_mosquitto
from tests.fixtures.broker import RunningBroker
from tests.system.stack import Stack


@pytest.fixture
def stack(tmp_path: Path, broker: RunningBroker) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack", broker, downlink={"sweep_interval_s": 0.2})
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def supervised_stack(tmp_path: Path) -> Iterator[Stack]:
    try:
        find_mosquitto()
    except GatewayError as exc:
        pytest.skip(f"mosquitto is not installed: {exc}")
    s = Stack(tmp_path / "stack", None, downlink={"sweep_interval_s": 0.2})
    try:
        yield s
    finally:
        s.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    stacks = [s for s in getattr(item, "funcargs", {}).values() if isinstance(s, Stack)]
    for s in stacks if report.failed else []:
        report.sections.append(("gateway log", s.log_text()[-20000:]))
        for node in s.nodes.values():
            report.sections.append((f"node {node.id} log", node.log_text()[-8000:]))
    return report
