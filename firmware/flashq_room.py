# Making room in a full flash queue: the drop policy (lowest priority first, then oldest)
# and, under flash pressure, freeing a block. Imported by flashq only when the queue is at
# max_records or its flash budget, which a node with a reachable gateway never meets.
from flashq import NPRIO, _u32


def _victim(q, prio):
    # Lowest priority first, then oldest. Returns (id, seg) or (0, None) to drop the new one.
    if not q._plive_ok:
        q._rescan()
    minp = 0
    while minp < NPRIO and q._plive[minp] == 0:
        minp += 1
    if minp >= NPRIO or prio < minp:
        return 0, None
    ch = q._ch()
    ss = q.slot_size
    for seg in q._segs:
        if seg.nlive == 0:
            continue
        f = q._fopen(seg)
        try:
            while True:
                k = q._fill(f, seg)
                if k < 0:
                    break
                for j in range(k):
                    i = _u32(ch, j * ss)
                    if ch[j * ss + 4] == minp and q._live(i):
                        q._victim_prio = minp
                        return i, seg
        finally:
            f.close()
    return 0, None


def _drop_one(q, prio):
    i, seg = _victim(q, prio)
    if not i:
        return False
    pr = q._victim_prio
    ncompact = q._ncompact
    if not q._remove(i):
        return False
    q.dropped += 1
    q.last_dropped = i
    q._write_state()
    if ncompact != q._ncompact:
        q._rescan()  # a compaction ran inside _remove
        return True
    seg.nlive -= 1
    q.depth -= 1
    q._plive[pr] -= 1
    if seg.nlive == 0 and seg is not q._segs[-1]:
        q._delete_seg(seg)
    return True


def make_room(q, prio):
    # Drop one reading of a lower (or equal, older) priority; False: the new one is dropped.
    if _drop_one(q, prio):
        return True
    q.dropped += 1
    q._write_state()
    return False


def free_block(q):
    # Under flash pressure: delete an empty segment or merge two neighbours that fit in one.
    segs = q._segs
    for j in range(len(segs) - 1):
        a = segs[j]
        if a.nlive == 0:
            q._delete_seg(a)
            return True
        if j + 2 < len(segs):
            b = segs[j + 1]
            if (a.nslots + b.nslots > a.nlive + b.nlive and
                    a.nlive + b.nlive <= q.seg_records):
                import flashq_compact

                flashq_compact.merge(q, (a, b))
                q._write_state()
                return True
    return False
