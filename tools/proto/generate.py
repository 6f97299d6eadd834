"""Write, or compare against, every file generated from the protocol spec."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tools.proto import gen_docs, gen_micropython, gen_python
from tools.proto.spec import ROOT, Spec, load

TARGETS: dict[str, Callable[[Spec], str]] = {
    "firmware/proto.py": gen_micropython.generate,
    "firmware/wire.py": gen_micropython.generate_wire,
    "firmware/bootwire.py": gen_micropython.generate_bootwire,
    "boards/_boot_cause.py": gen_micropython.generate_boot_cause,
    "firmware/op_args.py": gen_micropython.generate_op_args,
    "gateway/proto.py": gen_python.generate,
    "docs/protocol.md": gen_docs.generate,
}


def render(root: Path = ROOT) -> dict[Path, str]:
    spec = load()
    return {root / rel: fn(spec) for rel, fn in TARGETS.items()}


def write_all(root: Path = ROOT) -> list[Path]:
    written = []
    for path, text in render(root).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_files(root: Path = ROOT) -> list[Path]:
    stale = []
    for path, text in render(root).items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
    return stale
