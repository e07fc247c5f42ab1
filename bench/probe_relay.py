#!/usr/bin/env python3
"""Throwaway probe: why does one imsrelay site relay at the rate it does?

Runs the throughput scenario of ``bench/run.py`` (smtp-source → site → smtp-sink)
with the site *in this process*, instrumented from the outside (no change to
imsrelay): the spool writer's rounds (batch size, time, fsync/fdatasync calls), event-loop lag,
the queue manager's backlog and deliveries in flight, and CPU per thread.

    python bench/probe_relay.py [--messages 4000] [--sessions 20]

Loopback only, bounded in time; prints a report and writes bench/out/probe-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py)


def thread_cpu() -> dict[int, float]:
    out = {}
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        with contextlib.suppress(OSError):
            raw = Path(f"/proc/{os.getpid()}/task/{tid}/stat").read_bytes()
            rest = raw[raw.rindex(b")") + 2:].split()
            out[int(tid)] = (int(rest[11]) + int(rest[12])) / bench.CLK_TCK
    return out


class Probe:
    def __init__(self) -> None:
        self.rounds: list[tuple[float, int, int, float]] = []  # (start, requests, fsyncs, seconds)
        self.fsyncs = 0
        self.fsync_seconds = 0.0
        self.writer_tid: int | None = None
        self.lag: list[float] = []
        self.samples: list[tuple[float, int, int, int, int, int]] = []
        # (t, backlog, in flight, free delivery slots, free per-destination slots, spool requests waiting)

    def install(self) -> None:
        import imsrelay.durable.committer as committer
        import imsrelay.queue.spool as spool

        original_apply = committer._apply_batch
        probe = self

        def counted(original: Any) -> Any:
            def flush(fd: int) -> None:
                t = time.perf_counter()
                original(fd)
                if threading.get_native_id() == probe.writer_tid:
                    probe.fsyncs += 1
                    probe.fsync_seconds += time.perf_counter() - t
            return flush

        def apply_batch(batch: Any, *args: Any, **kwargs: Any) -> Any:
            probe.writer_tid = threading.get_native_id()
            before = probe.fsyncs
            t = time.perf_counter()
            try:
                return original_apply(batch, *args, **kwargs)
            finally:
                probe.rounds.append((t, len(batch), probe.fsyncs - before, time.perf_counter() - t))

        committer._apply_batch = apply_batch
        os.fsync = counted(os.fsync)
        os.fdatasync = counted(os.fdatasync)

        # Time a few awaitables the delivery path waits on (class attributes, wrapped).
        from imsrelay.queue.manager import QueueManager
        from imsrelay.transport.smtp import SmtpClient

        self.timings: dict[str, list[float]] = {}
        for cls, name in ((spool.Spool, "enqueue"), (spool.Spool, "remove"), (spool.Spool, "save_state"),
                          (SmtpClient, "deliver"), (QueueManager, "_deliver"), (QueueManager, "_attempt"),
                          (QueueManager, "_record")):
            self._time(cls, name)

    def _time(self, cls: Any, name: str) -> None:
        original = getattr(cls, name)
        bucket = self.timings.setdefault(f"{cls.__name__}.{name}", [])

        async def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                bucket.append(time.perf_counter() - t)

        setattr(cls, name, timed)

    async def watch_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            self.lag.append(time.perf_counter() - t - 0.005)

    async def watch_queue(self, site: Any, stop: asyncio.Event) -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            slots = site.qmgr._destinations  # per-destination slots (the queue manager owns them)
            free_conn = sum(getattr(sem, "_value", 0) for sem, _ in slots.values()) if slots else -1
            waiting = site.spool.committer._requests.qsize()
            self.samples.append((time.monotonic() - t0, site.qmgr.backlog, len(site.qmgr._running),
                                 site.qmgr._limit._value, free_conn, waiting))
            await asyncio.sleep(0.1)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from imsrelay.config.loader import load_config
    from imsrelay.observe.logs import configure_logging
    from imsrelay.site import Site

    tools = bench.ensure_tools()
    procs = bench.Processes()
    root = Path(tempfile.mkdtemp(prefix="imsrelay-probe-"))
    probe = Probe()
    probe.install()
    result: dict[str, Any] = {}
    try:
        sink_port, site_port = bench.free_port(), bench.free_port()
        sink = bench.Sink(procs, tools, sink_port, root)
        spec = bench.SiteSpec("ProbeRelay", "127.0.0.1", site_port, "relay.imsrelay-bench.test",
                              "relay.imsrelay-bench.test", mailboxes=["Administrator"],
                              email_domains=[("bench.example", "127.0.0.1", sink_port)],
                              delivery=dict(a.split("=", 1) for a in args.delivery))
        for k, v in spec.delivery.items():
            spec.delivery[k] = int(v) if v.isdigit() else v
        ims = bench.ImsSite(procs, root, spec)  # writes the TOML; not started as a process
        config = load_config(ims.config)
        configure_logging("warning", "json")
        site = Site(config)
        await site.start()
        stop = asyncio.Event()
        watchers = [asyncio.create_task(probe.watch_loop(stop)), asyncio.create_task(probe.watch_queue(site, stop))]
        try:
            # warm-up
            await asyncio.to_thread(bench.run_source, tools, site_port, messages=200, sessions=args.sessions,
                                    size=4096, timeout=120)
            await asyncio.to_thread(sink.wait_count, 200, time.monotonic() + 60, 30)
            probe.rounds.clear()
            probe.lag.clear()
            probe.samples.clear()
            probe.fsyncs, probe.fsync_seconds = 0, 0.0
            for bucket in probe.timings.values():
                bucket.clear()
            base = sink.count
            rss0 = bench.process_rss_bytes(os.getpid())
            cpu0, pcpu0 = thread_cpu(), bench.tree_cpu_seconds(os.getpid())
            t0 = time.monotonic()
            src = await asyncio.to_thread(bench.run_source, tools, site_port, messages=args.messages,
                                          sessions=args.sessions, size=4096, timeout=600)
            t_src = time.monotonic() - t0
            t_end = await asyncio.to_thread(sink.wait_count, base + args.messages, t0 + 600, 30)
            wall = (t_end or time.monotonic()) - t0
            cpu1, pcpu1 = thread_cpu(), bench.tree_cpu_seconds(os.getpid())
            rss1 = bench.process_rss_bytes(os.getpid())
            await asyncio.sleep(2.0)
            import gc

            gc.collect()
            rss2 = bench.process_rss_bytes(os.getpid())
            containers = {name: len(value) for name, value in vars(site.qmgr).items()
                          if isinstance(value, dict | set | list)}
        finally:
            stop.set()
            await asyncio.gather(*watchers)
            await site.stop()
            sink.stop()
        n = args.messages
        main_tid = threading.get_native_id()
        threads = {}
        for tid, c in cpu1.items():
            name = "main (event loop)" if tid == main_tid else ("spool-writer" if tid == probe.writer_tid else
                                                                  f"thread {tid}")
            threads[name] = round(c - cpu0.get(tid, 0.0), 2)
        reqs = [r[1] for r in probe.rounds]
        writer_busy = sum(r[3] for r in probe.rounds)
        lag_ms = sorted(x * 1000 for x in probe.lag)
        result = {
            "delivery": spec.delivery, "messages": n, "sessions": args.sessions, "source_rc": src.returncode,
            "accepted_per_s": round(n / t_src, 1), "end_to_end_per_s": round(n / wall, 1) if t_end else None,
            "wall_s": round(wall, 2),
            "cpu_ms_per_msg_process": round(1000 * (pcpu1 - pcpu0) / n, 3),
            "cpu_s_by_thread": threads,
            "writer": {"rounds": len(probe.rounds), "requests": sum(reqs),
                       "requests_per_round_mean": round(sum(reqs) / max(1, len(reqs)), 2),
                       "requests_per_round_max": max(reqs, default=0),
                       "flushes": probe.fsyncs, "flushes_per_msg": round(probe.fsyncs / n, 2),
                       "flush_ms_mean": round(1000 * probe.fsync_seconds / max(1, probe.fsyncs), 3),
                       "round_ms_mean": round(1000 * writer_busy / max(1, len(probe.rounds)), 3),
                       "busy_fraction_of_wall": round(writer_busy / wall, 3)},
            "await_ms": {k: {"n": len(v), "mean": round(1000 * sum(v) / max(1, len(v)), 2),
                             "p50": round(bench.percentile([x * 1000 for x in v], 50), 2),
                             "p99": round(bench.percentile([x * 1000 for x in v], 99), 2)}
                          for k, v in probe.timings.items() if v},
            "memory_mib": {"before": round(rss0 / 2**20, 1), "after_drain": round(rss1 / 2**20, 1),
                           "after_gc": round(rss2 / 2**20, 1)},
            "qmgr_containers_after_drain": containers,
            "loop_lag_ms": {"p50": round(bench.percentile(lag_ms, 50), 2), "p99": round(bench.percentile(lag_ms, 99), 2),
                            "max": round(max(lag_ms, default=0), 2)},
            "queue": {"backlog_max": max((s[1] for s in probe.samples), default=0),
                      "backlog_mean": round(sum(s[1] for s in probe.samples) / max(1, len(probe.samples)), 1),
                      "in_flight_max": max((s[2] for s in probe.samples), default=0),
                      "in_flight_mean": round(sum(s[2] for s in probe.samples) / max(1, len(probe.samples)), 1),
                      "free_delivery_slots_mean": round(sum(s[3] for s in probe.samples) / max(1, len(probe.samples)), 1),
                      "free_sink_connection_slots_mean": round(sum(s[4] for s in probe.samples) / max(1, len(probe.samples)), 2),
                      "share_of_samples_with_no_free_connection": round(
                          sum(1 for s in probe.samples if s[4] == 0) / max(1, len(probe.samples)), 2),
                      "spool_requests_waiting_mean": round(sum(s[5] for s in probe.samples) / max(1, len(probe.samples)), 1)},
        }
    finally:
        procs.stop_all()
        subprocess.run(["rm", "-rf", str(root)], check=False)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=4000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--delivery", action="append", default=[], metavar="KEY=VALUE",
                   help="extra [delivery] setting for the site, e.g. max_per_destination=20")
    args = p.parse_args()
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=1))
    bench.OUT_DIR.mkdir(exist_ok=True)
    (bench.OUT_DIR / f"probe-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
