# The credential slots in MicroPython: a rotation kept after a good session, dropped after
# a refusal, after MAX_TRIES trial connects that never came back (a connect that failed for
# the network is given back), or on a certificate for another key; provisioning over a rotated node wins. Power cuts: test_creds_powercut.py.
import os

import creds
import csr
import mpunit
import p256

OLD_CERT = b"\x30old certificate"
OLD_KEY = b"old key"


def _node():
    root = mpunit.tmpdir() + "/certs"
    os.mkdir(root)
    with open(root + "/cert.der", "wb") as f:
        f.write(OLD_CERT)
    with open(root + "/key.der", "wb") as f:
        f.write(OLD_KEY)
    return root, creds.Credentials(root)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _pair(c, how):
    cert, key = how[:2]
    return _read(cert), _read(key)


def _new_key():
    d = p256.generate()
    pub = p256.public_key(d)
    return csr.private_key_der(d, pub), pub


def _cert_for(pub):
    # Stands in for the CA's certificate: what install() checks is that it carries the key.
    return b"\x30\x82" + csr.spki(pub) + b"rest of a certificate"


def test_rotation_kept_after_a_good_session():
    root, c = _node()
    mpunit.eq(_pair(c, c.for_connect()), (OLD_CERT, OLD_KEY))
    key, pub = _new_key()
    c.begin(key)
    mpunit.eq(c.state, creds.ST_KEYED)
    mpunit.eq(c.new_key_der(), key)
    mpunit.eq(_pair(c, c.for_connect()), (OLD_CERT, OLD_KEY))  # still the old pair
    cert = _cert_for(pub)
    c.install(cert)
    mpunit.eq(c.state, creds.ST_TRIAL)
    how = c.for_connect()
    mpunit.eq(how[2], True)
    mpunit.eq(_pair(c, how), (cert, key))
    c.session_ok()
    mpunit.eq((c.state, c.outcome()), (creds.ST_IDLE, creds.ROTATED))
    mpunit.eq(_pair(c, c.for_connect()), (cert, key))
    # The old pair is gone from flash, and a reload sees the same.
    assert "cert.der" not in os.listdir(root) and "key.der" not in os.listdir(root)
    c2 = creds.Credentials(root)
    mpunit.eq(_pair(c2, c2.for_connect()), (cert, key))
    c2.reported()
    mpunit.eq(creds.Credentials(root).outcome(), creds.NO_OUTCOME)
    # A second rotation replaces generation 1 with generation 2.
    key2, pub2 = _new_key()
    c2.begin(key2)
    c2.install(_cert_for(pub2))
    c2.for_connect()
    c2.session_ok()
    mpunit.eq(sorted(os.listdir(root)), ["creds.json", "k2"])


def test_refused_trial_falls_back_and_drops_the_new_key():
    root, c = _node()
    key, pub = _new_key()
    c.begin(key)
    c.install(_cert_for(pub))
    c.for_connect()
    c.session_refused()
    mpunit.eq((c.state, c.outcome()), (creds.ST_IDLE, creds.REFUSED))
    mpunit.eq(_pair(c, c.for_connect()), (OLD_CERT, OLD_KEY))
    mpunit.eq(sorted(os.listdir(root)), ["cert.der", "creds.json", "key.der"])


def test_trial_without_a_session_ends_after_max_tries():
    root, c = _node()
    key, pub = _new_key()
    c.begin(key)
    c.install(_cert_for(pub))
    for _ in range(creds.MAX_TRIES):
        # Each trial connect is counted before it starts: a reset mid-connect counts too.
        assert creds.Credentials(root).for_connect()[2]
    c = creds.Credentials(root)
    how = c.for_connect()
    mpunit.eq(how[2], False)
    mpunit.eq(_pair(c, how), (OLD_CERT, OLD_KEY))
    mpunit.eq(c.outcome(), creds.NO_SESSION)


def test_a_trial_connect_that_never_reached_the_broker_is_not_counted():
    # The broker down (a gateway host restarting) at many sends in a row: each failed
    # connect gives its attempt back, so the new pair stays on trial; then a session keeps it.
    root, c = _node()
    key, pub = _new_key()
    c.begin(key)
    cert = _cert_for(pub)
    c.install(cert)
    for _ in range(3 * creds.MAX_TRIES):
        c = creds.Credentials(root)  # a new wake
        how = c.for_connect()
        mpunit.eq(how[2], True)
        mpunit.eq(_pair(c, how), (cert, key))
        c.session_unreached()
    c = creds.Credentials(root)
    mpunit.eq((c.state, c.rec["tries"], c.outcome()), (creds.ST_TRIAL, 0, creds.NO_OUTCOME))
    # Attempts that never came back (resets, cuts) still end the trial after MAX_TRIES.
    for _ in range(creds.MAX_TRIES):
        assert creds.Credentials(root).for_connect()[2]
    c = creds.Credentials(root)
    mpunit.eq(c.for_connect()[2], False)
    mpunit.eq(c.outcome(), creds.NO_SESSION)
    # Given back outside a trial: nothing to give back, nothing written.
    seq = c.rec["seq"]
    c.session_unreached()
    mpunit.eq(c.rec["seq"], seq)


def test_certificate_for_another_key_is_refused():
    root, c = _node()
    key, pub = _new_key()
    c.begin(key)
    _, other = _new_key()
    e = mpunit.raises(creds.CredsError, c.install, _cert_for(other))
    mpunit.eq(e.code, creds.MISMATCH)
    mpunit.eq(c.state, creds.ST_KEYED)
    mpunit.raises(ValueError, c.begin, b"not a key")
    mpunit.eq(c.state, creds.ST_KEYED)
    c.abort()
    mpunit.eq((c.state, c.outcome()), (creds.ST_IDLE, creds.ABORTED))
    mpunit.eq(sorted(os.listdir(root)), ["cert.der", "creds.json", "key.der"])


def test_provisioning_over_a_rotated_node_wins():
    root, c = _node()
    key, pub = _new_key()
    c.begin(key)
    c.install(_cert_for(pub))
    c.for_connect()
    c.session_ok()
    # `torpor flash --reprovision` writes a new provisioned pair; the record is older.
    with open(root + "/cert.der", "wb") as f:
        f.write(b"\x30operator's new certificate")
    with open(root + "/key.der", "wb") as f:
        f.write(b"operator's new key")
    c = creds.Credentials(root)
    mpunit.eq(_pair(c, c.for_connect()), (b"\x30operator's new certificate", b"operator's new key"))
    mpunit.eq(c.outcome(), creds.REPROVISIONED)
    mpunit.eq(sorted(os.listdir(root)), ["cert.der", "creds.json", "key.der"])


def test_unreadable_record_means_the_provisioned_pair():
    root, c = _node()
    with open(root + "/creds.json", "w") as f:
        f.write("{not json")
    c = creds.Credentials(root)
    mpunit.eq(_pair(c, c.for_connect()), (OLD_CERT, OLD_KEY))


def test_lost_record_after_a_rotation_keeps_the_rotated_pair():
    root, c = _node()
    key, pub = _new_key()
    c.begin(key)
    cert = _cert_for(pub)
    c.install(cert)
    c.for_connect()
    c.session_ok()
    os.remove(root + "/creds.json")
    c = creds.Credentials(root)
    mpunit.eq(_pair(c, c.for_connect()), (cert, key))


def test_a_request_that_never_gets_a_certificate_is_given_up():
    root, c = _node()
    key, _pub = _new_key()
    c.begin(key, 9, b"request")
    mpunit.eq(c.csr_der(), b"request")
    sent = 0
    while c.request_sent():
        sent += 1
    mpunit.eq(sent, creds.MAX_REQUESTS)
    mpunit.eq((c.state, c.outcome(), c.rotation), (creds.ST_IDLE, creds.ABORTED, 9))
    mpunit.eq(_pair(c, c.for_connect()), (OLD_CERT, OLD_KEY))
    mpunit.eq(sorted(os.listdir(root)), ["cert.der", "creds.json", "key.der"])
