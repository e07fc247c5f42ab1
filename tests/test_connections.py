"""Connections "Advanced" (Q166584, Q146562): maximum outbound connections, outbound
connections per host, messages per connection — counted by real aiosmtpd peers.
(The inbound cap, smtp.max_inbound_connections, is issue 11's.)"""

from __future__ import annotations

import asyncio

from ims_kit import Peer, message, queued, start_peer, submit
from sitekit import free_port, make_config, running_site, site_mapping, wait_for


class SlowPeer(Peer):
    """Holds each DATA a moment so that concurrent deliveries overlap."""

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(0.3)
        return await super().handle_DATA(server, session, envelope)


async def _flow(tmp_path, connections: dict, n: int = 8, peers: int = 1):
    ports = [free_port() for _ in range(peers)]
    sinks = [SlowPeer(f"peer{i}.test") for i in range(peers)]
    servers = [await start_peer("127.0.0.1", p, s) for p, s in zip(ports, sinks, strict=True)]
    config = make_config(tmp_path, site_mapping(
        "SiteA", delivery={"retry_intervals": [0.3], "connection_idle": "30s"}, connections=connections,
        email_domains=[{"domain": f"p{i}.test", "host": "127.0.0.1", "port": p} for i, p in enumerate(ports)]))
    try:
        async with running_site(config) as site:
            await asyncio.gather(*(submit(site, [f"user{i}@p{i % peers}.test"], message(f"m{i}")) for i in range(n)))
            await wait_for(lambda: sum(len(s.messages) for s in sinks) == n, timeout=30)
            await wait_for(lambda: not queued(site))
            most = site.smtp_client.most_open
    finally:
        for s in servers:
            s.close()
    return sinks, most


async def test_outbound_connections_per_host(tmp_path):
    (sink,), _ = await _flow(tmp_path, {"max_outbound_per_host": 2})
    assert sink.most_open <= 2 and len(sink.messages) == 8


async def test_maximum_outbound_connections_over_all_hosts(tmp_path):
    sinks, most = await _flow(tmp_path, {"max_outbound": 1}, n=6, peers=2)
    assert most <= 1
    assert sum(s.most_open for s in sinks) <= 2  # one each at most, never both at once (checked by most)
    assert all(s.messages for s in sinks)


async def test_messages_per_connection(tmp_path):
    (sink,), _ = await _flow(tmp_path, {"max_outbound_per_host": 1, "messages_per_connection": 2}, n=6)
    assert sink.sessions >= 3  # 6 messages, at most 2 on one connection
    (reused,), _ = await _flow(tmp_path / "reuse", {"max_outbound_per_host": 1}, n=6)
    assert reused.sessions < 3  # without the limit the one connection is reused
