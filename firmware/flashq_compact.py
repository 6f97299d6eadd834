# Rewriting the flash queue's segments: compaction (a segment's live slots to c<first>,
# renamed over s<first>) and merges (neighbours into one). Imported by flashq only when a
# segment is worth rewriting, which most wakes never meet.
import os

from flashq import MAX_SET, _u32


def prune_set(q):
    # Keep only set entries some segment still holds (compaction leaves stale ones).
    s = q._set
    if not s:
        return
    held = []
    ch = q._ch()
    ss = q.slot_size
    for seg in q._segs:
        f = q._fopen(seg)
        try:
            while True:
                k = q._fill(f, seg)
                if k < 0:
                    break
                for j in range(k):
                    i = _u32(ch, j * ss)
                    if i in s:
                        held.append(i)
        finally:
            f.close()
    q._set = held


def _copy_live(q, seg, out, keep_last):
    # Writes seg's live slots to out; returns (kept, maxid written, last removed slot id
    # copied to q._slot2 when keep_last).
    ch = q._ch()
    ss = q.slot_size
    sl = q._slot
    if keep_last and q._slot2 is None:
        q._slot2 = bytearray(ss)
    kept = lastid = 0
    maxid = seg.first - 1
    f = q._fopen(seg)
    try:
        while True:
            k = q._fill(f, seg)
            if k < 0:
                break
            for j in range(k):
                p = j * ss
                i = _u32(ch, p)
                if q._live(i):
                    for b in range(ss):
                        sl[b] = ch[p + b]
                    out.write(sl)
                    kept += 1
                    maxid = i
                elif keep_last:
                    for b in range(ss):
                        q._slot2[b] = ch[p + b]
                    lastid = i
    finally:
        f.close()
    return kept, maxid, lastid


def compact_seg(q, seg):
    # Rewrite seg's live slots to c<first>, then rename over s<first>: atomic on littlefs.
    tmp = q._spath(seg.first, "/c")
    q._ncompact += 1
    # The newest segment keeps its highest slot even when removed: with the state file
    # garbled, the highest id still on flash is what keeps ids from being reused.
    keep_last = seg is q._segs[-1]
    with open(tmp, "wb") as out:
        kept, maxid, lastid = _copy_live(q, seg, out, keep_last)
        live = kept
        if lastid > maxid:
            out.write(q._slot2)
            kept += 1
            maxid = lastid
    if kept:
        os.rename(tmp, q._p(seg))
        s = q._set
        for j in range(len(s) - 1, -1, -1):
            if seg.first <= s[j] <= seg.maxid and s[j] != lastid:
                s.pop(j)
        seg.nslots = kept
        seg.nlive = live
        seg.bad = 0
        seg.maxid = maxid
    else:
        os.remove(tmp)
        q._delete_seg(seg)


def merge(q, run):
    # Live slots of the segments in run (neighbours, oldest first) into c<first>, renamed
    # over s<first>, then the others go. A cut before those deletes leaves them inside
    # the first's id range, which open recognises and removes.
    a = run[0]
    tmp = q._spath(a.first, "/c")
    q._ncompact += 1
    kept = 0
    maxid = a.first - 1
    top = run[-1].maxid
    with open(tmp, "wb") as out:
        for seg in run:
            k, m, _ = _copy_live(q, seg, out, False)
            if k:
                kept += k
                maxid = m
    if kept:
        os.rename(tmp, q._p(a))
        a.nslots = a.nlive = kept
        a.bad = 0
        a.maxid = maxid
        a.closed = True
    else:
        os.remove(tmp)
        q._delete_seg(a)
    for seg in run[1:]:
        q._delete_seg(seg)
    s = q._set
    for j in range(len(s) - 1, -1, -1):
        if a.first <= s[j] <= top:
            s.pop(j)


def reclaim(q, crowded):
    # Compact the closed segments where it pays (q._worth_compacting), then take the
    # counts again.
    for seg in list(q._segs):
        if q._worth_compacting(seg, crowded):
            compact_seg(q, seg)
    prune_set(q)
    q._write_state()
    q._rescan()


def make_set_room(q):
    # The set of removed ids is full: compact every segment holding one of them, so they
    # leave flash and the set. False if it is still full.
    q._write_state()
    for seg in list(q._segs):
        for j in q._set:
            if seg.first <= j <= seg.maxid:
                if seg is q._aseg:
                    q._close_active()
                compact_seg(q, seg)
                break
    prune_set(q)
    q._write_state()
    return len(q._set) < MAX_SET


def compact_all(q):
    # Compact every closed segment holding removed readings (and close the active one).
    q._full()
    q._close_active()
    for seg in list(q._segs):
        if seg.nslots != seg.nlive or seg.bad:
            compact_seg(q, seg)
    prune_set(q)
    q._write_state()
    q._reclaim(False)
    q._rescan()
