"""The scale phase's plan, its table and its plot (pure: counts in, text / PNG out).

The plan says how many messages each load point sends; the table and the plot read
the results dict of one run (``phases.scale``, plus the replication and concurrency
phases' growth figures when they ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_targets import num, size_label


@dataclass(frozen=True)
class LoadPoint:
    sessions: int
    size: int
    messages: int


@dataclass(frozen=True)
class ScalePlan:
    sessions: tuple[LoadPoint, ...]  # 4 KB at 1, 20, 100, 500 sessions
    sizes: tuple[LoadPoint, ...]  # 20 sessions at 1 KB, 50 KB, 1 MB
    restart_queued: tuple[int, ...]  # queue depths at which the site is restarted


def scale_plan(quick: bool, queued: int) -> ScalePlan:
    """Counts per point: enough for a few seconds each on a 2-core machine (quick: ~1 s)."""
    if quick:
        sess = {1: 50, 20: 300, 100: 300, 500: 500, 1000: 1000}
        sizes = {1024: 300, 51200: 100, 1 << 20: 10}
    else:
        sess = {1: 1000, 20: 10_000, 100: 10_000, 500: 10_000, 1000: 10_000}
        sizes = {1024: 10_000, 51200: 4000, 1 << 20: 200}
    depths = tuple(sorted({max(1, queued // 10), queued}))
    return ScalePlan(sessions=tuple(LoadPoint(s, 4096, m) for s, m in sess.items()),
                     sizes=tuple(LoadPoint(20, z, m) for z, m in sizes.items()),
                     restart_queued=depths)


def growth_per_unit(rows: list[dict[str, Any]], x_key: str, y_key: str, scale: float = 1.0) -> list[float | None]:
    """For each row after the first, (y − previous y) / (x − previous x) × scale: the cost
    of one more unit (e.g. KiB of memory per queued message between two restarts)."""
    out: list[float | None] = [None]
    for prev, row in zip(rows, rows[1:], strict=False):
        x0, x1, y0, y1 = num(prev.get(x_key)), num(row.get(x_key)), num(prev.get(y_key)), num(row.get(y_key))
        if None in (x0, x1, y0, y1) or x1 == x0:
            out.append(None)
        else:
            assert x0 is not None and x1 is not None and y0 is not None and y1 is not None
            out.append(round((y1 - y0) / (x1 - x0) * scale, 3))
    return out[: len(rows)]


def _f(v: Any, digits: int = 2) -> str:
    x = num(v)
    if x is None:
        return "—"
    return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.{digits}f}"


def _count(v: Any) -> str:
    x = num(v)
    return "—" if x is None else f"{int(x):,}"


def _load_rows(points: list[dict[str, Any]], key: str) -> list[str]:
    rows = []
    for p in points:
        n = p.get("sessions")
        value = f"{n} session{'s' if n != 1 else ''}" if key == "sessions" else size_label(int(p.get("size") or 0))
        rows.append(f"| {value} | {p.get('messages', 0):,} | {_f(p.get('accepted_per_s'))} | "
                    f"{_f(p.get('end_to_end_per_s'))} | {_f(p.get('cpu_ms_per_msg'), 3)} | "
                    f"{_f(p.get('relay_pss_mib'), 1)} | {p.get('error', '')} |")
    return rows


def render_scale(phases: dict[str, Any], plot_name: str | None) -> str:
    """The "Scale" section of RESULTS.md."""
    scale = phases.get("scale") or {}
    L = ["## Scale\n",
         "One imsrelay site relaying to `smtp-sink` through its E-Mail Domain table, started once "
         "and warmed up; `smtp-source` at each point in turn. CPU = the site's process tree "
         "(utime+stime) per message; PSS = the tree's proportional set size after the point.\n"]
    if scale.get("error"):
        L.append(f"Error: {scale['error']}\n")
    head = ["| {} | messages | accepted msg/s | end-to-end msg/s | CPU ms/msg | PSS MiB | note |",
            "|---|---:|---:|---:|---:|---:|---|"]
    if scale.get("sessions"):
        L += [head[0].format("concurrent sessions (4 KB)"), head[1], *_load_rows(scale["sessions"], "sessions"), ""]
    if scale.get("sizes"):
        L += [head[0].format("message size (20 sessions)"), head[1], *_load_rows(scale["sizes"], "size"), ""]
    if scale.get("restart"):
        L.append("Restart with a full queue: a site in Transfer mode `inbound` (outbound SMTP held) "
                 "fills its queue with 4 KB messages to a remote domain, is stopped (SIGTERM) and "
                 "started again; time from the start until the SMTP port answers and until `GET /ready` "
                 "says 200, the queue it reports then (`GET /status`), and its memory; the last two "
                 "columns are the growth from the restart before (per queued message).\n")
        L.append("| queued | stop s | SMTP port s | /ready s | queue after | RSS MiB | PSS MiB | "
                 "PSS KiB per queued message | /ready ms per 1,000 queued | note |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        restarts = scale["restart"]
        kib = growth_per_unit(restarts, "queued", "pss_mib", 1024)
        ready = growth_per_unit(restarts, "queued", "ready_seconds", 1e6)
        for r, k, t in zip(restarts, kib, ready, strict=True):
            L.append(f"| {r.get('queued', 0):,} | {_f(r.get('stop_seconds'))} | {_f(r.get('listening_seconds'))} | "
                     f"{_f(r.get('ready_seconds'))} | {_count(r.get('queue_after'))} | {_f(r.get('rss_mib'), 1)} | "
                     f"{_f(r.get('pss_mib'), 1)} | {_f(k)} | {_f(t)} | {r.get('error', '')} |")
        L.append("")
    rep = phases.get("replication") or {}
    conc = phases.get("concurrency") or {}
    if num(rep.get("seconds")) is not None or conc.get("steps"):
        L.append("From the other phases of this run:\n")
        L.append("| dimension | count | cost |\n|---|---:|---|")
        s = num(rep.get("seconds"))
        if s is not None:
            n = int(rep.get("mailboxes") or 0)
            L.append(f"| replication after Request Now | {n:,} mailboxes | {s:.2f} s "
                     f"({1000 * s / max(1, n):.3f} ms per mailbox) |")
        for step in conc.get("steps", []):
            L.append(f"| idle sessions held | {step['sessions']:,} | {_f(step.get('rss_mib'))} MiB RSS "
                     f"({_f(step.get('kib_per_session'))} KiB per session) |")
        L.append("")
    if plot_name:
        L.append(f"![how cost grows with each dimension]({plot_name})\n")
    return "\n".join(L)


def _series(points: list[dict[str, Any]], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for p in points:
        x, y = num(p.get(x_key)), num(p.get(y_key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def plot_scale(phases: dict[str, Any], path: Path) -> bool:
    """Write the scale plot (PNG, matplotlib's Agg backend); False when there is nothing
    to plot.  Raises ImportError without matplotlib (``pip install '.[bench]'``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = phases.get("scale") or {}
    conc = phases.get("concurrency") or {}
    panels = []
    if scale.get("sessions"):
        panels.append(("concurrent sessions (4 KB)", scale["sessions"], "sessions", "end_to_end_per_s", "cpu_ms_per_msg"))
    if scale.get("sizes"):
        panels.append(("message size, bytes (20 sessions)", scale["sizes"], "size", "end_to_end_per_s", "cpu_ms_per_msg"))
    if scale.get("restart"):
        panels.append(("queued messages at restart", scale["restart"], "queued", "ready_seconds", "rss_mib"))
    if conc.get("steps"):
        panels.append(("idle SMTP sessions held", conc["steps"], "sessions", "rss_mib", "kib_per_session"))
    panels = [p for p in panels if _series(p[1], p[2], p[3])[0] or _series(p[1], p[2], p[4])[0]]
    if not panels:
        return False
    labels = {"end_to_end_per_s": "end-to-end msg/s", "cpu_ms_per_msg": "CPU ms/msg",
              "ready_seconds": "s until /ready", "rss_mib": "RSS MiB", "kib_per_session": "KiB per session"}
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.0 * rows), squeeze=False)
    for ax, (title, points, xk, left, right) in zip(axes.flat, panels, strict=False):
        xs, ys = _series(points, xk, left)
        ax.plot(xs, ys, "o-", color="tab:blue", label=labels[left])
        ax.set_xlabel(title)
        ax.set_ylabel(labels[left], color="tab:blue")
        if xs and max(xs) / max(min(xs), 1e-9) >= 50:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        twin = ax.twinx()
        xs2, ys2 = _series(points, xk, right)
        twin.plot(xs2, ys2, "s--", color="tab:red", label=labels[right])
        if ys2 and min(ys2) > 0 and max(ys2) / min(ys2) >= 20:
            twin.set_yscale("log")
        twin.set_ylabel(labels[right], color="tab:red")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("imsrelay: how cost grows with each dimension (one run)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
