"""Operator login for the web page and API: a password stored as an scrypt hash, or a
bearer token; sessions in memory, each with its own CSRF token."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

# scrypt cost: about 16 MiB and tens of milliseconds per try on a Raspberry Pi 4.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
MAX_SESSIONS = 1024  # the oldest session goes first past this


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The `[web] password_hash` value for `password`."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(bytes.fromhex(digest)), maxmem=2**26)
    except ValueError:
        return False
    return hmac.compare_digest(got, bytes.fromhex(digest))


def check_token(given: str, token: str) -> bool:
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


@dataclass(slots=True)
class Session:
    id: str
    csrf: str
    logged_in: bool
    expires: float
    # What the last action said, shown once on the next page (never taken from the URL,
    # so a link cannot put words on the operator's page).
    flash: tuple[str, bool] | None = None


class Sessions:
    """Sessions by id, bounded in number and age."""

    def __init__(self, lifetime_s: float) -> None:
        self.lifetime_s = lifetime_s
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def new(self, logged_in: bool) -> Session:
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), logged_in,
                    time.monotonic() + self.lifetime_s)
        self._by_id[s.id] = s
        while len(self._by_id) > MAX_SESSIONS:
            # Anonymous sessions (a login form's) go first, so that a flood of them cannot
            # log the operator out.
            anonymous = next((k for k, v in self._by_id.items() if not v.logged_in), None)
            if anonymous is not None:
                del self._by_id[anonymous]
            else:
                self._by_id.popitem(last=False)
        return s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        if s.expires < time.monotonic():
            del self._by_id[sid]
            return None
        return s

    def drop(self, sid: str) -> None:
        self._by_id.pop(sid, None)


class Throttle:
    """Failed logins per client address: past `limit` within `window_s`, that address is
    refused until the window has passed (bounded in addresses kept)."""

    def __init__(self, limit: int = 10, window_s: float = 300.0, max_addresses: int = 4096) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._fails: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, addr: str, now: float) -> list[float]:
        times = [t for t in self._fails.get(addr, []) if now - t < self.window_s]
        if times:
            self._fails[addr] = times
        else:
            self._fails.pop(addr, None)
        return times

    def blocked(self, addr: str) -> bool:
        return len(self._recent(addr, time.monotonic())) >= self.limit

    def failed(self, addr: str) -> None:
        now = time.monotonic()
        self._fails[addr] = [*self._recent(addr, now), now]
        self._fails.move_to_end(addr)
        while len(self._fails) > self.max_addresses:
            self._fails.popitem(last=False)

    def succeeded(self, addr: str) -> None:
        self._fails.pop(addr, None)
