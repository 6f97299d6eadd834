# Power-safe queue of readings on littlefs: fixed-size records in append-only segment files,
# each under a 4-byte message id that never repeats, kept until the gateway acknowledges it.
#
# Files in the queue directory:
#   s<first id, 8 hex>  segment: slots of [id u32 LE][priority u8][check u8][record]
#   state               ack floor, selectively removed ids, id floor, drop counter;
#                       rewritten in place (littlefs commits a file's new contents at close)
#   c<first id>         compaction or merge in progress (renamed over its segment when done)
# littlefs makes each write visible only at flush/close, and rename atomic, so a power cut
# leaves either the old or the new version of each file. Open still tolerates torn tails
# and garbled slots (checked per slot) so a damaged file costs only the damaged readings.
#
# Flash wear: littlefs never programs a data block twice, so every flushed append to a file
# stored in its own block copies that block to a freshly erased one. Small files are kept
# inline in the directory's metadata log instead, where a flush is one short commit and a
# block is erased only when the log fills. So appends go to small "head" segments that stay
# inline (inline_bytes, 128 with the ports' default mount options), and once a run of them
# has filled up they are merged into one big segment (seg_records slots) written in one go.
#
# Resuming: opening reads every segment (depth and liveness come from the slots), which costs
# time and memory in proportion to the queue. snapshot() returns a small record of what that
# reading found: the counters and the newest few segments. Given back to the next open
# (resume=), and valid, the queue starts from it without reading a segment ("partial"
# mode): appends, head-segment merges, depth and age work from the record. Anything that
# needs the older segments (ack, read-out, a drop, flash pressure) first opens the queue
# the ordinary way, from flash, which is always exact. The caller keeps the record where a
# power cut loses it (RTC memory) and offers it only after a wake that ended as planned.
#
# This module is what every wake runs: append, read-out, ack, snapshot and resume. The
# rest is imported where it is first needed, so a wake loads its code only if it meets it:
#   flashq_open     open from flash (listing, state file, counting, repair after a cut)
#   flashq_compact  rewriting segments: compaction and head-segment merges
#   flashq_room     a full queue or flash: the drop policy, freeing a block
import os
import struct

from micropython import const

NPRIO = const(8)  # priorities 0 (dropped first) .. 7
_HDR = const(6)
MAX_SET = const(24)  # removed ids above the floor kept in the state file (stays inline)
ST_HDR = const(20)
_CHUNK = const(16)  # slots read per readinto()
_GROUP = const(4)  # full head segments merged into one
_TAIL = const(6)  # newest segments a snapshot describes: a merge group, the active one and
# the merged segment before them (all a head-segment merge looks at)
_SNAP_MAGIC = const(0x31525154)  # "TQR1"
_SNAP = "<IIIIHIIIHB"  # magic, next_id, floor, dropped, set size, depth, corrupt, oldest ts,
_SNAP_SIZE = const(33)  # segments left out, tail length; then per tail segment:
_SNAP_SEG = "<IHHIBB"  # first, nslots, nlive, maxid, bad, closed
_SNAP_SEG_SIZE = const(14)
NO_TS = const(0xFFFFFFFF)
_NO_RAW = (b"", 0, 0)


def _u32(b, o):
    return b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)


def _put32(b, o, v):
    b[o] = v & 0xFF
    b[o + 1] = (v >> 8) & 0xFF
    b[o + 2] = (v >> 16) & 0xFF
    b[o + 3] = (v >> 24) & 0xFF


def _check(b, o, n):
    # Sum of the slot's bytes except the check byte; 0xA5 start so blank (0xff/0x00) slots fail.
    s = 0xA5
    for i in range(o, o + n):
        s += b[i]
    return (s - b[o + 5]) & 0xFF


def _seg_at(data, o):
    # One _SNAP_SEG entry of a snapshot, read field by field (no tuple).
    seg = _Seg(_u32(data, o), None)
    seg.nslots = data[o + 4] | data[o + 5] << 8
    seg.nlive = data[o + 6] | data[o + 7] << 8
    seg.maxid = _u32(data, o + 8)
    # bad and closed only when they differ from the class defaults: a smaller dict each
    if data[o + 12]:
        seg.bad = data[o + 12]
    if data[o + 13] == 1:
        seg.closed = True
    return seg


def _sum(b, n, start=0):
    s = 0x5EED
    for i in range(start, n):
        s = (s * 31 + b[i]) & 0x3FFFFFFF
    return s


class _Seg:
    # Defaults on the class: an instance stores only what differs (a smaller dict each).
    nslots = 0  # valid slots
    nlive = 0  # valid slots not yet removed
    bad = 0  # torn or garbled slots: never append after them
    closed = False

    def __init__(self, first, path):
        self.first = first
        self.path = path
        self.maxid = first - 1


class FlashQueue:
    """FlashQueue(dir, record_size, max_records): see module comment for the layout.

    append(record, priority=0) -> msg_id (0 if dropped on arrival); durable on return.
    ack(cumulative_id, selective=()); read_into(buf, after_id=0) -> count (zero-allocation
    read-out, slot layout as on flash); peek(n) -> [(id, prio, bytes)]; depth, dropped,
    next_id, oldest_ts(), age(now); compact(); close().
    first_id: the lowest id a new reading takes (ids already used stay higher).
    resume: a snapshot() of the previous open, to skip reading the segments (see above).
    seg_records: slots of a merged segment; inline_bytes: the largest file the filesystem
    keeps inline (littlefs: its cache size, 4 * max(readsize, progsize), at most 1/8 block).
    """

    # Scalars start on the class; the instance dict holds what a queue changes.
    floor = 0
    next_id = 1
    dropped = 0
    depth = 0
    corrupt = 0
    last_dropped = 0
    _victim_prio = 0
    _ncompact = 0
    _prev = 0
    _eof = False
    _plive_ok = False
    _af = None
    _aseg = None
    _seg_budget = -1
    _partial = False  # started from a snapshot: _segs holds only the newest ones
    resumed = False  # this open started from a snapshot (stays True after _full)
    _omitted = 0  # segments older than _segs (partial mode)
    _oldest = NO_TS  # timestamp of the oldest live record (partial mode)
    _raw = _NO_RAW  # (snapshot, offset, count): older segments not yet made _Seg (see _tail)
    _chunk = None  # read buffer: _CHUNK slots (see _ch)
    _st = None  # state file buffer and path (see _state_buf)
    _slot2 = None  # a compaction's last removed slot (see flashq_compact)
    _pstate = ""
    notes = None  # type: list[str] | None  # what open found and repaired (see _note)
    run_first = 0  # first id of the last read_run

    def __init__(self, dir, record_size, max_records, seg_records=64, reserve_blocks=6,
                 inline_bytes=128, first_id=1, resume=None):
        if record_size < 1 or max_records < 1 or seg_records < 1:
            raise ValueError("record_size, max_records and seg_records must be positive")
        self.dir = dir.rstrip("/") or "/"
        self.record_size = record_size
        self.slot_size = record_size + _HDR
        self.max_records = max_records
        self.seg_records = seg_records
        # head segments take appends; they stay small enough to be stored inline
        self.head_records = max(1, min(seg_records, inline_bytes // self.slot_size))
        self.reserve_blocks = reserve_blocks
        self._slot = bytearray(self.slot_size)
        self._pdir = self.dir + "/"
        self._set = []
        self._segs = []
        self._plive = [0] * NPRIO
        self._first_id = first_id
        if not (resume and self._resume(resume)):
            self._open(first_id)

    def _note(self, text):
        if self.notes:
            self.notes.append(text)
        else:
            self.notes = [text]

    # ---- paths and state -------------------------------------------------------------
    def _spath(self, first, prefix="/s"):
        return "%s%s%08x" % (self.dir, prefix, first)

    def _new_seg(self, first):
        return _Seg(first, self._spath(first))

    def _p(self, seg):
        # A resumed segment gets its path when a file operation first needs it.
        p = seg.path
        if p is None:
            p = seg.path = self._spath(seg.first)
        return p

    def _state_buf(self):
        # The state file's buffer and path, made on first use (a resumed queue that only
        # appends never reads or writes the state file).
        if self._st is None:
            self._st = bytearray(ST_HDR + 4 * MAX_SET + 4)
            self._pstate = self._pdir + "state"
        return self._st

    def _write_state(self):
        # In place: littlefs keeps the old contents until the new ones commit at close, and
        # a small file is one metadata commit (a temporary file and a rename were three).
        st = self._state_buf()
        st[0:4] = b"TQS1"
        _put32(st, 4, self.next_id)
        _put32(st, 8, self.floor)
        _put32(st, 12, self.dropped)
        k = len(self._set)
        st[16] = k
        st[17] = st[18] = st[19] = 0
        for j in range(k):
            _put32(st, ST_HDR + 4 * j, self._set[j])
        end = ST_HDR + 4 * k
        _put32(st, end, _sum(st, end))
        with open(self._pstate, "wb") as f:
            f.write(memoryview(st)[: end + 4])

    # ---- scanning ----------------------------------------------------------------------
    # A segment is read chunk by chunk without a generator (no allocation but the file):
    #   f = self._fopen(seg); k = self._fill(f, seg) -> valid slots packed at the front of
    #   self._chunk (slot j at j * slot_size), -1 once the file is done; f.close().
    def _ch(self):
        # The read buffer, made on first use: a resumed queue that only appends never reads.
        if self._chunk is None:
            self._chunk = bytearray(self.slot_size * _CHUNK)
        return self._chunk

    def _fopen(self, seg):
        self._prev = seg.first - 1
        self._eof = False
        seg.bad = 0
        return open(self._p(seg), "rb")

    def _fill(self, f, seg):
        if self._eof:
            return -1
        ss = self.slot_size
        ch = self._ch()
        n = f.readinto(ch)
        if not n:
            return -1
        whole = n - n % ss
        prev = self._prev
        k = p = 0
        while p < whole:
            i = _u32(ch, p)
            if i > prev and ch[p + 4] < NPRIO and _check(ch, p, ss) == ch[p + 5]:
                prev = i
                if k != p:
                    for b in range(ss):
                        ch[k + b] = ch[p + b]
                k += ss
            else:
                seg.bad += 1
            p += ss
        self._prev = prev
        if n < len(ch):
            self._eof = True
            if n != whole:
                seg.bad += 1
        return k // ss

    def _live(self, i):
        return i > self.floor and i not in self._set

    def _scan(self, seg):
        ch = self._ch()
        ss = self.slot_size
        pl = self._plive
        seg.nslots = seg.nlive = 0
        f = self._fopen(seg)
        try:
            while True:
                k = self._fill(f, seg)
                if k < 0:
                    break
                for j in range(k):
                    i = _u32(ch, j * ss)
                    seg.nslots += 1
                    seg.maxid = i
                    if self._live(i):
                        seg.nlive += 1
                        pl[ch[j * ss + 4]] += 1
        finally:
            f.close()
        if seg.bad:
            seg.closed = True

    def _rescan(self):
        pl = self._plive
        for p in range(NPRIO):
            pl[p] = 0
        depth = corrupt = 0
        for seg in self._segs:
            self._scan(seg)
            depth += seg.nlive
            corrupt += seg.bad
        self.depth = depth
        self.corrupt = corrupt
        self._plive_ok = True

    def _recount(self, lo, hi, sel):
        # After removals: segments wholly at or below the floor are empty without reading
        # them; only those holding the new floor (lo < id <= hi) or a removed id are read.
        # Per-priority counts are left stale and rebuilt when the drop policy needs them.
        depth = 0
        for seg in self._segs:
            if seg.maxid <= self.floor:
                seg.nlive = 0
            elif seg.first <= hi and seg.maxid > lo:
                self._scan(seg)
            else:
                for i in sel:
                    if seg.first <= i <= seg.maxid:
                        self._scan(seg)
                        break
            depth += seg.nlive
        self.depth = depth
        self._plive_ok = False

    def _open(self, first_id):
        import flashq_open

        flashq_open.open_dir(self, first_id)

    def _budget(self):
        # Counted once per open, when a new segment is first needed (statvfs walks the
        # filesystem). littlefs needs room for metadata pairs and copy-on-write on top of
        # our files; one block a segment is generous for head segments, which are inline.
        st = os.statvfs(self.dir)
        if self.seg_records * self.slot_size > st[0]:
            self.seg_records = max(1, st[0] // self.slot_size)
            self.head_records = min(self.head_records, self.seg_records)
        free = st[3] if st[3] <= st[2] else 0
        n = len(self._segs) + self._omitted
        self._seg_budget = max(2, n + (free - self.reserve_blocks) * 3 // 4)

    # ---- removal -----------------------------------------------------------------------
    def _normalize(self):
        s = self._set
        for i in range(len(s) - 1, -1, -1):
            if s[i] <= self.floor:
                s.pop(i)
        while (self.floor + 1) in s:
            self.floor += 1
            s.remove(self.floor)

    def _delete_seg(self, seg):
        if seg is self._aseg:
            self._close_active()
        os.remove(self._p(seg))
        self._segs.remove(seg)

    def _close_active(self):
        if self._af is not None:
            self._af.close()
            self._af = None
        if self._aseg is not None:
            self._aseg.closed = True
            self._aseg = None

    def _reclaim(self, compact=True):
        # Whole segments go once nothing in them is live; compaction when it pays. By
        # index, backwards (deleting shifts only what was seen): no copy of the list.
        segs = self._segs
        for j in range(len(segs) - 2, -1, -1):
            if segs[j].nlive == 0:
                self._delete_seg(segs[j])
        if not compact:
            return
        crowded = len(self._set) > MAX_SET * 3 // 4
        for j in range(len(segs)):
            if self._worth_compacting(segs[j], crowded):
                import flashq_compact

                flashq_compact.reclaim(self, crowded)
                return

    def _worth_compacting(self, seg, crowded):
        if seg is self._aseg or (seg is self._segs[-1] and not seg.closed):
            return False
        removed = seg.nslots - seg.nlive
        return (removed and crowded) or (removed * 2 >= seg.nslots and removed >= 8) or seg.bad

    def _remove(self, i):
        # Mark one id removed (acked or dropped); False only if the set is full even after
        # compacting every closed segment.
        if i == self.floor + 1:
            self.floor = i
            self._normalize()
            return True
        if len(self._set) >= MAX_SET:
            import flashq_compact

            if not flashq_compact.make_set_room(self):
                return False
        self._set.append(i)
        return True

    def _flash_low(self):
        # littlefs's free-block figure is an estimate that wraps when flash is nearly full,
        # so the budget is counted in our own segments (one block each).
        if self._seg_budget < 0:
            self._budget()
        return len(self._segs) + self._omitted >= self._seg_budget

    def _consolidate(self):
        # While readings pile up (no gateway), full head segments are merged into one big
        # segment: one block written whole per seg_records readings instead of many small
        # files, so open stays cheap and the directory's metadata small.
        segs = self._segs
        hr = self.head_records
        # four head segments a merge: fewer files to open per read-out against one block
        # written per 4 * head_records readings
        group = min(_GROUP, self.seg_records // hr)
        if group < 2 or len(segs) < group + 1:
            return
        j = len(segs) - 1
        while j > 0 and segs[j - 1].closed and segs[j - 1].nslots <= hr:
            j -= 1
        # segs[j:-1] are closed head segments; merge the oldest group whose live slots fit
        if len(segs) - 1 - j < group:
            return
        live = 0
        for k in range(j, j + group):
            live += segs[k].nlive
        if j and segs[j - 1].closed and segs[j - 1].nlive + live <= self.seg_records:
            j -= 1  # the previous merged segment still has room: rewrite it with them
            live += segs[j].nlive
            group += 1
        if live > self.seg_records or segs[j + group - 1] is self._aseg:
            return
        import flashq_compact

        flashq_compact.merge(self, segs[j : j + group])
        if self._set:
            self._write_state()

    # ---- public API --------------------------------------------------------------------
    def append(self, record, priority=0):
        if len(record) != self.record_size:
            raise ValueError("record must be %d bytes" % self.record_size)
        if not 0 <= priority < NPRIO:
            raise ValueError("priority must be 0..%d" % (NPRIO - 1))
        self.last_dropped = 0
        if self._partial and (self.depth >= self.max_records or (self._needs_new_seg() and self._flash_low())):
            self._full()  # the drop policy and flash pressure need every segment
        if self.depth >= self.max_records:
            import flashq_room

            if not flashq_room.make_room(self, priority):
                return 0
        if self._needs_new_seg() and self._flash_low():
            # Flash grows only by whole segments: at the budget, drop readings (policy order)
            # until a segment can be deleted or two merged.
            import flashq_room

            tries = self.depth + 2
            while self._flash_low():
                tries -= 1
                if tries < 0 or (not flashq_room.free_block(self) and not flashq_room.make_room(self, priority)):
                    return 0
        i = self.next_id
        seg = self._aseg
        if seg is None:
            last = self._segs[-1] if self._segs else None
            if last is not None and not last.closed and last.nslots < self.head_records:
                seg = last
            else:
                if last is not None:
                    last.closed = True
                seg = self._new_seg(i)
                self._segs.append(seg)
            self._aseg = seg
        sl = self._slot
        _put32(sl, 0, i)
        sl[4] = priority
        for k in range(self.record_size):
            sl[_HDR + k] = record[k]
        sl[5] = _check(sl, 0, self.slot_size)
        try:
            if self._af is None:
                self._af = open(self._p(seg), "ab")
                if self._partial and self._af.seek(0, 2) != seg.nslots * self.slot_size:
                    # The newest segment is not as the snapshot left it: take the queue
                    # from flash instead, then append as usual.
                    self._af.close()
                    self._af = None
                    self._aseg = None
                    self._full()
                    return self.append(record, priority)
            self._af.write(sl)
            self._af.flush()
        except OSError:
            self._close_active()
            if seg.nslots == 0:
                self._segs.remove(seg)
            raise
        self.next_id = i + 1
        seg.nslots += 1
        seg.nlive += 1
        seg.maxid = i
        if self.depth == 0 and self.record_size >= 4:
            self._oldest = _u32(record, 0)
        self.depth += 1
        self._plive[priority] += 1
        if seg.nslots >= self.head_records:
            self._close_active()
            self._tail()
            self._consolidate()
        return i

    def _needs_new_seg(self):
        if self._aseg is not None:
            return False
        last = self._segs[-1] if self._segs else None
        return last is None or last.closed or last.nslots >= self.head_records

    def ack(self, cumulative_id, selective=()):
        self._whole()
        top = self.next_id - 1
        if cumulative_id > top:
            cumulative_id = top
        old = self.floor
        changed = False
        if cumulative_id > self.floor:
            self.floor = cumulative_id
            changed = True
        for i in selective:
            if self.floor < i <= top and i not in self._set:
                if not self._remove(i):
                    break
                changed = True
        if not changed:
            return
        self._normalize()
        self._write_state()
        self._recount(old, self.floor, selective)
        self._reclaim()

    def compact(self):
        """Compact every closed segment holding removed readings (and close the active one)."""
        import flashq_compact

        flashq_compact.compact_all(self)

    def read_into(self, buf, after_id=0):
        """Fill buf with live slots ([id u32][prio u8][check u8][record]) with id > after_id,
        in id order; returns the count. No allocation per reading."""
        return self._read(buf, after_id, False)

    def read_run(self, buf, after_id=0):
        """Fill buf with the records (no slot header) of the live readings after after_id
        whose ids follow one another without a gap, oldest first; returns how many, the
        first one's id in run_first. Each segment file is opened once; no allocation per
        reading."""
        return self._read(buf, after_id, True)

    def _read(self, buf, after_id, run):
        self._whole()
        ss = self.slot_size
        skip = _HDR if run else 0
        w = ss - skip
        room = len(buf) // w
        n = first = 0
        if room == 0:
            return 0
        ch = self._ch()
        for seg in self._segs:
            if n >= room:
                break
            if seg.nlive == 0 or seg.maxid <= after_id:
                continue
            f = self._fopen(seg)
            try:
                while n < room:
                    k = self._fill(f, seg)
                    if k < 0:
                        break
                    for j in range(k):
                        p = j * ss
                        i = _u32(ch, p)
                        if i <= after_id or not self._live(i):
                            continue
                        if run and n and i != first + n:
                            room = n  # a gap: the next run starts there
                            break
                        if not n:
                            first = i
                        o = n * w
                        p += skip
                        for b in range(w):
                            buf[o + b] = ch[p + b]
                        n += 1
                        if n >= room:
                            break
            finally:
                f.close()
        self.run_first = first
        return n

    @staticmethod
    def slot_id(buf, index, slot_size):
        return _u32(buf, index * slot_size)

    def peek(self, max_count):
        # Convenience read-out that allocates; use read_into on the send path.
        buf = bytearray(self.slot_size * max_count)
        n = self.read_into(buf)
        out = []
        for j in range(n):
            o = j * self.slot_size
            out.append((_u32(buf, o), buf[o + 4], bytes(buf[o + _HDR : o + self.slot_size])))
        return out

    def oldest_ts(self):
        """u32 timestamp in the first 4 bytes of the oldest live record, or None."""
        if self.depth == 0 or self.record_size < 4:
            return None
        if self._partial and self._oldest != NO_TS:
            return self._oldest
        if self.read_into(self._slot) == 0:
            return None
        return _u32(self._slot, _HDR)

    def age(self, now):
        ts = self.oldest_ts()
        return 0 if ts is None else max(0, now - ts)

    # ---- resuming ----------------------------------------------------------------------
    def snapshot(self, room=0):
        """A record of this queue's counters and newest segments for resume= (bytes), after
        `room` free bytes for the caller's own fields (no second buffer to join them)."""
        segs = self._segs
        raw, ro, rn = self._raw
        n = min(rn + len(segs), _TAIL)
        skip = rn + len(segs) - n  # oldest entries left out of the record
        oldest = self.oldest_ts() if self.depth else None
        buf = bytearray(room + _SNAP_SIZE + _SNAP_SEG_SIZE * n + 4)
        struct.pack_into(
            _SNAP, buf, room, _SNAP_MAGIC, self.next_id, self.floor, self.dropped, len(self._set),
            self.depth, self.corrupt, NO_TS if oldest is None else oldest,
            self._omitted - rn + skip, n,
        )
        o = room + _SNAP_SIZE
        if rn > skip:
            # entries taken over from the previous record and never needed this wake: one
            # contiguous copy
            k = (rn - skip) * _SNAP_SEG_SIZE
            p = ro + skip * _SNAP_SEG_SIZE
            buf[o : o + k] = memoryview(raw)[p : p + k]
            o += k
        for j in range(max(0, skip - rn), len(segs)):
            seg = segs[j]
            struct.pack_into(_SNAP_SEG, buf, o, seg.first, seg.nslots, seg.nlive, seg.maxid,
                             seg.bad, 1 if seg.closed else 0)
            o += _SNAP_SEG_SIZE
        _put32(buf, o, _sum(buf, o, room))
        return buf

    def _resume(self, data):
        # Start from a snapshot; False (nothing taken over) if it is damaged or does not
        # hold together with the state file. Only the newest
        # segment becomes a _Seg; the others stay record entries until a merge needs them.
        n = len(data)
        if n < _SNAP_SIZE + 4 or _u32(data, 0) != _SNAP_MAGIC or _u32(data, n - 4) != _sum(data, n - 4):
            return False
        ntail = data[32]
        if n != _SNAP_SIZE + _SNAP_SEG_SIZE * ntail + 4 or not ntail:
            return False
        # The newest segment's size is checked against the record when an append opens it.
        last = _seg_at(data, _SNAP_SIZE + _SNAP_SEG_SIZE * (ntail - 1))
        nset = data[16] | data[17] << 8
        if nset:
            # Removed ids above the floor: the state file has them (the snapshot only counts
            # them). A queue never acknowledged has no state file; anything else is damage.
            import flashq_open

            flashq_open.read_state(self)
            damaged = self.notes and self.notes != ["no state file"]
            if (self.next_id > _u32(data, 4) or self.floor != _u32(data, 8)
                    or self.dropped != _u32(data, 12) or len(self._set) != nset or damaged):
                self._set = []
                self.floor = self.dropped = 0
                self.next_id = 1
                self.notes = None
                return False
        else:
            # The state file holds nothing more than the snapshot: the wake that wrote the
            # snapshot ended after its last change to the queue.
            self.floor = _u32(data, 8)
            self.dropped = _u32(data, 12)
        self.next_id = max(_u32(data, 4), self._first_id)
        self.depth = _u32(data, 18)
        self.corrupt = _u32(data, 22)
        self._oldest = _u32(data, 26)
        self._omitted = (data[30] | data[31] << 8) + ntail - 1
        self._raw = (data, _SNAP_SIZE, ntail - 1)
        self._segs = [last]
        self._partial = self.resumed = True
        return True

    def _tail(self):
        # The older record entries as _Seg objects, in front of the materialized ones.
        data, o, n = self._raw
        if n:
            for j in range(n):
                self._segs.insert(j, _seg_at(data, o + j * _SNAP_SEG_SIZE))
            self._omitted -= n
            self._raw = _NO_RAW

    def _whole(self):
        # An ack or a read-out needs every segment. A snapshot that left no segment out
        # names them all, with their counts as the wake that wrote it left them (every
        # change since is this wake's own, in memory): its entries become _Segs and
        # nothing is read from flash for it. The segment files themselves are read by the
        # caller as always. Otherwise the queue is opened from flash.
        if not self._partial:
            return
        if self._omitted != self._raw[2]:
            self._full()
            return
        self._close_active()
        self._tail()
        for seg in self._segs:
            if seg.closed and not seg.bad:
                del seg.closed  # open, as opening from flash finds it
        self._partial = False
        self._plive_ok = False  # per-priority counts: rebuilt when the drop policy needs them
        self._oldest = NO_TS

    def _full(self):
        # Leave partial mode: open the queue from flash, which every change already reached.
        if self._partial:
            import flashq_open

            flashq_open.full(self)

    def close(self):
        self._close_active()
