# The wake cycle, one wake per boot: boot -> sample -> maybe send -> plan sleep -> sleep.
# Each step is a method of Wake, called in that order by run(); docs/firmware.md tells the
# story. Every blocking step runs under a deadline; whatever happens, the wake ends in
# board.deep_sleep() (or board.reset() when a command asked for it).
import gc
import struct
import sys
import time

import board
import bootstate
import config
import flashq
import log
import state
import wire
from micropython import const

RECORD_SIZE = wire.RECORD_SIZE_ENV3
MAX_READINGS = const(255)  # a BURST series holds at most 255 readings
MAX_BURSTS = const(8)  # per wake; more waits for the next wake (pending hint)
PRIO_NORMAL = const(0)
PRIO_ALARM = const(7)
LOW_BATTERY_STRETCH = const(4)
PENDING_WAKE_S = const(30)  # sleep at most this long when the gateway has more for us
BACKOFF_BASE_S = const(30)
BACKOFF_MAX_S = const(3600)
CONFIG_ERROR_SLEEP_S = const(3600)
WRAP_UP_MS = const(100)  # of the awake budget: closing the session, the report, sleep
# Held from before the send code loads until the TLS context is made, then let go: the
# context's one block (about 3 KB on the 64-bit unix port), and the MQTT client's two packet
# buffers made right after it (the room holds them too), then find a hole on a heap the
# imports, a rotation's records and a session key left fragmented with 20-30 KB free.
TLS_ROOM = const(4096)
# The hardware watchdog bites at the awake budget plus this: the bootloader before the app
# and the wrap-up after the budget. Only the wake cycle feeds it, at each of its steps.
WDT_MARGIN_MS = const(5000)
WDT_SLICE_MS = const(1000)  # a listen longer than the budget (stay_awake) feeds this often
_TOPIC_SLACK = const(96)  # MQTT header + topic in front of a frame in the transmit buffer

# A sending wake's listening states (Wake.listening): the awake window runs; the gateway said
# SLEEP_NOW (the node leaves as soon as every published reading is acknowledged); an
# operator's stay_awake holds the node connected until the stay ends, SLEEP_NOW or not.
# Compile-time constants, like every underscored const: they take no heap.
_WINDOW = const(0)
_RELEASED = const(1)
_STAYING = const(2)

# How a sending wake's session was authenticated (the "T" line's session=): the device
# certificate, the session key, or the certificate after the session key was refused.
_CERT = const(0)
_PSK = const(1)
_FALLBACK = const(2)

# The send path's buffers are made once per sending wake, in send(); a wake that only
# samples never pays for them. Frames are built straight into the MQTT client's transmit
# buffer, behind room for the PUBLISH header (client.out, client.publish_out); the readings
# of a burst are gathered in the receive buffer while it is idle (client.spare). Within a
# wake they are reused, so it allocates only small objects after that and the heap never
# fills (a full heap makes every allocation collect).


def _topic(t, off, dev, suffix):
    # "torpor/<dev>/<suffix>" into t at off; returns a view of it (no tuple: the next
    # topic starts at off + len(view)).
    t[off : off + 7] = b"torpor/"
    i = off + 7
    n = len(dev)
    t[i : i + n] = dev
    i += n
    t[i] = 0x2F  # "/"
    n = len(suffix)
    t[i + 1 : i + 1 + n] = suffix
    i += 1 + n
    return memoryview(t)[off:i]


def _u32(b, o):
    return b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)


def _on_trial():
    # ota.on_trial() without loading ota: a wake that only samples never imports it
    # (about 125 kB of flash reads and its bytecode on the heap, on every wake).
    b = bootstate.booted
    return b is not None and b[2]


def _ms_since(t):
    return time.ticks_diff(time.ticks_ms(), t)


def _earlier(a, b):
    return a if time.ticks_diff(a, b) <= 0 else b


class Deadline:
    """The one end every step of a sending wake works to (radio, connect, publish, listen,
    PUBACKs). `at` is a time.ticks_ms() value, the form the MQTT client takes; a stay_awake
    moves it."""

    def __init__(self, t0, ms):
        self.at = time.ticks_add(t0, max(0, ms))

    def step(self):
        """The end of a step the watchdog is not fed in (radio, TLS + MQTT connect): the
        deadline, or sooner on a board whose watchdog cannot wait that long (RP2: 8.4 s),
        so that a dead network fails the step instead of resetting the node."""
        wdt = getattr(board, "WDT_MAX_MS", 0)
        if wdt:
            return _earlier(time.ticks_add(time.ticks_ms(), wdt - 1000), self.at)
        return self.at


class Wake:
    # Defaults live on the class: a wake stores on the instance only what it changes, so a
    # sampling wake does not grow an instance dict of thirty entries.
    cfg = None
    st = None
    q = None
    cause = 0
    safe = False
    now = 0  # unix s at boot
    clock_t0 = 0  # the clock at t0, unix ms
    period = 60
    mv = 0
    alarm = False
    sent = 0  # readings published this wake
    sent_top = 0  # highest reading id published
    session_ok = False
    acked = False  # an ACK came this session (listen() reads it even when none did)
    session = _CERT
    psk_id = 0  # the session key the node holds after connecting (the HELLO tells it)
    listening = _WINDOW
    sleep_req = 0
    hint = 0
    effects = None  # commands.Effects of a sending wake
    out = None  # the client's transmit buffer after the header room: frames are built here
    recs = None  # the readings of one burst, as stored (RECORD_ENV3 each)
    up_topic = None
    tls_room = None  # the TLS context's room (TLS_ROOM), held from send() to the context
    restart = False  # reset at once: an OTA check with Ed25519 ran at the start (ota.restart_due)
    # timings (ms) and wire figures for the "T" line
    ms_boot = ms_sample = ms_connect = ms_publish = ms_wait = 0
    bytes_out = bytes_in = 0
    bytes_conn = 0  # TLS handshake + CONNECT/CONNACK, both directions
    bytes_burst = 0  # BURST publishes as written to the socket (TLS records included)
    tls_alloc = 0
    import_alloc = 0
    t_radio = None  # ticks when the radio was asked up (None: not this wake)
    radio_ms = 0  # from then to radio down: the next HELLO's prev_radio_ms

    def __init__(self):
        self.t0 = time.ticks_ms()

    # ---- boot ----------------------------------------------------------------------
    def boot(self):
        board.init()
        self.cause = board.boot_cause()
        self.cfg = cfg = config.Config(board.FS_ROOT)
        self.st = st = state.State(board, board.FS_ROOT)
        self.now = board.time()
        self.clock_t0 = board.time_ms() - _ms_since(self.t0)
        # Armed before anything that can hang (flash, sensors, radio, DNS, TLS); under the
        # bootloader this re-arms the watchdog it started for its checks.
        try:
            board.watchdog_start(cfg.awake_budget_ms + WDT_MARGIN_MS)
        except Exception as e:  # a port that cannot re-arm: the bootloader's timeout stands
            log.warn("watchdog not re-armed: %r", e)
            board.watchdog_feed()
        # The flash queue's resume record (docs/firmware.md) is taken only from a wake that
        # ended as planned, and only on a wake from deep sleep: any other boot reads the
        # queue from flash.
        resume = None
        if self.cause == board.TIMER and st.rtc_valid and st.boots_incomplete == 0:
            resume = st.rtc_extra
        # The boots before this one all ended without a planned sleep: stop doing the work
        # that may be crashing, and only listen for a fix (an image, a configuration). Safe
        # mode stays until one comes: the node does not alternate crashes and safe wakes.
        self.safe = st.count_boot(self.cause == board.TIMER, cfg.safe_mode_after)
        st.save_rtc()
        self.mv = board.battery_mv()
        self.period = cfg.sample_interval_s
        if self.mv and self.mv < cfg.low_battery_mv:
            self.period *= LOW_BATTERY_STRETCH
        self.q = flashq.FlashQueue(board.FS_ROOT + "/queue", RECORD_SIZE, cfg.max_queue,
                                   first_id=cfg.first_reading_id, resume=resume)
        st.queue = self.q
        if not st.clock_set and not st.epoch_id:
            # A power-on: the clock counts from the chip's cold value until the gateway
            # sets it; readings from this id on are stamped in that count.
            st.epoch_id = self.q.next_id
            st.save_rtc()
        self.ms_boot = _ms_since(self.t0)
        log.info(
            "boot cause=%d safe=%d incomplete=%d depth=%d mv=%d resumed=%d",
            self.cause, self.safe, st.boots_incomplete, self.q.depth, self.mv, self.q.resumed,
        )

    # ---- sample --------------------------------------------------------------------
    def _phase(self):
        # align_s > 0: every node wakes on wall-clock multiples of the period (+ align_s);
        # otherwise each node keeps its own phase from its id, so a fleet spreads its wakes.
        if self.cfg.align_s:
            return self.cfg.align_s % self.period
        uid = board.unique_id()
        h = 0
        for b in uid:
            h = (h * 131 + b) & 0xFFFFFF
        return h % self.period

    def slot(self, t):
        """The sampling-grid point nearest to unix time t."""
        p = self.period
        ph = self._phase()
        return ((t - ph + p // 2) // p) * p + ph

    def slot_sampled(self):
        """An early wake (the gateway had more for us) falls in the grid slot an earlier
        wake already sampled: one reading per slot keeps bursts evenly spaced."""
        last = self.st.last_wake
        if not last:
            return False
        g = self.slot(last)
        # A wake more than 1 s off its grid point (its clock was set meanwhile) took its
        # own time, not the point's.
        return -1 <= g - last <= 1 and g == self.slot(self.now)

    def sample(self):
        t1 = time.ticks_ms()
        cfg = self.cfg
        temp, hum = board.read_sensors()
        temp = max(-32768, min(32767, temp))
        hum = max(0, min(65535, hum))
        # On the grid when the wake is on time (a regular burst packs small), the true time
        # otherwise: a late wake's reading is stamped when it was taken. Read at the sample,
        # not at boot: the boot and the app's start before it would stamp it early.
        ts = ((board.time_ms() + 500) // 1000) & 0xFFFFFFFF
        g = self.slot(ts)
        if -1 <= g - ts <= 1:
            ts = g
        rec = bytearray(RECORD_SIZE)
        struct.pack_into(wire.RECORD_ENV3, rec, 0, ts, temp, hum, min(self.mv, 65535))
        self.alarm = bool(cfg.priority_alarm) and (
            temp > cfg.temp_high or temp < cfg.temp_low or (hum != 0xFFFF and hum > cfg.humidity_high)
        )
        i = self.q.append(rec, PRIO_ALARM if self.alarm else PRIO_NORMAL)
        if i:
            # Printed only once the reading is durable in flash.
            log.line("R id=%d t=%d temp=%d hum=%d mv=%d" % (i, ts, temp, hum, self.mv))
        else:
            log.warn("queue full: reading dropped (dropped=%d)", self.q.dropped)
        self.ms_sample = _ms_since(t1)

    # ---- decide --------------------------------------------------------------------
    def send_due(self):
        cfg = self.cfg
        st = self.st
        if self.safe:
            return "safe"
        if self.alarm:
            return "alarm"
        if _on_trial():
            return "trial"  # a trial image is kept only once it reaches the gateway
        if st.fails and self.now < st.next_try:
            return None
        if st.pending_hint:
            return "hint"
        if st.has_results():
            return "results"
        if self.q.depth >= cfg.send_every:
            return "count"
        if self.q.depth and self.q.age(self.now) >= cfg.send_max_age_s:
            return "age"
        return None

    # ---- send: connect -> publish -> listen -> close -----------------------------------
    def send(self, why):
        if self.st.pending_hint:
            # The last wake may have staged a firmware key list (keylist.py; it asks for
            # this early wake): checked and applied before anything of the send loads, its
            # result sent in this wake. keylist leaves; its garbage goes with what follows.
            import keylist

            keylist.apply_staged(self.st)
            del keylist
            sys.modules.pop("keylist", None)
        # The boot and sample's garbage goes before ~50 kB of send code loads: the heap's
        # peak in the TLS handshake is then about 5 kB lower (energy bench bisection).
        gc.collect()
        a = gc.mem_alloc()
        import ota  # only wakes that send pay for these imports

        # A manifest staged by an earlier wake is checked before the rest of the send code
        # and the session take the heap.
        ota.check_staged(self.cfg)
        if ota.restart_due():
            # A check with Ed25519 ran: the session goes to the next boot, on a fresh heap
            # (the trial image's, when the check set one); run() resets. Nothing was sent,
            # so what made this send due makes that boot's due too.
            self.restart = True
            return
        import rotate  # key rotation (docs/credentials.md): counted in import= as the rest

        rotate.before_send(self.cfg, board)  # a rotation's key that found no room in a session
        room = gc.mem_alloc()
        # With the client's two packet buffers: they are made right after the context.
        size = wire.CLASS_LIMITS[self.cfg.device_class][0] + _TOPIC_SLACK
        self.tls_room = bytearray(TLS_ROOM + 2 * size)
        room = gc.mem_alloc() - room  # not code: import= leaves it out
        import commands
        import mqtt  # noqa: F401 - loaded here so that import= counts it
        import proto  # noqa: F401 - the codec, likewise
        import psk  # noqa: F401 - session keys (docs/session-keys.md), likewise

        self.import_alloc = gc.mem_alloc() - a - room
        self.effects = commands.Effects()
        # Every step works to one end: the budget counts from the wake's start and keeps
        # WRAP_UP_MS for closing the session, the report and going to sleep, so a dead
        # network costs the budget, no more.
        dl = Deadline(self.t0, self.cfg.awake_budget_ms - WRAP_UP_MS)
        self.session_ok = False
        self.hint = 0
        client = None
        try:
            client = self.connect(dl)
            self.publish(client, dl)
            self.listen(client, dl)
        except OSError as e:
            log.warn("send failed (%s): %s", why, e)
        finally:
            self.close(client)

    def _room(self):
        # The TLS context is made next: the room held for it since send() began is freed.
        if self.tls_room is not None:
            self.tls_room = None
            gc.collect()

    def connect(self, dl):
        """Radio up, TLS + MQTT session, subscription sent: the client. A client whose
        session does not open is hung up here (close() gets none)."""
        import mqtt  # loaded by send()
        import psk
        import rotate

        cfg = self.cfg
        st = self.st
        t1 = time.ticks_ms()
        size = wire.CLASS_LIMITS[cfg.device_class][0]
        dev = memoryview(cfg.device_id)
        # torpor/<device id>/{up,down,status}
        topics = bytearray(3 * (8 + len(dev)) + 12)
        self.up_topic = _topic(topics, 0, dev, b"up")
        down = _topic(topics, len(self.up_topic), dev, b"down")
        status = _topic(topics, len(self.up_topic) + len(down), dev, b"status")
        self._radio_up(dl)
        board.watchdog_feed()
        # Routine sends take the session key when the node holds one and no certificate
        # rotation needs the certificate path (docs/session-keys.md); otherwise the device
        # pair, or a new one on trial (rotate.py, docs/credentials.md).
        sk = None if rotate.busy(cfg) else psk.load(cfg)
        if sk is not None:
            self._room()
        ctx = None if sk is None else psk.context(cfg, sk[2])
        if ctx is not None:
            port = sk[1]
        else:
            sk = None
            cert, key = rotate.pair(cfg)
            ca = cfg.read_file("ca")
            self._room()
            ctx = mqtt.make_tls_context(cert, key, ca)
            port = cfg.broker_port
        client = mqtt.MQTTClient(
            cfg.device_id, cfg.broker_host, port, ssl=ctx,
            server_hostname=cfg.server_hostname or None, keepalive=cfg.keepalive_s,
            # The gateway holds downlink for a sleeping node (it is the store), so the
            # broker keeps no session: no stale frames of an earlier window arrive.
            clean_session=True, max_packet=size + _TOPIC_SLACK, headroom=_TOPIC_SLACK,
            addr=st.broker_ip or None,
        )
        self.out = client.out
        # Room for what is queued now (a burst holds at most MAX_READINGS): 64 readings
        # take 640 bytes, which the receive buffer has while no packet is in it.
        need = max(1, min(self.q.depth, MAX_READINGS)) * RECORD_SIZE
        self.recs = client.spare(need) or bytearray(need)
        a = gc.mem_alloc()
        try:
            if sk is None:
                self._open_cert(client, dl, status)
            else:
                self.session = _PSK
                try:
                    # Not _open: a refused key is no reason to resolve the name again.
                    client.connect(dl.step(), will=(status, b"lost", 1, False))
                except OSError as e:
                    # Refused (or unreachable): the certificate, in this same wake.
                    log.warn("session key %d refused (%s): falling back to the certificate", sk[0], e)
                    self.session = _FALLBACK
                    cert, key = rotate.pair(cfg)
                    client.ssl = mqtt.make_tls_context(cert, key, cfg.read_file("ca"))
                    client.port = cfg.broker_port
                    self._open_cert(client, dl, status)
                    if psk.refusal(e):
                        # The broker no longer holds this key (rotated, revoked, lost): the
                        # next routine sends use the certificate until a new key comes, and
                        # the HELLO tells the gateway the node holds none.
                        psk.drop(cfg)
                        sk = None
            self.psk_id = sk[0] if sk is not None else 0
            rotate.connected(cfg)
            st.broker_ip = client.ip
            board.watchdog_feed()
            self.tls_alloc = gc.mem_alloc() - a
            self.bytes_conn = client.bytes_out + client.bytes_in
            # The SUBACK is taken after the publishes: its round trip overlaps them.
            client.subscribe(down, 1, dl.at, False)
        except BaseException:
            client.disconnect()
            self.bytes_out = client.bytes_out
            self.bytes_in = client.bytes_in
            raise
        self.ms_connect = _ms_since(t1)
        log.info("connected in %d ms", self.ms_connect)
        return client

    def publish(self, client, dl):
        """HELLO, the results still to report, the bursts; then the SUBACK."""
        t2 = time.ticks_ms()
        st = self.st
        self._publish_hello(client, dl)
        # state.bin is read only when results wait (RTC memory says whether any do).
        if st.has_results():
            for r in st.results:
                client.publish(self.up_topic, r, 1, False, dl.at)
        if not self.safe:
            self._publish_bursts(client, dl)
        client.suback(dl.at)
        self.ms_publish = _ms_since(t2)

    def listen(self, client, dl):
        """ACKs and downlink until the gateway lets the node go (SLEEP_NOW, every published
        reading acknowledged) or the window ends; a stay_awake holds it until the stay ends.
        Then the OTA report and the PUBACKs of what the node published."""
        import ota  # loaded by send()
        import rotate  # loaded by send()

        t3 = time.ticks_ms()
        st = self.st
        window = time.ticks_add(t3, self.cfg.awake_window_ms)
        stay = window  # when the stay_awake in force ends (state _STAYING sets it)
        while True:
            now = time.ticks_ms()
            if self.effects.stay_awake_ms:
                # An operator asked for it: it overrides the window, SLEEP_NOW and the budget.
                stay = time.ticks_add(now, self.effects.stay_awake_ms)
                self.effects.stay_awake_ms = 0
                self.listening = _STAYING
                dl.at = time.ticks_add(stay, self.cfg.awake_budget_ms)
                log.info("staying awake for %d ms", time.ticks_diff(stay, now))
            if self.listening == _STAYING:
                end = stay
            elif self.listening == _RELEASED and (self.q.floor >= self.sent_top or not self.sent):
                break
            else:
                end = _earlier(window, dl.at)
            if time.ticks_diff(end, now) <= 0:
                break  # the window (or the budget, or the stay) is over
            m = client.wait_payload(_earlier(end, time.ticks_add(now, WDT_SLICE_MS)))
            board.watchdog_feed()
            if m is not None:
                self._on_down(client, m)
        ota.after_window(client, self)
        rotate.after_window(client, self)
        client.wait_pubacks(dl.at)
        # Every result, old or from this window, reached the broker.
        if st.has_results():
            st.results_delivered(len(st.results))
        self.ms_wait = _ms_since(t3)
        # Done when every published reading is acknowledged (or none was sent).
        self.session_ok = self.q.floor >= self.sent_top or not self.sent
        if not self.session_ok:
            log.warn("no ACK for readings up to id %d", self.sent_top)
        elif self.listening == _RELEASED or self.acked:
            rotate.reported(self.cfg)  # the HELLO that told the outcome was answered

    def close(self, client):
        """DISCONNECT (from whatever step after connect the send reached), radio down; a
        session that ended as planned clears the backoff, any other doubles it."""
        import ota  # loaded by send()

        if client is not None:
            try:
                client.disconnect()
            except MemoryError:
                # No heap left for the courtesy: the link is dropped, the broker's Will
                # says "lost", and the session's outcome stands as it is.
                client.close()
            self.bytes_out = client.bytes_out
            self.bytes_in = client.bytes_in
        board.radio_down()
        if self.t_radio is not None:
            self.radio_ms = _ms_since(self.t_radio)
        st = self.st
        if self.session_ok:
            st.fails = 0
            st.next_try = 0
            st.boots_without_send = 0
            st.pending_hint = self.hint
        else:
            st.fails += 1
            back = BACKOFF_BASE_S << min(st.fails - 1, 7)
            st.next_try = self.now + min(back, BACKOFF_MAX_S)
            st.pending_hint = 0
            log.info("retry after %d s (failures=%d)", st.next_try - self.now, st.fails)
            if ota.trial_unreached():
                log.info("trial image: gateway out of reach, not held against it")

    def _open_cert(self, client, dl, status):
        import mqtt  # loaded by send()
        import rotate

        try:
            self._open(client, dl, status)
        except OSError as e:
            if not rotate.refused(self.cfg, e):
                raise
            # The new pair was refused: the confirmed one, in this same wake.
            cert, key = rotate.pair(self.cfg)
            client.ssl = mqtt.make_tls_context(cert, key, self.cfg.read_file("ca"))
            self._open(client, dl, status)

    def _open(self, client, dl, status):
        # A Will for crashes and lost links only: a planned sleep ends with DISCONNECT.
        st = self.st
        try:
            client.connect(dl.step(), will=(status, b"lost", 1, False))
        except OSError:
            if not st.broker_ip:
                raise
            # The cached address failed: resolve the name again, once.
            log.info("cached broker address failed; resolving %s", self.cfg.broker_host)
            st.broker_ip = b""
            client.addr = None
            client.connect(dl.step(), will=(status, b"lost", 1, False))

    def _radio_up(self, dl):
        # The last association's channel and BSSID (RTC memory) make it a fast one; a board
        # that keeps no hint answers True and gets none back.
        cfg = self.cfg
        st = self.st
        self.t_radio = time.ticks_ms()
        ms = max(0, time.ticks_diff(dl.step(), self.t_radio))
        hint = st.wifi_hint()
        if hint is None:
            r = board.radio_up(cfg.wifi_ssid, cfg.wifi_password, ms)
        else:
            r = board.radio_up(cfg.wifi_ssid, cfg.wifi_password, ms, hint)
        if not r:
            st.keep_wifi_hint(None)  # the next try scans
            raise OSError("radio did not come up")
        st.keep_wifi_hint(r if isinstance(r, tuple) else None)

    def next_listen_s(self, sleep_s):
        """Seconds from now until the node next connects: the wake whose count or age makes
        a send due, assuming this wake's send succeeds (the gateway counts missed wakes from
        it). Alarms and failures make it sooner or later, and the next HELLO says so."""
        cfg = self.cfg
        if self.safe or _on_trial() or self.hint or self.st.pending_hint:
            return sleep_s
        left = self.q.depth - min(self.q.depth, MAX_BURSTS * MAX_READINGS)
        if left:
            return sleep_s  # more than one wake sends: the next one is early (pending hint)
        p = max(1, self.period)
        k = min(cfg.send_every, 1 + (cfg.send_max_age_s + p - 1) // p)
        return sleep_s + (max(1, k) - 1) * p

    def _publish_hello(self, client, dl):
        import ota  # loaded by send()
        import proto  # loaded by send()
        import rotate

        cfg = self.cfg
        st = self.st
        ota_state, ota_reason = ota.hello_state()
        sleep_s = self.plan_sleep() // 1000
        n = proto.encode_hello(
            self.out, st.msg_id(), ota.fw_version(cfg.fw_version), self.cause, min(self.mv, 65535),
            max(-128, min(127, board.rssi())), gc.mem_free(), min(self.q.depth, 65535),
            self.q.dropped, sleep_s, cfg.awake_window_ms, board.time(),
            cfg.device_class, config_version=cfg.version, ota_state=ota_state,
            ota_reason=ota_reason, safe_mode=self.safe,
            boots_without_send=min(st.boots_without_send, 255),
            # Every id up to the queue's floor is acknowledged or was dropped here: the
            # gateway stops waiting for the dropped ones.
            first_id=self.q.floor + 1, next_listen_s=self.next_listen_s(sleep_s),
            clock_unset=not st.clock_set, session_key=self.psk_id,
            keys_seq=ota.keys_seq(), prev_awake_ms=st.prev_awake_ms,
            prev_radio_ms=st.prev_radio_ms, prev_sent=bool(st.prev_sent), **rotate.hello_kw(cfg),
        )
        client.publish_out(self.up_topic, n, 1, False, dl.at)

    def _publish_bursts(self, client, dl):
        import proto  # loaded by send()

        after = 0
        for _ in range(MAX_BURSTS):
            # recs lies in the client's receive buffer: filled and encoded with no call on
            # the client in between.
            count = self.q.read_run(self.recs, after)
            first = self.q.run_first
            if not count:
                return
            count, node_clock = self._clock_run(first, count)
            interval = self.period
            if count > 1:
                interval = _u32(self.recs, RECORD_SIZE) - _u32(self.recs, 0)
            if not 0 < interval <= 0xFFFF:
                interval = 0
            n = 0
            while count:
                try:
                    n = proto.encode_burst(self.out, first, proto.SCHEMA_ENV3, interval, self.recs, count,
                                           node_clock)
                    break
                except IndexError:
                    # Did not fit the class's max_message: fewer readings in this burst.
                    count = count * 3 // 4
            b0 = client.bytes_out
            client.publish_out(self.up_topic, n, 1, False, dl.at)
            self.bytes_burst += client.bytes_out - b0
            after = first + count - 1
            self.sent += count
            self.sent_top = after
            # Downlink that arrived while publishing is handled now: the inbox never fills.
            m = client.wait_payload(time.ticks_ms())
            while m is not None:
                self._on_down(client, m)
                m = client.wait_payload(time.ticks_ms())
        # More than MAX_BURSTS worth queued: ask for an early wake.
        if self.q.read_run(self.recs, after):
            self.hint = 1

    def _clock_run(self, first, count):
        """(count, node_clock) for the run of ids first.. in recs: cut where the stamps change
        clock; readings stamped in the chip's own count before the clock was set travel
        shifted by the step that set it, or flagged node_clock while it is not set yet."""
        st = self.st
        lo = st.epoch_id
        if not lo:
            return count, False
        if first < lo:
            return min(count, lo - first), False
        if not st.clock_set:
            return count, True
        hi = st.sync_id
        if first >= hi:
            return count, False
        count = min(count, hi - first)
        for i in range(count):
            o = i * RECORD_SIZE
            struct.pack_into("<I", self.recs, o, (_u32(self.recs, o) + st.sync_off) & 0xFFFFFFFF)
        return count, False

    def _on_down(self, client, payload):
        import ota  # loaded by send()
        import proto  # loaded by send()

        # payload is a view into the client's receive buffer, good until the client reads
        # again. OTA frames are read in place too: their fields reach flash (or a copy)
        # before on_frame returns, and a 1 KB copy of each could find no block of that
        # size in the heap a session leaves.
        t = payload[1] if len(payload) > 1 else 0
        # ACK and SLEEP_NOW come in every sending wake: read in place when plain, with the
        # generated readers (the decoder builds a tuple, a list and views for them).
        end = proto.in_place(payload)
        if end and t == proto.ACK:
            cumulative, clock, _ = proto.read_ack(payload, end)
            self._on_ack(cumulative, (), clock)
            return
        if end and t == proto.SLEEP_NOW:
            sleep_s, pending = proto.read_sleep_now(payload, end)
            self._on_sleep_now(sleep_s, pending)
            return
        try:
            ftype, f = proto.decode(payload)
        except proto.ProtocolError as e:
            log.warn("bad downlink frame: %s", e)
            return
        except MemoryError:
            # A frame is a downlink item the gateway delivers again until it is answered:
            # one that finds no room now comes in a later wake, and this wake goes on.
            log.warn("downlink frame type %d: out of heap, it comes again", t)
            return
        if ftype == proto.ACK:
            self._on_ack(f[proto.ACK_CUMULATIVE], f[proto.ACK_SELECTIVE], f[proto.ACK_TIME])
        elif ftype == proto.COMMAND:
            import commands  # loaded by send()

            try:
                n = commands.execute(f, self.cfg, self.st, board, self.effects, self.out,
                                     self.st.msg_id(), self.safe)
            except MemoryError:
                # Unanswered, it comes again at a later send (as after a lost result); the
                # wake goes on to its ACKs and its sleep.
                log.warn("command %d: out of heap, it comes again", f[proto.COMMAND_COMMAND_ID])
                return
            if self.effects.pending:
                self.hint = 1  # a key list staged: the next wake checks it and answers
            if n:  # 0: no result now (out of heap, or a key list staged): it comes later
                log.info("command %d op=%d -> status=%d", f[proto.COMMAND_COMMAND_ID], f[proto.COMMAND_OP],
                         self.out[10])
                client.publish_out(self.up_topic, n, 1)
        elif ftype == proto.SHADOW_DELTA:
            entries = []
            for key, value in f[proto.SHADOW_DELTA_ENTRIES]:
                name = config.KEYS.get(key)
                if name is not None:
                    entries.append((name, value))
            err = self.cfg.apply(entries, f[proto.SHADOW_DELTA_CONFIG_VERSION])
            if err is not None:
                log.warn("shadow delta refused: %s", err)
            else:
                self.period = self.cfg.sample_interval_s
                if self.st.safe:
                    # The operator's configuration is the fix to try: leave safe mode.
                    self.st.leave_safe_mode()
                    log.info("safe mode left: new configuration v%d", self.cfg.version)
            n = proto.encode_shadow_report(self.out, self.st.msg_id(), self.cfg.version, self.cfg.report())
            client.publish_out(self.up_topic, n, 1)
        elif ftype == proto.SLEEP_NOW:
            self._on_sleep_now(f[proto.SLEEP_NOW_SLEEP_S], f[proto.SLEEP_NOW_PENDING])
        elif ftype == proto.ERROR:
            log.warn("gateway error code=%d ref=%d %s", f[proto.ERROR_CODE], f[proto.ERROR_REF], f[proto.ERROR_DETAIL])
        elif ftype == proto.OTA_MANIFEST or ftype == proto.OTA_CHUNK:
            ota.on_frame(ftype, f, self)
        else:
            log.info("downlink frame type %d not handled by the app", ftype)

    def _on_ack(self, cumulative, selective, t=0):
        import ota  # loaded by send()

        self.acked = True
        if t:
            self._set_clock(t)
        if ota.on_ack() and self.st.safe:
            self.st.leave_safe_mode()  # a new image confirmed: it is the fix
            log.info("safe mode left: new image confirmed")
        self.q.ack(cumulative, selective)
        # ACK's `pending` counts frames that follow in this window: no reason to wake
        # early. Only SLEEP_NOW's `pending` (items left for a later wake) is.
        log.info("ack cumulative=%d depth=%d", cumulative, self.q.depth)

    def _set_clock(self, t):
        # Every HELLO's ACK carries the gateway's time: the clock is set on every send, so
        # its error is at most the drift since the last one.
        was = self.st.clock_set
        step = self.st.set_clock(t)
        if step is None:
            log.warn("gateway time %d refused: not a plausible time", t)
            return
        self.now += step  # the wake's start, on the clock it now keeps
        self.clock_t0 = board.time_ms() - _ms_since(self.t0)
        if not was or step > 2 or step < -2:
            log.info("clock set from the gateway: %d s step", step)

    def _on_sleep_now(self, sleep_s, pending):
        self.sleep_req = sleep_s
        if pending:
            self.hint = 1
        if self.listening == _WINDOW:
            self.listening = _RELEASED

    # ---- plan sleep ----------------------------------------------------------------
    def plan_sleep(self):
        """Milliseconds to sleep: to the next grid point, or what the gateway asked."""
        elapsed = _ms_since(self.t0)
        # In ms: from the clock's whole seconds every wake landed up to 1 s late.
        now_ms = self.clock_t0 + elapsed
        if self.sleep_req:
            ms = self.sleep_req * 1000
        else:
            # The grid point after the one this wake sampled (sample() stamps it when within
            # 1 s). A wake whose clock was set meanwhile may lie far from the nearest one:
            # when that lies ahead, the next wake takes it.
            p = self.period
            g = self.slot(self.now)
            if g - self.now > 1:
                g -= p
            ms = (g + p) * 1000 - now_ms
            while ms < 1000:
                ms += self.period * 1000
        if self.hint or (self.st is not None and self.st.pending_hint):
            ms = min(ms, PENDING_WAKE_S * 1000)
        return ms


def _report(w, sleep_ms, a0):
    # Printed piece by piece (print takes its arguments on the stack): no tuple of values
    # and no line string (about 200 bytes a wake); the lines are those log.line printed.
    print(
        "T boot=", w.ms_boot, " sample=", w.ms_sample, " connect=", w.ms_connect,
        " publish=", w.ms_publish, " wait=", w.ms_wait, " total=", _ms_since(w.t0),
        " bytes_out=", w.bytes_out, " bytes_in=", w.bytes_in, " sent=", w.sent,
        " depth=", w.q.depth if w.q else 0, " sleep=", sleep_ms, " conn_bytes=", w.bytes_conn,
        " burst_bytes=", w.bytes_burst, " session=", w.session, sep="",
    )
    # Bytes allocated during the wake (no collection runs in between on a roomy heap): the
    # TLS handshake and code loaded during the wake (mqtt) are shown apart from the wake's
    # own allocations. boot= counts the whole boot from the bootloader's first line: code
    # loading, the image check and the wake (0 when started without the bootloader).
    alloc = gc.mem_alloc() - a0
    app = alloc - w.tls_alloc - w.import_alloc
    # getattr: an image may run under an older bootloader (OTA replaces the app only).
    b0 = getattr(bootstate, "alloc0", None)
    print(
        "M alloc=", alloc, " tls=", w.tls_alloc, " import=", w.import_alloc, " app=", app,
        " boot=", 0 if b0 is None else gc.mem_alloc() - b0, " free=", gc.mem_free(), sep="",
    )


def run(t0=None):
    """One wake; t0 is its start in ticks when the caller took it before importing this
    module (the awake budget then counts the imports)."""
    gc.collect()
    a0 = gc.mem_alloc()
    w = Wake()
    if t0 is not None:
        w.t0 = t0
    sleep_ms = CONFIG_ERROR_SLEEP_S * 1000
    completed = False
    try:
        w.boot()
        if not w.safe and not w.slot_sampled():
            w.sample()
        board.watchdog_feed()
        why = w.send_due()
        if why:
            w.send(why)
        else:
            w.st.boots_without_send += 1
        sleep_ms = w.plan_sleep()
        completed = True
    except config.ConfigError as e:
        log.error("%s", e)
    except Exception as e:
        try:
            log.error("wake failed: %r", e)
            sys.print_exception(e)
        except MemoryError:
            # A heap too full to format the report: the wake must still reach its sleep (a
            # crash here would count towards safe mode at every boot).
            gc.collect()
            print("E wake failed: MemoryError")
        if w.cfg is not None:
            sleep_ms = w.cfg.sample_interval_s * 1000
    st = w.st
    if st is not None:
        if completed:
            st.finish_boot()
        st.last_wake = w.now
        # This wake's energy facts for the next HELLO: its ticks until now (the report and
        # the sleep call after this take a few ms), its radio time, whether it sent.
        st.prev_awake_ms = _ms_since(w.t0)
        st.prev_radio_ms = w.radio_ms
        st.prev_sent = 0 if w.t_radio is None else 1
        st.save_rtc(w.q.snapshot(state.RTC_SIZE) if completed and w.q is not None else None)
    _report(w, sleep_ms, a0)
    if w.q is not None:
        w.q.close()
    if w.restart or (w.effects is not None and w.effects.reboot):
        board.reset()
    board.deep_sleep(sleep_ms)
