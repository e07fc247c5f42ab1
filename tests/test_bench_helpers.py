"""The benchmark harness's pure helpers (bench/): plans, targets, tables, the plot,
py-spy lookup, the Maildir counter and the backpressure-aware client.  The benchmark
itself is not run here (it needs root, Postfix and minutes)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_scale  # noqa: E402
import bench_targets  # noqa: E402


def _load_run() -> Any:
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module
    spec.loader.exec_module(module)
    return module


run = _load_run()


# ------------------------------------------------------------------ plans and options


def test_throughput_plan_one_size_uses_messages_several_use_large_count() -> None:
    assert run.throughput_plan([51200], 8000, 800) == [(51200, 8000)]
    assert run.throughput_plan([4096, 51200], 20000, 8000) == [(4096, 20000), (51200, 8000)]
    assert run.throughput_plan([1024, 8192, 8193], 10, 3) == [(1024, 10), (8192, 10), (8193, 3)]


def test_parse_args_defaults_full_and_quick() -> None:
    full = run.parse_args([])
    assert full.sizes == [4096, 51200, 1 << 20, 10 << 20] and full.messages == 20000 and full.messages_large == 8000
    assert full.mailboxes == 100_000 and full.idle_sessions == 10_000 and full.scale_queue == 100_000
    assert full.local_messages == 10_000
    assert full.phases == ["throughput", "local", "latency", "replication", "concurrency", "scale"]
    quick = run.parse_args(["--quick"])
    assert quick.mailboxes == 1000 and quick.idle_sessions == 1000 and quick.messages < full.messages
    assert quick.scale_queue < 10_000 and quick.local_messages < full.local_messages
    one = run.parse_args(["--size", "51200", "--messages", "8000", "--phases", "throughput"])
    assert one.sizes == [51200] and run.throughput_plan(one.sizes, one.messages, one.messages_large) == [(51200, 8000)]
    with pytest.raises(SystemExit):
        run.parse_args(["--phases", "nonsense"])
    with pytest.raises(SystemExit):
        run.parse_args(["--sizes", "4k"])


def test_scale_plan_points_and_restart_depths() -> None:
    full = bench_scale.scale_plan(False, 100_000)
    assert [p.sessions for p in full.sessions] == [1, 20, 100, 500, 1000]
    assert {p.size for p in full.sessions} == {4096}
    assert [p.size for p in full.sizes] == [1024, 51200, 1 << 20]
    assert {p.sessions for p in full.sizes} == {20}
    assert full.restart_queued == (10_000, 100_000)
    quick = bench_scale.scale_plan(True, 1000)
    assert all(q.messages < f.messages for q, f in zip(quick.sessions + quick.sizes, full.sessions + full.sizes,
                                                      strict=True))
    assert bench_scale.scale_plan(True, 1).restart_queued == (1,)


def test_session_steps_are_cumulative_and_end_at_the_total() -> None:
    assert run.session_steps(10_000) == [2000, 4000, 6000, 8000, 10_000]
    assert run.session_steps(3) == [1, 2, 3]
    assert run.session_steps(0) == []


# ------------------------------------------------------------------ targets


def _phases(*, e2e4: float = 2.1, e2e50: float = 1.4, cpu4: float = 0.8, cpu50: float = 1.1,
            local: float = 1.6, heavy_p99: float = 200.0, heavy_rate: float = 900.0,
            pf_rate: float = 700.0, mailboxes: int = 100_000, rep_s: float = 12.0,
            sessions: int = 10_000, kib: float = 15.0) -> dict[str, Any]:
    def tp(size: int, e2e: float, cpu: float) -> dict[str, Any]:
        return {"size": size, "postfix": {"end_to_end_per_s": pf_rate if size == 4096 else 400.0,
                                          "cpu_ms_per_msg": 2.0},
                "imsrelay": {"cpu_ms_per_msg": 2.0 * cpu},
                "ratio_imsrelay_over_postfix": {"end_to_end_per_s": e2e, "cpu_ms_per_msg": cpu}}

    return {
        "throughput": {"sizes": [tp(4096, e2e4, cpu4), tp(51200, e2e50, cpu50)]},
        "local": {"ratio_imsrelay_over_postfix": {"end_to_end_per_s": local}},
        "latency": {"light": {"p99_ms": 5.0},
                    "heavy": {"p99_ms": heavy_p99, "accepted_per_s": heavy_rate, "sent": 2000, "delivered": 2000}},
        "replication": {"mailboxes": mailboxes, "seconds": rep_s},
        "concurrency": {"sessions": sessions, "opened": sessions, "alive_after_hold": sessions,
                        "kib_per_session": kib},
        "scale": {"sessions": [{"end_to_end_per_s": 100.0}], "sizes": [{"end_to_end_per_s": 50.0}],
                  "restart": [{"queued": 10, "ready_seconds": 1.0}]},
    }


def _verdicts(phases: dict[str, Any]) -> dict[str, bool | None]:
    return {t.name: t.ok for t in bench_targets.evaluate_targets(phases)}


def test_targets_met_and_not_met_from_one_run() -> None:
    v = _verdicts(_phases())
    assert v["relay end to end vs Postfix, 4 KB"] is True
    assert v["relay end to end vs Postfix, 50 KB"] is False  # 1.4 < 1.5
    assert v["relay CPU per message vs Postfix, 4 KB"] is True
    assert v["relay CPU per message vs Postfix, 50 KB"] is False
    assert v["local delivery into Maildir vs Postfix virtual(8)"] is True
    assert v["p99 cross-site latency, light load (issue 6)"] is True
    heavy = "p99 cross-site latency at heavy load, accepting ≥ Postfix's relay rate"
    assert v[heavy] is True
    assert v["replication of 100,000 mailboxes after Request Now"] is True
    assert v["10,000 idle sessions held, memory each"] is True
    assert v["scale table and plot (sessions, sizes, restart with a full queue)"] is True


def test_heavy_latency_target_needs_the_rate_and_the_p99() -> None:
    heavy = "p99 cross-site latency at heavy load, accepting ≥ Postfix's relay rate"
    assert _verdicts(_phases(heavy_rate=600.0, pf_rate=700.0))[heavy] is False  # fast but accepting too little
    assert _verdicts(_phases(heavy_p99=300.0))[heavy] is False
    no_tp = _phases()
    del no_tp["throughput"]
    assert _verdicts(no_tp)[heavy] is None  # no Postfix rate in this run: not judged
    lost = _phases()
    lost["latency"]["heavy"]["delivered"] = 1999
    assert _verdicts(lost)[heavy] is False


def test_small_counts_are_not_judged_against_the_big_targets() -> None:
    v = _verdicts(_phases(mailboxes=1000, sessions=1000))
    assert v["replication of 100,000 mailboxes after Request Now"] is None
    assert v["10,000 idle sessions held, memory each"] is None
    v = _verdicts(_phases(rep_s=31.0, kib=25.0))
    assert v["replication of 100,000 mailboxes after Request Now"] is False
    assert v["10,000 idle sessions held, memory each"] is False


def test_missing_phases_and_failed_points() -> None:
    v = _verdicts({})
    assert all(ok is None for ok in v.values())
    failed = _phases()
    failed["scale"]["restart"] = [{"queued": 10, "error": "/ready did not say 200"}]
    assert _verdicts(failed)["scale table and plot (sessions, sizes, restart with a full queue)"] is False
    md = bench_targets.targets_markdown(bench_targets.evaluate_targets(failed))
    assert "**not met**" in md and "**met**" in md and "| — |" not in md.split("\n")[2]


# ------------------------------------------------------------------ tables and the plot


def _scale_results() -> dict[str, Any]:
    return {
        "scale": {
            "sessions": [{"sessions": s, "size": 4096, "messages": 100, "accepted_per_s": 10.0 * s,
                          "end_to_end_per_s": 9.0 * s, "cpu_ms_per_msg": 2.0, "relay_pss_mib": 80.0}
                         for s in (1, 20, 100, 500)],
            "sizes": [{"sessions": 20, "size": z, "messages": 10, "end_to_end_per_s": 1e6 / z,
                       "cpu_ms_per_msg": z / 1e4} for z in (1024, 51200, 1 << 20)],
            "restart": [{"queued": 100, "ready_seconds": 1.5, "rss_mib": 90.0, "pss_mib": 60.0, "queue_after": 100},
                        {"queued": 1000, "ready_seconds": 2.5, "rss_mib": 120.0, "pss_mib": 69.0,
                         "queue_after": 1000}],
        },
        "replication": {"mailboxes": 1000, "seconds": 2.0},
        "concurrency": {"steps": [{"sessions": 500, "rss_mib": 60.0, "kib_per_session": 10.0},
                                  {"sessions": 1000, "rss_mib": 70.0, "kib_per_session": 10.5}]},
    }


def test_render_scale_table() -> None:
    text = bench_scale.render_scale(_scale_results(), "scale.png")
    assert "| 500 sessions | 100 | 5,000.0 | 4,500.0 | 2.000 | 80.0 |  |" in text
    assert "| 1 MB | 10 |" in text and "| 50 KB |" in text
    # growth from the restart before: 9 MiB over 900 messages = 10.24 KiB each; 1 s over 900 = 1,111 ms per 1,000
    assert "| 1,000 | — | — | 2.50 | 1,000 | 120.0 | 69.0 | 10.24 | 1,111.1 |  |" in text
    assert "| 1 session | 50 |" not in text and "| 1 session | 100 |" in text
    assert "1,000 mailboxes | 2.00 s (2.000 ms per mailbox)" in text
    assert "![how cost grows with each dimension](scale.png)" in text
    assert "![" not in bench_scale.render_scale(_scale_results(), None)


def test_growth_per_unit() -> None:
    rows = [{"x": 10, "y": 1.0}, {"x": 20, "y": 3.0}, {"x": 20, "y": 4.0}, {"x": 40}]
    assert bench_scale.growth_per_unit(rows, "x", "y") == [None, 0.2, None, None]
    assert bench_scale.growth_per_unit(rows[:2], "x", "y", 1000) == [None, 200.0]
    assert bench_scale.growth_per_unit([], "x", "y") == []


def test_plot_scale_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "scale.png"
    assert bench_scale.plot_scale(_scale_results(), out) is True
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench_scale.plot_scale({}, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()


def test_render_results_has_every_section() -> None:
    res = {"machine": {"nproc": 2, "cpu": "x", "memory_gib": 1, "kernel": "k", "tmp_filesystem": "ext4",
                       "python": "3.11", "packages": {}, "postfix": "3.7", "loadavg_at_start": (0.1, 0.2, 0.3)},
           "command": "python bench/run.py", "started": "s", "finished": "f", "options": {},
           "phases": _phases() | _scale_results()}
    ph = res["phases"]
    ph["throughput"]["sizes"][0]["command"] = "smtp-source -l 4096"
    ph["latency"]["light"] = run.summarize_ms([0.004, 0.005]) | {"lost": 0}
    ph["latency"]["heavy"] = run.summarize_ms([0.1, 0.2]) | {
        "senders": 20, "sent": 2, "delivered": 2, "accepted_per_s": 900.0, "delivered_per_s": 800.0,
        "accept_p50_ms": 3.0, "accept_p99_ms": 9.0, "deferred_4xx": 7, "errors": []}
    ph["concurrency"].update({"rss_before_mib": 50.0, "rss_held_mib": 190.0, "open_seconds": 3.0})
    text = run.render_results(res, "", "scale.png")
    for heading in ("## Targets", "## Relay throughput", "### 4 KB", "### 50 KB", "## Local delivery into Maildir",
                    "## Cross-site latency", "## Replication", "## Concurrency", "## Scale"):
        assert heading in text
    assert text.index("## Targets") < text.index("## Relay throughput")
    assert "deferred 7 attempts with a 4xx" in text
    assert run.scale_png_path(Path("bench/RESULTS.md")) == Path("bench/scale.png")
    assert run.scale_png_path(Path("/tmp/x.md")) == Path("/tmp/x.scale.png")


# ------------------------------------------------------------------ py-spy


def test_find_py_spy_looks_in_the_virtualenv_when_not_on_path(tmp_path: Path) -> None:
    assert run.find_py_spy(lambda name: "/usr/bin/py-spy", prefixes=()) == "/usr/bin/py-spy"
    assert run.find_py_spy(lambda name: None, prefixes=(str(tmp_path),)) is None
    exe = tmp_path / "bin" / "py-spy"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    assert run.find_py_spy(lambda name: None, prefixes=(str(tmp_path),)) is None  # not executable
    exe.chmod(0o755)
    assert run.find_py_spy(lambda name: None, prefixes=(str(tmp_path),)) == str(exe)


def test_py_spy_follows_the_workers() -> None:
    argv = run.py_spy_argv("py-spy", 42, Path("/tmp/p.txt"), gil_only=False, subprocesses=True)
    assert argv[:4] == ["py-spy", "record", "--pid", "42"] and "--subprocesses" in argv and "--gil" not in argv
    argv = run.py_spy_argv("py-spy", 42, Path("/tmp/p.txt"), gil_only=True, subprocesses=False)
    assert "--subprocesses" not in argv and "--gil" in argv


def test_py_spy_summary_reads_subprocess_stacks(tmp_path: Path) -> None:
    raw = tmp_path / "p.py-spy.txt"
    raw.write_text(
        'process 10:"python -m imsrelay serve";thread (0x1): "MainThread";run (asyncio/runners.py:118);'
        "smtp_DATA (aiosmtpd/smtp.py:1400) 30\n"
        'process 11:"python -m imsrelay serve";thread (0x2): "spool-writer";_apply_batch (imsrelay/durable/journal.py:80) 10\n')
    s = run.summarize_py_spy(raw, messages=100, rate=100)
    assert s["samples"] == 40
    threads = {r["function"]: r["samples"] for r in s["threads"]}
    assert threads == {'thread (0x1): "MainThread"': 30, 'thread (0x2): "spool-writer"': 10}
    stages = {r["function"]: r["samples"] for r in s["entry_points"]}
    assert stages["spool writer thread (write + fsync + rename)"] == 10


def test_py_spy_stages_follow_the_package_layout(tmp_path: Path) -> None:
    """Frames of today's modules land in their part of the relay, not in "other"."""
    main = 'thread (0x1): "MainThread";'
    raw = tmp_path / "p.py-spy.txt"
    raw.write_text(
        f"{main}QueueManager._attempt (imsrelay/queue/manager.py:500);CostedTransport.deliver "
        "(imsrelay/transport/costed.py:40);SmtpClient.deliver (imsrelay/transport/smtp.py:300) 7\n"
        f"{main}PipeliningProtocol.exchange (imsrelay/transport/pipelining.py:120) 5\n"
        f"{main}QueueManager._record (imsrelay/queue/manager.py:700) 4\n"
        f"{main}ImsSMTP._data (imsrelay/ingress/adapter.py:740);SiteHandler.handle_DATA "
        "(imsrelay/ingress/handler.py:300) 3\n"
        f"{main}ImsSMTP.push (imsrelay/ingress/adapter.py:950) 2\n")
    stages = {r["function"]: r["samples"] for r in run.summarize_py_spy(raw, messages=10, rate=100)["entry_points"]}
    assert stages == {"delivery: outbound SMTP (imsrelay transport + aiosmtplib)": 12,
                      "delivery: queue manager (routing, spool state, records)": 4,
                      "ingress: imsrelay handlers (handle_MAIL/RCPT/DATA, policy, spool.enqueue)": 3,
                      "ingress: aiosmtpd session (command parsing, replies)": 2}


# ------------------------------------------------------------------ Postfix virtual(8), Maildir counter


def test_virtual_maildir_settings_write_a_maildir_map(tmp_path: Path) -> None:
    settings = run.virtual_maildir_settings(tmp_path, "local.bench.test", ["user1"], 65534, 65534)
    assert (tmp_path / "vmailbox").read_text() == "user1@local.bench.test  local.bench.test/user1/\n"
    assert settings["virtual_mailbox_maps"] == f"texthash:{tmp_path / 'vmailbox'}"
    assert settings["virtual_uid_maps"] == "static:65534" and settings["relayhost"] == ""
    assert settings["virtual_mailbox_base"] == str(tmp_path / "vmail")


def test_maildir_counter_counts_new_files(tmp_path: Path) -> None:
    new = run.make_maildir(tmp_path / "box")
    assert {p.name for p in (tmp_path / "box").iterdir()} == {"tmp", "new", "cur"}
    (new / "old").write_text("x")
    counter = run.MaildirCounter(new, interval=0.01)
    try:
        assert counter.count == 1
        assert counter.wait_count(3, time.monotonic() + 0.3, stall=5) is None  # nothing more yet
        for i in range(2):
            (new / f"m{i}").write_text("x")
        assert counter.wait_count(3, time.monotonic() + 5, stall=5) is not None
        assert counter.count == 3
    finally:
        counter.stop()


# ------------------------------------------------------------------ the client at heavy load


async def test_try_send_returns_backpressure_and_sends_again() -> None:
    state = {"mails": 0}

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake\r\n")
        while line := await reader.readline():
            cmd = line.strip().upper()
            if cmd.startswith(b"EHLO"):
                writer.write(b"250-fake\r\n250 PIPELINING\r\n")
            elif cmd.startswith(b"MAIL"):
                state["mails"] += 1
                writer.write(b"452 4.3.1 queue full\r\n" if state["mails"] == 1 else b"250 ok\r\n")
            elif cmd.startswith((b"RCPT", b"RSET")):
                writer.write(b"250 ok\r\n")
            elif cmd == b"DATA":
                writer.write(b"354 go\r\n")
                while (await reader.readline()) != b".\r\n":
                    pass
                writer.write(b"451 4.3.0 try later\r\n" if state["mails"] == 2 else b"250 queued\r\n")
            elif cmd == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        smtp = await run.MiniSmtp.connect("127.0.0.1", port, timeout=5)
        body = run.bench_message("a@x.test", "b@y.test", "id1", size=200)
        assert await smtp.try_send("a@x.test", "b@y.test", body, 5) == (452, 0.0)
        code, waited = await smtp.try_send("a@x.test", "b@y.test", body, 5)
        assert code == 451 and waited >= 0.0
        code, waited = await smtp.try_send("a@x.test", "b@y.test", body, 5)
        assert code == 250 and waited >= 0.0
        await smtp.quit()
    finally:
        srv.close()
        await srv.wait_closed()


def test_no_cliff_targets_compare_500_and_1000_sessions_with_100() -> None:
    phases = _phases()
    phases["scale"]["sessions"] = [{"sessions": s, "size": 4096, "end_to_end_per_s": r}
                                   for s, r in ((1, 200.0), (100, 900.0), (500, 850.0), (1000, 700.0))]
    v = _verdicts(phases)
    assert v["no cliff: 500 sessions vs 100, 4 KB end to end"] is True  # 94 %
    assert v["no cliff: 1,000 sessions vs 100, 4 KB end to end"] is False  # 78 %
    assert _verdicts(_phases())["no cliff: 500 sessions vs 100, 4 KB end to end"] is None  # not measured


def test_ratios_come_from_interleaved_rounds_not_from_one_noisy_run() -> None:
    pf = [{"end_to_end_per_s": 400.0, "cpu_ms_per_msg": 3.0}, {"end_to_end_per_s": 100.0, "cpu_ms_per_msg": 3.0},
          {"end_to_end_per_s": 500.0, "cpu_ms_per_msg": 3.0}]
    ims = [{"end_to_end_per_s": 800.0, "cpu_ms_per_msg": 1.5}, {"end_to_end_per_s": 780.0, "cpu_ms_per_msg": 1.5},
           {"end_to_end_per_s": 1000.0, "cpu_ms_per_msg": 1.5}]
    r = run.paired_ratios(pf, ims)
    assert r["end_to_end_per_s"] == 2.0  # ratios 2.0, 7.8, 2.0: the noisy second Postfix round does not decide
    assert r["cpu_ms_per_msg"] == 0.5 and len(r["rounds"]) == 3
    assert run.paired_ratios(pf[:1], ims[:1]) == {"end_to_end_per_s": 2.0, "cpu_ms_per_msg": 0.5}
    assert run.parse_args([]).rounds == 3 and run.parse_args(["--quick"]).rounds == 1


def test_big_message_counts_come_from_a_byte_budget() -> None:
    plan = run.throughput_plan([4096, 51200, 1 << 20, 10 << 20], 20000, 8000, 512 << 20)
    assert plan == [(4096, 20000), (51200, 8000), (1 << 20, 512), (10 << 20, 51)]
    assert run.throughput_plan([1 << 20, 100 << 20], 1500, 500, 48 << 20) == [(1 << 20, 48), (100 << 20, 10)]
    assert run.parse_args([]).sizes == [4096, 51200, 1 << 20, 10 << 20]


def test_big_message_targets_ratio_and_memory() -> None:
    phases = _phases()
    phases["throughput"]["sizes"].append(
        {"size": 1 << 20, "sessions": 20, "ratio_imsrelay_over_postfix": {"end_to_end_per_s": 1.4},
         "imsrelay": {"relay_peak_rss_mib": 100.0 + 60.0, "relay_pss_before_mib": 100.0}})
    v = _verdicts(phases)
    assert v["relay end to end vs Postfix, 1 MB"] is True
    assert v["peak memory at 1 MB, above the site's size before the run"] is True  # 60 MiB / 20 MiB = 3×
    phases["throughput"]["sizes"][-1]["imsrelay"]["relay_peak_rss_mib"] = 200.0  # 5× in flight
    assert _verdicts(phases)["peak memory at 1 MB, above the site's size before the run"] is False
    assert v["relay end to end vs Postfix, 10 MB"] is None  # not run


def test_floor_relay_target_and_row() -> None:
    """Issue 28: imsrelay's CPU per message within 2.5× the floor relay's, which runs
    beside it at 4 KB and 50 KB and is shown in the relay table."""
    phases = _phases()  # imsrelay 1.6 ms/msg at 4 KB
    assert _verdicts(phases)["relay CPU per message vs the floor relay, 4 KB"] is None  # not run
    four = phases["throughput"]["sizes"][0]
    four["floor"] = {"label": "floor relay", "cpu_ms_per_msg": 0.5, "end_to_end_per_s": 2000.0}
    assert _verdicts(phases)["relay CPU per message vs the floor relay, 4 KB"] is False  # 3.2×
    four["floor"]["cpu_ms_per_msg"] = 0.8
    assert _verdicts(phases)["relay CPU per message vs the floor relay, 4 KB"] is True  # 2.0×
    four["imsrelay"]["end_to_end_per_s"] = 1000.0
    lines: list[str] = []
    run._relay_table(lines, four, ("postfix", "imsrelay"))
    text = "\n".join(lines)
    assert "| floor relay | — | 2,000.0 | 0.80 |" in text, text
    assert "| **imsrelay / floor relay** | — | 0.50× | **2.00×** |" in text, text


def test_a_separate_profiled_run_says_so() -> None:
    prof = {"entry_points": [{"function": "ingress", "pct": 60.0, "us_per_msg": 900.0}],
            "top_self": [{"function": "data_reader.py:feed", "pct": 10.0, "us_per_msg": 150.0}],
            "rate_hz": 200, "samples": 400, "cpu_us_per_msg": 1500.0, "raw": "/x/profile.py-spy.txt",
            "mode": "py-spy-gil", "separate_run": 200}
    lines: list[str] = []
    run._profile_tables(lines, prof)
    text = "\n".join(lines)
    assert "a separate run of 200 messages (not in the figures above)" in text
    assert "| `data_reader.py:feed` | 10.0% | 150.0 |" in text


def test_the_servers_phase_writes_a_two_server_site_and_its_table(tmp_path):
    """Issue 24's bench figure: the site files it writes are a site of two servers the
    loader accepts, and the table compares one server with two."""
    from imsrelay.config.loader import load_config

    servers = [{"name": n, "host": h, "port": 2525, "admin": f"http://{h}:8025"}
               for n, h in (("ServerA", "127.0.0.30"), ("Server1", "127.0.0.31"))]
    spec = run.SiteSpec("SiteA", "127.0.0.31", 2525, "SiteA.bench.test", "bench.test", mailboxes=["User1", "User2"],
                        admin_port=8025, server="Server1", servers=servers,
                        homes={"User1": "ServerA", "User2": "Server1"})
    config = load_config(run.ImsSite(None, tmp_path, spec).config)
    assert (config.server, [s.name for s in config.servers]) == ("Server1", ["ServerA", "Server1"])
    assert [m.home_server for m in config.mailboxes] == ["ServerA", "Server1"]
    lat = {"p50_ms": 1.0, "p99_ms": 3.0}
    text = run.render_servers({"messages": 400, "servers_1": {"accepted_per_s": 300.0, "end_to_end_per_s": 290.0,
                                                               "cpu_ms_per_message": 1.2, "direct": lat},
                               "servers_2": {"accepted_per_s": 250.0, "end_to_end_per_s": 240.0,
                                             "cpu_ms_per_message": 2.0, "direct": lat,
                                             "hop": {"p50_ms": 2.5, "p99_ms": 4.0}},
                               "ratio_two_over_one": 0.83, "hop_adds_p50_ms": 1.5})
    assert "| 1 server | 300.0 | 290.0 | 1.20 | 1.00 / 3.00 | — |" in text
    assert "| 2 servers | 250.0 | 240.0 | 2.00 | 1.00 / 3.00 | 2.50 / 4.00 |" in text
    assert "0.83×" in text and "adds 1.5 ms" in text
