# The station-mode WiFi both real board families use (network.WLAN, the same API on the
# ESP32 and RP2 ports): bring the radio up within a deadline, take it down, read RSSI.
import time as _time

import network

_wlan = None


def radio_up(ssid, password, deadline_ms, hint=None):
    # `hint` (channel, then the BSSID) from an earlier success: the BSSID is passed on so the
    # port skips the scan for it. These ports report no hint of their own yet: True.
    global _wlan
    if _wlan is None:
        _wlan = network.WLAN(network.STA_IF)
    _wlan.active(True)
    if _wlan.isconnected():
        return True
    start = _time.ticks_ms()
    if hint is not None and len(hint) == 7:
        _wlan.connect(ssid, password, bssid=bytes(hint[1:7]))
    else:
        _wlan.connect(ssid, password)
    while _time.ticks_diff(_time.ticks_ms(), start) < deadline_ms:
        if _wlan.isconnected():
            return True
        _time.sleep_ms(50)
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
