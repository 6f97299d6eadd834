# The station-mode WiFi both real board families use (network.WLAN, the same API on the
# ESP32 and RP2 ports): bring the radio up within a deadline, take it down, read RSSI.
# A hint (channel, BSSID) of the last association, which the app keeps in RTC memory,
# lets the next one skip choosing an access point; a failed fast join falls back to a scan.
import time as _time

import network

_wlan = None
FAST_JOIN_MS = 1500  # a join with the hint that has not succeeded by then scans instead


def _join(ssid, password, hint, start, limit_ms):
    # One association attempt, until limit_ms after start. With a hint the port is told the
    # access point (bssid=) and, where it takes one, the channel.
    if hint:
        try:
            _wlan.config(channel=hint[0])
        except (OSError, ValueError, TypeError):
            pass  # RP2 (cyw43) sets the channel on the access point side only
        try:
            _wlan.connect(ssid, password, bssid=hint[1])
        except TypeError:
            _wlan.connect(ssid, password)  # a port without bssid=
    else:
        _wlan.connect(ssid, password)
    while _time.ticks_diff(_time.ticks_ms(), start) < limit_ms:
        if _wlan.isconnected():
            return True
        _time.sleep_ms(20)
    return False


def _scan(ssid):
    # The strongest access point of `ssid`: (channel, bssid), or None.
    best = None
    name = ssid.encode() if isinstance(ssid, str) else ssid
    try:
        for ap in _wlan.scan():  # (ssid, bssid, channel, rssi, security, hidden)
            if ap[0] == name and (best is None or ap[3] > best[3]):
                best = ap
    except OSError:
        return None
    return (best[2], bytes(best[1])) if best is not None else None


def radio_up(ssid, password, deadline_ms, hint=None):
    """Join `ssid` within deadline_ms. Returns the hint to keep for the next association
    ((channel, bssid), or True when none is known) on success, False on failure. `hint`:
    the last association's, tried first; a failure scans and joins as a new one."""
    global _wlan
    if _wlan is None:
        _wlan = network.WLAN(network.STA_IF)
    _wlan.active(True)
    if _wlan.isconnected():
        return hint or True
    start = _time.ticks_ms()
    if hint:
        if _join(ssid, password, hint, start, min(deadline_ms, FAST_JOIN_MS)):
            return hint
        try:
            _wlan.disconnect()
        except OSError:
            pass
    new = _scan(ssid)
    if _join(ssid, password, new, start, deadline_ms):
        return new or True
    radio_down()
    return False


def radio_down():
    if _wlan is not None:
        try:
            _wlan.disconnect()
        except OSError:
            pass
        _wlan.active(False)


def radio_active():
    """True while the radio is powered (it may not be connected)."""
    return _wlan is not None and _wlan.active()


def rssi():
    if _wlan is None or not _wlan.isconnected():
        return 0
    return int(_wlan.status("rssi"))
