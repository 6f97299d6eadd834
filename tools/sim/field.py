"""The field a sim node lives in: its board profile, Wi-Fi failures and outages, and its clock.

`FieldModel` goes into the node's sim.json for boards/sim.py (association time, failure rate,
outage windows, TLS and boot charges, energy ledger). `next_clocks()` is the supervisor's
side of the clock: the true (virtual) time and the node's own RTC after a run, with the RTC
reset to the profile's cold-boot value on every power-on and drifting across deep sleep.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.sim.profiles import BoardProfile, get_profile


@dataclass(frozen=True, slots=True)
class FieldModel:
    """`outages` are windows of virtual unix ms in which no access point answers.
    `awake_scale` divides the charged delays (TLS, association) in real time; at 1 the
    firmware's budget and window face the chip's real durations."""

    profile: BoardProfile
    assoc_fail_rate: float = 0.0
    outages: tuple[tuple[int, int], ...] = ()
    awake_scale: float = 1.0
    # A fleet run against one gateway in compressed time: the field's radio lock and clock
    # file (boards/sim.py), and whether the board logs the true sampling and sync times.
    world: tuple[str, str] | None = None
    truth: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.assoc_fail_rate <= 1.0:
            raise ValueError("association failure rate must be between 0 and 1")
        if self.awake_scale < 1.0:
            raise ValueError("awake time compression must be >= 1")
        for start, end in self.outages:
            if end <= start:
                raise ValueError(f"outage window {start}..{end} ends before it starts")

    @classmethod
    def named(cls, name: str, **kw: Any) -> FieldModel:
        return cls(get_profile(name), **kw)

    @property
    def real(self) -> bool:
        return not self.profile.ideal

    def drift_ppm(self, seed: int) -> float:
        """This node's RTC drift: the profile's magnitude, fast or slow by the seed."""
        rng = random.Random(seed * 31337 + 7)
        return self.profile.rtc_drift_ppm * rng.choice((-1.0, 1.0)) * rng.uniform(0.5, 1.0)

    def sim_json(self, seed: int) -> dict[str, Any]:
        return {
            "profile": self.profile.to_json(),
            "field": {
                "assoc_fail_rate": self.assoc_fail_rate,
                "outages": [list(w) for w in self.outages],
                "awake_scale": self.awake_scale,
                "drift_ppm": self.drift_ppm(seed),
                "world": {"lock": self.world[0], "clock": self.world[1]} if self.world else None,
                "truth": self.truth,
            },
        }


def cold_rtc_ms(sim_cfg: dict[str, Any], true_ms: int) -> int | None:
    """The RTC right after a power-on: the profile's cold-boot value (None: no RTC model)."""
    prof = sim_cfg.get("profile")
    if not prof:
        return None
    cold = prof.get("cold_boot_ms")
    return true_ms if cold is None else int(cold)


def next_clocks(
    sim_cfg: dict[str, Any],
    state: dict[str, int],
    *,
    awake_ms: int,
    skip_ms: int,
    sleep_ms: int,
    power_lost: bool,
    rng: random.Random,
) -> tuple[int, int | None]:
    """(true time, node RTC) at the start of the next run.

    Awake, both clocks run together (the CPU clock is a crystal). In deep sleep the node
    counts `sleep_ms` on its own RTC, which runs fast or slow by the node's drift, and wakes
    a random bit later (the profile's jitter); the true time is what really passed.
    """
    field = sim_cfg.get("field", {})
    prof = sim_cfg.get("profile") or {}
    drift = float(field.get("drift_ppm", 0.0))
    jitter = int(prof.get("wake_jitter_ms", 0))
    extra = rng.randint(0, jitter) if sleep_ms and jitter else 0
    true_sleep = int(round(sleep_ms / (1.0 + drift / 1e6))) + extra if sleep_ms else 0
    vt = state["vt_ms"] + awake_ms + skip_ms + true_sleep
    rtc = state.get("rtc_ms")
    if rtc is None:
        return vt, None
    if power_lost:
        return vt, cold_rtc_ms(sim_cfg, vt)
    return vt, rtc + awake_ms + skip_ms + (sleep_ms + extra if sleep_ms else 0)


def compile_firmware(firmware_dir: Path, dest: Path) -> Path:
    """The firmware as a chip runs it: every module compiled with mpy-cross into dest (kept
    up to date by modification time). Running from source would charge the heap with the
    compiler's work, which a chip never does."""
    from tools.fw.image import mpy_cross_binary

    tool = mpy_cross_binary()
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(firmware_dir.glob("*.py")):
        out = dest / (src.stem + ".mpy")
        if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
            continue
        tmp = out.with_suffix(".tmp")
        try:
            # In a session of its own: a Ctrl-C at the terminal reaches only us, so the
            # compiler never fails half-way for it and we stop where we choose. A file is
            # made current (renamed to .mpy) only once the compiler has written it whole.
            subprocess.run([tool, "-o", str(tmp), str(src)], check=True, timeout=120,
                           capture_output=True, start_new_session=True)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(out)
    return dest


# ---- command line (`torpor sim node|fleet|board`) and node logs -----------------------------

def add_field_args(p: Any, *, several: bool = False) -> None:
    """The field options every `torpor sim` action takes."""
    from tools.sim.profiles import DEFAULT_PROFILE

    p.add_argument(
        "--board-profile", default=DEFAULT_PROFILE, metavar="NAME" + (",NAME..." if several else ""),
        help="board profile from boards/profiles.toml (esp32, esp32s3, esp32c3, pico_w, pico2_w; "
             f"'ideal' is the kind simulator){'; several are dealt round the nodes, mixed: every real board' if several else ''} "
             f"(default {DEFAULT_PROFILE})",
    )
    p.add_argument("--assoc-fail-rate", type=float, default=0.0,
                   help="share of Wi-Fi associations that fail (default 0)")
    p.add_argument("--outage", action="append", default=[], metavar="START_H:END_H",
                   help="a Wi-Fi outage from START_H to END_H hours after the start of the "
                        "virtual clock (repeatable)")
    if several:
        p.add_argument("--outage-share", type=float, default=1.0, metavar="FRACTION",
                       help="share of the nodes the --outage windows apply to (default 1)")
    p.add_argument("--awake-scale", type=float, default=1.0,
                   help="divide the charged delays (association, TLS) by this in real time; "
                        "1 keeps the firmware's budget honest (default 1)")


def fields_from_args(args: Any, start_ms: int) -> list[FieldModel]:
    """One FieldModel per profile named in --board-profile (a comma-separated list)."""
    from tools.sim.profiles import ProfileError

    outages: list[tuple[int, int]] = []
    for text in args.outage:
        a, sep, b = text.partition(":")
        try:
            lo, hi = float(a), float(b)
        except ValueError:
            raise ProfileError(f"--outage {text!r}: expected START_H:END_H (hours)") from None
        if not sep or hi <= lo or lo < 0:
            raise ProfileError(f"--outage {text!r}: the window must end after it starts")
        outages.append((start_ms + int(lo * 3600_000), start_ms + int(hi * 3600_000)))
    names = [n.strip() for n in str(args.board_profile).split(",") if n.strip()]
    if names == ["mixed"]:
        from tools.sim.profiles import profile_names

        names = [n for n in profile_names() if n != "ideal"]
    if not names:
        raise ProfileError("--board-profile: give at least one profile name")
    try:
        return [
            FieldModel.named(n, assoc_fail_rate=args.assoc_fail_rate, outages=tuple(outages),
                             awake_scale=args.awake_scale)
            for n in names
        ]
    except ValueError as exc:
        raise ProfileError(str(exc)) from exc


def parse_ledger(line: str) -> dict[str, tuple[int, float]] | None:
    """The phases of an `L ...` ledger line of the node log: {phase: (ms, uAh)}."""
    if not line.startswith("L "):
        return None
    out: dict[str, tuple[int, float]] = {}
    try:
        for part in line[2:].split():
            key, _, value = part.partition("=")
            if key == "total":
                continue
            ms, _, uah = value.partition(":")
            out[key] = (int(ms), float(uah))
    except ValueError:
        return None
    return out


def with_outage_share(fields: list[FieldModel], nodes: int, share: float) -> list[FieldModel]:
    """One field per node, dealt round the profiles; the outage windows only on `share` of
    the nodes, spread evenly (node i has them when the running count of share steps)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError("--outage-share must be between 0 and 1")
    out = []
    for i in range(nodes):
        f = fields[i % len(fields)]
        if f.outages and int((i + 1) * share) == int(i * share):
            f = dataclasses.replace(f, outages=())
        out.append(f)
    return out


# Wakes that end without a deep sleep (a crash, the watchdog, a hang, a power cut) write no
# ledger of their own; the supervisor books their awake time, so the battery still pays.
_LOST_WITH_RADIO = frozenset({"watchdog", "hang"})


def book_lost_wake(node_dir: Path, sim_cfg: dict[str, Any], kind: str, awake_ms: int, logf: Any) -> float:
    """Book a wake that ended without deep sleep: boot plus its awake time at the CPU current
    (with the radio's listen current for a watchdog bite or a hang: those wait on the
    network). Writes its ledger line and drains battery.json; returns the µAh."""
    prof = sim_cfg.get("profile")
    if not prof:
        return 0.0
    ma = float(prof["cpu_active_ma"])
    if kind in _LOST_WITH_RADIO:
        ma += float(prof["radio_listen_ma"])
    boot = int(prof["boot_ms"])
    uah = (float(prof["cpu_active_ma"]) * boot + ma * awake_ms) / 3600.0
    logf.write(f"L boot={boot}:{prof['cpu_active_ma'] * boot / 3600.0:.3f} "
               f"{kind}={awake_ms}:{ma * awake_ms / 3600.0:.3f} total={uah:.3f}\n")
    path = node_dir / "battery.json"
    try:
        bat = json.loads(path.read_text())
    except (OSError, ValueError):
        return uah
    bat["used_uah"] = float(bat.get("ledger_uah", bat.get("used_uah", 0.0))) + uah
    bat["ledger_uah"] = bat["used_uah"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(bat))
    tmp.replace(path)
    return uah
