"""`torpor bench transport`: MQTT client candidates for the gateway's hot connections,
measured in the same run against the same Mosquitto (mutual TLS, loopback).

Candidates: aiomqtt as published (public API only), gmqtt (public API only; skipped when
not installed) and the gateway's own codec and client (`gateway.transport`). Scenarios:
- receive_qos1: drain N QoS 1 PUBLISHes queued in a persistent session (the ingest
  connection after a restart, or under load): connect, receive and PUBACK every one;
- send_qos0: N QoS 0 PUBLISHes, ended by one QoS 1 PUBLISH whose PUBACK fences them;
- send_qos1: N QoS 1 PUBLISHes with at most `window` unacknowledged (the relay's
  upstream connection), until the last PUBACK.
The broker binds every client id to its certificate's CN, so one identity holds one
connection at a time: the timed client is the gateway's identity, and the untimed filler
of a receive run is a node (NODE_ID) publishing on its own topic.
Each figure is the median over rounds; in every round each scenario runs every candidate
once, in an order that rotates round by round, so they share the machine's noise. CPU is
this process's (the candidate's; nothing else runs here while it is timed) and the
broker's, per message.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.metadata
import json
import logging
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CANDIDATES = ("aiomqtt", "gmqtt", "torpor")
SCENARIOS = ("receive_qos1", "send_qos0", "send_qos1")
NODE_ID = "bench-0001"
TOPIC = f"torpor/{NODE_ID}/up"
SINK = f"bench/sink/{NODE_ID}"


@dataclass(frozen=True, slots=True)
class Scale:
    messages: int = 20_000
    rounds: int = 5
    window: int = 64
    deadline_s: float = 120.0  # per timed run
    warmup: bool = True


QUICK = Scale(messages=300, rounds=1, deadline_s=30.0, warmup=False)


class BenchError(Exception):
    """The benchmark could not run (the broker did not start, a run did not finish)."""


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    ctx: ssl.SSLContext
    client_id: str  # the gateway certificate's CN: the ACL lets it use every topic
    payload: bytes
    messages: int
    window: int
    node_ctx: ssl.SSLContext  # NODE_ID's certificate: the receive runs' filler


Run = Callable[[Target, str], Awaitable[None]]


def _quiet() -> logging.Logger:
    # aiomqtt warns on every publish while more than 10 are pending: a window is the point.
    lg = logging.getLogger("torpor.bench.transport.quiet")
    lg.setLevel(logging.CRITICAL)
    lg.propagate = False
    return lg


# --- the gateway's own client ---------------------------------------------------------------

def _torpor_options(t: Target, client_id: str, clean: bool) -> Any:
    from gateway import proto
    from gateway.transport import codec
    from gateway.transport.client import ClientOptions

    return ClientOptions(t.host, t.port, client_id, ssl=t.ctx, clean_session=clean,
                         max_packet=codec.max_publish_packet(proto.MAX_FRAME, 128),
                         max_inflight=t.window)


async def torpor_receive(t: Target, session: str) -> None:
    from gateway.transport.client import MqttClient
    from gateway.transport.codec import Publish

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    count = 0

    def on_message(_: Publish) -> None:
        nonlocal count
        count += 1
        if count == t.messages:
            done.set_result(None)

    client = MqttClient(_torpor_options(t, session, False), on_message=on_message)
    await client.connect()
    await done
    await client.disconnect()


async def torpor_send(t: Target, qos: int) -> None:
    from gateway.transport.client import MqttClient

    async with MqttClient(_torpor_options(t, t.client_id, True)) as client:
        start = time.monotonic()
        if qos == 0:
            for _ in range(t.messages):
                await client.publish(SINK, t.payload, 0)
            await client.publish(SINK, t.payload, 1)
        else:
            futs = [await client.start_publish(SINK, t.payload) for _ in range(t.messages)]
            await asyncio.gather(*futs)
        _mark(start)


# --- aiomqtt, public API only -----------------------------------------------------------------

def _aiomqtt_client(t: Target, client_id: str, clean: bool) -> Any:
    import aiomqtt

    return aiomqtt.Client(t.host, t.port, identifier=client_id, clean_session=clean,
                          tls_context=t.ctx, logger=_quiet(), max_inflight_messages=t.window)


async def aiomqtt_receive(t: Target, session: str) -> None:
    count = 0
    async with _aiomqtt_client(t, session, False) as client:
        async for _ in client.messages:
            count += 1
            if count == t.messages:
                break


async def aiomqtt_send(t: Target, qos: int) -> None:
    async with _aiomqtt_client(t, t.client_id, True) as client:
        start = time.monotonic()
        if qos == 0:
            for _ in range(t.messages):
                await client.publish(SINK, t.payload, qos=0)
            await client.publish(SINK, t.payload, qos=1)
        else:
            # The public API's window: that many publishers, each awaiting its PUBACK.
            async def lane(n: int) -> None:
                for _ in range(n):
                    await client.publish(SINK, t.payload, qos=1)

            share, extra = divmod(t.messages, t.window)
            await asyncio.gather(*(lane(share + (i < extra)) for i in range(t.window)))
        _mark(start)


# --- gmqtt, public API only -----------------------------------------------------------------

def _gmqtt() -> Any:
    return importlib.import_module("gmqtt")


def _gmqtt_window_storage(window: int) -> Any:
    """gmqtt has no per-message PUBACK callback; its public `persistent_storage` hook sees
    every QoS 1 message stored on publish and removed on PUBACK, which bounds the window."""
    storage_mod = importlib.import_module("gmqtt.storage")

    class WindowStorage(storage_mod.PersistentStorage):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.inflight = 0
            self.room = asyncio.Event()
            self.room.set()

        def push_message(self, mid: int, raw_package: bytes) -> None:
            super().push_message(mid, raw_package)
            self.inflight += 1
            if self.inflight >= window:
                self.room.clear()

        def remove_message_by_mid(self, mid: int) -> None:
            before = self.is_empty
            super().remove_message_by_mid(mid)
            if not before:
                self.inflight -= 1
                if self.inflight < window:
                    self.room.set()

    return WindowStorage()


async def gmqtt_receive(t: Target, session: str) -> None:
    gmqtt = _gmqtt()
    constants = importlib.import_module("gmqtt.mqtt.constants")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    count = 0

    def on_message(client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        nonlocal count
        count += 1
        if count == t.messages:
            done.set_result(None)
        return 0

    client = gmqtt.Client(session, clean_session=False, logger=_quiet())
    client.on_message = on_message
    await client.connect(t.host, t.port, ssl=t.ctx, version=constants.MQTTv311)
    await done
    await client.disconnect()


async def gmqtt_send(t: Target, qos: int) -> None:
    gmqtt = _gmqtt()
    constants = importlib.import_module("gmqtt.mqtt.constants")
    storage = _gmqtt_window_storage(t.window)
    client = gmqtt.Client(t.client_id, persistent_storage=storage, logger=_quiet())
    await client.connect(t.host, t.port, ssl=t.ctx, version=constants.MQTTv311)
    start = time.monotonic()
    if qos == 0:
        for i in range(t.messages):
            client.publish(SINK, t.payload, qos=0)
            if i % 256 == 255:
                await asyncio.sleep(0)  # gmqtt's publish never yields: let the socket drain
        client.publish(SINK, t.payload, qos=1)
        await storage.wait_empty()
    else:
        for _ in range(t.messages):
            if not storage.room.is_set():
                await storage.room.wait()
            client.publish(SINK, t.payload, qos=1)
        await storage.wait_empty()
    _mark(start)
    await client.disconnect()


# --- harness --------------------------------------------------------------------------------

_STARTED: list[float] = []


def _mark(start: float) -> None:
    """Send runs time from after their connect: record where that was."""
    _STARTED.append(start)


RUNS: dict[str, dict[str, Callable[[Target, str], Awaitable[None]]]] = {
    "torpor": {
        "receive_qos1": torpor_receive,
        "send_qos0": lambda t, _s: torpor_send(t, 0),
        "send_qos1": lambda t, _s: torpor_send(t, 1),
    },
    "aiomqtt": {
        "receive_qos1": aiomqtt_receive,
        "send_qos0": lambda t, _s: aiomqtt_send(t, 0),
        "send_qos1": lambda t, _s: aiomqtt_send(t, 1),
    },
    "gmqtt": {
        "receive_qos1": gmqtt_receive,
        "send_qos0": lambda t, _s: gmqtt_send(t, 0),
        "send_qos1": lambda t, _s: gmqtt_send(t, 1),
    },
}


async def _prepare_session(t: Target, session: str, n: int) -> None:
    """A persistent session subscribed to TOPIC with `n` QoS 1 messages queued for it
    (published by the node NODE_ID through the gateway's client, untimed)."""
    from gateway.transport.client import MqttClient

    sub = MqttClient(_torpor_options(t, session, False))
    await sub.connect()
    await sub.subscribe((TOPIC, 1))
    await sub.disconnect()
    # The filler must not present the subscriber's certificate: the broker would give it
    # the same client id, and its clean session would wipe the one just prepared.
    node = dataclasses.replace(t, ctx=t.node_ctx)
    async with MqttClient(_torpor_options(node, NODE_ID, True)) as filler:
        futs = [await filler.start_publish(TOPIC, t.payload) for _ in range(n)]
        await asyncio.gather(*futs)


async def _drop_session(t: Target, session: str) -> None:
    from gateway.transport.client import MqttClient

    async with MqttClient(_torpor_options(t, session, True)):
        pass


async def _one(t: Target, candidate: str, scenario: str, broker_pid: int | None,
               deadline_s: float) -> dict[str, float]:
    from tools.bench.gateway import _cpu_s

    run = RUNS[candidate][scenario]
    # the client id asked for; the broker gives the certificate's CN whatever is asked
    session = t.client_id
    if scenario == "receive_qos1":
        await _prepare_session(t, session, t.messages)
    _STARTED.clear()
    b0 = _cpu_s(broker_pid)
    c0 = time.process_time()
    w0 = time.monotonic()
    try:
        async with asyncio.timeout(deadline_s):
            await run(t, session)
    except TimeoutError:
        raise BenchError(f"{candidate} {scenario}: not done within {deadline_s:g}s") from None
    w1 = time.monotonic()
    c1 = time.process_time()
    b1 = _cpu_s(broker_pid)
    if scenario == "receive_qos1":
        await _drop_session(t, session)
    elif _STARTED:
        # send runs exclude their connect from the wall time; its CPU (one TLS handshake,
        # about a millisecond) stays in, a rounding error over thousands of messages
        w0 = _STARTED[0]
    n = t.messages
    return {
        "msgs_per_s": n / (w1 - w0),
        "cpu_us_per_msg": (c1 - c0) / n * 1e6,
        "broker_cpu_us_per_msg": (b1 - b0) / n * 1e6,
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def available() -> tuple[str, ...]:
    return tuple(c for c in CANDIDATES if c != "gmqtt" or _version("gmqtt") is not None)


async def _measure(scale: Scale, t: Target, broker_pid: int | None,
                   candidates: tuple[str, ...]) -> dict[str, dict[str, list[dict[str, float]]]]:
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        c: {s: [] for s in SCENARIOS} for c in candidates}
    if scale.warmup:
        warm = dataclasses.replace(t, messages=max(100, t.messages // 10))
        for c in candidates:
            for s in SCENARIOS:
                await _one(warm, c, s, broker_pid, scale.deadline_s)
    for r in range(scale.rounds):
        k = r % len(candidates)
        order = candidates[k:] + candidates[:k]
        for s in SCENARIOS:
            for c in order:
                runs[c][s].append(await _one(t, c, s, broker_pid, scale.deadline_s))
    return runs


def measure(scale: Scale = Scale(), payload: bytes | None = None) -> dict[str, Any]:
    from gateway.security.pki import Pki
    from tools.bench.gateway import BenchError as GatewayBenchError
    from tools.bench.gateway import Mosquitto
    from tools.bench.loadgen import Frames

    if payload is None:
        payload = Frames().burst(1)
    candidates = available()
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-transport-"))
    broker: Mosquitto | None = None
    try:
        pki = Pki(tmp / "pki")
        pki.init_ca()
        pki.issue_server(["localhost", "127.0.0.1"])
        gw = pki.issue_gateway()
        node = pki.issue_device(NODE_ID)
        broker = Mosquitto(tmp / "broker", pki)
        try:
            broker.start()
        except GatewayBenchError as exc:
            raise BenchError(str(exc)) from exc
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_pem))
        ctx.load_cert_chain(str(gw.cert_pem), str(gw.key_pem))
        node_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_pem))
        node_ctx.load_cert_chain(str(node.cert_pem), str(node.key_pem))
        target = Target("127.0.0.1", broker.port, ctx, gw.cn, payload, scale.messages,
                        scale.window, node_ctx)
        runs = asyncio.run(_measure(scale, target, broker.pid, candidates))
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    fig: dict[str, Any] = {
        "messages": scale.messages,
        "rounds": scale.rounds,
        "window": scale.window,
        "payload_bytes": len(payload),
        "tls": "mutual TLS, loopback, Mosquitto",
        "versions": {"aiomqtt": _version("aiomqtt"), "paho-mqtt": _version("paho-mqtt"),
                     "gmqtt": _version("gmqtt"), "python": sys.version.split()[0]},
        "candidates": {},
    }
    if "gmqtt" not in candidates:
        fig["candidates"]["gmqtt"] = {"skipped": "gmqtt is not installed (pip install gmqtt)"}
    for c in candidates:
        fig["candidates"][c] = {
            s: {key: round(statistics.median(r[key] for r in runs[c][s]), 2)
                for key in ("msgs_per_s", "cpu_us_per_msg", "broker_cpu_us_per_msg")}
            for s in SCENARIOS
        }
    ours = fig["candidates"]["torpor"]
    for c in candidates:
        if c == "torpor":
            continue
        other = fig["candidates"][c]
        fig[f"torpor_cpu_ratio_to_{c}"] = {
            s: round(ours[s]["cpu_us_per_msg"] / other[s]["cpu_us_per_msg"], 2) for s in SCENARIOS}
    return fig


def table(fig: dict[str, Any]) -> str:
    lines = [f"{fig['messages']} messages of {fig['payload_bytes']} bytes per run, window "
             f"{fig['window']}, medians of {fig['rounds']} alternating rounds ({fig['tls']})",
             f"{'scenario':14} {'candidate':9} {'msgs/s':>10} {'CPU µs/msg':>11} "
             f"{'broker µs/msg':>14}"]
    for s in SCENARIOS:
        for c, per in fig["candidates"].items():
            if "skipped" in per:
                continue
            f = per[s]
            lines.append(f"{s:14} {c:9} {f['msgs_per_s']:>10,.0f} {f['cpu_us_per_msg']:>11.1f} "
                         f"{f['broker_cpu_us_per_msg']:>14.1f}")
    for c, per in fig["candidates"].items():
        if "skipped" in per:
            lines.append(f"{c}: skipped, {per['skipped']}")
    v = fig["versions"]
    lines.append(f"aiomqtt {v['aiomqtt']} (paho-mqtt {v['paho-mqtt']}), gmqtt {v['gmqtt']}, "
                 f"Python {v['python']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    scale = QUICK if args.quick else Scale()
    if args.messages:
        scale = Scale(args.messages, scale.rounds, scale.window, scale.deadline_s, scale.warmup)
    if args.rounds:
        scale = Scale(scale.messages, args.rounds, scale.window, scale.deadline_s, scale.warmup)
    try:
        fig = measure(scale)
    except BenchError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(fig) if args.json else table(fig))
    return 0


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "transport", help="MQTT clients for the gateway's hot connections: aiomqtt, gmqtt, own")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds), for smoke tests")
    parser.add_argument("--messages", type=int, default=0, help="messages per run (default 20000)")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds (default 5)")
    parser.set_defaults(func=run)
