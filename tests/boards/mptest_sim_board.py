# The sim board inside one unix-port process: flash, sensors, battery, RTC memory, clock.
# Behaviour across processes (deep sleep, power cuts) is in test_sim_supervisor.py.
import json
import os
import time

import mpunit
import sim

TIMEOUT = 60


def _node(name, **cfg):
    d = mpunit.tmpdir() + "/" + name
    os.mkdir(d)
    with open(d + "/sim.json", "w") as f:
        f.write(json.dumps(cfg))
    with open(d + "/state.json", "w") as f:
        f.write(json.dumps({"vt_ms": 1767225600000, "cause": sim.TIMER, "runs": 3}))
    sim.configure(d)
    return d


def test_flash_is_littlefs_with_the_configured_geometry():
    d = _node("n", block_count=64)
    sim.init()
    st = os.statvfs(sim.FS_ROOT)
    mpunit.eq(st[0], 4096)
    mpunit.eq(st[2], 64)
    with open(sim.FS_ROOT + "/queue.bin", "wb") as f:
        f.write(b"x" * 10000)
    mpunit.eq(os.stat(sim.FS_ROOT + "/queue.bin")[6], 10000)
    mpunit.eq(os.stat(d + "/flash.img")[6], 64 * 4096)
    mpunit.eq(sim.flash_block_device().ioctl(4, 0), 64)


def test_boot_state_and_virtual_clock_come_from_the_node_dir():
    _node("n")
    mpunit.eq(sim.boot_cause(), sim.TIMER)
    mpunit.eq(sim.reset_cause(), sim.TIMER)
    t0 = sim.time()
    assert 1767225600 <= t0 <= 1767225602, t0
    time.sleep_ms(1100)
    assert sim.time() >= t0 + 1
    sim.set_time(2000000000)
    assert 2000000000 <= sim.time() <= 2000000001
    assert sim.virtual_ms() < 1767225610000  # the true virtual time is unchanged


def test_sensors_are_deterministic_and_physical():
    t0 = 1767225600000
    a = [sim.sensors_at(5, t0 + i * 60000) for i in range(0, 1440, 10)]
    mpunit.eq(a, [sim.sensors_at(5, t0 + i * 60000) for i in range(0, 1440, 10)])
    assert a != [sim.sensors_at(6, t0 + i * 60000) for i in range(0, 1440, 10)]
    temps = [t for t, _ in a]
    hums = [h for _, h in a]
    assert 500 <= min(temps) and max(temps) <= 4000, (min(temps), max(temps))
    assert max(temps) - min(temps) >= 400  # a day has a diurnal swing
    assert 500 <= min(hums) and max(hums) <= 9900, (min(hums), max(hums))
    # Minute to minute, temperature wanders by about 0.05 degC around the diurnal curve.
    steps = []
    for i in range(600):
        t1 = sim.sensors_at(5, t0 + i * 60000)[0]
        t2 = sim.sensors_at(5, t0 + (i + 1) * 60000)[0]
        steps.append(abs(t2 - t1))
    mean = sum(steps) / len(steps)
    assert 1 <= mean <= 12, mean
    assert max(steps) <= 40, max(steps)
    # Humidity falls as temperature rises.
    warm = max(range(len(a)), key=lambda i: a[i][0])
    cold = min(range(len(a)), key=lambda i: a[i][0])
    assert a[warm][1] < a[cold][1]


def test_battery_drains_more_with_the_radio_on():
    _node("radio", seed=1)
    sim.init()
    before = sim.battery_used_uah()
    assert sim.radio_up("ssid", "pw", 1000)
    assert sim.rssi() < 0
    time.sleep_ms(300)
    sim.radio_down()
    with_radio = sim.battery_used_uah() - before
    mpunit.eq(sim.rssi(), 0)

    sim._battery = None
    _node("quiet", seed=1)
    sim.init()
    before = sim.battery_used_uah()
    time.sleep_ms(300)
    without = sim.battery_used_uah() - before
    assert without > 0
    assert with_radio > 2 * without, (with_radio, without)


def test_battery_voltage_follows_the_charge():
    _node("full", battery_start_pct=100)
    full = sim.battery_mv()
    sim._battery = None
    _node("half", battery_start_pct=50)
    half = sim.battery_mv()
    sim._battery = None
    _node("empty", battery_start_pct=3)
    empty = sim.battery_mv()
    assert 4100 <= full <= 4200 and 3600 <= half <= 3900 and 3000 <= empty <= 3300, (full, half, empty)


def test_radio_can_be_unavailable():
    _node("noap", radio={"available": False})
    t = time.ticks_ms()
    assert not sim.radio_up("ssid", "pw", 150)
    assert time.ticks_diff(time.ticks_ms(), t) >= 150


def test_rtc_memory_is_bounded_and_kept_in_a_file():
    d = _node("n")
    mpunit.eq(sim.rtc_memory(), b"")
    sim.rtc_memory_write(b"\x01\x02state")
    mpunit.eq(sim.rtc_memory(), b"\x01\x02state")
    with open(d + "/rtc.bin", "rb") as f:
        mpunit.eq(f.read(), b"\x01\x02state")
    mpunit.raises(ValueError, sim.rtc_memory_write, b"x" * (sim.RTC_MEMORY_SIZE + 1))


def test_identity_and_button():
    d = _node("n", seed=9)
    uid = sim.unique_id()
    mpunit.eq(len(uid), 6)
    assert not sim.button()
    open(d + "/button", "w").close()
    assert sim.button()
