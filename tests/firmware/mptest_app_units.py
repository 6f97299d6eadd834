# Units of the wake cycle inside the unix port on the sim board: config validation and
# atomic apply, persisted state (RTC memory and flash), idempotent commands, the sleep grid.
import json
import os
import sys

import mpunit
import sim

sys.modules["board"] = sim  # what lib/board.py does on a sim node

import app  # noqa: E402
import commands  # noqa: E402
import config  # noqa: E402
import proto  # noqa: E402
import state  # noqa: E402

BASE = {"device_id": "n1", "broker_host": "127.0.0.1"}


def _node(cfg=None):
    d = mpunit.tmpdir() + "/node"
    os.mkdir(d)
    with open(d + "/state.json", "w") as f:
        f.write(json.dumps({"vt_ms": 1767225600000, "cause": sim.TIMER, "runs": 1}))
    with open(d + "/sim.json", "w") as f:
        f.write(json.dumps({"seed": 3, "block_count": 64}))
    sim.configure(d)
    sim.init()
    if cfg is not None:
        with open(sim.FS_ROOT + "/config.json", "w") as f:
            f.write(json.dumps(cfg))
    return d


def _cfg(**over):
    c = dict(BASE)
    c.update(over)
    return c


def test_config_defaults_and_errors_name_the_key():
    _node(_cfg())
    c = config.Config(sim.FS_ROOT)
    mpunit.eq(c.sample_interval_s, 60)
    mpunit.eq(c.broker_port, 8883)
    mpunit.eq(c.path("cert"), "/flash/certs/cert.der")
    for bad, key in (
        (_cfg(send_every=0), "send_every"),
        (_cfg(sample_interval_s="60"), "sample_interval_s"),
        (_cfg(colour=1), "colour"),
        ({"broker_host": "h"}, "device_id"),
        (_cfg(temp_low=100, temp_high=50), "temp_low"),
    ):
        with open(sim.FS_ROOT + "/config.json", "w") as f:
            f.write(json.dumps(bad))
        e = mpunit.raises(config.ConfigError, config.Config, sim.FS_ROOT)
        mpunit.eq(e.key, key)


def test_apply_is_all_or_nothing_and_survives_a_reboot():
    _node(_cfg())
    c = config.Config(sim.FS_ROOT)
    err = c.apply((("send_every", 5), ("sample_interval_s", 0)), 3)
    mpunit.eq(err.key, "sample_interval_s")
    mpunit.eq(c.send_every, 10)
    mpunit.eq(c.apply((("send_every", 5), ("temp_high", 3000)), 3), None)
    c2 = config.Config(sim.FS_ROOT)
    mpunit.eq((c2.send_every, c2.temp_high, c2.version), (5, 3000, 3))
    mpunit.eq("applied.json.new" in os.listdir(sim.FS_ROOT), False)
    rep = dict(c2.report())
    mpunit.eq(rep[proto.CONFIG_KEY_SEND_EVERY], 5)


def test_state_rtc_and_flash_round_trip():
    _node(_cfg())
    st = state.State(sim, sim.FS_ROOT)
    mpunit.eq(st.rtc_valid, False)
    st.boots_incomplete = 2
    st.fails = 3
    st.next_try = 1767225999
    st.save_rtc()
    first = st.msg_id()
    mpunit.eq(first, state.MSG_ID_BASE)
    st.record_result(77, b"\x10\x05abcd")
    st2 = state.State(sim, sim.FS_ROOT)
    mpunit.eq((st2.boots_incomplete, st2.fails, st2.next_try), (2, 3, 1767225999))
    mpunit.eq(st2.was_executed(77), True)
    mpunit.eq(st2.results, [b"\x10\x05abcd"])
    # Ids are reserved in blocks before use: a reboot never hands out one twice.
    mpunit.eq(st2.msg_id() > first, True)
    st2.results_delivered(1)
    mpunit.eq(state.State(sim, sim.FS_ROOT).results, [])


def test_state_keeps_the_last_wakes_energy_facts_and_reads_the_earlier_layout():
    import struct

    _node(_cfg())
    st = state.State(sim, sim.FS_ROOT)
    mpunit.eq((st.prev_awake_ms, st.prev_radio_ms, st.prev_sent), (0, 0, 0))
    st.prev_awake_ms = 4321
    st.prev_radio_ms = 3170
    st.prev_sent = 1
    st.fails = 2
    st.save_rtc(bytearray(state.RTC_SIZE) + b"resume")
    st2 = state.State(sim, sim.FS_ROOT)
    mpunit.eq((st2.prev_awake_ms, st2.prev_radio_ms, st2.prev_sent, st2.fails), (4321, 3170, 1, 2))
    mpunit.eq(bytes(st2.rtc_extra), b"resume")
    # RTC memory as an image of the release before (54 bytes, "TRS3") left it: its fields
    # and resume record are read, the energy facts are unknown (0).
    old = bytearray(54)
    struct.pack_into("<IBHBIBIIIIBIIi4sB6sB", old, 0, 0x54525333, 0, 7, 1, 0, 0, 1767225000,
                     0, 0, 0, 1, 5, 0, 0, b"\0\0\0\0", 0, b"", 0)
    sim.rtc_memory_write(old + b"resume3")
    st3 = state.State(sim, sim.FS_ROOT)
    mpunit.eq((st3.rtc_valid, st3.boots_without_send, st3.fails, st3.last_wake, st3.clock_set,
               st3.epoch_id), (True, 7, 1, 1767225000, 1, 5))
    mpunit.eq((st3.prev_awake_ms, st3.prev_radio_ms, st3.prev_sent), (0, 0, 0))
    mpunit.eq(bytes(st3.rtc_extra), b"resume3")


def test_state_reads_state_bin_only_when_a_completed_wake_left_no_count():
    _node(_cfg())
    st = state.State(sim, sim.FS_ROOT)
    st.record_result(5, b"\x10\x05r1")
    st.boots_incomplete = 0
    st.save_rtc()  # a completed wake: one result pending
    st2 = state.State(sim, sim.FS_ROOT)
    mpunit.eq((st2._results, st2.has_results()), (None, True))  # from RTC, no file read
    mpunit.eq(st2.results, [b"\x10\x05r1"])  # read when needed
    st2.results_delivered(1)
    st2.save_rtc()
    st3 = state.State(sim, sim.FS_ROOT)
    mpunit.eq((st3._results, st3.has_results()), (None, False))
    # A wake that did not complete may have changed state.bin after its RTC write: the
    # count is not trusted and the file is read.
    st3.boots_incomplete = 1
    st3.record_result(6, b"\x10\x05r2")  # state.bin changes, RTC still says none pending
    st3.save_rtc()
    st4 = state.State(sim, sim.FS_ROOT)
    mpunit.eq((st4._results is not None, st4.has_results()), (True, True))
    # msg_id() reads the file too: ids stay reserved across wakes.
    first = st4.msg_id()
    st4.boots_incomplete = 0
    st4.save_rtc()
    st5 = state.State(sim, sim.FS_ROOT)
    mpunit.eq(st5._results, None)
    mpunit.eq(st5.msg_id() > first, True)


def test_msg_ids_come_from_rtc_memory_between_reservations():
    _node(_cfg())
    st = state.State(sim, sim.FS_ROOT)
    a = st.msg_id()  # reserves a block on flash
    st.boots_incomplete = 0
    st.save_rtc()  # a completed wake
    st2 = state.State(sim, sim.FS_ROOT)
    b = st2.msg_id()
    mpunit.eq((b, st2._results), (a + 1, None))  # the next id, state.bin not read
    st2.boots_incomplete = 0
    st2.save_rtc()
    # A power cut loses RTC memory: the mark on flash starts a new block, no id comes twice.
    sim.rtc_memory_write(b"")
    st3 = state.State(sim, sim.FS_ROOT)
    c = st3.msg_id()
    mpunit.eq(c > b, True)
    # A wake that did not complete leaves no trusted ids either.
    st3.boots_incomplete = 1
    st3.save_rtc()
    st4 = state.State(sim, sim.FS_ROOT)
    mpunit.eq(st4._msg_rtc, False)
    mpunit.eq(st4.msg_id() > c, True)


def _for_commands():
    # A node's configuration, state, effects and result buffer, as a wake runs commands.
    _node(_cfg())
    return config.Config(sim.FS_ROOT), state.State(sim, sim.FS_ROOT), commands.Effects(), bytearray(128)


def test_commands_are_idempotent_by_id():
    c, st, fx, buf = _for_commands()
    cmd = (1, 9, proto.COMMAND_OP_SET_INTERVAL, [300], 1, 60, b"", 0)
    n = commands.execute(cmd, c, st, sim, fx, buf, st.msg_id())
    r = proto.decode(buf[:n])[1]
    mpunit.eq((r[proto.COMMAND_RESULT_STATUS], r[proto.COMMAND_RESULT_VALUES]), (proto.RESULT_STATUS_OK, [300]))
    n = commands.execute(cmd, c, st, sim, fx, buf, st.msg_id())
    mpunit.eq(proto.decode(buf[:n])[1][proto.COMMAND_RESULT_STATUS], proto.RESULT_STATUS_DUPLICATE)
    # Known after a "power cut": a fresh State reads the executed ids from flash.
    st2 = state.State(sim, sim.FS_ROOT)
    n = commands.execute(cmd, c, st2, sim, fx, buf, st2.msg_id())
    mpunit.eq(proto.decode(buf[:n])[1][proto.COMMAND_RESULT_STATUS], proto.RESULT_STATUS_DUPLICATE)
    n = commands.execute((1, 10, proto.COMMAND_OP_STAY_AWAKE, [5], 1, 60, b"", 0), c, st, sim, fx, buf, 5)
    mpunit.eq(fx.stay_awake_ms, 5000)
    n = commands.execute((1, 11, proto.COMMAND_OP_REBOOT, [], 1, 60, b"", 0), c, st, sim, fx, buf, 6)
    mpunit.eq(fx.reboot, True)
    n = commands.execute((1, 12, proto.COMMAND_OP_SET_THRESHOLDS, [1], 1, 60, b"", 0), c, st, sim, fx, buf, 7)
    mpunit.eq(proto.decode(buf[:n])[1][proto.COMMAND_RESULT_STATUS], proto.RESULT_STATUS_BAD_ARGS)


def test_set_keys_runs_in_safe_mode_and_its_last_piece_waits_for_the_next_wake():
    import keylist

    c, st, fx, buf = _for_commands()
    blob = b'{"key_id":"0badc0de","keys":{},"seq":1}' + bytes(64)
    # Safe mode: a ping is refused, a key list's piece is taken.
    n = commands.execute((1, 20, proto.COMMAND_OP_PING, [], 1, 60, b"", 0), c, st, sim, fx, buf, 1, True)
    mpunit.eq(proto.decode(buf[:n])[1][proto.COMMAND_RESULT_DETAIL], "safe mode")
    piece = (1, 21, proto.COMMAND_OP_SET_KEYS, [1, 0, len(blob)], 1, 60, blob[:60], 0)
    n = commands.execute(piece, c, st, sim, fx, buf, 2, True)
    r = proto.decode(buf[:n])[1]
    mpunit.eq((r[proto.COMMAND_RESULT_STATUS], fx.pending), (proto.RESULT_STATUS_OK, False))
    # The last piece stages the list: no answer, nothing recorded, the next wake comes soon.
    last = (1, 22, proto.COMMAND_OP_SET_KEYS, [1, 60, len(blob)], 1, 60, blob[60:], 0)
    mpunit.eq(commands.execute(last, c, st, sim, fx, buf, 3, True), 0)
    mpunit.eq((fx.pending, st.was_executed(22)), (True, False))
    # The next sending wake's start: the check, and the answer of command 22.
    st2 = state.State(sim, sim.FS_ROOT)
    mpunit.eq(keylist.apply_staged(st2), 1)
    mpunit.eq(keylist.apply_staged(st2), 0)
    r = proto.decode(st2.results[-1])[1]
    mpunit.eq((r[proto.COMMAND_RESULT_COMMAND_ID], r[proto.COMMAND_RESULT_STATUS], r[proto.COMMAND_RESULT_DETAIL]),
              (22, proto.RESULT_STATUS_REFUSED, "unknown_key"))
    n = commands.execute(last, c, st2, sim, fx, buf, 4, True)
    mpunit.eq(proto.decode(buf[:n])[1][proto.COMMAND_RESULT_STATUS], proto.RESULT_STATUS_DUPLICATE)


def test_sleep_lands_on_the_grid_and_hints_shorten_it():
    _node(_cfg(align_s=60))
    w = app.Wake()
    w.cfg = config.Config(sim.FS_ROOT)
    w.period = 60
    w.now = 1767225600 + 59  # woke a second early for the :01:00 slot
    w.clock_t0 = w.now * 1000
    mpunit.eq(w.slot(w.now), 1767225660)
    mpunit.eq(w.slot(1767225600 + 61), 1767225660)
    ms = w.plan_sleep()
    mpunit.eq(55000 < ms <= 61000, True)
    w.hint = 1
    mpunit.eq(w.plan_sleep(), app.PENDING_WAKE_S * 1000)
    w.hint = 0
    w.sleep_req = 600
    mpunit.eq(w.plan_sleep(), 600000)


def _plain_fields(p):
    # What the wake takes from ACK / SLEEP_NOW in place, or None when it leaves the frame to
    # the codec (the same reads as Wake._on_down, through the generated in-place readers).
    end = proto.in_place(p)
    t = p[1] if len(p) > 1 else 0
    if end and t == proto.ACK:
        return (proto.read_ack(p, end)[0], [])
    if end and t == proto.SLEEP_NOW:
        return proto.read_sleep_now(p, end)
    return None


def _codec_fields(p):
    try:
        t, f = proto.decode(p)
    except proto.ProtocolError:
        return "refused"
    if t == proto.ACK:
        return (f[proto.ACK_CUMULATIVE], f[proto.ACK_SELECTIVE])
    return (f[proto.SLEEP_NOW_SLEEP_S], f[proto.SLEEP_NOW_PENDING])


def test_ack_and_sleep_now_read_in_place_agree_with_the_codec():
    buf = bytearray(proto.MAX_ACK)
    frames = []
    for cum, sel, tm, pend in ((7, [], 0, 0), (0xFFFFFFFF, [], 1767225600, 3), (64, [], 0, 255),
                               (64, [], 5, 0), (9, [11, 12], 5, 1)):
        frames.append(bytes(buf[: proto.encode_ack(buf, 0x80000001, cum, sel, tm, pend)]))
    for s, pend in ((0, 0), (600, 0), (0xFFFFFFFF, 2)):
        frames.append(bytes(buf[: proto.encode_sleep_now(buf, 5, s, pend)]))
    # The frames the gateway sends take the in-place path.
    for p in frames[:4] + frames[5:]:
        mpunit.eq(_plain_fields(p), _codec_fields(p))
    mpunit.eq(_plain_fields(frames[4]), None)  # selective ids: the codec decodes them
    # Damaged, truncated, extended or reordered frames: whenever the in-place read accepts a
    # frame, the codec accepts it too and reads the same values.
    tried = taken = 0
    for p in frames:
        variants = [p[:k] for k in range(len(p))]
        variants += [p + b"\x00", p + b"\x05\x01\x00", p[:6] + b"\x00" + p[7:]]
        for i in range(len(p)):
            for v in (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x21, 0x7F, 0x80, 0xFF):
                variants.append(p[:i] + bytes((v,)) + p[i + 1 :])
        for q in variants:
            mine = _plain_fields(q)
            tried += 1
            if mine is not None:
                taken += 1
                mpunit.eq(mine, _codec_fields(q))
    mpunit.eq(tried > 500 and taken > 50, True)
    # Optional fields out of order or repeated are the codec's to refuse.
    p = frames[1]  # ..., time (tag 3) at 11..16, pending (tag 4) at 17..19
    ack = p[:11] + p[17:20] + p[11:17]
    mpunit.eq(_plain_fields(ack), None)
    mpunit.eq(_codec_fields(ack), "refused")


def test_on_down_reads_ack_and_sleep_now_without_the_codec_objects():
    import gc

    _node(_cfg())

    class Q:
        floor = depth = 0

        def ack(self, cum, sel):
            self.floor = cum
            self.sel = sel

    w = app.Wake()
    w.q = Q()
    w.st = state.State(sim, sim.FS_ROOT)
    buf = bytearray(proto.MAX_ACK)
    ack = memoryview(bytearray(buf[: proto.encode_ack(buf, 1, 64, [], 1767225600, 0)]))
    sleep = memoryview(bytearray(buf[: proto.encode_sleep_now(buf, 1, 0, 4)]))
    w._on_down(None, ack)
    mpunit.eq((w.q.floor, w.q.sel), (64, ()))
    gc.collect()
    a = gc.mem_alloc()
    w._on_down(None, sleep)
    used = gc.mem_alloc() - a
    mpunit.eq((w.sleep_req, w.hint, w.listening), (0, 1, 1))  # listening: RELEASED
    print("mem_alloc SLEEP_NOW read in place:", used)
    assert used < 128, used  # the instance dict takes the three fields; the codec took 160+
