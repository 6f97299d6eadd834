"""The gateway's layers, read from its import statements and its calls.

    cli -> ops -> store / transport / security
    service -> pipeline -> store / transport
    web -> ops (and the store's read helpers)

Every package may import itself and the shared base (gateway.config, gateway.errors,
gateway.proto). Nothing in gateway/ imports tools/, only gateway/transport imports an MQTT
library, only gateway/store runs SQL, and only the commands print.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "gateway"

# child_process: how the supervisor's child processes (the relay, in pipeline; the web page,
# in web) start, stop and end with their gateway; neither layer may import the other's.
BASE = {"gateway.config", "gateway.errors", "gateway.proto", "gateway.child_process"}
# layer -> the layers its modules may import (besides itself and BASE).
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "store": set(),
    "security": {"store"},
    "transport": {"security"},
    "pipeline": {"store", "transport"},
    "ops": {"store", "transport", "security"},
    "web": {"ops", "store"},
    # The commands start the supervisor (`torpor gateway run`) and the web server
    # (`torpor gateway web`); everything else they do is an ops function.
    "cli": {"ops", "service", "web"},
    "service": {"pipeline", "store", "transport", "security", "ops", "web"},
}
# The one module below ops that ops and security use: events raised by an operator action
# (released, revoked) or a credential renewal go upstream formatted and queued like the
# pipeline's own, through the outbox.
SHARED_PIPELINE = {"gateway.pipeline.events"}
# What web may read from the store directly: read helpers and the types they return.
WEB_STORE_READS = {"gateway.store.db", "gateway.store.devices", "gateway.store.downlink_queue",
                   "gateway.store.readings"}
MQTT_LIBRARIES = {"paho", "aiomqtt", "gmqtt", "amqtt", "asyncio_mqtt", "hbmqtt"}
SQL_CALLS = {"execute", "executemany", "executescript"}
SQL_WORDS = ("SELECT ", "INSERT ", "UPDATE ", "DELETE ", "CREATE TABLE", "PRAGMA ", "SAVEPOINT ")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if module in BASE or len(parts) < 2:
        return "base"
    if parts[1] == "service":
        return "service"
    return parts[1] if parts[1] in ALLOWED else "base"


def _sources() -> list[tuple[str, ast.Module]]:
    return [(_module(p), ast.parse(p.read_text(), str(p)))
            for p in sorted(GATEWAY.rglob("*.py"))]


def _imports(module: str, tree: ast.Module) -> list[tuple[int, str]]:
    """Every module `module` imports, at any depth (lazy imports count too)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")[: -node.level or None]
                base = ".".join([*pkg, base] if base else pkg)
            # `from gateway.store import devices` imports gateway.store.devices.
            for a in node.names:
                out.append((node.lineno, f"{base}.{a.name}" if base in _PACKAGES else base))
    return out


_PACKAGES = {"gateway", *(f"gateway.{p.name}" for p in GATEWAY.iterdir() if p.is_dir()
                          and (p / "__init__.py").exists())}
SOURCES = _sources()


def _target(name: str) -> str | None:
    """The gateway module `name` names, or None outside the gateway."""
    if name != "gateway" and not name.startswith("gateway."):
        return None
    return name


def test_the_layers_are_packages() -> None:
    for layer in ("store", "transport", "pipeline", "security", "ops", "cli", "web"):
        assert (GATEWAY / layer / "__init__.py").exists(), layer
    flat = sorted(p.name for p in GATEWAY.glob("*.py"))
    assert flat == ["__init__.py", "child_process.py", "config.py", "errors.py", "proto.py",
                    "service.py"], flat


@pytest.mark.parametrize("module,tree", SOURCES, ids=[m for m, _ in SOURCES])
def test_imports_go_down_only(module: str, tree: ast.Module) -> None:
    layer = _layer(module)
    bad = []
    for line, name in _imports(module, tree):
        target = _target(name)
        if target is None or target in BASE or target == "gateway":
            continue
        to = _layer(target)
        if to in ("base", layer) or to in ALLOWED[layer]:
            if layer == "web" and to == "store" and target not in WEB_STORE_READS:
                bad.append(f"{line}: {name} (web reads the store only through {WEB_STORE_READS})")
            continue
        if to == "pipeline" and layer in ("ops", "security") and target in SHARED_PIPELINE:
            continue
        bad.append(f"{line}: {name} ({layer} -> {to})")
    assert not bad, f"{module} imports above or beside its layer:\n" + "\n".join(bad)


@pytest.mark.parametrize("module,tree", SOURCES, ids=[m for m, _ in SOURCES])
def test_nothing_in_the_gateway_imports_tools(module: str, tree: ast.Module) -> None:
    bad = [f"{line}: {name}" for line, name in _imports(module, tree)
           if name == "tools" or name.startswith("tools.")]
    assert not bad, f"{module} imports tools/:\n" + "\n".join(bad)


@pytest.mark.parametrize("module,tree", SOURCES, ids=[m for m, _ in SOURCES])
def test_only_the_transport_imports_an_mqtt_library(module: str, tree: ast.Module) -> None:
    if module.startswith("gateway.transport"):
        return
    bad = [f"{line}: {name}" for line, name in _imports(module, tree)
           if name.split(".")[0] in MQTT_LIBRARIES]
    assert not bad, f"{module} imports an MQTT library:\n" + "\n".join(bad)


@pytest.mark.parametrize("module,tree", SOURCES, ids=[m for m, _ in SOURCES])
def test_only_the_store_runs_sql(module: str, tree: ast.Module) -> None:
    if module.startswith("gateway.store"):
        return
    bad = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in SQL_CALLS):
            bad.append(f"{node.lineno}: .{node.func.attr}(...)")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.lstrip().startswith(SQL_WORDS)):
            bad.append(f"{node.lineno}: {node.value.strip()[:40]!r}")
    assert not bad, f"{module} runs SQL outside gateway/store:\n" + "\n".join(bad)


@pytest.mark.parametrize("module,tree", SOURCES, ids=[m for m, _ in SOURCES])
def test_only_the_commands_print(module: str, tree: ast.Module) -> None:
    """ops (and everything under them) return results; printing is the commands' job
    (gateway/cli and `torpor gateway web`'s own command)."""
    if _layer(module) == "cli" or module == "gateway.web.command":
        return
    bad = [f"{node.lineno}: print(...)" for node in ast.walk(tree)
           if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
           and node.func.id == "print"]
    assert not bad, f"{module} prints:\n" + "\n".join(bad)


def test_the_checks_see_a_violation() -> None:
    """The rules are not vacuous: a module written against them is caught."""
    tree = ast.parse("from gateway.store import devices\nimport aiomqtt\nimport tools.fw\n"
                     "conn.execute('SELECT 1')\n")
    names = [n for _, n in _imports("gateway.cli.example", tree)]
    assert "gateway.store.devices" in names and "aiomqtt" in names and "tools.fw" in names
    assert _layer("gateway.store.devices") not in ALLOWED["cli"]
    with pytest.raises(AssertionError):
        test_only_the_store_runs_sql("gateway.pipeline.example", tree)
