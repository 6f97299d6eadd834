# Node configuration: config.json on flash (written at provisioning) overlaid by applied.json
# (values the gateway set later through SHADOW_DELTA or commands). Validated at every boot;
# a bad value is reported naming its key, never half-applied.
import json
import os

import wire

CONFIG_FILE = "config.json"
APPLIED_FILE = "applied.json"

# key -> (default, kind, low, high). kind: "s" string, "i" integer; default None = required.
# Ranges keep a typo from turning into a node that never wakes or never sleeps.
SPEC = {
    "device_id": (None, "s", 1, 64),
    "device_class": (wire.DEVICE_CLASS_SENSOR, "i", 0, 4),
    "broker_host": (None, "s", 1, 253),
    "broker_port": (8883, "i", 1, 65535),
    "server_hostname": ("", "s", 0, 253),
    "wifi_ssid": ("", "s", 0, 32),
    "wifi_password": ("", "s", 0, 64),
    "cert": ("certs/cert.der", "s", 1, 128),
    "key": ("certs/key.der", "s", 1, 128),
    "ca": ("certs/ca.der", "s", 1, 128),
    "fw_version": (1, "i", 0, 0x7FFFFFFF),
    "sample_interval_s": (60, "i", 1, 86400),
    "send_every": (10, "i", 1, 255),
    "send_max_age_s": (3600, "i", 1, 604800),
    "awake_window_ms": (3000, "i", 0, 60000),
    "awake_budget_ms": (15000, "i", 1000, 120000),
    "low_battery_mv": (3300, "i", 0, 5000),
    "align_s": (0, "i", 0, 86400),
    "safe_mode_after": (5, "i", 1, 255),
    # trial boots of a new image that may end without reaching the gateway (network down)
    "trial_outage_boots": (24, "i", 0, 1000),
    "temp_high": (32767, "i", -32768, 32767),
    "temp_low": (-32768, "i", -32768, 32767),
    "humidity_high": (65535, "i", 0, 65535),
    "priority_alarm": (1, "i", 0, 1),
    "max_queue": (4096, "i", 16, 65535),
    # The lowest id a new reading may take. A re-provisioned node (flash erased) gets the
    # gateway's highest committed id + 1 here, or its new readings would look like
    # duplicates of the old ones and be dropped. Reading ids stay below the top half of
    # the u32 space, which non-reading frames use.
    "first_reading_id": (1, "i", 1, 0x7FFFFFFF),
    "keepalive_s": (60, "i", 0, 65535),
}

# Wire config_key -> name: the keys the gateway may set remotely.
KEYS = {
    wire.CONFIG_KEY_SAMPLE_INTERVAL_S: "sample_interval_s",
    wire.CONFIG_KEY_SEND_EVERY: "send_every",
    wire.CONFIG_KEY_SEND_MAX_AGE_S: "send_max_age_s",
    wire.CONFIG_KEY_TEMP_HIGH: "temp_high",
    wire.CONFIG_KEY_TEMP_LOW: "temp_low",
    wire.CONFIG_KEY_HUMIDITY_HIGH: "humidity_high",
    wire.CONFIG_KEY_AWAKE_WINDOW_MS: "awake_window_ms",
    wire.CONFIG_KEY_LOW_BATTERY_MV: "low_battery_mv",
    wire.CONFIG_KEY_ALIGN_S: "align_s",
    wire.CONFIG_KEY_PRIORITY_ALARM: "priority_alarm",
}


# Settings live in one list per Config, indexed by this map (made once at import): an
# attribute per setting would grow the instance's dict through five sizes every boot.
_IDX = {}
for _i, _k in enumerate(SPEC):
    _IDX[_k] = _i


class ConfigError(ValueError):
    def __init__(self, key, why):
        super().__init__("config key %s: %s" % (key, why))
        self.key = key
        self.why = why


def check(key, value):
    """The value if it is valid for key, else ConfigError naming the key."""
    spec = SPEC.get(key)
    if spec is None:
        raise ConfigError(key, "unknown key")
    _, kind, lo, hi = spec
    if kind == "s":
        if not isinstance(value, str):
            raise ConfigError(key, "must be a string")
        if not lo <= len(value) <= hi:
            raise ConfigError(key, "length must be %d..%d" % (lo, hi))
    else:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, "must be an integer")
        if not lo <= value <= hi:
            raise ConfigError(key, "must be in %d..%d, not %d" % (lo, hi, value))
    return value


def _read(path):
    try:
        f = open(path)
    except OSError:
        return None
    try:
        # Parsed from the stream: no copy of the whole text on the heap.
        obj = json.load(f)
    except ValueError:
        raise ConfigError(path, "not valid JSON")
    finally:
        f.close()
    if not isinstance(obj, dict):
        raise ConfigError(path, "must hold a JSON object")
    return obj


class Config:
    """Validated settings as attributes (cfg.sample_interval_s), plus the applied version."""

    def __getattr__(self, name):
        # Reached for the settings only (everything else is an ordinary attribute).
        i = _IDX.get(name)
        if i is None:
            raise AttributeError(name)
        return self._v[i]

    def _set(self, key, value):
        self._v[_IDX[key]] = value

    def __init__(self, root):
        self._v = [None] * len(SPEC)
        self.root = root.rstrip("/")
        self._applied_path = "%s/%s" % (self.root, APPLIED_FILE)
        base = _read("%s/%s" % (self.root, CONFIG_FILE))
        if base is None:
            raise ConfigError(CONFIG_FILE, "missing: provision the node first")
        applied = None
        try:
            # Most nodes never get an overlay: a stat of a missing file costs a third of
            # a failed open.
            os.stat(self._applied_path)
            applied = _read(self._applied_path)
        except (OSError, ConfigError):
            applied = None  # none, or a damaged overlay: the provisioned values hold
        self.version = 0
        self._applied = {}
        for key in base:
            if key not in SPEC:
                raise ConfigError(key, "unknown key")
        for key in SPEC:
            default = SPEC[key][0]
            value = base.get(key, default)
            if value is None:
                raise ConfigError(key, "required")
            self._set(key, check(key, value))
        if applied:
            # Gateway-applied values were checked when they arrived; check again in case
            # the ranges changed with the firmware, dropping any that no longer fit.
            for key in applied.get("values", {}):
                try:
                    self._set(key, check(key, applied["values"][key]))
                    self._applied[key] = applied["values"][key]
                except ConfigError:
                    pass
            v = applied.get("version", 0)
            self.version = v if isinstance(v, int) else 0
        self._cross_check()

    def _cross_check(self):
        if self.temp_low >= self.temp_high:
            raise ConfigError("temp_low", "must be below temp_high")
        if self.awake_window_ms > self.awake_budget_ms:
            raise ConfigError("awake_window_ms", "must not exceed awake_budget_ms")

    def path(self, key):
        # Certificate paths are relative to the flash root unless absolute.
        p = getattr(self, key)
        return p if p.startswith("/") else self.root + "/" + p

    def read_file(self, key):
        with open(self.path(key), "rb") as f:
            return f.read()

    def apply(self, entries, version=None):
        """Validate every (key name, value) first, then set all and persist atomically.

        Returns None on success, or the ConfigError of the first bad entry (nothing applied).
        """
        old = {}
        try:
            for key, value in entries:
                check(key, value)
                old[key] = getattr(self, key)
            for key, value in entries:
                self._set(key, value)
            self._cross_check()
        except ConfigError as e:
            for key in old:
                self._set(key, old[key])
            return e
        for key, value in entries:
            self._applied[key] = value
        if version is not None:
            self.version = version
        self._save()
        return None

    def _save(self):
        # Write the new file, then rename over the old: a power cut leaves one of the two.
        tmp = self._applied_path + ".new"
        with open(tmp, "w") as f:
            f.write(json.dumps({"version": self.version, "values": self._applied}))
        os.rename(tmp, self._applied_path)

    def report(self):
        """(config_key, value) pairs of every remotely settable key, for SHADOW_REPORT."""
        out = []
        for k in KEYS:
            out.append((k, getattr(self, KEYS[k])))
        return out
