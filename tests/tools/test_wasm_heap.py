"""The wake's heap at a chip's word size: the firmware's codec, flash queue and wakes (radio
stubbed) on the 32-bit WebAssembly port and on the 64-bit unix port, side by side."""

from __future__ import annotations

import json

import pytest

from tests.mpharness import micropython_binary
from tools.sim.profiles import load_profiles
from tools.sim.wasm import WasmError, measure, wasm_port


def test_codec_queue_and_wakes_fit_every_profiles_heap_at_32_bits() -> None:
    try:
        wasm_port()
    except WasmError as exc:
        # Not hardware: `make test` installs Node.js and the port (`make wasm`).
        pytest.fail(str(exc))
    if micropython_binary() is None:
        pytest.skip("no MicroPython unix port")
    figs = measure()
    print(json.dumps(figs))
    w = figs["wasm32"]
    for key in ("codec_alloc", "flashq_alloc", "wake_sample_alloc", "wake_send_alloc"):
        assert w[key] > 0 and figs["unix64"][key] > 0, key
    smallest = min(p.gc_heap_wifi_bytes for p in load_profiles().values() if not p.ideal)
    # Bytes allocated with no collection at all, at the chip's word size: under the smallest
    # board's heap with room to spare for fragmentation.
    assert max(w.values()) < smallest // 2, (w, smallest)
