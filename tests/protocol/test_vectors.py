"""Frozen frames of every released protocol version still decode to the same values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import gateway.proto as p
from tests.protocol.make_vectors import plain

VECTOR_FILES = sorted((Path(__file__).parent / "vectors").glob("v*.json"))
CASES = [(f.name, v) for f in VECTOR_FILES for v in json.loads(f.read_text())]


def test_the_current_version_has_frozen_vectors() -> None:
    assert any(f.name == f"v{p.MAJOR}_{p.MINOR}.json" for f in VECTOR_FILES)


@pytest.mark.parametrize(("file", "vector"), CASES, ids=[f"{f}:{v['frame']}:{i}" for i, (f, v) in enumerate(CASES)])
def test_frozen_vector_decodes(file: str, vector: dict[str, Any]) -> None:
    frame = p.decode(bytes.fromhex(vector["hex"]))
    assert type(frame).__name__ == vector["frame"]
    decoded = plain(frame)
    # fields added by later versions take their defaults; every frozen field must match
    for key, value in vector["fields"].items():
        assert decoded[key] == value, key
    if file == f"v{p.MAJOR}_{p.MINOR}.json":
        assert p.encode(frame).hex() == vector["hex"]
