# Opening the flash queue from flash: list the segment files, read the state file, count
# every slot and repair what a power cut left behind. Imported by flashq only when a wake
# cannot resume from its snapshot (a power-on, a reset, a crash, a mismatch).
import os

from flashq import _NO_RAW, MAX_SET, NO_TS, NPRIO, ST_HDR, _Seg, _sum, _u32


def read_state(q):
    st = q._state_buf()
    try:
        with open(q._pstate, "rb") as f:
            n = f.readinto(st)
    except OSError:
        q._note("no state file")
        return
    if n < ST_HDR + 4 or st[0:4] != b"TQS1":
        q._note("state file garbled")
        return
    k = st[16]
    end = ST_HDR + 4 * k
    if k > MAX_SET or n < end + 4 or _u32(st, end) != _sum(st, end):
        q._note("state file garbled")
        return
    q.next_id = max(q.next_id, _u32(st, 4))
    q.floor = _u32(st, 8)
    q.dropped = _u32(st, 12)
    for j in range(k):
        q._set.append(_u32(st, ST_HDR + 4 * j))


def open_dir(q, first_id):
    segs = q._segs
    stale = None
    try:
        it = os.ilistdir(q.dir)
    except OSError:
        os.mkdir(q.dir)
        it = ()
    for ent in it:
        name = ent[0]
        if name[0] == "c" or name == "state.new":
            # removed after the listing ends: littlefs directory iteration and removal
            # do not mix
            stale = [name] if stale is None else stale + [name]
        elif name[0] == "s" and len(name) == 9:
            try:
                first = int(name[1:], 16)
            except ValueError:
                q._note("ignored " + name)
                continue
            j = len(segs)
            while j and segs[j - 1].first > first:
                j -= 1
            segs.insert(j, _Seg(first, q._pdir + name))
    if stale is not None:
        for name in stale:
            os.remove(q._pdir + name)
    read_state(q)
    q._rescan()
    merged = False
    j = 1
    while j < len(segs):
        if segs[j].first <= segs[j - 1].maxid:
            # merged into a predecessor before the cut: its live slots are there
            q._note("removed merged segment")
            os.remove(q._p(segs[j]))
            segs.pop(j)
            merged = True
        else:
            j += 1
    top = q.floor
    for i in q._set:
        top = max(top, i)
    for seg in segs:
        top = max(top, seg.maxid)
    q.next_id = max(q.next_id, top + 1, first_id)
    # Set entries no segment holds (compaction leaves them) do not change any count;
    # only a removed merged segment does, and then the counts are taken again.
    if q._set:
        import flashq_compact

        flashq_compact.prune_set(q)
    if merged:
        q._rescan()
    if q.corrupt:
        q._note("%d garbled slots skipped" % q.corrupt)
    q._normalize()
    q._reclaim(False)


def full(q):
    # Leave partial mode: open the queue from flash, which every change already reached.
    q._close_active()
    keep = q.next_id
    q._partial = False
    q._segs = []
    q._set = []
    q._aseg = None
    q._seg_budget = -1
    q._omitted = 0
    q._raw = _NO_RAW
    q._oldest = NO_TS
    q.floor = q.dropped = q.depth = q.corrupt = 0
    for p in range(NPRIO):
        q._plive[p] = 0
    q._plive_ok = False
    open_dir(q, q._first_id)
    q.next_id = max(q.next_id, keep)
