# SHA-512 (FIPS 180-4) in plain MicroPython bytecode: the port's hashlib has no SHA-512,
# and Ed25519 signature checks in the bootloader need it. Streaming update()/digest().
import sys

from micropython import const

_MASK = const(0xFFFFFFFFFFFFFFFF)
_MASK32 = const(0xFFFFFFFF)

# Round constants: first 64 bits of the fractional parts of the cube roots of the first
# 80 primes.
_K = (
    0x428A2F98D728AE22, 0x7137449123EF65CD, 0xB5C0FBCFEC4D3B2F, 0xE9B5DBA58189DBBC,
    0x3956C25BF348B538, 0x59F111F1B605D019, 0x923F82A4AF194F9B, 0xAB1C5ED5DA6D8118,
    0xD807AA98A3030242, 0x12835B0145706FBE, 0x243185BE4EE4B28C, 0x550C7DC3D5FFB4E2,
    0x72BE5D74F27B896F, 0x80DEB1FE3B1696B1, 0x9BDC06A725C71235, 0xC19BF174CF692694,
    0xE49B69C19EF14AD2, 0xEFBE4786384F25E3, 0x0FC19DC68B8CD5B5, 0x240CA1CC77AC9C65,
    0x2DE92C6F592B0275, 0x4A7484AA6EA6E483, 0x5CB0A9DCBD41FBD4, 0x76F988DA831153B5,
    0x983E5152EE66DFAB, 0xA831C66D2DB43210, 0xB00327C898FB213F, 0xBF597FC7BEEF0EE4,
    0xC6E00BF33DA88FC2, 0xD5A79147930AA725, 0x06CA6351E003826F, 0x142929670A0E6E70,
    0x27B70A8546D22FFC, 0x2E1B21385C26C926, 0x4D2C6DFC5AC42AED, 0x53380D139D95B3DF,
    0x650A73548BAF63DE, 0x766A0ABB3C77B2A8, 0x81C2C92E47EDAEE6, 0x92722C851482353B,
    0xA2BFE8A14CF10364, 0xA81A664BBC423001, 0xC24B8B70D0F89791, 0xC76C51A30654BE30,
    0xD192E819D6EF5218, 0xD69906245565A910, 0xF40E35855771202A, 0x106AA07032BBD1B8,
    0x19A4C116B8D2D0C8, 0x1E376C085141AB53, 0x2748774CDF8EEB99, 0x34B0BCB5E19B48A8,
    0x391C0CB3C5C95A63, 0x4ED8AA4AE3418ACB, 0x5B9CCA4F7763E373, 0x682E6FF3D6B2B8A3,
    0x748F82EE5DEFB2FC, 0x78A5636F43172F60, 0x84C87814A1F0AB72, 0x8CC702081A6439EC,
    0x90BEFFFA23631E28, 0xA4506CEBDE82BDE9, 0xBEF9A3F7B2C67915, 0xC67178F2E372532B,
    0xCA273ECEEA26619C, 0xD186B8C721C0C207, 0xEADA7DD6CDE0EB1E, 0xF57D4F7FEE6ED178,
    0x06F067AA72176FBA, 0x0A637DC5A2C898A6, 0x113F9804BEF90DAE, 0x1B710B35131C471B,
    0x28DB77F523047D84, 0x32CAAB7B40C72493, 0x3C9EBE0A15C9BEBC, 0x431D67C49C100D4C,
    0x4CC5D4BECB3E42B6, 0x597F299CFC657E2A, 0x5FCB6FAB3AD6FAEC, 0x6C44198C4A475817,
)

_IV = (
    0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
    0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
)



# Small ints hold 62 bits on 64-bit builds and 30 bits on the ESP32/RP2 ports.
_WIDE = sys.maxsize > 0xFFFFFFFF


def _split(words):
    out = []
    for x in words:
        out.append(x >> 32)
        out.append(x & _MASK32)
    return tuple(out)


_K32 = _split(_K) if _WIDE else None
_IV32 = _split(_IV) if _WIDE else None


def _compress64(h, w, K, block):
    # One 128-byte block into the eight-word state `h` (a list, updated in place);
    # `w` is the preallocated 80-entry message schedule. Words are 64-bit big ints: on
    # 32-bit ports (small ints hold 31 bits) this needs half the big-int operations of
    # the split form below.
    m = _MASK
    for i in range(16):
        w[i] = int.from_bytes(block[i * 8:i * 8 + 8], "big")
    for i in range(16, 80):
        x = w[i - 15]
        y = w[i - 2]
        s0 = ((x >> 1) ^ (x >> 8) ^ (x >> 7) ^ (x << 63) ^ (x << 56)) & m
        s1 = ((y >> 19) ^ (y >> 61) ^ (y >> 6) ^ (y << 45) ^ (y << 3)) & m
        w[i] = (w[i - 16] + s0 + w[i - 7] + s1) & m
    a, b, c, d, e, f, g, hh = h
    for i in range(80):
        t1 = (hh + ((e >> 14) ^ (e >> 18) ^ (e >> 41) ^ (e << 50) ^ (e << 46) ^ (e << 23))
              + ((e & f) ^ (~e & g)) + K[i] + w[i]) & m
        t2 = ((a >> 28) ^ (a >> 34) ^ (a >> 39) ^ (a << 36) ^ (a << 30) ^ (a << 25)) \
            + ((a & b) ^ (a & c) ^ (b & c))
        hh = g
        g = f
        f = e
        e = (d + t1) & m
        d = c
        c = b
        b = a
        a = (t1 + t2) & m
    h[0] = (h[0] + a) & m
    h[1] = (h[1] + b) & m
    h[2] = (h[2] + c) & m
    h[3] = (h[3] + d) & m
    h[4] = (h[4] + e) & m
    h[5] = (h[5] + f) & m
    h[6] = (h[6] + g) & m
    h[7] = (h[7] + hh) & m


def _compress32(h, w, K, block):
    # The same block function on 32-bit halves (hi, lo): on 64-bit builds every value
    # stays a small int, which measured about three times faster than 64-bit big ints.
    m = _MASK32
    for i in range(32):
        w[i] = int.from_bytes(block[i * 4:i * 4 + 4], "big")
    for i in range(32, 160, 2):
        xh = w[i - 30]
        xl = w[i - 29]
        yh = w[i - 4]
        yl = w[i - 3]
        s0h = (xh >> 1) ^ (xl << 31) ^ (xh >> 8) ^ (xl << 24) ^ (xh >> 7)
        s0l = (xl >> 1) ^ (xh << 31) ^ (xl >> 8) ^ (xh << 24) ^ (xl >> 7) ^ (xh << 25)
        s1h = (yh >> 19) ^ (yl << 13) ^ (yl >> 29) ^ (yh << 3) ^ (yh >> 6)
        s1l = (yl >> 19) ^ (yh << 13) ^ (yh >> 29) ^ (yl << 3) ^ (yl >> 6) ^ (yh << 26)
        lo = w[i - 31] + (s0l & m) + w[i - 13] + (s1l & m)
        w[i] = (w[i - 32] + (s0h & m) + w[i - 14] + (s1h & m) + (lo >> 32)) & m
        w[i + 1] = lo & m
    ah, al, bh, bl, ch, cl, dh, dl, eh, el, fh, fl, gh, gl, hh, hl = h
    for i in range(0, 160, 2):
        t1l = hl + (((el >> 14) ^ (eh << 18) ^ (el >> 18) ^ (eh << 14) ^ (eh >> 9) ^ (el << 23)) & m) \
            + ((el & fl) ^ (~el & gl)) + K[i + 1] + w[i + 1]
        t1h = hh + (((eh >> 14) ^ (el << 18) ^ (eh >> 18) ^ (el << 14) ^ (el >> 9) ^ (eh << 23)) & m) \
            + ((eh & fh) ^ (~eh & gh)) + K[i] + w[i] + (t1l >> 32)
        t1l &= m
        t2l = (((al >> 28) ^ (ah << 4) ^ (ah >> 2) ^ (al << 30) ^ (ah >> 7) ^ (al << 25)) & m) \
            + ((al & bl) ^ (al & cl) ^ (bl & cl))
        t2h = (((ah >> 28) ^ (al << 4) ^ (al >> 2) ^ (ah << 30) ^ (al >> 7) ^ (ah << 25)) & m) \
            + ((ah & bh) ^ (ah & ch) ^ (bh & ch))
        hh = gh
        hl = gl
        gh = fh
        gl = fl
        fh = eh
        fl = el
        el = dl + t1l
        eh = (dh + t1h + (el >> 32)) & m
        el &= m
        dh = ch
        dl = cl
        ch = bh
        cl = bl
        bh = ah
        bl = al
        al = t1l + t2l
        ah = (t1h + t2h + (al >> 32)) & m
        al &= m
    v = (ah, al, bh, bl, ch, cl, dh, dl, eh, el, fh, fl, gh, gl, hh, hl)
    for j in range(0, 16, 2):
        lo = h[j + 1] + v[j + 1]
        h[j] = (h[j] + v[j] + (lo >> 32)) & m
        h[j + 1] = lo & m


class sha512:
    """Streaming SHA-512: sha512(data).digest(), or update() in pieces (bytes, bytearray,
    memoryview). `wide` picks the word layout; None means the faster one for this build."""

    digest_size = 64
    block_size = 128

    def __init__(self, data=None, wide=None):
        if wide is None:
            wide = _WIDE
        if wide:
            self._h = list(_IV32 or _split(_IV))
            self._w = [0] * 160
            self._f = _compress32
            self._k = _K32 or _split(_K)
        else:
            self._h = list(_IV)
            self._w = [0] * 80
            self._f = _compress64
            self._k = _K
        self._buf = bytearray(128)
        self._n = 0  # bytes waiting in _buf
        self._len = 0  # total bytes hashed
        if data is not None:
            self.update(data)

    def update(self, data):
        mv = memoryview(data)
        size = len(mv)
        self._len += size
        f = self._f
        h = self._h
        w = self._w
        k = self._k
        pos = 0
        n = self._n
        buf = self._buf
        if n:
            take = min(128 - n, size)
            buf[n:n + take] = mv[:take]
            n += take
            pos = take
            if n < 128:
                self._n = n
                return
            f(h, w, k, buf)
        while size - pos >= 128:
            f(h, w, k, mv[pos:pos + 128])
            pos += 128
        rest = size - pos
        buf[:rest] = mv[pos:]
        self._n = rest

    def digest(self):
        # Pads a copy so the object can keep taking update() calls afterwards.
        h = list(self._h)
        buf = bytearray(self._buf)
        n = self._n
        buf[n] = 0x80
        for i in range(n + 1, 128):
            buf[i] = 0
        if n >= 112:
            self._f(h, self._w, self._k, buf)
            for i in range(112):
                buf[i] = 0
        buf[112:128] = (self._len * 8).to_bytes(16, "big")
        self._f(h, self._w, self._k, buf)
        size = 64 // len(h)
        out = bytearray(64)
        for i in range(len(h)):
            out[i * size:i * size + size] = h[i].to_bytes(size, "big")
        return bytes(out)

    def hexdigest(self):
        return "".join("%02x" % b for b in self.digest())
