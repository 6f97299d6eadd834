"""HTML for the operator's pages: plain server-rendered markup, inline style, no script or
font from anywhere else, so the page works with no internet access."""

from __future__ import annotations

import datetime as dt
import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from html import escape
from urllib.parse import quote, urlencode

from gateway.config import EnergyModel
from gateway.ops import campaigns as ocampaigns
from gateway.ops import fleet as ofleet
from gateway.ops import health as ohealth
from gateway.store import devices as registry
from gateway.store import downlink_queue as q
from gateway.store import readings
from gateway.web import svg

RANGES = {"1h": 3600, "6h": 6 * 3600, "1d": 86400, "7d": 7 * 86400, "30d": 30 * 86400}

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{background:#234;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
header a{color:#fff;text-decoration:none}header .sp{flex:1}
main{padding:12px 16px}table{border-collapse:collapse;background:#fff;width:100%}
th,td{border-bottom:1px solid #e3e5e8;padding:4px 8px;text-align:left;vertical-align:middle}
th{background:#eef0f3}.st-active{color:#186}.st-quarantined{color:#b50}.st-revoked,
.st-decommissioned{color:#888}.late{color:#c22}.msg{padding:6px 10px;background:#ffd;
border:1px solid #dd8;margin-bottom:8px}.err{background:#fdd;border-color:#d88}
section{margin-bottom:18px}form.inline{display:inline}dl{display:grid;
grid-template-columns:max-content auto;gap:2px 12px}dt{color:#555}
.pager a{margin:0 4px}.bar{display:flex;width:320px;height:14px;background:#e3e5e8}
.bar span{display:block;height:100%}.key span{display:inline-block;width:10px;height:10px;
margin:0 4px 0 10px}
"""


def when(t: float | None, now: float | None = None) -> str:
    if t is None:
        return "never"
    now = time.time() if now is None else now
    d = t - now
    text = dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    span = abs(d)
    rel = (f"{span:.0f}s" if span < 120 else f"{span / 60:.0f} min" if span < 7200
           else f"{span / 3600:.1f} h" if span < 172800 else f"{span / 86400:.1f} d")
    return f"{text} ({'in ' + rel if d > 0 else rel + ' ago'})"


def layout(title: str, body: str, *, csrf: str, logged_in: bool, msg: str = "",
           error: bool = False, script: str = "") -> str:
    logout = (f'<form class="inline" method="post" action="/logout">'
              f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
              f'<button>Log out</button></form>') if logged_in else ""
    note = f'<div class="msg{" err" if error else ""}" role="status">{escape(msg)}</div>' if msg else ""
    js = f"<script>{script}</script>" if script else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<meta name="csrf-token" content="{escape(csrf)}">'
            f"<title>{escape(title)} · Torpor</title><style>{_STYLE}</style></head><body>"
            f'<header><strong>Torpor</strong><a href="/">Fleet</a><a href="/campaigns">Campaigns</a>'
            f'<a href="/deadletters">Dead letters</a><a href="/health">Health</a><span class="sp"></span>{logout}'
            f"</header><main>{note}<h1>{escape(title)}</h1>{body}</main>{js}</body></html>")


# The fleet page asks the API's event stream for changes and reloads its table rows.
FLEET_SCRIPT = """
(function(){if(!window.EventSource)return;var es=new EventSource('/api/v1/events');
es.addEventListener('fleet',function(){var u=new URL(location.href);u.searchParams.set('rows','1');
fetch(u,{credentials:'same-origin'}).then(function(r){return r.ok?r.text():null}).then(function(t){
if(t!==null){document.getElementById('fleet-rows').innerHTML=t;}});});})();
"""


LOW_DAYS = 14.0  # a forecast under this many days is shown in red


def _days_left_text(days: float | None, pending: bool, source: str | None = None) -> str:
    if pending:
        return "not fitted yet"
    if days is None:
        return f"– (fewer than {readings.FORECAST_MIN_POINTS} battery readings in a week)"
    if not math.isfinite(days):
        return "not falling"
    if source == "ledger":
        return (f"{days:.1f} days (energy ledger of its wakes: an estimate, see Energy "
                "per wake below)")
    return (f"{days:.1f} days (voltage trend of the last {readings.FORECAST_WINDOW_DAYS:g} "
            f"days to {readings.FORECAST_EMPTY_MV:g} mV)")


def _days_left(days: float | None, pending: bool = False, source: str | None = None) -> str:
    """A fleet row's forecast cell: days, "not falling", or a dash without enough readings
    (an ellipsis while it is still to be fitted); `data-source` says what it comes from."""
    if source is not None and not pending:
        return _days_left(days).replace('class="days-left', f'data-source="{source}" '
                                        'class="days-left', 1)
    if pending:
        return ('<td class="days-left" data-days="pending" title="forecast not fitted yet: '
                'shown at the next refresh">…</td>')
    if days is None:
        return '<td class="days-left" data-days="">–</td>'
    if not math.isfinite(days):
        return '<td class="days-left" data-days="inf">not falling</td>'
    text = f"{days:.1f} d" if days < 10 else f"{days:.0f} d"
    cls = " late" if days < LOW_DAYS else ""
    return f'<td class="days-left{cls}" data-days="{days:.2f}">{text}</td>'


@functools.lru_cache(maxsize=1024)
def _sparkline(device: str, battery: tuple[tuple[int, int], ...]) -> str:
    """A fleet row's sparkline, drawn again only when its readings changed (a row is drawn
    once a second while the page is open, and most rows' readings change far less often)."""
    return svg.sparkline([(float(t), float(v)) for t, v in battery], label=f"battery of {device}")


def fleet_rows(page: ofleet.FleetPage, now: float) -> str:
    out = []
    for r in page.rows:
        listen = when(r.next_listen_at, now)
        if r.overdue_wakes:
            listen = f'<span class="late">{escape(listen)}, {r.overdue_wakes} missed</span>'
        else:
            listen = escape(listen)
        batt = "" if r.battery_mv is None else f"{r.battery_mv} mV "
        spark = _sparkline(r.id, r.battery)
        alerts = f'<span class="late">{r.alerts} open</span>' if r.alerts else ""
        out.append(
            f'<tr data-device="{escape(r.id)}"><td><a href="/devices/{quote(r.id)}">{escape(r.id)}'
            f'</a></td><td class="st-{escape(r.status)}" title="{escape(r.status_reason)}">'
            f"{escape(r.status)}</td><td>{escape(when(r.last_seen, now))}</td><td>{listen}</td>"
            f"<td>{batt}{spark}</td>{_days_left(r.days_left, r.days_left_pending, r.days_left_source)}<td>{r.queued}</td>"
            f"<td>{'' if r.fw_version is None else r.fw_version}</td>"
            f"<td>{escape(r.ota_state or '')}</td><td>{alerts}</td></tr>")
    if not out:
        out.append('<tr><td colspan="10">no device matches</td></tr>')
    return "".join(out)


def fleet(page: ofleet.FleetPage, *, status: str | None, text: str, now: float) -> str:
    opts = "".join(
        f'<option value="{s}"{" selected" if s == status else ""}>{s} '
        f"({page.counts.get(s, 0)})</option>" for s in registry.STATUSES)
    filters = (f'<form method="get" action="/" class="filters"><label>Status <select name="status">'
               f'<option value="">any ({sum(page.counts.values())})</option>{opts}</select></label> '
               f'<label>Search <input name="q" value="{escape(text)}" placeholder="device id">'
               f"</label> <button>Filter</button></form>")
    pages = []
    base = {k: v for k, v in (("status", status or ""), ("q", text)) if v}
    if page.offset > 0:
        prev = max(0, page.offset - page.limit)
        pages.append(f'<a rel="prev" href="/?{urlencode({**base, "offset": prev})}">previous</a>')
    last = min(page.offset + page.limit, page.total)
    pages.append(f"{page.offset + 1 if page.total else 0}–{last} of {page.total}")
    if last < page.total:
        pages.append(f'<a rel="next" href="/?{urlencode({**base, "offset": last})}">next</a>')
    pager = f'<p class="pager">{" ".join(pages)}</p>'
    table = ('<table id="fleet"><thead><tr><th>Device</th><th>Status</th><th>Last seen</th>'
             "<th>Next listening</th><th>Battery</th>"
             '<th title="days until the battery is empty: by the energy ledger of its wakes '
             "where the board is known (an estimate), else by its voltage trend over the last "
             f'{readings.FORECAST_WINDOW_DAYS:g} days to {readings.FORECAST_EMPTY_MV:g} mV">'
             "Days left</th><th>Queued</th><th>Firmware</th>"
             f'<th>OTA</th><th>Alerts</th></tr></thead><tbody id="fleet-rows">{fleet_rows(page, now)}'
             "</tbody></table>")
    return filters + pager + table + pager


def _items(items: Iterable[q.Item], device: str, csrf: str, cancel: bool, now: float) -> str:
    rows = []
    for it in items:
        act = ""
        if cancel:
            act = (f'<form class="inline" method="post" action="/devices/{quote(device)}/commands/'
                   f'{it.command_id}/cancel"><input type="hidden" name="csrf" value="{escape(csrf)}">'
                   f"<button>Cancel</button></form>")
        result = escape(" ".join(str(x) for x in (it.result_status, it.result_code,
                                                  it.result_detail) if x not in (None, "")))
        rows.append(f'<tr data-command-id="{it.command_id}"><td>{it.command_id}</td>'
                    f"<td>{escape(it.what)}</td><td>{escape(it.status)}</td><td>{it.priority}</td>"
                    f"<td>{escape(when(it.created_at, now))}</td><td>{it.attempts}</td>"
                    f"<td>{result}</td><td>{act}</td></tr>")
    if not rows:
        return "<p>none</p>"
    return ("<table><thead><tr><th>Id</th><th>What</th><th>Status</th><th>Priority</th>"
            "<th>Queued</th><th>Tries</th><th>Result</th><th></th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


SEEN_NOTE = (
    "\"Awake seen by gateway\" is the time from the HELLO to the wake's last frame as the "
    "gateway received them: a lower bound of the awake time, without the boot, Wi-Fi and TLS "
    "set-up before the HELLO.")


def energy_note(energy: EnergyModel | None) -> str:
    """What the energy per wake is, said on the page: a model, not a measurement."""
    if energy is None:
        return ("Energy per wake: the device has no board in the registry (`torpor device "
                "board`) and no default board is configured ([energy] board in gateway.toml), "
                "so the gateway draws no energy model. The node reports its "
                "previous wake's awake and radio-on times in each HELLO (firmware of protocol "
                "1.5 or later); the wake table shows them.")
    e = energy
    return (f"Energy per wake is a model estimate, not a measurement: each HELLO reports the "
            f"node's previous wake, its awake time (from the app's start to deep sleep) and "
            f"radio-on time, counted by the node's own ticks; the gateway multiplies them by "
            f"the cited currents of the {e.board} board profile (boards/profiles.toml, "
            f"docs/board-profiles.md): CPU {e.cpu_active_ma:g} mA over the awake time plus "
            f"the profile's {e.boot_ms:g} ms boot before the app, radio {e.radio_listen_ma:g} "
            f"mA more while it is on. Each point is drawn at the HELLO that reported it. "
            f"Wakes of firmware before protocol 1.5 report nothing and are not drawn.")


def _wake_charts(wakes: Sequence[ofleet.WakeLogEntry], since: float, until: float,
                 energy: EnergyModel | None = None) -> str:
    """Battery, RSSI, awake time and energy per wake, from the wake log."""
    def pts(get: Callable[[ofleet.WakeLogEntry], float | None]) -> list[tuple[float, float]]:
        out = []
        for w in wakes:
            v = get(w)
            if v is not None:
                out.append((w.at, float(v)))
        return out

    energy_chart = ""
    if energy is not None:
        energy_chart = svg.chart(
            "energy per wake (model estimate)", "µAh", pts(lambda w: w.energy_uah(energy)),
            since, until, kind="wake", empty="no wake in this range reported its energy facts")
    return (svg.chart("battery at wake", "mV", pts(lambda w: w.battery_mv), since, until,
                      kind="wake", empty="no wake in this range")
            + svg.chart("rssi", "dBm", pts(lambda w: w.rssi), since, until, kind="wake",
                        empty="no wake in this range")
            + svg.chart("awake seen by gateway", "s", pts(lambda w: w.seen_s), since, until,
                        kind="wake", empty="no wake in this range")
            + energy_chart
            + f'<p class="energy-note" id="energy-per-wake">{escape(energy_note(energy))}</p>'
            + f"<p>{escape(SEEN_NOTE)}</p>")


def _energy_cell(w: ofleet.WakeLogEntry, energy: EnergyModel | None) -> str:
    """The previous wake's facts and, with a board model, its estimated charge."""
    if w.prev_awake_ms is None:
        return "not reported"
    facts = (f"prev. wake {w.prev_awake_ms} ms awake, radio {w.prev_radio_ms or 0} ms"
             + (", sent" if w.prev_sent else ", sampled only"))
    e = w.energy_uah(energy)
    return facts if e is None else f"{e:.1f} µAh est. ({facts})"


def _wake_table(wakes: Sequence[ofleet.WakeLogEntry], now: float,
                energy: EnergyModel | None = None) -> str:
    rows = []
    for w in wakes:
        ota = w.ota_state or ""
        if w.ota_reason and w.ota_reason != "none":
            ota += f" ({w.ota_reason})"
        rot = ""
        if w.cred_rotation:
            rot = f"#{w.cred_rotation}" + (f" {w.cred_outcome}" if w.cred_outcome else "")
        elif w.cred_outcome:
            rot = w.cred_outcome
        seen = "" if w.seen_s is None else f"{w.seen_s:.1f} s"
        sent = f"{w.readings}" + ("" if w.queue_depth is None else f" of {w.queue_depth} queued")
        safe = " safe mode" if w.safe_mode else ""
        rows.append(
            f'<tr data-wake="{w.seq}"><td>{escape(when(w.at, now))}</td>'
            f"<td>{escape(w.boot_cause)}{safe}</td><td>{escape(sent)}</td>"
            f"<td>{'' if w.rssi is None else f'{w.rssi} dBm'}</td>"
            f"<td>{'' if w.battery_mv is None else f'{w.battery_mv} mV'}</td>"
            f"<td>{seen}</td><td>{escape(_energy_cell(w, energy))}</td>"
            f"<td>{'' if w.fw_version is None else w.fw_version}</td>"
            f"<td>{escape(ota)}</td><td>{escape(rot)}</td></tr>")
    if not rows:
        return "<p>no wake logged yet</p>"
    return ('<table id="wakes"><thead><tr><th>Woke</th><th>Cause</th><th>Readings stored</th>'
            "<th>RSSI</th><th>Battery</th><th>Awake (seen)</th><th>Energy</th><th>Firmware</th>"
            "<th>OTA</th><th>Key rotation</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


def _rotations(rots: Sequence[ofleet.RotationEntry], now: float) -> str:
    pending = [r for r in rots if r.state in ofleet.ROTATION_OPEN]
    rows = "".join(
        f'<tr data-rotation="{r.id}"><td>{r.id}</td><td>{escape(r.state)}</td>'
        f"<td>{escape(r.reason)}</td><td>{escape(when(r.created_at, now))}</td>"
        f"<td>{escape(when(r.updated_at, now))}</td>"
        f"<td>{escape(' '.join(x for x in (r.outcome, r.detail) if x))}</td></tr>" for r in rots)
    head = (f"<p>{len(pending)} pending (requested, certificate issued or awaiting revocation of "
            "the old one).</p>" if pending else "<p>No key rotation pending.</p>")
    if not rows:
        return head
    return (head + '<table id="rotations"><thead><tr><th>Rotation</th><th>State</th>'
            "<th>Reason</th><th>Requested</th><th>Updated</th><th>Outcome</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def device(view: ofleet.DeviceView, rv: ofleet.ReadingsView, rng: str, *, csrf: str,
           now: float, wakes: Sequence[ofleet.WakeLogEntry] = (),
           wakes_since: float | None = None, energy: EnergyModel | None = None,
           ledger: ofleet.LedgerForecast | None = None) -> str:
    d = view.device
    r = view.row
    listen = when(r.next_listen_at, now)
    lands = ("at its first HELLO" if r.next_listen_at is None
             else f"when it next listens: {listen}")
    if r.overdue_wakes:
        lands += f" (overdue: {r.overdue_wakes} missed wakes)"
    facts = [
        ("Status", f'<span class="st-{escape(d.status)}">{escape(d.status)}</span> '
                   f"{escape(d.status_reason)}"),
        ("Class", escape(d.device_class)),
        ("Board", escape(d.board) if d.board else
         escape(f"– (the default, {energy.board})") if energy is not None else "–"),
        ("Last seen", escape(when(d.last_seen, now))),
        ("Next listening", escape(listen)), ("Battery", f"{d.battery_mv} mV" if d.battery_mv else "–"),
        ("Battery days left", _days_left_text(r.days_left, r.days_left_pending,
                                              r.days_left_source)),
        ("RSSI", f"{d.rssi} dBm" if d.rssi is not None else "–"),
        ("Firmware", escape(str(d.fw_version or "–"))), ("OTA", escape(d.ota_state or "–")),
        ("Boot cause", escape(d.boot_cause or "–")), ("Readings stored", str(view.readings_stored)),
        ("Dead letters", f'<a href="/deadletters?device={quote(d.id)}">{view.dead_letters}</a>'),
    ]
    if ledger is not None:
        facts.append(("Energy ledger", escape(
            f"{ledger.drain_ua:.1f} µA average over {ledger.wakes} wakes in "
            f"{ledger.span_s / 3600:.1f} h (sending wake {ledger.sending_uah:.1f} µAh"
            + ("" if ledger.sampling_uah is None
               else f", sampling wake {ledger.sampling_uah:.1f} µAh")
            + f"); {ledger.left_mah:.0f} mAh left at {ledger.battery_mv} mV by the 2×AA "
            "discharge curve: a model estimate, not a measurement")))
    if view.wakes is not None:
        w = view.wakes
        facts.append(("Wakes", f"{w.wakes} seen, {w.missed_wakes} missed; interval "
                               f"{w.interval_s or '?'} s, window {w.window_ms or '?'} ms"))
    dl = "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
    if d.status == registry.QUARANTINED:
        dl += (f'<form method="post" action="/devices/{quote(d.id)}/release">'
               f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
               f"<button>Release from quarantine</button></form>")
    ranges = " ".join(
        (f"<strong>{k}</strong>" if k == rng else f'<a href="?range={k}">{k}</a>') for k in RANGES)
    charts = "".join(svg.chart(s.name, s.unit, s.points, rv.since, rv.until) for s in rv.series)
    if rv.series and rv.until < now - 60:
        charts = (f"<p>No readings in the last {rng}: showing the {rng} up to its newest reading"
                  f" ({escape(when(rv.until, now))}).</p>" + charts)
    if rv.series and rv.until > now + 60:
        charts = (f"<p>Its newest reading is stamped {escape(when(rv.until, now))}, ahead of the "
                  "gateway's clock: the chart runs to it.</p>" + charts)
    if not rv.series:
        charts = svg.chart("readings", "", [], rv.since, rv.until)
        if rv.latest_at is not None:
            charts += f"<p>Its newest reading is from {escape(when(rv.latest_at, now))}.</p>"
    since = now - RANGES[rng] if wakes_since is None else wakes_since
    wake_charts = _wake_charts(wakes, since, now, energy)
    ops = "".join(f'<option value="{o}">{o}</option>' for o in q.OPS)
    form = (f'<form method="post" action="/devices/{quote(d.id)}/commands" id="queue-command">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            f'<label>Command <select name="op">{ops}</select></label> '
            f'<label>Arguments <input name="args" placeholder="e.g. 300" size="12"></label> '
            f'<label>Priority <input name="priority" type="number" min="0" max="{q.MAX_PRIORITY}" '
            f'value="{q.DEFAULT_PRIORITY}" size="4"></label> '
            f'<label>TTL (s) <input name="ttl_s" type="number" min="1" value="{q.DEFAULT_TTL_S}" '
            f'size="8"></label> <button>Queue</button></form>')
    done = [it for it in view.history if it.status not in q.ACTIVE]
    cfg_rows = "".join(
        f"<tr><td>{escape(c.key)}</td><td>{c.value}</td><td>v{c.version}</td>"
        f"<td>{'yes' if c.applied else 'pending'}</td>"
        f"<td>{'' if c.reported_value is None else c.reported_value}</td></tr>" for c in view.config)
    cfg = ('<table id="config"><thead>'
           "<tr><th>Key</th><th>Desired</th><th>Version</th><th>Applied</th>"
           f"<th>Reported</th></tr></thead><tbody>{cfg_rows}</tbody></table>" if cfg_rows
           else "<p>no configuration set</p>")
    cfg += f"<p>Configuration version the node reported: {d.config_version or 0}</p>"
    keys = "".join(f'<option value="{k}">{k}</option>' for k in q.CONFIG_KEYS)
    cfg += (f'<form method="post" action="/devices/{quote(d.id)}/config" id="set-config">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            f'<label>Key <select name="key">{keys}</select></label> '
            f'<label>Value <input name="value" type="number" required size="10"></label> '
            f"<button>Set</button></form>")
    return (f"<section>{dl}</section>"
            f'<section><h2>Readings</h2><p class="ranges">Range: {ranges} · {rv.count} readings'
            f"</p>{charts}</section>"
            f'<section><h2>Wakes</h2><p class="ranges">Range: {ranges} · {len(wakes)} wakes '
            f"logged</p>{wake_charts}<h3>Latest wakes</h3>{_wake_table(view.wake_log, now, energy)}"
            "</section>"
            f"<section><h2>Key rotations</h2>{_rotations(view.rotations, now)}</section>"
            f"<section><h2>Pending downlink</h2><p>Lands {escape(lands)}.</p>"
            f"{_items(view.pending, d.id, csrf, True, now)}{form}</section>"
            f"<section><h2>Command results</h2>"
            f"{_items(done, d.id, csrf, False, now)}</section>"
            f"<section><h2>Configuration</h2>{cfg}</section>")


def dead_letters(dl: ohealth.DeadLetters, now: float) -> str:
    rows = "".join(
        f"<tr><td>{x.id}</td><td>{escape(x.device)}</td><td>{escape(when(x.at, now))}</td>"
        f"<td>{escape(x.reason)}</td><td>{escape(x.detail)}</td><td>{x.raw_len} B</td>"
        f"<td><code>{x.raw[:32].hex()}{'…' if len(x.raw) > 32 else ''}</code></td></tr>"
        for x in dl.letters)
    refused = "".join(
        f"<tr><td>{escape(c.device)}</td><td>{escape(c.reason)}</td><td>{c.frames}</td>"
        f"<td>{c.stored}</td><td>{escape(when(c.last_at, now))}</td></tr>" for c in dl.refused)
    return (f"<p>{dl.total} dead letters stored; the newest {len(dl.letters)} below.</p>"
            "<table><thead><tr><th>Id</th><th>Device</th><th>At</th><th>Reason</th><th>Detail</th>"
            f"<th>Size</th><th>Frame</th></tr></thead><tbody>{rows}</tbody></table>"
            "<h2>Refused frames</h2><table><thead><tr><th>Device</th><th>Reason</th><th>Frames</th>"
            f"<th>Stored</th><th>Last</th></tr></thead><tbody>{refused}</tbody></table>")


def health(h: ohealth.Health, now: float) -> str:
    st = h.status
    o = h.outbox
    up = "not running" if o.upstream_connected is None else (
        "connected" if o.upstream_connected else "disconnected")
    gw = [("State", escape(st.state)), ("Running", "yes" if st.running else "no"),
          ("Started", escape(when(st.started_at, now))),
          ("Status written", escape(when(st.updated_at, now))),
          ("Broker connection", "yes" if st.detail.get("mqtt_connected") else "no"),
          ("Devices", escape(", ".join(f"{k} {v}" for k, v in sorted(st.devices.items())) or "none")),
          ("Seen in the last 10 min", str(st.seen_recently)),
          ("Readings", f"{st.readings_total} stored, {st.readings_per_min:.0f}/min"),
          ("Task restarts", escape(str(st.detail.get("restarts", {}))))]
    ob = [("Upstream", up), ("Depth", str(o.depth)),
          ("Oldest", "–" if o.oldest_age_s is None else f"{o.oldest_age_s:.0f} s old"),
          ("Enqueued", str(o.enqueued)), ("Delivered", str(o.delivered)),
          ("Dropped (full)", str(o.dropped_full)), ("Dropped (age)", str(o.dropped_age))]

    def dl(facts: list[tuple[str, str]]) -> str:
        return "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"

    return (f"<section><h2>Gateway</h2>{dl(gw)}</section><section><h2>Outbox and upstream</h2>"
            f"{dl(ob)}</section><section><h2>Dead letters</h2><p>{h.dead_letters} stored "
            f'({h.dead_letter_bytes} bytes): <a href="/deadletters">see them</a></p></section>')


# A colour per campaign device state: greys waiting, blues under way, green done, reds bad.
STATE_COLOURS = {
    "pending": "#bbb", "queued": "#9ab", "downloading": "#48c", "verifying": "#36a",
    "trial": "#a6c", "confirmed": "#2a6", "reverted": "#e80", "failed": "#c22",
    "refused": "#933", "timed_out": "#b66", "cancelled": "#777",
}


def _bar(p: ocampaigns.Progress) -> str:
    """Progress per state as one stacked bar (each state's share of the devices)."""
    total = p.total or 1
    parts = "".join(
        f'<span class="st-part" data-state="{s}" title="{s}: {p.counts[s]}" style="width:'
        f'{100 * p.counts[s] / total:.2f}%;background:{STATE_COLOURS[s]}"></span>'
        for s in ocampaigns.STATES if p.counts.get(s))
    return f'<div class="bar" role="img" aria-label="progress per state">{parts}</div>'


def _counts(p: ocampaigns.Progress) -> str:
    return " ".join(f"{s} {p.counts[s]}" for s in ocampaigns.STATES if p.counts.get(s))


def campaigns(items: list[ocampaigns.Progress], now: float) -> str:
    key = "".join(f'<span style="background:{c}"></span>{s}' for s, c in STATE_COLOURS.items())
    rows = "".join(
        f'<tr data-campaign="{p.campaign.id}"><td><a href="/campaigns/{p.campaign.id}">'
        f"{p.campaign.id}</a></td><td>v{p.campaign.version}</td>"
        f'<td class="st-{escape(p.campaign.status)}">{escape(p.campaign.status)}</td>'
        f"<td>{p.finished}/{p.total}</td><td>{_bar(p)}<small>{escape(_counts(p))}</small></td>"
        f"<td>{escape(when(p.campaign.created_at, now))}</td>"
        f"<td>{escape(p.campaign.note)}</td></tr>" for p in items)
    if not rows:
        rows = ('<tr><td colspan="7">no campaign yet: start one with '
                "<code>torpor ota campaign</code></td></tr>")
    return (f'<p class="key">{key}</p><table id="campaigns"><thead><tr><th>Campaign</th>'
            "<th>Image</th><th>State</th><th>Finished</th><th>Progress per state</th>"
            f"<th>Started</th><th>Note</th></tr></thead><tbody>{rows}</tbody></table>")


def campaign(p: ocampaigns.Progress, now: float, state: str | None) -> str:
    c = p.campaign
    rate = f"{c.rate}{'%' if c.rate_percent else ''} at a time"
    facts = [("Image", f"v{c.version}"), ("State", escape(c.status)), ("Rate", rate),
             ("Abort past", f"{c.abort_threshold:g}% failed"),
             ("Device timeout", f"{c.timeout_s / 3600:g} h"),
             ("Started", escape(when(c.created_at, now))),
             ("Finished", escape(when(c.finished_at, now)) if c.finished_at else "–"),
             ("Note", escape(c.note) or "–")]
    counts = "".join(
        f'<tr data-state="{s}"><td><span style="color:{STATE_COLOURS[s]}">■</span> '
        f'<a href="?state={s}">{s}</a></td><td>{p.counts.get(s, 0)}</td></tr>'
        for s in ocampaigns.STATES)
    shown = [d for d in c.devices if state is None or d.status == state]
    rows = "".join(
        f'<tr data-device="{escape(d.device)}"><td><a href="/devices/{quote(d.device)}">'
        f"{escape(d.device)}</a></td><td>{escape(d.status)}</td>"
        f"<td>{d.progress}/{d.chunks or '?'}</td><td>{escape(d.reason)}</td>"
        f"<td>{escape(when(d.updated_at, now))}</td></tr>" for d in shown[:MAX_CAMPAIGN_ROWS])
    more = (f"<p>The first {MAX_CAMPAIGN_ROWS} of {len(shown)} shown; filter by state above.</p>"
            if len(shown) > MAX_CAMPAIGN_ROWS else "")
    return (f"<section><dl>{''.join(f'<dt>{k}</dt><dd>{v}</dd>' for k, v in facts)}</dl>"
            f"{_bar(p)}<p>{p.finished} of {p.total} devices finished, {p.bad} failed.</p>"
            f'</section><section><h2>Devices per state</h2><table id="states"><tbody>{counts}'
            f'<tr><td><a href="?">all</a></td><td>{p.total}</td></tr></tbody></table></section>'
            f"<section><h2>Devices{f' ({escape(state)})' if state else ''}</h2>"
            '<table id="campaign-devices"><thead><tr><th>Device</th><th>State</th>'
            "<th>Chunks</th><th>Reason</th><th>Updated</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>{more}</section>")


MAX_CAMPAIGN_ROWS = 1000


def login(*, csrf: str, error: str = "", token: bool, password: bool) -> str:
    what = " or ".join(x for x, on in (("password", password), ("token", token)) if on)
    return (f'<form method="post" action="/login"><input type="hidden" name="csrf" '
            f'value="{escape(csrf)}"><label>Operator {what} <input type="password" name="secret" '
            f'autofocus required></label> <button>Log in</button></form>')
