"""Run the web page and API: inside the gateway service (one supervised task) or alone
(`torpor gateway web`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from aiohttp import web

from gateway.config import GatewayConfig, WebConfig, board_models
from gateway.errors import ConfigError
from gateway.ops.metrics import Live
from gateway.store import db
from gateway.web.app import STATE, LiveSource, make_app

log = logging.getLogger(__name__)

# At shutdown, requests in flight get this long; an open event stream would otherwise hold
# the gateway's stop for aiohttp's default of a minute.
SHUTDOWN_S = 1.0


def tls_context(cfg: WebConfig) -> ssl.SSLContext | None:
    if not cfg.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[web] tls_cert: cannot load {cfg.tls_cert} / {cfg.tls_key}: {exc}") from None
    return ctx


def check(cfg: WebConfig) -> None:
    """Refuse a non-loopback address without a login configured (config.py checks it
    too; this guards callers that build a WebConfig by hand)."""
    if not cfg.loopback and not (cfg.token or cfg.password_hash):
        raise ConfigError(f"[web] host: {cfg.host!r} is not a loopback address; set [web] "
                          "password_hash or token first")


def preflight(cfg: WebConfig) -> None:
    """What can be checked before the gateway starts its tasks: a login for a public
    address, a loadable certificate."""
    check(cfg)
    tls_context(cfg)


async def serve(cfg: GatewayConfig, *, started: asyncio.Future[str] | None = None,
                live: Live | None = None, live_source: LiveSource | None = None) -> None:
    """Serve until cancelled; `started` gets the URL once listening. `live`: the running
    gateway's own metrics, when served inside it; `live_source`: how to ask for them, when
    served by its child process."""
    web_cfg = cfg.web
    check(web_cfg)
    ctx = tls_context(web_cfg)
    conn = db.connect(cfg.db_path)
    app = make_app(web_cfg, conn, tls=ctx is not None, live=live, live_source=live_source,
                   energy=board_models(cfg))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, web_cfg.host, web_cfg.port, ssl_context=ctx)
        await site.start()
        url = site.name
        for addr in runner.addresses:  # the real port when port = 0
            host = f"[{addr[0]}]" if ":" in str(addr[0]) else addr[0]
            url = f"{'https' if ctx else 'http'}://{host}:{addr[1]}/"
            break
        log.info("web page at %s", url)
        if started is not None and not started.done():
            started.set_result(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        async with app[STATE].lock:  # a query a stopped request left running ends first
            with contextlib.suppress(Exception):
                conn.close()
