# Field behaviour of the wake cycle inside the unix port on the sim board: the clock taken
# from the gateway (sanity rule, readings stamped before it), the next listening time, a
# command's expiry, safe mode's refusal, the watchdog and the cached broker address.
import json
import os
import socket
import struct
import sys

import mpunit
import sim

sys.modules["board"] = sim  # what lib/board.py does on a sim node

import app  # noqa: E402
import commands  # noqa: E402
import config  # noqa: E402
import mqtt  # noqa: E402
import proto  # noqa: E402
import state  # noqa: E402
import wire  # noqa: E402

BASE = {"device_id": "n1", "broker_host": "127.0.0.1"}
T0 = 1767225600  # 2026-01-01


def _node(**over):
    d = mpunit.tmpdir() + "/node"
    try:
        os.mkdir(d)
    except OSError:
        pass
    with open(d + "/state.json", "w") as f:
        f.write(json.dumps({"vt_ms": T0 * 1000, "cause": sim.TIMER, "runs": 1}))
    with open(d + "/sim.json", "w") as f:
        f.write(json.dumps({"seed": 3, "block_count": 64}))
    sim.configure(d)
    sim.init()
    cfg = dict(BASE)
    cfg.update(over)
    with open(sim.FS_ROOT + "/config.json", "w") as f:
        f.write(json.dumps(cfg))
    return d


class _Q:
    next_id = 1
    depth = 0


def test_clock_is_set_only_to_plausible_times_and_kept_in_rtc_memory():
    _node()
    sim.set_time(946684800)  # what an ESP32 reads after power-on
    st = state.State(sim, sim.FS_ROOT)
    st.queue = _Q()
    st.queue.next_id = 7
    for absurd in (0, 946684800, 1600000000, 4200000000):
        mpunit.eq(st.set_clock(absurd), None)
    mpunit.eq(st.clock_set, 0)
    mpunit.eq(sim.time() < 946684900, True)
    step = st.set_clock(T0 + 5)
    mpunit.eq(abs(step - (T0 + 5 - 946684800)) <= 1, True)
    mpunit.eq((st.clock_set, st.sync_id), (1, 7))
    mpunit.eq(abs(sim.time() - (T0 + 5)) <= 1, True)
    # A later setting (drift) moves the clock but not the shift of the early readings.
    st.queue.next_id = 9
    mpunit.eq(st.set_clock(T0 + 8) is not None, True)
    mpunit.eq((st.sync_id, st.sync_off), (7, step))
    st.epoch_id = 3
    st.broker_ip = b"\x7f\x00\x00\x01"
    st.keep_wifi_hint((6, b"\x01\x02\x03\x04\x05\x06"))
    st.save_rtc()
    st2 = state.State(sim, sim.FS_ROOT)
    mpunit.eq((st2.clock_set, st2.epoch_id, st2.sync_id, st2.sync_off), (1, 3, 7, step))
    mpunit.eq(st2.broker_ip, b"\x7f\x00\x00\x01")
    mpunit.eq(st2.wifi_hint(), (6, b"\x01\x02\x03\x04\x05\x06"))
    st2.keep_wifi_hint(None)
    mpunit.eq(st2.wifi_hint(), None)


def _recs(first_ts, n):
    rs = wire.RECORD_SIZE_ENV3
    b = bytearray(rs * n)
    for i in range(n):
        struct.pack_into(wire.RECORD_ENV3, b, i * rs, first_ts + 60 * i, 2000, 5000, 3700)
    return b


def test_readings_stamped_before_the_clock_was_set_are_flagged_or_shifted():
    _node()
    w = app.Wake()
    w.st = state.State(sim, sim.FS_ROOT)
    w.st.epoch_id = 5
    w.recs = _recs(946684800, 6)
    # Unset clock: readings of an earlier power session (ids < 5) are on the wall clock,
    # those from 5 on on the chip's count.
    mpunit.eq(w._clock_run(2, 6), (3, False))
    mpunit.eq(w._clock_run(5, 6), (6, True))
    # Set at id 8 with a step of 1000 s: ids 5..7 travel shifted, 8.. as they are.
    w.st.clock_set = 1
    w.st.sync_id = 8
    w.st.sync_off = 1000
    mpunit.eq(w._clock_run(5, 6), (3, False))
    mpunit.eq([struct.unpack_from("<I", w.recs, 10 * i)[0] for i in range(4)],
              [946685800, 946685860, 946685920, 946684800 + 180])
    mpunit.eq(w._clock_run(8, 6), (6, False))


def test_next_listen_counts_the_sampling_wakes_until_a_send_is_due():
    _node()
    w = app.Wake()
    w.cfg = config.Config(sim.FS_ROOT)  # defaults: 60 s, send_every 10, max age 3600 s
    w.st = state.State(sim, sim.FS_ROOT)
    w.q = _Q()
    w.period = 60
    mpunit.eq(w.next_listen_s(55), 55 + 9 * 60)
    w.cfg.send_max_age_s = 120  # the first reading is two periods old at the third wake
    mpunit.eq(w.next_listen_s(55), 55 + 2 * 60)
    w.hint = 1  # the gateway has more: the next wake connects
    mpunit.eq(w.next_listen_s(55), 55)


def test_an_expired_command_is_answered_expired_and_safe_mode_runs_none():
    _node()
    c = config.Config(sim.FS_ROOT)
    st = state.State(sim, sim.FS_ROOT)
    st.queue = _Q()
    st.set_clock(T0 + 100)
    fx = commands.Effects()
    buf = bytearray(128)
    cmd = (1, 21, proto.COMMAND_OP_SET_INTERVAL, [300], 1, 5, b"", T0 + 99)
    n = commands.execute(cmd, c, st, sim, fx, buf, st.msg_id())
    r = proto.decode(buf[:n])[1]
    mpunit.eq(r[proto.COMMAND_RESULT_STATUS], proto.RESULT_STATUS_EXPIRED)
    mpunit.eq(c.sample_interval_s, 60)  # not run
    mpunit.eq(st.was_executed(21), True)  # a redelivery is a duplicate, not a second try
    cmd = (1, 22, proto.COMMAND_OP_SET_INTERVAL, [300], 1, 5, b"", T0 + 200)
    n = commands.execute(cmd, c, st, sim, fx, buf, st.msg_id())
    mpunit.eq(proto.decode(buf[:n])[1][proto.COMMAND_RESULT_STATUS], proto.RESULT_STATUS_OK)
    cmd = (1, 23, proto.COMMAND_OP_STAY_AWAKE, [30], 1, 5, b"", 0)
    n = commands.execute(cmd, c, st, sim, fx, buf, st.msg_id(), True)
    r = proto.decode(buf[:n])[1]
    mpunit.eq((r[proto.COMMAND_RESULT_STATUS], r[proto.COMMAND_RESULT_DETAIL]),
              (proto.RESULT_STATUS_REFUSED, "safe mode"))
    mpunit.eq((fx.stay_awake_ms, st.was_executed(23)), (0, False))


def test_the_watchdog_is_armed_for_the_awake_budget_plus_a_margin():
    _node(awake_budget_ms=9000)
    w = app.Wake()
    w.boot()
    mpunit.eq(sim._wdt_ms, 9000 + app.WDT_MARGIN_MS)


def test_the_broker_address_is_used_without_resolving_the_name():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(socket.getaddrinfo("127.0.0.1", 0)[0][-1])
    srv.listen(1)
    port = 0
    for p in range(47000, 47100):  # the unix port cannot read back an ephemeral port
        try:
            s2 = socket.socket()
            s2.bind(socket.getaddrinfo("127.0.0.1", p)[0][-1])
            s2.listen(1)
            srv.close()
            srv, port = s2, p
            break
        except OSError:
            s2.close()
    mpunit.eq(port > 0, True)
    # A name no resolver knows: only the cached address can reach the listener.
    c = mqtt.MQTTClient("n1", "broker.invalid", port, addr=b"\x7f\x00\x00\x01")
    c._open(mqtt.deadline(2000))
    mpunit.eq(c.ip, b"\x7f\x00\x00\x01")
    c.close()
    c = mqtt.MQTTClient("n1", "broker.invalid", port)
    mpunit.raises(OSError, c._open, mqtt.deadline(2000))
    srv.close()


def test_safe_mode_counts_failing_boots_across_power_loss_and_stays():
    d = _node()
    st = state.State(sim, sim.FS_ROOT)
    # A completed timer wake: RTC memory only, no boots.bin.
    st.rtc_valid = True
    mpunit.eq(st.count_boot(True, 3), False)
    st.finish_boot()
    st.save_rtc()
    mpunit.raises(OSError, os.stat, sim.FS_ROOT + "/boots.bin")
    safe = []
    for i in range(5):
        st = state.State(sim, sim.FS_ROOT)  # a boot after a crash (cause != timer)
        safe.append(st.count_boot(False, 3))
        st.save_rtc()  # then it crashes: no finish_boot()
        if i == 1:
            os.remove(d + "/rtc.bin")  # power lost between two crashing boots
    mpunit.eq(safe, [False, False, False, True, True])  # the 4th failing boot in a row
    # A safe wake completes; the next boots stay safe, even after power loss.
    st.finish_boot()
    st.save_rtc()
    st = state.State(sim, sim.FS_ROOT)
    mpunit.eq(st.count_boot(True, 3), True)
    st.finish_boot()
    st.save_rtc()
    os.remove(d + "/rtc.bin")
    st = state.State(sim, sim.FS_ROOT)
    mpunit.eq(st.count_boot(False, 3), True)
    st.leave_safe_mode()
    st.finish_boot()
    st.save_rtc()
    os.remove(d + "/rtc.bin")
    st = state.State(sim, sim.FS_ROOT)
    mpunit.eq(st.count_boot(False, 3), False)


def test_the_wifi_hint_is_kept_passed_on_and_dropped_after_a_failure():
    import time

    _node()
    w = app.Wake()
    w.cfg = config.Config(sim.FS_ROOT)
    w.st = state.State(sim, sim.FS_ROOT)
    calls = []
    ok = [True]

    def up(ssid, password, deadline_ms, hint=None):
        calls.append(hint)
        return (6, b"\x01\x02\x03\x04\x05\x06") if ok[0] else False

    real = sim.radio_up
    sim.radio_up = up
    try:
        budget = app.Deadline(time.ticks_ms(), 5000)
        w._radio_up(budget)
        w._radio_up(budget)
        mpunit.eq(calls, [None, (6, b"\x01\x02\x03\x04\x05\x06")])
        ok[0] = False
        mpunit.raises(OSError, w._radio_up, budget)
        mpunit.eq(w.st.wifi_hint(), None)
        ok[0] = True
        w._radio_up(budget)
        mpunit.eq(calls[-1], None)  # the next try scans
    finally:
        sim.radio_up = real
    # A board that keeps no hint (True) is never given one.
    w.st.keep_wifi_hint(None)
    sim.radio_up = lambda ssid, password, deadline_ms, hint=None: calls.append(hint) or True
    try:
        w._radio_up(budget)
        w._radio_up(budget)
        mpunit.eq(calls[-2:], [None, None])
    finally:
        sim.radio_up = real
    # The sim board reports the access point it joined, as a hint to keep.
    mpunit.eq(sim.radio_up("s", "p", 100), (6, bytes(sim._AP_BSSID)))


class _FakeWLAN:
    # network.WLAN as the ESP32 and RP2 ports have it, with one access point per BSSID.
    aps = ((b"home", b"\xaa" * 6, 1, -70, 3, 0), (b"home", b"\xbb" * 6, 11, -50, 3, 0),
           (b"other", b"\xcc" * 6, 6, -30, 3, 0))
    down = b""  # a BSSID that does not answer

    def __init__(self, _iface):
        self.on = False
        self.joined = None
        self.log = []

    def active(self, on=None):
        if on is None:
            return self.on
        self.on = on

    def isconnected(self):
        return self.joined is not None

    def config(self, **kw):
        self.log.append(("config", kw.get("channel")))

    def connect(self, ssid, key, bssid=None):
        self.log.append(("connect", bssid))
        for ap in self.aps:
            if ap[0] == ssid.encode() and (bssid is None or ap[1] == bssid) and ap[1] != self.down:
                self.joined = ap
                return

    def disconnect(self):
        self.joined = None

    def scan(self):
        self.log.append(("scan", None))
        return list(self.aps)

    def status(self, what):
        return self.joined[3] if self.joined else 0


def test_real_boards_join_with_the_hint_and_scan_when_it_fails():
    class network:  # the ports' module; the unix port has none
        WLAN = _FakeWLAN
        STA_IF = 0

    sys.modules["network"] = network
    import _wlan

    _wlan._wlan = None
    # Cold: one scan, the strongest access point of the network, its hint kept.
    mpunit.eq(_wlan.radio_up("home", "pw", 500), (11, b"\xbb" * 6))
    wl = _wlan._wlan
    mpunit.eq(wl.log, [("scan", None), ("config", 11), ("connect", b"\xbb" * 6)])
    _wlan.radio_down()
    # With the hint: no scan.
    wl.log = []
    mpunit.eq(_wlan.radio_up("home", "pw", 500, (11, b"\xbb" * 6)), (11, b"\xbb" * 6))
    mpunit.eq([e[0] for e in wl.log], ["config", "connect"])
    _wlan.radio_down()
    # The hinted access point is gone: after the fast try, a scan finds the other.
    _FakeWLAN.down = b"\xbb" * 6
    _FakeWLAN.aps = _FakeWLAN.aps[:1] + _FakeWLAN.aps[2:]
    wl.log = []
    _wlan.FAST_JOIN_MS = 100
    mpunit.eq(_wlan.radio_up("home", "pw", 800, (11, b"\xbb" * 6)), (1, b"\xaa" * 6))
    mpunit.eq([e[0] for e in wl.log], ["config", "connect", "scan", "config", "connect"])


def test_steps_end_before_a_short_hardware_watchdog_bites():
    import time

    _node()  # awake_budget_ms 15000: longer than an RP2 watchdog (8.4 s) can wait
    w = app.Wake()
    w.cfg = config.Config(sim.FS_ROOT)
    dl = app.Deadline(time.ticks_ms(), 15000)
    mpunit.eq(dl.step(), dl.at)  # the sim's watchdog waits as long as asked
    sim.WDT_MAX_MS = 8388
    try:
        left = time.ticks_diff(dl.step(), time.ticks_ms())
        mpunit.eq(7000 <= left <= 7388, True)
    finally:
        del sim.WDT_MAX_MS
