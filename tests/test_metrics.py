"""PerfMon counters as Prometheus metrics: GET /metrics parsed by prometheus_client's
parser while real mail flows (real site, real aiosmtpd peer)."""

from __future__ import annotations

import asyncio
import smtplib

import aiohttp
from ims_kit import Peer, admin, admin_section, message, start_peer, submit
from prometheus_client.parser import text_string_to_metric_families
from sitekit import free_port, make_config, running_site, site_mapping, wait_for

from imsrelay.model.envelope import Envelope, RecipientState
from imsrelay.observe.metrics import SiteMetrics, queue_lengths


class Refusing(Peer):
    async def handle_RCPT(self, server, session, envelope, address, options):
        if address.startswith("bad"):
            return f"550 5.1.1 <{address}>: unknown user"
        return await super().handle_RCPT(server, session, envelope, address, options)


async def scrape(site) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{site.config.admin.port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:  # no token: scrapers need none
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_move_as_mail_flows(tmp_path):
    peer_port, dead_port = free_port(), free_port()
    peer = Refusing()
    server = await start_peer("127.0.0.1", peer_port, peer)
    config = make_config(tmp_path, site_mapping(
        "SiteA", delivery={"retry_intervals": [0.3], "connect_timeout": 2},
        connected_sites=[{"name": "SiteB", "routing_address": "@SiteB.microsoft.com"}],
        email_domains=[{"domain": "partner.test", "host": "127.0.0.1", "port": peer_port},
                       {"domain": "SiteB.microsoft.com", "host": "127.0.0.1", "port": dead_port}],
        replication={"key": "k", "startup_delay": "1h", "connectors": [{"site": "SiteB", "schedule": "never"}]},
        **admin_section()))
    try:
        async with running_site(config) as site:
            before = await scrape(site)
            assert value(before, "imsrelay_messages_in_total") == 0
            assert value(before, "imsrelay_transfer_mode", mode="inbound-outbound") == 1

            await submit(site, ["User1@SiteA.microsoft.com"], message("local"))
            await submit(site, ["bob@partner.test", "bad@partner.test"], message("out"))
            await admin(site, "POST", "/replication/request-now", {"site": "SiteB"})  # SiteB is down
            await wait_for(lambda: len(peer.messages) == 1)
            after = await wait_for(lambda: _when(scrape(site), lambda m: value(
                m, "imsrelay_connections_outbound_failed_total") >= 1 and value(m, "imsrelay_ndrs_total") == 1
                and value(m, "imsrelay_deliveries_total", outcome="delivered") >= 3
                # the last delivery is counted a moment before its message leaves the queue
                and value(m, "imsrelay_queue_messages", queue="inbound") == 0))

            assert value(after, "imsrelay_messages_in_total") == 2
            assert value(after, "imsrelay_bytes_in_total") > 2 * len(message("out"))
            assert value(after, "imsrelay_messages_out_total") == 1
            assert value(after, "imsrelay_bytes_out_total") > len(message("out"))
            assert value(after, "imsrelay_connections_inbound_total") >= 2
            assert value(after, "imsrelay_connections_outbound_total") >= 1
            assert value(after, "imsrelay_deliveries_total", outcome="delivered") >= 3  # local, bob, the NDR
            assert value(after, "imsrelay_deliveries_total", outcome="failed") == 1
            assert value(after, "imsrelay_deliveries_total", outcome="deferred") >= 1  # to SiteB
            assert value(after, "imsrelay_queue_messages", queue="outbound") == 1
            assert value(after, "imsrelay_queue_messages", queue="inbound") == 0
            assert value(after, "imsrelay_replication_backlog_messages", peer="SiteB") == 1
            assert ("imsrelay_replication_last_reply_age_seconds", (("peer", "SiteB"),)) not in after
            assert value(after, "imsrelay_spool_flush_seconds_count") >= 3
            assert value(after, "imsrelay_spool_flush_seconds_sum") > 0

            # refused connections and faults have their counters too
            await admin(site, "PUT", "/transfer-mode", {"mode": "none"})

            def refused() -> None:
                try:
                    smtplib.SMTP("127.0.0.1", site.bound_port, timeout=10).quit()
                except smtplib.SMTPConnectError:
                    return
                raise AssertionError("accepted")

            await asyncio.to_thread(refused)
            await admin(site, "PUT", "/transfer-mode", {"mode": "inbound-outbound"})
            await admin(site, "POST", "/faults", {"stage": "connect", "reply": "421 4.3.2 fault"})
            await asyncio.to_thread(refused)
            last = await scrape(site)
            assert value(last, "imsrelay_connections_rejected_total", reason="transfer_mode") == 1
            assert value(last, "imsrelay_connections_rejected_total", reason="fault") == 1
            assert value(last, "imsrelay_faults_fired_total", kind="reply") == 1
            # no per-message label explosion: every label is one of a few known ones
            assert {k for key in last for k, _ in key[1]} <= {"queue", "reason", "outcome", "peer", "kind", "mode",
                                                               "state", "action",
                                                               "le"}
    finally:
        server.close()


async def _when(scraping, predicate):
    samples = await scraping
    return samples if predicate(samples) else None


async def test_sites_in_one_process_keep_their_own_registries(tmp_path):
    a = make_config(tmp_path, site_mapping("SiteA", **admin_section()))
    b = make_config(tmp_path, site_mapping("SiteB", **admin_section()))
    async with running_site(a) as site_a, running_site(b) as site_b:
        await submit(site_a, ["User1@SiteA.microsoft.com"])
        samples_a = await wait_for(lambda: _when(scrape(site_a), lambda m: value(m, "imsrelay_messages_in_total")))
        samples_b = await scrape(site_b)
    assert value(samples_a, "imsrelay_messages_in_total") == 1
    assert value(samples_b, "imsrelay_messages_in_total") == 0


async def test_metrics_can_require_the_token_or_be_off(tmp_path):
    cfg = make_config(tmp_path, site_mapping("SiteA", metrics={"require_token": True}, **admin_section()))
    async with running_site(cfg):
        url = f"http://127.0.0.1:{cfg.admin.port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 401
        assert "imsrelay_messages_in_total" in (await asyncio.to_thread(_get_with_token, url, cfg.admin.token))
    off = make_config(tmp_path / "off", site_mapping("SiteA", metrics={"enabled": False}, **admin_section()))
    async with running_site(off):
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{off.admin.port}/metrics") as resp:
            assert resp.status == 404 and "disabled" in (await resp.json())["error"]


def _get_with_token(url: str, token: str) -> str:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with opener.open(req, timeout=10) as resp:
        return resp.read().decode()


def test_queue_lengths_split_inbound_and_outbound():
    def env(*routes):
        return Envelope("Q", "a@b", [RecipientState(f"r{i}@x", route=r) for i, r in enumerate(routes)], 0.0)

    done = env("mx:x:25:none")
    done.recipients[0].state = "delivered"
    assert queue_lengths([env("relay:h:25:none"), env("local:User1"), env("mx:x:25:none", None), done]) == (2, 2)
    assert SiteMetrics().registry is not SiteMetrics().registry
