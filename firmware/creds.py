# The node's device credentials as two slots, rotated like an A/B firmware update: the
# confirmed pair, and a new pair made on the node that is used on trial and kept only after
# a session with it succeeds. docs/credentials.md has the state table and the power-cut
# argument; this module is that table.
#
# Layout (under `root`, "certs" on a board): generation 0 is the provisioned pair at the
# paths config.json names (certs/cert.der, certs/key.der); generation g >= 1 lives in
# certs/k<g>/ (key.der, then csr.der, the certificate's pieces p<offset> as they arrive over
# the air, and cert.der once whole). One record, certs/creds.json, says which generation is confirmed and which
# is new; it is replaced atomically (write creds.tmp, rename over creds.json), and every file
# it names is complete before the record names it. A slot the record does not name is
# deleted when the record is loaded, so a cut between two steps leaves only debris that the
# next boot clears, never a record that names a missing file.
import json
import os
from binascii import hexlify
from hashlib import sha256

from micropython import const

# States of the record ("st").
ST_IDLE = const(0)  # only the confirmed pair
ST_KEYED = const(1)  # a new key is on flash; its CSR goes up each wake until a certificate comes
ST_TRIAL = const(2)  # the new pair has its certificate; the next connects use it, on trial

# Outcomes kept for the app to report (until it calls reported()). They become values of a
# protocol enum when the uplink frame for rotations is added to the spec.
NO_OUTCOME = const(0)
ROTATED = const(1)  # a session with the new pair succeeded: it is now the confirmed one
REFUSED = const(2)  # the broker refused the new pair (TLS alert or CONNACK 4/5): dropped
NO_SESSION = const(3)  # MAX_TRIES trial connects ended with neither a session nor an answer (cuts, resets)
MISMATCH = const(4)  # the delivered certificate does not carry the new key: refused
ABORTED = const(5)  # the gateway cancelled the rotation
REPROVISIONED = const(6)  # certs/cert.der was replaced by provisioning: its pair wins

# Trial connects started (counted before each one) before an unconfirmed pair is dropped. A
# connect that fails for the network (no route, name, TCP, timeout) is given back
# (session_unreached): only attempts that ended the process (a crash, a hang the watchdog
# cut, a power cut) count, so a broker that is down only defers the trial.
MAX_TRIES = const(3)
# Requests sent for one key with no certificate coming back before the node gives the
# rotation up (ABORTED, reported): a gateway that lost or ended the rotation would otherwise
# get the same refused request every wake. The gateway starts a new one when it wants to.
MAX_REQUESTS = const(24)

# SubjectPublicKeyInfo of a P-256 key up to its uncompressed point: SEQUENCE { SEQUENCE {
# id-ecPublicKey, prime256v1 }, BIT STRING (0 unused bits) }; csr.spki() builds the same.
_SPKI_P256 = b"\x30\x59\x30\x13\x06\x07\x2a\x86\x48\xce\x3d\x02\x01\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07\x03\x42\x00"

RECORD = "creds.json"
_TMP = "creds.tmp"


class CredsError(ValueError):
    def __init__(self, code, why):
        super().__init__(why)
        self.code = code


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _write(path, data):
    # littlefs commits a file on close: after a cut it is absent or whole, never partial.
    with open(path, "wb") as f:
        f.write(data)


def _digest(path):
    try:
        return hexlify(sha256(_read(path)).digest()[:8]).decode()
    except OSError:
        return ""


def _tl(der, i):
    # (tag, body start, body length) of the DER element at i.
    n = der[i + 1]
    if n < 0x80:
        return der[i], i + 2, n
    k = n & 0x7F
    ln = 0
    for j in range(k):
        ln = (ln << 8) | der[i + 2 + j]
    return der[i], i + 2 + k, ln


def cert_serial(der):
    """The serial number of a DER certificate, as its INTEGER's bytes (big-endian)."""
    _, i, _ = _tl(der, 0)  # Certificate
    _, i, _ = _tl(der, i)  # TBSCertificate
    t, j, n = _tl(der, i)
    if t == 0xA0:  # [0] version
        i = j + n
    t, j, n = _tl(der, i)
    if t != 0x02:
        raise CredsError(NO_OUTCOME, "not a certificate")
    return bytes(der[j : j + n])


class Credentials:
    def __init__(self, root="certs", cert0=None, key0=None):
        self.root = root.rstrip("/")
        self.cert0 = cert0 or self.root + "/cert.der"
        self.key0 = key0 or self.root + "/key.der"
        self.rec = self._fresh()
        self.load()

    # ---- paths ----------------------------------------------------------------------

    def _dir(self, gen):
        return "%s/k%d" % (self.root, gen)

    def cert_path(self, gen):
        return self.cert0 if gen == 0 else self._dir(gen) + "/cert.der"

    def key_path(self, gen):
        return self.key0 if gen == 0 else self._dir(gen) + "/key.der"

    # ---- the record -----------------------------------------------------------------

    def _fresh(self, outcome=NO_OUTCOME):
        # p0: a digest of the provisioned certificate, to notice a re-provisioning.
        # rid: the rotation (the gateway's rotate_key) that "new" and "out" belong to.
        return {"cur": 0, "new": 0, "st": ST_IDLE, "tries": 0, "out": outcome, "p0": _digest(self.cert0), "seq": 0,
                "rid": 0}

    def _save(self, rec):
        rec["seq"] += 1
        tmp = self.root + "/" + _TMP
        _write(tmp, json.dumps(rec).encode())
        # littlefs renames atomically: the old record or the new one, never a mix.
        os.rename(tmp, self.root + "/" + RECORD)
        self.rec = rec

    def load(self):
        """Read the record (a fresh one if none or unreadable), clear debris; the record."""
        _remove(self.root + "/" + _TMP)
        rec = None
        try:
            rec = json.loads(_read(self.root + "/" + RECORD))
            for k in ("cur", "new", "st", "tries", "out", "p0", "seq"):
                rec[k]  # noqa: B018  (a missing key makes the record unreadable)
            if "rid" not in rec:
                rec["rid"] = 0  # a record from before rotations over the air
        except (OSError, ValueError, KeyError, TypeError):
            rec = None
        if rec is None:
            rec = self._fresh()
            # Atomic renames make this unreachable short of flash corruption. Without a
            # record, the provisioned pair if it is there, else the newest complete pair.
            if not _exists(self.cert0):
                rec["cur"] = self._newest_complete()
        elif rec["cur"] and _exists(self.cert0) and _digest(self.cert0) != rec["p0"]:
            # Provisioning wrote a new pair over a rotated node: the operator's pair wins.
            rec = self._fresh(REPROVISIONED)
            self._save(rec)
        self.rec = rec
        self._sweep()
        return rec

    def _sweep(self):
        # Delete every slot the record does not name (the end of a step cut short).
        keep = (self.rec["cur"], self.rec["new"] if self.rec["st"] != ST_IDLE else -1)
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            if name[:1] == "k" and name[1:].isdigit() and int(name[1:]) not in keep:
                self._drop(int(name[1:]))
        if 0 not in keep:
            _remove(self.cert0)
            _remove(self.key0)
        if self.rec["st"] == ST_TRIAL:
            self._tidy(self.rec["new"])  # what a cut left between install() and its tidying

    def _newest_complete(self):
        best = 0
        try:
            names = os.listdir(self.root)
        except OSError:
            return 0
        for name in names:
            if name[:1] == "k" and name[1:].isdigit():
                g = int(name[1:])
                if g > best and _exists(self.cert_path(g)) and _exists(self.key_path(g)):
                    best = g
        return best

    def _drop(self, gen):
        if gen == 0:
            return  # the provisioned pair goes only once another pair is confirmed
        d = self._dir(gen)
        try:
            names = os.listdir(d)
        except OSError:
            names = ()
        for name in names:
            _remove(d + "/" + name)
        try:
            os.rmdir(d)
        except OSError:
            pass

    # ---- what the app asks ----------------------------------------------------------

    @property
    def state(self):
        return self.rec["st"]

    def outcome(self):
        """The last rotation's outcome (NO_OUTCOME once reported)."""
        return self.rec["out"]

    def reported(self):
        if self.rec["out"] != NO_OUTCOME:
            rec = dict(self.rec)
            rec["out"] = NO_OUTCOME
            self._save(rec)

    def confirmed(self):
        """(cert path, key path) of the confirmed pair."""
        g = self.rec["cur"]
        return self.cert_path(g), self.key_path(g)

    def new_key_der(self):
        """The new key's DER (state ST_KEYED or ST_TRIAL): the app rebuilds the CSR from it."""
        if self.rec["st"] == ST_IDLE:
            raise CredsError(NO_OUTCOME, "no rotation in progress")
        return _read(self.key_path(self.rec["new"]))

    def for_connect(self, count=True):
        """(cert path, key path, on_trial) for this connect. On trial the attempt is
        counted first, so a trial pair that kills the node is dropped after MAX_TRIES.
        count=False leaves the counting to count_try(), which must come before connecting
        (the caller reads the pair in between)."""
        rec = self.rec
        if rec["st"] != ST_TRIAL:
            return self.confirmed() + (False,)
        if rec["tries"] >= MAX_TRIES:
            self._fall_back(NO_SESSION)
            return self.confirmed() + (False,)
        if count:
            self.count_try()
        g = rec["new"]
        return self.cert_path(g), self.key_path(g), True

    def count_try(self):
        """Count one trial connect (record saved): before the connect it counts."""
        rec = dict(self.rec)
        rec["tries"] += 1
        self._save(rec)

    # ---- steps of a rotation ---------------------------------------------------------

    @property
    def rotation(self):
        """The rotation id the new pair (or the last outcome) belongs to (0: none)."""
        return self.rec["rid"]

    def csr_der(self):
        """The stored certificate request of the rotation in progress (None if none)."""
        if self.rec["st"] == ST_IDLE:
            return None
        try:
            return _read(self._dir(self.rec["new"]) + "/csr.der")
        except OSError:
            return None

    def begin(self, key_der, rid=0, csr_der=None):
        """Store a new key (csr.private_key_der), and its request if given, for rotation
        `rid`, and enter ST_KEYED. A rotation already in progress is replaced: its key is
        dropped, never reused."""
        import csr  # csr and p256 load only in the wakes that make or install a pair

        csr.private_key_from_der(key_der)  # refuse anything but a P-256 key in our layout
        rec = dict(self.rec)
        if rec["st"] != ST_IDLE:
            rec["st"] = ST_IDLE
            self._save(rec)
            self._drop(rec["new"])
        g = rec["cur"] + 1
        self._drop(g)  # debris of an earlier failed rotation
        try:
            os.mkdir(self._dir(g))
        except OSError:
            pass
        _write(self.key_path(g), key_der)
        if csr_der is not None:
            _write(self._dir(g) + "/csr.der", csr_der)
        rec = dict(self.rec)
        rec.update(new=g, st=ST_KEYED, tries=0, rid=rid)
        self._save(rec)

    def request_sent(self):
        """Count one CSR_UP of the key waiting for its certificate (ST_KEYED); past
        MAX_REQUESTS the rotation is given up (ABORTED). Returns False then."""
        rec = self.rec
        if rec["st"] != ST_KEYED:
            return False
        if rec["tries"] >= MAX_REQUESTS:
            self._fall_back(ABORTED)
            return False
        rec = dict(rec)
        rec["tries"] += 1
        self._save(rec)
        return True

    def put_piece(self, rid, offset, total, data):
        """Keep one piece of the certificate for rotation `rid` (bytes offset.. of total);
        once the pieces cover it, install() it. Returns True when installed (or already
        past ST_KEYED for this rotation). Each piece is a file of its own, whole or absent
        after a cut, so a piece delivered again only rewrites the same bytes."""
        rec = self.rec
        if rec["st"] == ST_IDLE or rid != rec["rid"]:
            raise CredsError(NO_OUTCOME, "no rotation %d in progress" % rid)
        if rec["st"] == ST_TRIAL:
            return True
        if not 0 <= offset < total or offset + len(data) > total or not data:
            raise CredsError(NO_OUTCOME, "piece %d+%d outside %d bytes" % (offset, len(data), total))
        d = self._dir(rec["new"])
        _write("%s/p%d" % (d, offset), data)
        # Contiguous cover from 0 to total, from the pieces on flash.
        got = {}
        for name in os.listdir(d):
            if name[:1] == "p" and name[1:].isdigit():
                got[int(name[1:])] = name
        at = 0
        parts = []
        while at < total:
            name = got.get(at)
            if name is None:
                return False
            part = _read(d + "/" + name)
            if not part:
                return False
            parts.append(part)
            at += len(part)
        if at != total:
            raise CredsError(MISMATCH, "pieces overrun the certificate's length")
        try:
            self.install(b"".join(parts))
        except CredsError:
            for name in got.values():  # a wrong certificate: let it come again whole
                _remove(d + "/" + name)
            raise
        return True

    def install(self, cert_der):
        """Take the certificate issued for the new key and enter ST_TRIAL. A certificate that
        does not carry the new key's public key is refused (MISMATCH) and changes nothing."""
        rec = self.rec
        if rec["st"] == ST_IDLE:
            raise CredsError(NO_OUTCOME, "no rotation in progress")
        key = _read(self.key_path(rec["new"]))
        pub = key[-65:]  # private_key_der ends with the uncompressed public point
        # The SubjectPublicKeyInfo written out (csr.spki's bytes) rather than importing csr,
        # which loads p256: about 10 KB of bytecode the wake that takes the certificate's
        # pieces cannot spare on a small heap (the ESP32 profile ran out of it here).
        if pub[:1] != b"\x04" or _SPKI_P256 + pub not in cert_der or cert_der[:1] != b"\x30":
            raise CredsError(MISMATCH, "certificate is not for the new key")
        _write(self.cert_path(rec["new"]), cert_der)
        rec = dict(rec)
        rec.update(st=ST_TRIAL, tries=0)
        self._save(rec)
        self._tidy(rec["new"])

    def _tidy(self, gen):
        # The request and the pieces are needless once the certificate is installed.
        d = self._dir(gen)
        try:
            names = os.listdir(d)
        except OSError:
            return
        for name in names:
            if name[:1] == "p" or name == "csr.der":
                _remove(d + "/" + name)

    def session_ok(self):
        """A session with the trial pair succeeded (CONNACK 0): it becomes the confirmed
        pair and the old one is deleted. Call before anything else in the session."""
        rec = self.rec
        if rec["st"] != ST_TRIAL:
            return
        old = rec["cur"]
        rec = dict(rec)
        rec.update(cur=rec["new"], new=0, st=ST_IDLE, tries=0, out=ROTATED)
        self._save(rec)
        if old == 0:
            _remove(self.cert0)
            _remove(self.key0)
        else:
            self._drop(old)

    def session_refused(self):
        """The broker refused the trial pair (TLS handshake or CONNACK 4/5): drop it and
        connect again with the confirmed pair. A network failure is not a refusal: the
        trial stays (session_unreached)."""
        if self.rec["st"] == ST_TRIAL:
            self._fall_back(REFUSED)

    def session_unreached(self):
        """The trial connect failed before the broker answered (no route, name lookup, TCP
        refused or reset, a timeout): nothing was learnt about the new pair, so the attempt
        for_connect() counted is given back and the trial stays for the next send. Only
        attempts that never came back here (a crash, a reset, a cut) reach MAX_TRIES."""
        rec = self.rec
        if rec["st"] != ST_TRIAL or rec["tries"] <= 0:
            return
        rec = dict(rec)
        rec["tries"] -= 1
        self._save(rec)

    def abort(self):
        if self.rec["st"] != ST_IDLE:
            self._fall_back(ABORTED)

    def _fall_back(self, outcome):
        new = self.rec["new"]
        rec = dict(self.rec)
        rec.update(new=0, st=ST_IDLE, tries=0, out=outcome)
        self._save(rec)
        self._drop(new)
