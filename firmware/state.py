# Small persisted state of the wake cycle.
#   RTC memory (kept across deep sleep, lost on power loss): per-wake counters and hints.
#   state.bin on flash (survives power cuts): executed command ids, COMMAND_RESULT frames
#   not yet delivered, and the high-water mark of the message ids of non-reading frames.
import os
import struct

from micropython import const

_RTC_MAGIC = const(0x54525334)  # "TRS4"
# ..., then the clock (set flag, epoch id, sync id, sync offset), the broker's cached
# IPv4 address, the last Wi-Fi association (channel, BSSID), safe mode and the last wake's
# energy facts (awake ms, radio ms, sent): see the fields below.
_RTC_FMT = "<IBHBIBIIIIBIIi4sB6sBIIB"
_RTC_SIZE = const(63)
# The layout before the energy facts (an image of an earlier release wrote it): read
# without them, so an update keeps the clock, the queue's resume record and the counters.
_RTC_MAGIC3 = const(0x54525333)  # "TRS3"
_RTC_SIZE3 = const(54)
RTC_SIZE = _RTC_SIZE  # room save_rtc() needs in front of what follows the fields

_FL_MAGIC = const(0x54534631)  # "TSF1"
# Gateway times outside these are refused (a gateway without time yet, a chip's cold
# clock relayed, garbage): plain ints, they are not small ints on a 32-bit port.
MIN_TIME = 1735689600  # 2025-01-01
MAX_TIME = 4102444800  # 2100-01-01
N_EXECUTED = const(16)  # command ids remembered for duplicate detection
N_RESULTS = const(8)  # undelivered results kept (oldest dropped beyond)
_RESULT_MAX = const(104)  # a COMMAND_RESULT frame is at most 103 bytes
# Non-reading frames take ids from the top half of the u32 space, so they never meet the
# flash queue's reading ids (which start at 1 and grow by one per reading).
MSG_ID_BASE = const(0x80000000)
_MSG_BLOCK = const(64)
_HINT_SET = const(0x80)  # RTC byte 17: pending results count is valid


class State:
    """Wake-cycle state. RTC fields are attributes; save_rtc() writes them back."""

    # Defaults on the class: the instance dict holds only what a wake sets.
    # RTC fields
    boots_incomplete = 0  # boots that did not reach a planned sleep
    boots_without_send = 0  # wakes since the last delivered burst
    fails = 0  # consecutive failed sends (backoff exponent)
    next_try = 0  # unix s before which a failed send is not retried
    pending_hint = 0  # the gateway said more downlink is waiting
    last_wake = 0  # unix s of the previous wake
    # The previous wake's energy facts, for the HELLO (docs/firmware.md, "Energy facts"):
    # its ticks from the app's start to deep sleep, its radio-on time, whether it sent.
    prev_awake_ms = 0
    prev_radio_ms = 0
    prev_sent = 0
    # The clock. After power-on the chip's clock counts from its cold-boot value (2000-01-01
    # on an ESP32); the gateway's time sets it (docs/firmware.md, "Time"). Readings with ids
    # from epoch_id up to sync_id - 1 were stamped before that, in the chip's count: they
    # travel shifted by sync_off once it is known, or flagged node_clock before.
    clock_set = 0
    epoch_id = 0  # first reading id of this power session
    sync_id = 0  # first reading id stamped with the set clock (0: not set yet)
    sync_off = 0  # set clock - chip clock at the first setting, s
    broker_ip = b""  # the broker's address, resolved once (b"": resolve by name)
    wifi_channel = 0  # the last association's channel and BSSID (0: scan)
    wifi_bssid = b""
    # Safe mode, sticky: set when boots kept failing, cleared when a new image confirms or
    # the gateway's configuration changes. Kept in RTC memory for the common wake and, with
    # the failing-boot count, in boots.bin on flash (written only by unusual boots).
    safe = 0
    _boots_flash = 0  # boots.bin's count as this wake found or wrote it (0: none)
    rtc_valid = False
    queue = None  # the wake's flash queue, for the first id stamped on the set clock
    # What the last save_rtc() stored after the fields (the flash queue's resume record);
    # valid only when the wake that wrote it completed (boots_incomplete == 0 at load).
    rtc_extra = None
    # flash fields, read from state.bin on first use (see _flash)
    _msg_hw = MSG_ID_BASE
    _msg_next = MSG_ID_BASE
    _executed = None
    _results = None
    # Pending results as the last completed wake left them (RTC; -1: unknown). With it a
    # wake that neither sends nor runs commands never reads state.bin.
    _hint = -1
    # _msg_next and _msg_hw came from RTC memory (a completed wake left them): a wake that
    # sends takes ids from them and reads state.bin only to reserve the next block.
    _msg_rtc = False

    def __init__(self, board, root):
        self._board = board
        self._path = root.rstrip("/") + "/state.bin"
        self._rtc = bytearray(_RTC_SIZE)  # reused by every save_rtc()
        self._load_rtc()
        if self._hint < 0:
            self._flash()

    @property
    def executed(self):
        self._flash()
        return self._executed

    @property
    def results(self):
        self._flash()
        return self._results

    def has_results(self):
        """Whether COMMAND_RESULT frames wait for delivery (state.bin read only if needed)."""
        if self._results is None and self._hint >= 0:
            return self._hint > 0
        return bool(self.results)

    # ---- RTC memory ----
    def _load_rtc(self):
        raw = self._board.rtc_memory()
        size = 0
        if len(raw) >= _RTC_SIZE3:
            magic = _u32(raw, 0)
            size = _RTC_SIZE if magic == _RTC_MAGIC else _RTC_SIZE3 if magic == _RTC_MAGIC3 else 0
        if not size or len(raw) < size:
            return
        # _RTC_FMT read field by field: no tuple
        self.boots_incomplete = raw[4]
        self.boots_without_send = raw[5] | raw[6] << 8
        self.fails = raw[7]
        self.next_try = _u32(raw, 8)
        self.pending_hint = raw[12]
        self.last_wake = _u32(raw, 13)
        self.clock_set = raw[29]
        self.epoch_id = _u32(raw, 30)
        self.sync_id = _u32(raw, 34)
        off = _u32(raw, 38)
        self.sync_off = off - (1 << 32) if off & 0x80000000 else off
        if raw[42] | raw[43] | raw[44] | raw[45]:
            self.broker_ip = bytes(raw[42:46])
        self.wifi_channel = raw[46]
        if self.wifi_channel:
            self.wifi_bssid = bytes(raw[47:53])
        self.safe = raw[53]
        if size == _RTC_SIZE:
            self.prev_awake_ms = _u32(raw, 54)
            self.prev_radio_ms = _u32(raw, 58)
            self.prev_sent = raw[62]
        self.rtc_valid = True
        # The results count is trusted only from a wake that completed: every change to
        # state.bin in it came before its last save_rtc().
        if raw[17] & _HINT_SET and self.boots_incomplete == 0:
            self._hint = raw[17] & 0x7F
            nxt = _u32(raw, 21)
            hw = _u32(raw, 25)
            if MSG_ID_BASE <= nxt <= hw:
                self._msg_next = nxt
                self._msg_hw = hw
                self._msg_rtc = True
        if len(raw) > size:
            self.rtc_extra = memoryview(raw)[size:]

    def save_rtc(self, buf=None):
        """Write the RTC fields. buf: a bytearray whose first RTC_SIZE bytes are left for
        them (FlashQueue.snapshot(RTC_SIZE)); the rest of it is stored after them."""
        if buf is None:
            buf = self._rtc
        struct.pack_into(
            _RTC_FMT, buf, 0, _RTC_MAGIC, min(self.boots_incomplete, 255),
            min(self.boots_without_send, 65535), min(self.fails, 255),
            self.next_try & 0xFFFFFFFF, min(self.pending_hint, 255),
            self.last_wake & 0xFFFFFFFF, self._results_hint(),
            # 0, 0 (not trusted) unless the ids are known: from state.bin or RTC memory.
            self._msg_next if self._msg_known() else 0, self._msg_hw if self._msg_known() else 0,
            self.clock_set, self.epoch_id & 0xFFFFFFFF, self.sync_id & 0xFFFFFFFF,
            max(-0x80000000, min(0x7FFFFFFF, self.sync_off)), self.broker_ip,
            self.wifi_channel, self.wifi_bssid, self.safe,
            self.prev_awake_ms, self.prev_radio_ms, self.prev_sent,
        )
        self._board.rtc_memory_write(buf)

    def set_clock(self, t):
        """Set the clock to gateway time t (unix s); the step in s, or None when t is refused."""
        if not MIN_TIME <= t < MAX_TIME:
            return None
        b = self._board
        step = t - b.time()
        b.set_time(t)
        if not self.clock_set:
            self.clock_set = 1
            self.sync_off = step
            self.sync_id = self.queue.next_id if self.queue is not None else 0
        return step

    # ---- failing boots and safe mode (power loss keeps them: flash) ----
    def count_boot(self, board_timer, safe_after):
        """Count this boot as incomplete until finish_boot(); returns whether it runs in
        safe mode. A timer wake after a completed one only touches RTC memory; any other
        boot (power-on, crash, watchdog, a wake after an incomplete one) also updates
        boots.bin, so that power loss in a crash loop does not reset the count."""
        if board_timer and self.rtc_valid and self.boots_incomplete == 0:
            self.boots_incomplete = 1
            return bool(self.safe)
        n, safe = self._read_boots()
        n = max(n, self.boots_incomplete) + 1
        self.safe = 1 if (safe or self.safe or n > safe_after) else 0
        self.boots_incomplete = n
        self._write_boots(n, self.safe)
        return bool(self.safe)

    def finish_boot(self):
        """The wake reached its planned sleep."""
        self.boots_incomplete = 0
        if self._boots_flash:
            self._write_boots(0, self.safe)

    def leave_safe_mode(self):
        if self.safe:
            self.safe = 0
            self._write_boots(0, 0)

    def _boots_path(self):
        return self._path[: -len("state.bin")] + "boots.bin"

    def _read_boots(self):
        try:
            with open(self._boots_path(), "rb") as f:
                b = f.read()
        except OSError:
            return 0, 0
        if len(b) != 5 or b[0:2] != b"TB" or b[4] != (b[2] ^ b[3] ^ 0x5A):
            return 0, 0
        return b[2], b[3]

    def _write_boots(self, n, safe):
        n = min(n, 255)
        tmp = self._boots_path() + ".new"
        with open(tmp, "wb") as f:
            f.write(bytes((0x54, 0x42, n, safe, n ^ safe ^ 0x5A)))
        os.rename(tmp, self._boots_path())
        self._boots_flash = n or 0

    def wifi_hint(self):
        """(channel, bssid) of the last association, or None: a full scan."""
        if self.wifi_channel and len(self.wifi_bssid) == 6:
            return (self.wifi_channel, self.wifi_bssid)
        return None

    def keep_wifi_hint(self, hint):
        if hint and len(hint) >= 2 and hint[0] and len(hint[1]) == 6:
            self.wifi_channel = hint[0] & 0xFF
            self.wifi_bssid = bytes(hint[1])
        else:
            self.wifi_channel = 0
            self.wifi_bssid = b""

    def _msg_known(self):
        return self._results is not None or self._msg_rtc

    def _results_hint(self):
        if self._results is not None:
            return _HINT_SET | min(len(self._results), 0x7F)
        return _HINT_SET | self._hint if self._hint >= 0 else 0

    # ---- flash file ----
    def _flash(self):
        if self._results is None:
            self._executed = []
            self._results = []
            self._load_flash()

    def _load_flash(self):
        try:
            with open(self._path, "rb") as f:
                data = f.read()
        except OSError:
            return
        # [magic u32][msg_hw u32][n_exec u8][n_res u8][exec ids u32...][len u8 + frame]...[sum u32]
        if len(data) < 14 or struct.unpack_from("<I", data, 0)[0] != _FL_MAGIC:
            return
        if struct.unpack_from("<I", data, len(data) - 4)[0] != _sum(data, len(data) - 4):
            return
        self._msg_hw = struct.unpack_from("<I", data, 4)[0]
        self._msg_next = self._msg_hw
        ne = data[8]
        nr = data[9]
        off = 10
        for _ in range(ne):
            self._executed.append(struct.unpack_from("<I", data, off)[0])
            off += 4
        for _ in range(nr):
            ln = data[off]
            self._results.append(bytes(data[off + 1 : off + 1 + ln]))
            off += 1 + ln

    def save(self):
        size = 14 + 4 * len(self.executed)
        for r in self.results:
            size += 1 + len(r)
        buf = bytearray(size)
        struct.pack_into("<IIBB", buf, 0, _FL_MAGIC, self._msg_hw, len(self.executed), len(self.results))
        off = 10
        for cid in self.executed:
            struct.pack_into("<I", buf, off, cid)
            off += 4
        for r in self.results:
            buf[off] = len(r)
            buf[off + 1 : off + 1 + len(r)] = r
            off += 1 + len(r)
        struct.pack_into("<I", buf, off, _sum(buf, off))
        tmp = self._path + ".new"
        with open(tmp, "wb") as f:
            f.write(buf)
        os.rename(tmp, self._path)

    # ---- message ids of non-reading frames ----
    def msg_id(self):
        # Ids are reserved in blocks on flash before use, so a power cut never reuses one.
        # Within a block the next id travels in RTC memory from a completed wake, which a
        # power cut loses: then state.bin's mark starts a new block.
        if not self._msg_rtc or self._msg_next >= self._msg_hw:
            self._flash()  # reserving rewrites the whole file
        if self._msg_next >= self._msg_hw:
            self._msg_hw = self._msg_next + _MSG_BLOCK
            if self._msg_hw > 0xFFFFFFFF:
                self._msg_next = MSG_ID_BASE
                self._msg_hw = MSG_ID_BASE + _MSG_BLOCK
            self.save()
        i = self._msg_next
        self._msg_next += 1
        return i

    # ---- commands ----
    def was_executed(self, command_id):
        return command_id in self.executed

    def record_result(self, command_id, frame):
        """Remember that command_id ran and keep its result until delivered; durable."""
        if command_id not in self.executed:
            self.executed.append(command_id)
            if len(self.executed) > N_EXECUTED:
                self.executed.pop(0)
        self.results.append(bytes(frame))
        if len(self.results) > N_RESULTS:
            self.results.pop(0)
        self.save()

    def results_delivered(self, count):
        """The first `count` pending results reached the broker."""
        if count:
            del self.results[:count]
            self.save()


def _u32(b, o):
    return b[o] | b[o + 1] << 8 | b[o + 2] << 16 | b[o + 3] << 24


def _sum(b, n):
    s = 0x1234
    for i in range(n):
        s = (s * 31 + b[i]) & 0xFFFFFFFF
    return s
