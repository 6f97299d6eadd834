"""The aiohttp application: pages, the JSON API under /api/v1, login, CSRF and errors.

Every database call runs on a worker thread, one at a time, on the web's own connection,
so a slow query never stalls the gateway's event loop or its ingest writer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote, urlsplit

from aiohttp import web

from gateway.config import BoardModels, WebConfig
from gateway.ops import actions, fleet
from gateway.ops import alerts as oalerts
from gateway.ops import campaigns as ocampaigns
from gateway.ops import charts as ocharts
from gateway.ops import groups as ogroups
from gateway.ops import health as ohealth
from gateway.ops import metrics as ometrics
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import readings
from gateway.web import auth, openapi, pages

log = logging.getLogger(__name__)

T = TypeVar("T")
COOKIE = "torpor_session"
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OPEN_PATHS = frozenset({"/login"})
EVENT_POLL_S = 2.0
EVENT_PING_S = 15.0
MAX_LIMIT = 1000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LiveSource = Callable[[], Awaitable[ometrics.Live | None]]


class BadRequest(Exception):
    """A request the operator can fix; `field` names the input at fault."""

    def __init__(self, message: str, field: str = "", status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


@dataclass
class State:
    cfg: WebConfig
    conn: sqlite3.Connection
    tls: bool = False
    live: ometrics.Live | None = None  # the running gateway's own metrics, when inside it
    # ...or, served by the gateway's child process (gateway.web.process), asked of it
    live_source: LiveSource | None = None
    sessions: auth.Sessions = field(init=False)
    throttle: auth.Throttle = field(default_factory=auth.Throttle)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    charts: ocharts.ChartCache = field(default_factory=ocharts.ChartCache)
    # The boards' energy models: each device's own board's, else [energy] board's.
    energy: BoardModels | None = None
    forecasts: fleet.Forecasts = field(init=False)
    kept: fleet.Kept = field(default_factory=fleet.Kept)  # the fleet page's, between views

    def __post_init__(self) -> None:
        self.sessions = auth.Sessions(self.cfg.session_hours * 3600)
        self.forecasts = fleet.Forecasts(energy=self.energy)

    async def db(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """`fn(conn, ...)` on a worker thread, one at a time. A cancelled caller (a closed
        event stream, the server stopping) keeps the lock until the thread is done with the
        connection: closing it under a running statement crashes the process."""
        async with self.lock:
            work = asyncio.ensure_future(asyncio.to_thread(fn, self.conn, *args, **kw))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                while not work.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([work])
                raise


STATE = web.AppKey("state", State)
# The request's session; None when it came with a bearer token.
SESSION: web.RequestKey[auth.Session | None] = web.RequestKey("session")


def _state(request: web.Request) -> State:
    return request.app[STATE]


def _is_api(request: web.Request) -> bool:
    # /metrics is for scrapers: a 401 naming the header, not a redirect to the login form.
    return request.path.startswith("/api/") or request.path == "/metrics"


# ------------------------------------------------------------------ middlewares
@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bad input becomes a 4xx naming the field; anything else a 500 with no traceback."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return _error(request, exc.status, str(exc), exc.field)
    except actions.ActionError as exc:
        return _error(request, 409 if not exc.field or exc.field == "command_id" else 400,
                      str(exc), exc.field)
    except fleet.NotFound as exc:
        return _error(request, 404, str(exc), "device")
    except web.HTTPException as exc:
        if exc.status >= 400 and _is_api(request):
            return _error(request, exc.status, exc.reason, "")
        raise
    except Exception:
        log.exception("web request %s %s failed", request.method, request.path)
        return _error(request, 500, "internal error: the gateway's log says more", "")


def _error(request: web.Request, status: int, message: str, field_name: str) -> web.Response:
    if _is_api(request):
        return web.json_response({"error": message, "field": field_name or None}, status=status)
    body = pages.layout(f"Error {status}", f"<p>{_esc(message)}</p>", csrf="", logged_in=False)
    return web.Response(text=body, status=status, content_type="text/html")


def _esc(text: str) -> str:
    from html import escape

    return escape(text)


def _same_origin(request: web.Request) -> bool:
    """The Origin (or, lacking one, the Referer) names this server."""
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin or origin == "null":
        return False
    parts = urlsplit(origin)
    return (parts.scheme == request.scheme and parts.netloc == request.host)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    st = _state(request)
    cfg = st.cfg
    bearer = request.headers.get("Authorization", "")
    if bearer.startswith("Bearer "):
        remote = request.remote or "?"
        if st.throttle.blocked(remote):
            raise BadRequest("too many failed logins from this address: wait a few minutes",
                             "Authorization", 429)
        if not auth.check_token(bearer[7:].strip(), cfg.token):
            st.throttle.failed(remote)
            raise BadRequest("invalid bearer token", "Authorization", 401)
        request[SESSION] = None  # a token is not a cookie: no CSRF to guard against
        return await handler(request)
    session = st.sessions.get(request.cookies.get(COOKIE))
    fresh = session is None
    if session is None:
        if cfg.auth_required and request.path not in OPEN_PATHS:
            _login_first(request)  # no session is made for a request that gets nothing
        session = st.sessions.new(logged_in=not cfg.auth_required)
    request[SESSION] = session
    if request.method in UNSAFE:
        if not _same_origin(request):
            raise BadRequest("cross-origin request refused (Origin does not match)", "Origin", 403)
        given = request.headers.get("X-CSRF-Token", "")
        if not given and request.content_type == "application/x-www-form-urlencoded":
            given = str((await request.post()).get("csrf", ""))
        if fresh or not auth.check_token(given, session.csrf):
            raise BadRequest("missing or stale CSRF token: reload the page", "csrf", 403)
    if not session.logged_in and request.path not in OPEN_PATHS:
        _login_first(request)
    resp = await handler(request)
    if fresh:
        _set_cookie(resp, st, session)
    return resp


def _login_first(request: web.Request) -> NoReturn:
    if _is_api(request):
        raise BadRequest("log in first (or send Authorization: Bearer <token>)",
                         "Authorization", 401)
    raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs)}")


# The page's only script is the fleet page's live update, allowed by its hash; no frame
# may hold the page (clickjacking) and forms post only here.
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(pages.FLEET_SCRIPT.encode()).digest()).decode()
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except web.HTTPException as exc:  # redirects carry them too
        exc.headers.update(SECURITY_HEADERS)
        raise
    if not resp.prepared:  # an event stream has sent its headers already
        resp.headers.update(SECURITY_HEADERS)
    return resp


def _set_cookie(resp: web.StreamResponse, st: State, session: auth.Session) -> None:
    resp.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict", secure=st.tls,
                    max_age=int(st.cfg.session_hours * 3600), path="/")


# ------------------------------------------------------------------ input
def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name}: expected an integer, got {text!r}", name) from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name}: {value} is outside {lo}..{hi}", name)
    return value


def _float(request: web.Request, name: str, default: float) -> float:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        return float(text)
    except ValueError:
        raise BadRequest(f"{name}: expected a number (unix seconds), got {text!r}", name) from None


def _status(request: web.Request) -> str | None:
    status = request.query.get("status") or None
    if status is not None and status not in registry.STATUSES:
        raise BadRequest(f"status: {status!r} is not one of {', '.join(registry.STATUSES)}",
                         "status")
    return status


def _csrf(request: web.Request) -> str:
    s = request.get(SESSION)
    return s.csrf if s is not None else ""


def _html(request: web.Request, title: str, body: str, *, script: str = "") -> web.Response:
    s = request.get(SESSION)
    cfg = _state(request).cfg
    msg, error = ("", False)
    if s is not None and s.flash is not None:
        (msg, error), s.flash = s.flash, None
    text = pages.layout(title, body, csrf=_csrf(request),
                        logged_in=bool(s and s.logged_in and cfg.auth_required), msg=msg,
                        error=error, script=script)
    return web.Response(text=text, content_type="text/html")


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.json_response(doc, status=status, dumps=lambda d: json.dumps(d, default=str))


# ------------------------------------------------------------------ pages
async def fleet_page(request: web.Request) -> web.Response:
    st = _state(request)
    status = _status(request)
    text = request.query.get("q", "").strip()
    offset = _int(request, "offset", 0, 0, 10**9)
    now = time.time()
    page = await st.db(fleet.fleet, status=status, text=text, offset=offset,
                       limit=st.cfg.page_size, now=now, forecasts=st.forecasts,
                       kept=st.kept)
    if request.query.get("rows") == "1":  # the live update's table body
        return web.Response(text=pages.fleet_rows(page, now), content_type="text/html")
    return _html(request, "Fleet", pages.fleet(page, status=status, text=text, now=now),
                 script=pages.FLEET_SCRIPT)


def _device_data(conn: sqlite3.Connection, st: State, device_id: str, now: float, span: float,
                 ) -> tuple[fleet.DeviceView, fleet.ReadingsView, tuple[fleet.WakeLogEntry, ...],
                            fleet.LedgerForecast | None]:
    """What the device page shows, in one trip to the database thread: each trip waits
    for the interpreter, which ingest keeps busy when the page runs inside the gateway."""
    view = fleet.device(conn, device_id, now=now, forecasts=st.forecasts)
    rv = st.charts.view(conn, device_id, now - span, now)
    latest = rv.latest_at
    if latest is not None and (latest > now or (not rv.count and latest < now - span)):
        # The range ends at the newest reading when that is not now: a node silent for
        # longer than the range shows its last readings rather than an empty chart, and a
        # node whose clock runs ahead of ours keeps its newest readings on the chart (the
        # page says so).
        rv = st.charts.view(conn, device_id, latest - span, latest)
    model = None if st.energy is None else st.energy.energy(view.device.board)
    return (view, rv, fleet.device_wakes(conn, device_id, now - span, now),
            fleet.device_ledger(conn, device_id, model, now))


async def device_page(request: web.Request) -> web.Response:
    st = _state(request)
    device_id = request.match_info["device"]
    rng = request.query.get("range", "1d")
    if rng not in pages.RANGES:
        raise BadRequest(f"range: {rng!r} is not one of {', '.join(pages.RANGES)}", "range")
    now = time.time()
    span = pages.RANGES[rng]
    view, rv, wakes, ledger = await st.db(_device_data, st, device_id, now, span)
    model = None if st.energy is None else st.energy.energy(view.device.board)
    return _html(request, f"Device {device_id}", pages.device(
        view, rv, rng, csrf=_csrf(request), now=now, wakes=wakes, wakes_since=now - span,
        energy=model, ledger=ledger))


def _back(request: web.Request, device_id: str, msg: str,
          error: bool = False) -> web.HTTPSeeOther:
    """Back to the device page, which shows `msg` once."""
    s = request.get(SESSION)
    if s is not None:
        s.flash = (msg, error)
    return web.HTTPSeeOther(f"/devices/{quote(device_id)}")


def _parse_args(text: str) -> list[int]:
    try:
        return [int(x, 0) for x in text.replace(",", " ").split()]
    except ValueError:
        raise actions.ActionError(f"args: {text!r} is not a list of integers", "args") from None


async def queue_form(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    device_id = request.match_info["device"]
    form = await request.post()
    try:
        args = _parse_args(str(form.get("args", "")))
        priority = _form_int(form.get("priority"), "priority", q.DEFAULT_PRIORITY)
        ttl = _form_int(form.get("ttl_s"), "ttl_s", q.DEFAULT_TTL_S)
        done = await st.db(actions.queue_command, device_id, str(form.get("op", "")), args,
                           priority=priority, ttl_s=ttl)
    except actions.ActionError as exc:
        raise _back(request, device_id, f"not queued: {exc}", True) from None
    raise _back(request, device_id, f"queued {done.what} as item {done.command_id}")


def _form_int(value: object, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(str(value))
    except ValueError:
        raise actions.ActionError(f"{name}: expected an integer, got {value!r}", name) from None


async def config_form(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    device_id = request.match_info["device"]
    form = await request.post()
    key = str(form.get("key", ""))
    try:
        value = _form_int(form.get("value"), "value", 0) if form.get("value") else None
        if value is None:
            raise actions.ActionError("value: required", "value")
        done = await st.db(actions.set_config, device_id, {key: value})
    except actions.ActionError as exc:
        raise _back(request, device_id, f"configuration not set: {exc}", True) from None
    raise _back(request, device_id, f"configuration v{done.version} queued: {key} = {value}")


async def cancel_form(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    device_id = request.match_info["device"]
    cid = _path_int(request, "command_id")
    try:
        await st.db(actions.cancel, device_id, cid)
    except actions.ActionError as exc:
        raise _back(request, device_id, f"not cancelled: {exc}", True) from None
    raise _back(request, device_id, f"cancelled item {cid}")


async def release_form(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    device_id = request.match_info["device"]
    try:
        await st.db(actions.release, device_id)
    except actions.ActionError as exc:
        raise _back(request, device_id, f"not released: {exc}", True) from None
    raise _back(request, device_id, "released from quarantine")


def _path_int(request: web.Request, name: str) -> int:
    text = request.match_info[name]
    try:
        return int(text)
    except ValueError:
        raise BadRequest(f"{name}: expected an integer, got {text!r}", name) from None


async def deadletters_page(request: web.Request) -> web.Response:
    st = _state(request)
    dl = await st.db(ohealth.dead_letters, request.query.get("device") or None,
                     _int(request, "limit", 100, 1, MAX_LIMIT))
    return _html(request, "Dead letters", pages.dead_letters(dl, time.time()))


def _state_filter(request: web.Request) -> str | None:
    state = request.query.get("state") or None
    if state is not None and state not in ocampaigns.STATES:
        raise BadRequest(f"state: {state!r} is not one of {', '.join(ocampaigns.STATES)}",
                         "state")
    return state


async def _campaign(request: web.Request) -> ocampaigns.Progress:
    cid = _path_int(request, "campaign")
    try:
        return await _state(request).db(ocampaigns.campaign, cid)
    except ocampaigns.NotFound as exc:
        raise BadRequest(str(exc), "campaign", 404) from None


async def campaigns_page(request: web.Request) -> web.Response:
    items = await _state(request).db(ocampaigns.campaigns)
    return _html(request, "Campaigns", pages.campaigns(items, time.time()))


async def campaign_page(request: web.Request) -> web.Response:
    state = _state_filter(request)
    p = await _campaign(request)
    return _html(request, f"Campaign {p.campaign.id}", pages.campaign(p, time.time(), state))


async def health_page(request: web.Request) -> web.Response:
    st = _state(request)
    h = await st.db(ohealth.health)
    return _html(request, "Gateway health", pages.health(h, time.time()))


async def login_page(request: web.Request) -> web.Response:
    st = _state(request)
    body = pages.login(csrf=_csrf(request), token=bool(st.cfg.token),
                       password=bool(st.cfg.password_hash))
    return _html(request, "Log in", body)


async def login_post(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    form = await request.post()
    secret = str(form.get("secret", ""))
    old = request[SESSION]
    remote = request.remote or "?"
    if st.throttle.blocked(remote):
        log.warning("web login from %s refused: too many failed attempts", remote)
        raise BadRequest("too many failed logins from this address: wait a few minutes",
                         "secret", 429)
    ok = auth.check_token(secret, st.cfg.token) or (
        bool(st.cfg.password_hash)
        and await asyncio.to_thread(auth.check_password, secret, st.cfg.password_hash))
    if not ok:
        st.throttle.failed(remote)
        log.warning("web login refused from %s", remote)
        if old is not None:
            old.flash = ("wrong password or token", True)
        raise web.HTTPSeeOther("/login")
    st.throttle.succeeded(remote)
    # A new session id at login, so an id planted before it is worth nothing after.
    if old is not None:
        st.sessions.drop(old.id)
    session = st.sessions.new(logged_in=True)
    target = request.query.get("next", "/")
    if not target.startswith("/") or target.startswith("//"):
        target = "/"
    resp = web.HTTPSeeOther(target)
    _set_cookie(resp, st, session)
    raise resp


async def logout_post(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    s = request.get(SESSION)
    if s is not None:
        st.sessions.drop(s.id)
    resp = web.HTTPSeeOther("/login")
    resp.del_cookie(COOKIE, path="/")
    raise resp


# ------------------------------------------------------------------ API
async def api_devices(request: web.Request) -> web.Response:
    st = _state(request)
    page = await st.db(fleet.fleet, status=_status(request),
                       text=request.query.get("q", "").strip(),
                       offset=_int(request, "offset", 0, 0, 10**9),
                       limit=_int(request, "limit", st.cfg.page_size, 1, MAX_LIMIT),
                       forecasts=st.forecasts, kept=st.kept)
    return _json(page.as_dict())


async def api_device(request: web.Request) -> web.Response:
    st = _state(request)
    view = await st.db(fleet.device, request.match_info["device"], forecasts=st.forecasts)
    return _json(view.as_dict())


def _time_range(request: web.Request) -> tuple[float, float]:
    """`since` and `until` of a request (default: the last day), checked in order."""
    until = _float(request, "until", time.time())
    since = _float(request, "since", until - 86400)
    if since > until:
        raise BadRequest("since: later than until", "since")
    return since, until


async def api_readings(request: web.Request) -> web.Response:
    since, until = _time_range(request)
    points = _int(request, "points", fleet.MAX_CHART_POINTS, 1, 100_000)
    rv = await _state(request).db(fleet.device_readings, request.match_info["device"], since,
                                  until, points=points)
    return _json(rv.as_dict())


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        doc = await request.json()
    except ValueError:
        raise BadRequest("body: expected a JSON object", "body") from None
    if not isinstance(doc, dict):
        raise BadRequest("body: expected a JSON object", "body")
    return doc


def _field_int(doc: dict[str, Any], name: str, default: int | None) -> int | None:
    v = doc.get(name, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{name}: expected an integer, got {v!r}", name)
    return v


async def api_queue(request: web.Request) -> web.Response:
    doc = await _body(request)
    unknown = set(doc) - {"op", "args", "priority", "ttl_s"}
    if unknown:
        name = sorted(unknown)[0]
        raise BadRequest(f"{name}: unknown field (known: op, args, priority, ttl_s)", name)
    op = doc.get("op")
    if not isinstance(op, str) or not op:
        raise BadRequest("op: required, a command name such as 'ping'", "op")
    args = doc.get("args", [])
    if not isinstance(args, list) or any(isinstance(a, bool) or not isinstance(a, int)
                                         for a in args):
        raise BadRequest("args: expected a list of integers", "args")
    priority = _field_int(doc, "priority", q.DEFAULT_PRIORITY)
    ttl = _field_int(doc, "ttl_s", q.DEFAULT_TTL_S)
    done = await _state(request).db(actions.queue_command, request.match_info["device"], op,
                                    args, priority=q.DEFAULT_PRIORITY if priority is None
                                    else priority, ttl_s=ttl)
    return _json({"device": done.device, "command_id": done.command_id, "what": done.what}, 201)


async def api_config(request: web.Request) -> web.Response:
    doc = await _body(request)
    unknown = set(doc) - {"values", "priority"}
    if unknown:
        name = sorted(unknown)[0]
        raise BadRequest(f"{name}: unknown field (known: values, priority)", name)
    values = doc.get("values")
    if not isinstance(values, dict):
        raise BadRequest("values: expected an object of key: integer", "values")
    priority = _field_int(doc, "priority", q.DEFAULT_PRIORITY)
    done = await _state(request).db(actions.set_config, request.match_info["device"], values,
                                    priority=q.DEFAULT_PRIORITY if priority is None else priority)
    return _json({"device": done.device, "config_version": done.version,
                  "values": done.values}, 201)


async def api_config_show(request: web.Request) -> web.Response:
    view = await _state(request).db(fleet.device_config, request.match_info["device"])
    return _json(view.as_dict())


async def api_wakes(request: web.Request) -> web.Response:
    since, until = _time_range(request)
    st = _state(request)
    device = request.match_info["device"]
    wakes, energy = await st.db(
        lambda conn: (fleet.device_wakes(conn, device, since, until),
                      fleet.device_model(conn, device, st.energy)))
    out = []
    for w in wakes:
        d = w.as_dict()
        e = w.energy_uah(energy)
        d["energy_uah"] = None if e is None else round(e, 3)
        out.append(d)
    # The energy figures are a model: the node's own times × its board's cited currents.
    model = None if energy is None else {**energy.as_dict(), "kind": "model estimate"}
    return _json({"device": device, "since": since, "until": until,
                  "energy_reported": any(w.prev_awake_ms is not None for w in wakes),
                  "energy_model": model, "wakes": out})


async def api_cancel(request: web.Request) -> web.Response:
    item = await _state(request).db(actions.cancel, request.match_info["device"],
                                    _path_int(request, "command_id"))
    return _json(item.as_dict())


async def api_release(request: web.Request) -> web.Response:
    dev = await _state(request).db(actions.release, request.match_info["device"])
    return _json(dev.as_dict())


async def api_deadletters(request: web.Request) -> web.Response:
    dl = await _state(request).db(ohealth.dead_letters, request.query.get("device") or None,
                                  _int(request, "limit", 100, 1, MAX_LIMIT))
    return _json(dl.as_dict())


async def api_campaigns(request: web.Request) -> web.Response:
    items = await _state(request).db(ocampaigns.campaigns)
    return _json({"campaigns": [p.as_dict() for p in items]})


async def api_campaign(request: web.Request) -> web.Response:
    return _json((await _campaign(request)).as_dict(devices=True))


async def api_health(request: web.Request) -> web.Response:
    h = await _state(request).db(ohealth.health)
    return _json(h.as_dict())


async def api_group(request: web.Request) -> web.Response:
    doc = await _body(request)
    unknown = set(doc) - {"group"}
    if unknown:
        name = sorted(unknown)[0]
        raise BadRequest(f"{name}: unknown field (known: group)", name)
    if "group" not in doc or not (doc["group"] is None or isinstance(doc["group"], str)):
        raise BadRequest("group: required, a group name or null", "group")
    done = await _state(request).db(ogroups.set_group, request.match_info["device"],
                                    doc["group"])
    return _json({"device": done.device, "group": done.group})


async def api_alerts(request: web.Request) -> web.Response:
    state = request.query.get("state") or None
    if state is not None and state not in oalerts.STATES:
        raise BadRequest(f"state: {state!r} is not one of {', '.join(oalerts.STATES)}", "state")
    page = await _state(request).db(
        oalerts.alerts_page, state=state, device=request.query.get("device") or None,
        rule=request.query.get("rule") or None, offset=_int(request, "offset", 0, 0, 10**9),
        limit=_int(request, "limit", 50, 1, MAX_LIMIT))
    return _json(page.as_dict())


async def api_alert_clear(request: web.Request) -> web.Response:
    try:
        a = await _state(request).db(oalerts.clear, _path_int(request, "alert_id"))
    except oalerts.AlertNotFound as exc:
        raise BadRequest(str(exc), "alert_id", 404) from None
    return _json(a.as_dict())


async def api_openapi(request: web.Request) -> web.Response:
    return _json(openapi.DOCUMENT)


def _fingerprint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """Moves when a device changes status, stores readings or has its downlink queue change."""
    return (registry.version(conn), readings.total(conn),
            sum(q.pending_counts(conn).values()))


async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: `fleet` whenever the fleet changed (poll it, or reload rows)."""
    st = _state(request)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    last: tuple[int, int, int] | None = None
    quiet = 0.0
    try:
        while True:
            fp = await st.db(_fingerprint)
            if fp != last:
                data = json.dumps({"registry_version": fp[0], "readings": fp[1], "queued": fp[2]})
                await resp.write(f"event: fleet\ndata: {data}\n\n".encode())
                last, quiet = fp, 0.0
            elif quiet >= EVENT_PING_S:
                await resp.write(b": ping\n\n")
                quiet = 0.0
            await asyncio.sleep(EVENT_POLL_S)
            quiet += EVENT_POLL_S
    except ConnectionResetError:  # the page went away
        pass
    return resp


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics (gateway.ops.metrics), under the same login rule as the page."""
    st = _state(request)
    live = st.live if st.live_source is None else await st.live_source()
    body = await st.db(ometrics.render, live)
    return web.Response(body=body, headers={"Content-Type": ometrics.CONTENT_TYPE})


def make_app(cfg: WebConfig, conn: sqlite3.Connection, *, tls: bool = False,
             live: ometrics.Live | None = None, live_source: LiveSource | None = None,
             energy: BoardModels | None = None) -> web.Application:
    app = web.Application(middlewares=[security_headers, errors, authenticate], client_max_size=64 * 1024)
    app[STATE] = State(cfg, conn, tls, live, live_source, energy=energy)
    r = app.router
    r.add_get("/", fleet_page)
    r.add_get("/devices/{device}", device_page)
    r.add_post("/devices/{device}/commands", queue_form)
    r.add_post("/devices/{device}/config", config_form)
    r.add_post("/devices/{device}/commands/{command_id}/cancel", cancel_form)
    r.add_post("/devices/{device}/release", release_form)
    r.add_get("/deadletters", deadletters_page)
    r.add_get("/health", health_page)
    r.add_get("/campaigns", campaigns_page)
    r.add_get("/campaigns/{campaign}", campaign_page)
    r.add_get("/login", login_page)
    r.add_post("/login", login_post)
    r.add_post("/logout", logout_post)
    r.add_get("/api/v1/devices", api_devices)
    r.add_get("/api/v1/devices/{device}", api_device)
    r.add_get("/api/v1/devices/{device}/readings", api_readings)
    r.add_post("/api/v1/devices/{device}/commands", api_queue)
    r.add_post("/api/v1/devices/{device}/config", api_config)
    r.add_get("/api/v1/devices/{device}/config", api_config_show)
    r.add_get("/api/v1/devices/{device}/wakes", api_wakes)
    r.add_delete("/api/v1/devices/{device}/commands/{command_id}", api_cancel)
    r.add_post("/api/v1/devices/{device}/release", api_release)
    r.add_put("/api/v1/devices/{device}/group", api_group)
    r.add_get("/api/v1/deadletters", api_deadletters)
    r.add_get("/api/v1/health", api_health)
    r.add_get("/api/v1/campaigns", api_campaigns)
    r.add_get("/api/v1/campaigns/{campaign}", api_campaign)
    r.add_get("/api/v1/alerts", api_alerts)
    r.add_post("/api/v1/alerts/{alert_id}/clear", api_alert_clear)
    r.add_get("/api/v1/openapi.json", api_openapi)
    r.add_get("/api/v1/events", api_events)
    r.add_get("/metrics", metrics)
    return app
