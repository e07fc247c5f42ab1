"""The issues' targets, evaluated from one run's results (pure: a dict in, rows out).

Each row is (target, wanted, measured, verdict) where the verdict is True (met),
False (not met) or None (not measured in this run, or measured at a smaller count
than the target is about — the measured text then says so).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

# Issue 16 ("Twice Postfix").
RELAY_RATIO = {4096: 2.0, 51200: 1.5}  # end-to-end msg/s, imsrelay / Postfix, by message size
# Issue 28: big messages (end to end against Postfix) and memory per message in flight.
BIG_RATIO = {1 << 20: 1.3, 10 << 20: 1.0}
BIG_MEMORY_MULTIPLE = 4.0  # peak RSS of the largest process ≤ this × size × sessions, above its size before
LOCAL_RATIO = 1.5  # local delivery into Maildir vs Postfix virtual(8)
HEAVY_P99_MS = 250.0  # cross-site p99 at heavy load, while accepting >= Postfix's relay rate
REPLICATION_S = 30.0
REPLICATION_COUNT = 100_000
SESSION_KIB = 20.0
SESSION_COUNT = 10_000
# Issue 28: no cliff as sessions grow (500 and 1,000 sessions against 100, scale phase, 4 KB).
CLIFF_SHARE = 0.9
CLIFF_SESSIONS = (500, 1000)
# Issue 28: imsrelay's CPU per message against the floor relay (bench/floor_relay.py) of the same run.
FLOOR_CPU_MULTIPLE = {4096: 2.5}
# Issue 6, still in force.
LIGHT_P99_MS = 100.0


class Target(NamedTuple):
    name: str
    wanted: str
    measured: str
    ok: bool | None


def num(v: Any) -> float | None:
    """A measured number, or None for missing / NaN / not a number."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return None if math.isnan(v) else float(v)


def _f(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    text = f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return text + unit


def size_label(size: int) -> str:
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size >> 10} KB"
    return f"{size} B"


def throughput_entry(phases: dict[str, Any], size: int) -> dict[str, Any] | None:
    """The throughput phase's entry for one message size, if it ran."""
    for entry in (phases.get("throughput") or {}).get("sizes", []):
        if entry.get("size") == size:
            return dict(entry)
    return None


def postfix_relay_rate(phases: dict[str, Any]) -> float | None:
    """Postfix's end-to-end relay rate at 4 KB in this run (msg/s)."""
    entry = throughput_entry(phases, 4096)
    return num(((entry or {}).get("postfix") or {}).get("end_to_end_per_s"))


def _relay_targets(phases: dict[str, Any]) -> list[Target]:
    rows = []
    for size, want in RELAY_RATIO.items():
        entry = throughput_entry(phases, size)
        label = size_label(size)
        if entry is None:
            rows.append(Target(f"relay end to end vs Postfix, {label}", f"≥ {want}×", "not run", None))
            rows.append(Target(f"relay CPU per message vs Postfix, {label}", "< 1.0×", "not run", None))
            continue
        ratios = entry.get("ratio_imsrelay_over_postfix") or {}
        e2e = num(ratios.get("end_to_end_per_s"))
        rows.append(Target(f"relay end to end vs Postfix, {label}", f"≥ {want}×", _f(e2e, "×"),
                           None if e2e is None else e2e >= want))
        cpu = num(ratios.get("cpu_ms_per_msg"))
        ims = num((entry.get("imsrelay") or {}).get("cpu_ms_per_msg"))
        pf = num((entry.get("postfix") or {}).get("cpu_ms_per_msg"))
        measured = f"{_f(cpu, '×')} ({_f(ims)} vs {_f(pf)} ms/msg)" if cpu is not None else "—"
        rows.append(Target(f"relay CPU per message vs Postfix, {label}", "< 1.0×", measured,
                           None if cpu is None else cpu < 1.0))
    return rows


def _local_target(phases: dict[str, Any]) -> Target:
    name = "local delivery into Maildir vs Postfix virtual(8)"
    local = phases.get("local")
    if not local:
        return Target(name, f"≥ {LOCAL_RATIO}×", "not run", None)
    ratio = num((local.get("ratio_imsrelay_over_postfix") or {}).get("end_to_end_per_s"))
    return Target(name, f"≥ {LOCAL_RATIO}×", _f(ratio, "×"), None if ratio is None else ratio >= LOCAL_RATIO)


def _latency_targets(phases: dict[str, Any]) -> list[Target]:
    lat = phases.get("latency")
    light_name = "p99 cross-site latency, light load (issue 6)"
    heavy_name = "p99 cross-site latency at heavy load, accepting ≥ Postfix's relay rate"
    heavy_want = f"< {HEAVY_P99_MS:.0f} ms at ≥ Postfix's 4 KB rate"
    if not lat:
        return [Target(light_name, f"< {LIGHT_P99_MS:.0f} ms", "not run", None),
                Target(heavy_name, heavy_want, "not run", None)]
    light_p99 = num((lat.get("light") or {}).get("p99_ms"))
    rows = [Target(light_name, f"< {LIGHT_P99_MS:.0f} ms", _f(light_p99, " ms"),
                   None if light_p99 is None else light_p99 < LIGHT_P99_MS)]
    heavy = lat.get("heavy") or {}
    p99 = num(heavy.get("p99_ms"))
    rate = num(heavy.get("accepted_per_s"))
    pf_rate = postfix_relay_rate(phases)
    complete = heavy.get("delivered") is not None and heavy.get("delivered") == heavy.get("sent")
    measured = f"{_f(p99, ' ms')} at {_f(rate)} msg/s accepted (Postfix relays {_f(pf_rate)} msg/s)"
    if heavy and not complete:
        measured += f"; {heavy.get('delivered')}/{heavy.get('sent')} delivered"
    ok: bool | None
    if p99 is None or rate is None:
        ok = None
    elif p99 >= HEAVY_P99_MS or not complete:
        ok = False
    elif pf_rate is None:
        ok = None
        measured += " — needs the throughput phase in the same run"
    else:
        ok = rate >= pf_rate
    return rows + [Target(heavy_name, heavy_want, measured, ok)]


def _counted(name: str, want: str, measured: str, value: float | None, *, ran: int, needed: int,
             ok: bool, error: str = "") -> Target:
    """A target about a count (mailboxes, sessions): failed without a figure, not judged
    below the target's count, else ``ok``."""
    if value is None:
        return Target(name, want, measured + (f" ({error})" if error else ""), False)
    if ran < needed:
        return Target(name, want, measured + " — fewer than the target's count, not judged", None)
    return Target(name, want, measured, ok)


def _replication_target(phases: dict[str, Any]) -> Target:
    rep = phases.get("replication")
    name = f"replication of {REPLICATION_COUNT:,} mailboxes after Request Now"
    want = f"< {REPLICATION_S:.0f} s"
    if not rep:
        return Target(name, want, "not run", None)
    if rep.get("skipped"):
        return Target(name, want, "skipped", None)
    n = int(rep.get("mailboxes") or 0)
    s = num(rep.get("seconds"))
    return _counted(name, want, f"{_f(s, ' s')} for {n:,}", s, ran=n, needed=REPLICATION_COUNT,
                    ok=s is not None and s < REPLICATION_S, error=str(rep.get("error") or ""))


def _sessions_target(phases: dict[str, Any]) -> Target:
    conc = phases.get("concurrency")
    name = f"{SESSION_COUNT:,} idle sessions held, memory each"
    want = f"< {SESSION_KIB:.0f} KiB"
    if not conc:
        return Target(name, want, "not run", None)
    k = num(conc.get("kib_per_session"))
    n = int(conc.get("sessions") or 0)
    held = conc.get("opened") == n and conc.get("alive_after_hold") == n
    measured = f"{_f(k, ' KiB')} with {int(conc.get('alive_after_hold') or 0):,}/{n:,} held"
    return _counted(name, want, measured, k, ran=n, needed=SESSION_COUNT,
                    ok=held and k is not None and k < SESSION_KIB, error=str(conc.get("error") or ""))


def _scale_target(phases: dict[str, Any]) -> Target:
    scale = phases.get("scale")
    name = "scale table and plot (sessions, sizes, restart with a full queue)"
    if not scale:
        return Target(name, "every point measured", "not run", None)
    points = list(scale.get("sessions", [])) + list(scale.get("sizes", []))
    failed = [p for p in points if num(p.get("end_to_end_per_s")) is None]
    restarts = scale.get("restart", [])
    bad_restarts = [r for r in restarts if r.get("error") or num(r.get("ready_seconds")) is None]
    measured = (f"{len(points) - len(failed)}/{len(points)} load points, "
                f"{len(restarts) - len(bad_restarts)}/{len(restarts)} restarts")
    if scale.get("error"):
        measured += f" ({scale['error']})"
    ok = bool(points) and bool(restarts) and not failed and not bad_restarts and not scale.get("error")
    return Target(name, "every point measured", measured, ok)


def _big_targets(phases: dict[str, Any]) -> list[Target]:
    """1 MB and 10 MB: end to end against Postfix, and the site's peak memory a bounded
    multiple of what the sessions have in flight (size × sessions)."""
    rows = []
    for size, want in BIG_RATIO.items():
        label = size_label(size)
        entry = throughput_entry(phases, size)
        name = f"relay end to end vs Postfix, {label}"
        mem = f"peak memory at {label}, above the site's size before the run"
        mem_want = f"≤ {BIG_MEMORY_MULTIPLE:g} × size × sessions"
        if entry is None:
            rows += [Target(name, f"≥ {want}×", "not run", None), Target(mem, mem_want, "not run", None)]
            continue
        e2e = num((entry.get("ratio_imsrelay_over_postfix") or {}).get("end_to_end_per_s"))
        rows.append(Target(name, f"≥ {want}×", _f(e2e, "×"), None if e2e is None else e2e >= want))
        ims = entry.get("imsrelay") or {}
        peak, before = num(ims.get("relay_peak_rss_mib")), num(ims.get("relay_pss_before_mib"))
        sessions = int(entry.get("sessions") or 0)
        if peak is None or before is None or not sessions:
            rows.append(Target(mem, mem_want, "—", None))
            continue
        multiple = (peak - before) * 2**20 / (size * sessions)
        rows.append(Target(mem, mem_want, f"{multiple:.2f} × ({_f(peak, ' MiB')} peak, {_f(before, ' MiB')} before, "
                                          f"{sessions} sessions)", multiple <= BIG_MEMORY_MULTIPLE))
    return rows


def _cliff_targets(phases: dict[str, Any]) -> list[Target]:
    """500 and 1,000 concurrent sessions keep at least 90 % of the 100-session rate."""
    rows = {int(p.get("sessions") or 0): num(p.get("end_to_end_per_s"))
            for p in (phases.get("scale") or {}).get("sessions", []) if p.get("size") == 4096}
    base = rows.get(100)
    out = []
    for n in CLIFF_SESSIONS:
        name = f"no cliff: {n:,} sessions vs 100, 4 KB end to end"
        want = f"≥ {CLIFF_SHARE:.0%}"
        rate = rows.get(n)
        if base is None or rate is None:
            out.append(Target(name, want, "not run" if not rows else "—", None))
            continue
        share = rate / base
        out.append(Target(name, want, f"{share:.0%} ({_f(rate)} vs {_f(base)} msg/s)", share >= CLIFF_SHARE))
    return out


def _floor_targets(phases: dict[str, Any]) -> list[Target]:
    """imsrelay's CPU per message within a multiple of the floor relay's (run beside it)."""
    rows = []
    for size, want in FLOOR_CPU_MULTIPLE.items():
        name = f"relay CPU per message vs the floor relay, {size_label(size)}"
        entry = throughput_entry(phases, size)
        floor = (entry or {}).get("floor") or {}
        ims = num(((entry or {}).get("imsrelay") or {}).get("cpu_ms_per_msg"))
        low = num(floor.get("cpu_ms_per_msg"))
        if entry is None or not floor:
            rows.append(Target(name, f"≤ {want}×", "not run", None))
            continue
        if ims is None or not low:
            rows.append(Target(name, f"≤ {want}×", "—", None))
            continue
        rows.append(Target(name, f"≤ {want}×", f"{ims / low:.2f}× ({_f(ims)} vs {_f(low)} ms/msg)",
                           ims / low <= want))
    return rows


def evaluate_targets(phases: dict[str, Any]) -> list[Target]:
    """Every target of issue 16 (and issue 6's light-load latency, issue 28's cliff) from one run."""
    return [*_relay_targets(phases), _local_target(phases), *_latency_targets(phases),
            _replication_target(phases), _sessions_target(phases), _scale_target(phases),
            *_cliff_targets(phases), *_big_targets(phases), *_floor_targets(phases)]


def targets_markdown(targets: list[Target]) -> str:
    rows = ["## Targets (issue 16; light-load latency from issue 6)\n",
            "| target | wanted | measured | |", "|---|---|---|---|"]
    for t in targets:
        verdict = "—" if t.ok is None else ("**met**" if t.ok else "**not met**")
        rows.append(f"| {t.name} | {t.wanted} | {t.measured} | {verdict} |")
    return "\n".join(rows) + "\n"
