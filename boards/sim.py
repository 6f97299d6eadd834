# The sim board: the Board API on the MicroPython unix port, so the real firmware runs on a PC.
# Flash is littlefs on an image file, RTC memory and the battery live in files of the node
# directory, time is a virtual clock the supervisor (tools/sim/node.py) advances across sleeps.
import json
import math
import os
import sys
import time as _time

import _boot_cause
import simflash
from micropython import const

NAME = "sim"
FS_ROOT = "/flash"

# Boot causes: the protocol's boot_cause enum, generated into _boot_cause.py.
POWER_ON = _boot_cause.POWER_ON
TIMER = _boot_cause.TIMER
WATCHDOG = _boot_cause.WATCHDOG
CRASH = _boot_cause.CRASH
SOFT_RESET = _boot_cause.SOFT_RESET
EXTERNAL_RESET = _boot_cause.EXTERNAL_RESET
BROWNOUT = _boot_cause.BROWNOUT

# Process exit codes the supervisor understands (documented in boards/README.md).
EXIT_DEEP_SLEEP = const(75)
EXIT_SOFT_RESET = const(76)

# Lines on stdout starting with this marker are for the supervisor, not the node log.
CONTROL = "\x00sim:"

RTC_MEMORY_SIZE = const(2048)
DIR_ENV = "TORPOR_SIM_DIR"

_DAY_MS = const(86400000)

_dir = None
_dir_override = None
_cfg = None
_state = None
_t0_ticks = 0
_bdev = None
_radio = False
_led = False
_battery = None
_clock_offset_ms = 0
_wdt_ms = 0
_rtc_files = None
# Field model (a board profile in sim.json; without one the kind model of old node dirs):
_prof = None  # the profile's figures (dict), or None
_field = None  # failure rate, outage windows, time compression, this node's drift
_skip_ms = 0  # time charged to this run but not waited in real time (boot, flash, compression)
_ledger = None  # phase -> [ms, uAh] of this wake
# Room the board's own bookkeeping takes back when the radio goes down (the energy ledger,
# the battery, the field's radio lock): taken at init, out of SIM_OVERHEAD_BYTES, so that
# the simulator's Python never competes with the firmware for a block on the chip's heap.
# Without it, an ESP32-profile node's session-end found no 752-byte block there.
_SIM_ROOM = const(2048)
_sim_room = None
_phase = "boot"
_phase_t = 0  # ticks when the open phase started
_tls = None
_booted = False
_io0 = 0  # the block device's host time when the app's phases started (F line)
_world_held = False  # this node holds the field's radio (see _world_acquire)


def _path(name):
    return _dir + "/" + name


def _read_json(name, default):
    try:
        with open(_path(name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _write_json(name, obj):
    # Write then rename, so a power cut leaves the old or the new file, never half of one.
    tmp = _path(name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj))
    os.rename(tmp, _path(name))


def _load():
    # Read the node directory once per process; the supervisor writes sim.json and state.json.
    global _dir, _cfg, _state, _t0_ticks, _clock_offset_ms
    if _cfg is not None:
        return
    _t0_ticks = _time.ticks_ms()
    _dir = (_dir_override or os.getenv(DIR_ENV) or ".").rstrip("/") or "/"
    _cfg = _read_json("sim.json", {})
    _state = _read_json("state.json", None)
    if _state is None:
        # No supervisor: start the virtual clock at the host's wall clock, as a cold boot.
        _state = {"vt_ms": int(_time.time()) * 1000, "cause": POWER_ON, "runs": 0}
    _clock_offset_ms = _read_json("clock.json", {}).get("offset_ms", 0)
    _load_profile()


def configure(node_dir):
    """Use node_dir as the node directory (instead of $TORPOR_SIM_DIR); call before init()."""
    global _cfg, _dir_override, _rtc_files, _booted
    _dir_override = node_dir
    _cfg = None
    _rtc_files = None
    _booted = False
    _load()


def _seed():
    _load()
    return _cfg.get("seed", 1)


def virtual_ms():
    """The simulated true time in unix milliseconds (the node's own clock is time())."""
    _load()
    return _state["vt_ms"] + _time.ticks_diff(_time.ticks_ms(), _t0_ticks) + _skip_ms


# ---- identity, boot ----

def init():
    # Once per process: the bootloader calls it, then the app again (a no-op then).
    global _bdev, _sim_room
    _load()
    global _booted, _io0
    if _bdev is None:
        _sim_room = bytearray(_SIM_ROOM)
        _bdev = simflash.mount(
            _path("flash.img"),
            FS_ROOT,
            _cfg.get("block_size", 4096),
            _cfg.get("block_count", 512),
        )
        _battery_account(True)
    if _prof and not _booted:
        # The chip's boot to the app happened before this process ran any firmware. (The
        # virtual board mounts the flash itself, so this does not hang on the mount.)
        _booted = True
        _charge("boot", _prof["boot_ms"], "cpu", False)
        phase("sample")
        _io0 = _bdev.io_us  # the mount above is the chip's boot, booked in boot_ms
        _install_tls()


def unique_id():
    _load()
    uid = _cfg.get("unique_id")
    if uid:
        return bytes.fromhex(uid)
    h = _mix(_seed(), 0x5EED)
    return bytes((0x02, 0x54, (h >> 24) & 0xFF, (h >> 16) & 0xFF, (h >> 8) & 0xFF, h & 0xFF))


def boot_cause():
    _load()
    return _state.get("cause", POWER_ON)


def reset_cause():
    return boot_cause()


def wake_cause():
    return boot_cause()


def flash_block_device():
    return _bdev


# ---- deterministic signals ----

def _mul32(a, m):
    # (a * m) mod 2^32 for a, m < 2^32 in two 16-bit halves: the full product would be a
    # big integer (a heap allocation per multiply); these stay small ints.
    return (a * (m & 0xFFFF) + (((a * (m >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix(a, b):
    # 32-bit integer hash: the same inputs give the same output on every run and host.
    h = (_mul32(a & 0xFFFFFFFF, 0x9E3779B1) + _mul32(b & 0xFFFFFFFF, 0x85EBCA77) + 0x165667B1) & 0xFFFFFFFF
    h ^= h >> 15
    h = _mul32(h, 0x2C1B3C6D)
    h ^= h >> 12
    h = _mul32(h, 0x297A2D39)
    h ^= h >> 15
    return h


def _lattice(seed, octave, i):
    # A value in [-1, 1) for lattice point i of one noise octave, in units of 1/65536.
    # Integer (fixed point) throughout: a float is a heap object on the ports.
    return (_mix(_mix(seed, octave), i & 0xFFFFFFFF) >> 15) - 65536


def _noise(seed, t_ms, period_ms, octave):
    # Smooth value noise (1/65536 units): smoothstep interpolation between lattice points.
    x = t_ms // period_ms
    f = (t_ms % period_ms) * 65536 // period_ms
    f = (f * f >> 16) * (196608 - 2 * f) >> 16
    a = _lattice(seed, octave, x)
    return a + ((_lattice(seed, octave, x + 1) - a) * f >> 16)


def _walk(seed, t_ms):
    # Noise octaves tuned so consecutive minutes differ by about 0.05 degC, like a random walk
    # that stays bounded: (period, amplitude in centi-degC).
    return (
        _noise(seed, t_ms, 60000, 1) * 3
        + _noise(seed, t_ms, 600000, 2) * 12
        + _noise(seed, t_ms, 3600000, 3) * 40
        + _noise(seed, t_ms, 21600000, 4) * 80
    ) >> 16


def sensors_at(seed, t_ms):
    """The sensor signals of node `seed` at virtual unix time t_ms: (0.01 degC, 0.01 %RH)."""
    base = 1500 + _mix(seed, 11) % 1000  # 15.00 .. 24.99 degC site average
    swing = 300 + _mix(seed, 12) % 400  # 3 .. 7 degC half-amplitude
    # Warmest at 15:00 UTC, with a per-node phase of up to an hour.
    phase = (t_ms - 15 * 3600000 + _mix(seed, 13) % 3600000) % _DAY_MS
    diurnal = int(swing * math.cos(6.283185307179586 * phase / _DAY_MS))
    temp = base + diurnal + _walk(seed, t_ms)
    hum = 5500 - (5 * (temp - base)) // 2 + _walk(seed + 7, t_ms) * 2
    return max(-4000, min(8500, temp)), max(500, min(9900, hum))


def read_sensors():
    """(temperature in 0.01 degC, relative humidity in 0.01 %RH) at the virtual time."""
    t = virtual_ms()
    if _field and _field.get("truth"):
        # The true sampling time, for a fleet run's verdict on stored timestamps.
        sys.stdout.write("V s %d\n" % t)
    return sensors_at(_seed(), t)


def rssi_at(seed, t_ms):
    """The RSSI of node `seed` at virtual unix time t_ms, in dBm: a site level of -50 .. -79
    and up to 4 dB of fading a minute, kept within a real radio's -100 .. -30."""
    base = -50 - _mix(seed, 21) % 30
    # _noise is in 1/65536 units: scale before adding dBm.
    return max(-100, min(-30, base + ((_noise(seed, t_ms, 60000, 22) * 4) >> 16)))


def rssi():
    """Synthetic RSSI in dBm while the radio is up; 0 when it is down."""
    if not _radio:
        return 0
    return rssi_at(_seed(), virtual_ms())


# ---- battery model ----

_CURVE = ((0, 3000), (5, 3300), (10, 3500), (20, 3620), (50, 3750), (80, 3950), (100, 4200))


def _battery_account(save=False):
    # Charge the time since the last update at the current of the state the node was in.
    # The file is written at boot and at deep sleep only: a write (JSON, file) per radio
    # switch or battery reading would be most of the board's allocation in a wake, and a
    # power cut in between is charged as awake time from the boot's record.
    global _battery
    _load()
    now = virtual_ms()
    if _battery is None:
        cap = _cfg.get("capacity_mah", 2000) * 1000.0
        start = _cfg.get("battery_start_pct", 100)
        _battery = _read_json(
            "battery.json", {"used_uah": cap * (100 - start) / 100.0, "vt_ms": now, "mode": "awake"}
        )
    b = _battery
    dt_h = max(0, now - b["vt_ms"]) / 3600000.0
    if _prof:
        dt_h = 0.0  # with a profile the battery drains by the ledger (deep_sleep books it)
    if b["mode"] == "sleep":
        ua = _cfg.get("sleep_ua", 10)
    else:
        ua = _cfg.get("awake_ma", 40) * 1000
        if b["mode"] == "radio":
            ua += _cfg.get("radio_ma", 90) * 1000
    b["used_uah"] += ua * dt_h
    b["vt_ms"] = now
    b["mode"] = "radio" if _radio else "awake"
    if save:
        _write_json("battery.json", b)


def battery_used_uah():
    """Charge drawn so far in micro-amp-hours (sim only: for tests and benchmarks)."""
    _battery_account()
    if _prof:
        return _battery["used_uah"] + sum(e[1] for e in ledger().values())
    return _battery["used_uah"]


def battery_mv():
    _battery_account()
    cap = _cfg.get("capacity_mah", 2000) * 1000.0
    pct = max(0.0, 100.0 * (1.0 - battery_used_uah() / cap))
    lo = _CURVE[0]
    for hi in _CURVE:
        if pct <= hi[0]:
            if hi[0] == lo[0]:
                return hi[1]
            return int(lo[1] + (hi[1] - lo[1]) * (pct - lo[0]) / (hi[0] - lo[0]))
        lo = hi
    return _CURVE[-1][1]


# ---- field model: profile, energy ledger ----

# The access point the sim's network has: (channel, BSSID) make the hint radio_up returns.
_AP_CHANNEL = const(6)
_AP_BSSID = b"\x02\x54\x4f\x52\x50\x52"


def _load_profile():
    global _prof, _field, _ledger, _phase, _phase_t
    _prof = _cfg.get("profile")
    _field = _cfg.get("field", {})
    _ledger = {}
    _phase = "boot"
    _phase_t = _time.ticks_ms()


def profile_name():
    """The board profile this sim board runs under ("" for the kind model of old node dirs)."""
    _load()
    return _prof["name"] if _prof else ""


def _ma(mode):
    # Current in mA of the chip in a mode, from the profile (or the old model's figures).
    if _prof:
        cpu = _prof["cpu_active_ma"]
        if mode == "cpu":
            return cpu
        if mode == "assoc":
            return cpu + _prof["radio_rx_ma"]
        return cpu + _prof["radio_listen_ma"]
    cpu = _cfg.get("awake_ma", 40)
    return cpu if mode == "cpu" else cpu + _cfg.get("radio_ma", 90)


def _book(phase, ms, ma):
    # Ledger entry: ms of `phase` at ma milliamps, in micro-amp-hours (mA * ms / 3600).
    e = _ledger.get(phase)
    if e is None:
        e = _ledger[phase] = [0, 0.0]
    e[0] += ms
    e[1] += ma * ms / 3600.0


def _close_phase():
    # Book the real time spent in the open phase at the current mode's current.
    global _phase_t
    now = _time.ticks_ms()
    ms = _time.ticks_diff(now, _phase_t)
    if ms > 0:
        _book(_phase, ms, _ma("radio" if _radio else "cpu"))
    _phase_t = now


def phase(name):
    """Mark the start of a wake phase for the energy ledger ("sample", "publish", "listen",
    ...); the time until the next mark is booked to it. Optional: a no-op on real boards."""
    global _phase
    _load()
    _close_phase()
    _phase = name


def _charge(name, ms, mode, wait=True):
    # Charge `ms` of chip time to phase `name`: a real delay of ms divided by the field's
    # time compression (the rest is added to the clocks), or no delay at all when the
    # firmware does not wait for it (boot before the app, flash timing). Back to the open
    # phase afterwards.
    global _skip_ms, _phase_t
    _close_phase()
    if ms <= 0:
        return
    waited = 0
    if wait:
        waited = int(ms / max(1.0, _field.get("awake_scale", 1.0)))
        if waited > 0:
            _time.sleep_ms(waited)
    _skip_ms += ms - waited
    _book(name, ms, _ma(mode))
    _phase_t = _time.ticks_ms()
    if _world_held:
        _world_publish()


def ledger():
    """This wake's energy ledger so far: {phase: (ms, uAh)} (sim only)."""
    _load()
    _close_phase()
    return {k: (v[0], v[1]) for k, v in _ledger.items()}


def pk_op(kind):
    """Charge one public-key operation outside TLS ("ed25519_verify") its profile time."""
    _load()
    if _prof:
        _charge(kind, _prof.get(kind + "_ms", 0), "cpu")


# ---- radio ----

def _rand(salt):
    # Deterministic per node, run and salt: a value in [0, 1).
    return _mix(_mix(_seed(), _state.get("runs", 0)), salt) / 4294967296.0


def _outage(now_ms):
    for w in _field.get("outages", ()):
        if w[0] <= now_ms < w[1]:
            return True
    return False


def radio_up(ssid, password, deadline_ms, hint=None):
    """Join the network within deadline_ms. `hint` is what a previous success returned
    (channel and BSSID, kept by the firmware in RTC memory): with the right one the board
    associates in the profile's preset time, with a stale one it falls back to a full scan.
    Returns the hint to keep, (channel, bssid), on success, False on failure."""
    global _radio
    _load()
    radio = _cfg.get("radio", {})
    _battery_account()
    _radio = True
    _battery_account()
    _close_phase()
    if not _prof:
        wait = min(deadline_ms, radio.get("connect_ms", 0))
        if not radio.get("available", True):
            wait = deadline_ms
        if wait > 0:
            _time.sleep_ms(wait)
        _close_phase()
        if not radio.get("available", True):
            radio_down()
            return False
        return (_AP_CHANNEL, _AP_BSSID)
    good = (_AP_CHANNEL, _AP_BSSID)
    need = _prof["wifi_cold_ms"]
    if hint and hint[0] == _AP_CHANNEL and bytes(hint[1]) == _AP_BSSID:
        need = _prof["wifi_preset_ms"]
    elif hint:
        need += _prof["wifi_preset_ms"]  # the preset channel/BSSID is tried first, in vain
    down = not radio.get("available", True) or _outage(virtual_ms())
    if not down and _rand(0xA550C) < _field.get("assoc_fail_rate", 0.0):
        down = True
    if down or need > deadline_ms:
        # No AP answers (or too slow): the board tries until the deadline.
        _charge("assoc", deadline_ms, "assoc")
        radio_down()
        return False
    _charge("assoc", need, "assoc")
    _world_acquire()
    if _phase == "boot" or _phase == "sample":
        phase("publish")
    return good


def radio_down():
    global _radio, _sim_room
    _sim_room = None  # the board's bookkeeping below finds its room (see _SIM_ROOM)
    if _radio:
        _close_phase()
        _battery_account()
        _radio = False
        _battery_account()
    _world_release()


# ---- the field's shared clock (a fleet in compressed time against one gateway) ----
# Each sim node keeps its own virtual time; the gateway has one clock. With a "world" in
# sim.json ({"lock": dir, "clock": file}), a node that has joined the network takes the
# field's radio (one node at a time) and, while it holds it, the gateway's clock is this
# node's true time: the clock file holds (virtual - host) milliseconds, which the gateway's
# clock adds to the host's (tools/sim/vclock.py). Waiting for the radio is a simulator
# artefact: the node's clocks and ledger stand still meanwhile.

def _world():
    w = _field.get("world") if _field else None
    return w if w else None


def _host_ms():
    return _time.time_ns() // 1000000


def _world_publish():
    w = _world()
    tmp = w["clock"] + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % (virtual_ms() - _host_ms()))
    os.rename(tmp, w["clock"])


def _world_acquire():
    global _world_held, _skip_ms, _phase_t
    w = _world()
    if w is None or _world_held:
        return
    t0 = _time.ticks_ms()
    fed = t0
    while True:
        try:
            os.mkdir(w["lock"])
            break
        except OSError:
            _time.sleep_ms(2)
            now = _time.ticks_ms()
            if _wdt_ms and _time.ticks_diff(now, fed) > 500:
                _control("feed")  # the node's time stands still: so does its watchdog
                fed = now
    with open(w["lock"] + "/owner", "w") as f:
        f.write(_dir)
    waited = _time.ticks_diff(_time.ticks_ms(), t0)
    _skip_ms -= waited
    _phase_t = _time.ticks_ms()  # the wait is not booked to the phase
    _world_held = True
    if waited > 0:
        _control("froze %d" % waited)
    _world_publish()


def _world_release():
    global _world_held
    if not _world_held:
        return
    _world_held = False
    w = _world()
    try:
        os.remove(w["lock"] + "/owner")
    except OSError:
        pass
    os.rmdir(w["lock"])


class _SimTls:
    # The port's `tls` module with each handshake charged the profile's time: installed as
    # sys.modules["tls"] by init() when the profile has one, before firmware imports it.
    def __init__(self, real, ms):
        self._real = real
        self._ms = ms

    def __getattr__(self, name):
        if name == "SSLContext":
            return self._context
        return getattr(self._real, name)

    def _context(self, protocol):
        return _SimContext(self._real.SSLContext(protocol), self._ms)


class _SimContext:
    def __init__(self, ctx, ms):
        self._ctx = ctx
        self._ms = ms

    def load_cert_chain(self, cert, key):
        return self._ctx.load_cert_chain(cert, key)

    def load_verify_locations(self, *args, **kw):
        return self._ctx.load_verify_locations(*args, **kw)

    def __setattr__(self, name, value):
        if name in ("_ctx", "_ms"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._ctx, name, value)
            if name == "psk_key" and _prof and _prof.get("tls_psk_ms"):
                # No certificate, no ECDHE: the profile's (modelled) PSK handshake.
                object.__setattr__(self, "_ms", _prof["tls_psk_ms"])

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def wrap_socket(self, sock, *args, **kw):
        # The handshake's public-key work (ECDHE, the certificate chain, CertificateVerify)
        # blocks the chip's CPU for the profile's time; on the PC it takes milliseconds.
        _charge("tls", self._ms, "radio")
        return self._ctx.wrap_socket(sock, *args, **kw)


def _install_tls():
    global _tls
    if _tls is not None or not _prof or _prof.get("tls_ms", 0) <= 0:
        return
    try:
        import tls as real
    except ImportError:
        return
    _tls = _SimTls(real, _prof["tls_ms"])
    sys.modules["tls"] = _tls


def _flash_ms():
    # Chip time of this wake's flash writes: erases and 256-byte page programs.
    if not _prof or _bdev is None:
        return 0
    # Not truncated to whole ms: one page (0.7 ms) is most sampling wakes' write.
    pages = (_bdev.prog_bytes + 255) // 256
    return _bdev.erase_count * _prof["flash_erase_4k_ms"] + pages * _prof["flash_program_256_ms"]


# The order phases are printed in; the firmware may mark others with phase().
_PHASES = ("boot", "sample", "assoc", "tls", "publish", "listen", "flash", "sleep")


def _ledger_line(sleep_ms):
    # "L <phase>=<ms>:<uAh> ... total=<uAh>": one line per wake in the node log.
    global _skip_ms
    _close_phase()
    fl = _flash_ms()
    if fl:
        _book("flash", fl, _ma("cpu"))
        _skip_ms += int(fl)
    if sleep_ms:
        ua = _prof["deep_sleep_ua"] if _prof else _cfg.get("sleep_ua", 10)
        _ledger["sleep"] = [sleep_ms, ua * sleep_ms / 3600000.0]
    total = 0.0
    parts = []
    names = [k for k in _PHASES if k in _ledger] + [k for k in _ledger if k not in _PHASES]
    for k in names:
        e = _ledger[k]
        total += e[1]
        parts.append("%s=%d:%.3f" % (k, round(e[0]), e[1]))
    sys.stdout.write("L %s total=%.3f\n" % (" ".join(parts), total))
    return total


# ---- sleep, RTC memory, clock ----

def _control(line):
    sys.stdout.write(CONTROL + line + "\n")


def deep_sleep(ms):
    """End this run; the supervisor restarts the node after ms of virtual time, RAM lost."""
    global _radio
    if _bdev is not None:
        # Flash wear of this wake, for benchmarks: bytes programmed, blocks erased.
        # read= bytes read, reads= block-device reads, io_us= host time in the Python block
        # device (a chip's littlefs reads in C: benchmarks take it out of the CPU time).
        sys.stdout.write("F prog=%d erase=%d read=%d reads=%d io_us=%d\n" % (
            _bdev.prog_bytes, _bdev.erase_count, _bdev.read_bytes, _bdev.reads, _bdev.io_us - _io0))
    radio_down()
    total = _ledger_line(ms)
    _battery_account()
    if _prof:
        # The battery drains by the ledger: this wake's phases and the coming sleep.
        _battery["used_uah"] = _battery.get("ledger_uah", _battery["used_uah"]) + total
        _battery["ledger_uah"] = _battery["used_uah"]
    _battery["mode"] = "sleep"
    _write_json("battery.json", _battery)
    if _skip_ms:
        _control("skip %d" % _skip_ms)
    _control("sleep %d" % ms)
    # SystemExit skips `except Exception`; the supervisor also kills a process that lingers.
    sys.exit(EXIT_DEEP_SLEEP)


def _rtc_paths():
    # Made once: RTC memory is read once and written twice a wake.
    global _rtc_files
    if _rtc_files is None:
        _load()
        _rtc_files = (_path("rtc.bin"), _path("rtc.bin.tmp"))
    return _rtc_files


def rtc_memory():
    try:
        with open(_rtc_paths()[0], "rb") as f:
            return f.read()
    except OSError:
        return b""


def rtc_memory_write(data):
    if len(data) > RTC_MEMORY_SIZE:
        raise ValueError("RTC memory holds %d bytes" % RTC_MEMORY_SIZE)
    path, tmp = _rtc_paths()
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def _rtc_ms():
    # The node's RTC before set_time's correction: with a profile, the supervisor keeps it
    # (cold-boot value after a power-on, drifting in deep sleep); else the true time.
    _load()
    base = _state.get("rtc_ms")
    if base is None:
        return virtual_ms()
    return base + _time.ticks_diff(_time.ticks_ms(), _t0_ticks) + _skip_ms


def time_ms():
    """The node's wall clock in unix milliseconds (its RTC plus set_time's correction)."""
    return _rtc_ms() + _clock_offset_ms


def time():
    return (time_ms() // 1000) & 0xFFFFFFFF


def set_time(seconds):
    global _clock_offset_ms
    _clock_offset_ms = seconds * 1000 - _rtc_ms()
    _write_json("clock.json", {"offset_ms": _clock_offset_ms})
    if _field and _field.get("truth"):
        sys.stdout.write("V c %d\n" % virtual_ms())


# ---- LED, button, watchdog, reset ----

def led(on):
    global _led
    _led = bool(on)


def led_state():
    return _led


def button():
    """True while the file `button` exists in the node directory."""
    _load()
    try:
        os.stat(_path("button"))
        return True
    except OSError:
        return False


def watchdog_start(timeout_ms):
    """The supervisor ends the process (exit kind `watchdog`) if not fed within timeout_ms."""
    global _wdt_ms
    _load()
    if _prof and _prof.get("watchdog_max_ms", 0):
        timeout_ms = min(timeout_ms, _prof["watchdog_max_ms"])  # the RP2's counter clamps
    _wdt_ms = timeout_ms
    _control("wdt %d" % timeout_ms)


def watchdog_feed():
    if _wdt_ms:
        _control("feed")


def reset():
    _control("reset")
    sys.exit(EXIT_SOFT_RESET)
