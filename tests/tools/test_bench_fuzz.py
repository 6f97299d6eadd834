"""The fuzzer's boundary frames come from the spec: every up and down frame type, message
ids at 0 and 2^32 - 1, series at their largest count, strings, bytes and arrays full."""

from __future__ import annotations

import random

from gateway import proto
from tools.bench.fuzz import Corpus, frames, mutate

U32 = 0xFFFFFFFF


def test_boundary_frames_reach_every_limit() -> None:
    corpus = Corpus(random.Random(1))
    decoded = [proto.decode(f) for f in corpus.frames]
    assert {type(f).FRAME_TYPE for f in decoded} == {fr.id for fr in corpus.spec.frames}
    assert {0, U32} <= {f.msg_id for f in decoded}
    bursts = [f for f in decoded if isinstance(f, proto.Burst)]
    assert {len(b.readings) for b in bursts} >= {1, 255}
    assert any(b.msg_id == U32 and len(b.readings) > 1 for b in bursts)  # the poison kind
    hellos = [f for f in decoded if isinstance(f, proto.Hello)]
    assert {h.first_id for h in hellos} >= {0, U32}
    data_max = next(f.max for f in corpus.spec.frame("OTA_CHUNK").fields if f.name == "data")
    chunks = [f for f in decoded if isinstance(f, proto.OtaChunk)]
    assert {len(c.data) for c in chunks} >= {0, data_max}
    assert max(len(f) for f in corpus.frames) <= proto.MAX_FRAME


def test_mutated_and_random_frames_stay_within_the_largest_frame() -> None:
    rng = random.Random(2)
    corpus = Corpus(rng)
    gen = frames(rng, corpus)
    kinds = set()
    for _ in range(2000):
        kind, frame = next(gen)
        kinds.add(kind)
        assert len(frame) <= proto.MAX_FRAME
    assert kinds == {"boundary", "mutated", "random"}
    assert all(len(mutate(rng, f, corpus.frames)) <= proto.MAX_FRAME for f in corpus.frames)
