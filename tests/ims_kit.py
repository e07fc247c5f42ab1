"""Helpers for the IMS connection tests (transfer mode, faults, metrics, ETRN, route
cost): a recording aiosmtpd peer that counts sessions and concurrency, smtplib
submission, and the running site's admin endpoint called from a thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import email
import email.policy
import functools
import smtplib
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP as AioSMTP
from sitekit import free_port, maildir_messages

from imsrelay.admin.client import AdminClient
from imsrelay.queue.spool import Spool

USER1 = "User1@SiteA.microsoft.com"
TOKEN = "test-admin-token"


def message(subject: str = "Figures", *, headers: str = "", body: bytes = b"hello\r\n") -> bytes:
    return (f"From: User One <{USER1}>\r\nTo: bob@partner.test\r\nSubject: {subject}\r\n{headers}"
            "Message-ID: <m1@SiteA.microsoft.com>\r\n\r\n").encode() + body


def admin_section() -> dict[str, Any]:
    return {"admin": {"listen": "127.0.0.1", "port": free_port(), "token": TOKEN}}


class Peer:
    """aiosmtpd handler recording each accepted message, sessions, and the most
    sessions open at once."""

    def __init__(self, name: str = "peer.partner.test") -> None:
        self.name = name
        self.messages: list[tuple[list[str], bytes]] = []
        self.sessions = 0
        self.open = 0
        self.most_open = 0
        self.transports: set[asyncio.BaseTransport] = set()

    def hang_up(self) -> None:
        """Close every open session (a stopped server keeps accepted connections open)."""
        for t in list(self.transports):
            t.close()

    async def handle_RCPT(self, server, session, envelope, address, options):
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 Ok: queued"

    def subjects(self) -> list[str]:
        out = []
        for _, raw in self.messages:
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            out.append(str(msg["Subject"]))
        return out


class _CountingSMTP(AioSMTP):
    def __init__(self, peer: Peer, *args: Any, **kwargs: Any) -> None:
        super().__init__(peer, *args, **kwargs)
        self._peer = peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._peer.sessions += 1
        self._peer.transports.add(transport)
        self._peer.open += 1
        self._peer.most_open = max(self._peer.most_open, self._peer.open)

    def connection_lost(self, error: Exception | None) -> None:
        self._peer.open -= 1
        self._peer.transports.discard(self.transport)
        super().connection_lost(error)


async def start_peer(host: str, port: int, peer: Peer) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _CountingSMTP(peer, hostname=peer.name, decode_data=False, enable_SMTPUTF8=True),
        host=host, port=port)


async def spread_over_two_peers(tmp_path: Path, settings: Any, *, messages: int = 16) -> tuple[Peer, Peer]:
    """``messages`` messages for User3@SiteC through a SiteA whose routes ``settings(port_1,
    port_2)`` gives (a mapping merged into the site file), with two recording peers on those
    ports: the peers, once every message reached one of them."""
    from sitekit import running_site, site_mapping, wait_for, write_site_file

    port_1, port_2 = free_port(), free_port()
    one, two = Peer(), Peer()
    s1, s2 = await start_peer("127.0.0.1", port_1, one), await start_peer("127.0.0.1", port_2, two)
    _, config = write_site_file(tmp_path, site_mapping(
        "SiteA", delivery={"retry_intervals": [0.3]}, **settings(port_1, port_2)))
    try:
        async with running_site(config) as site:
            for i in range(messages):
                await submit(site, ["User3@SiteC.microsoft.com"], message(f"m{i}"))
            await wait_for(lambda: len(one.messages) + len(two.messages) == messages)
    finally:
        s1.close()
        s2.close()
    return one, two


def send(port: int, rcpts: list[str], data: bytes, *, sender: str = USER1, host: str = "127.0.0.1") -> str:
    """One message through smtplib; returns the queue id from the 250 reply."""
    with smtplib.SMTP(host, port, timeout=20) as s:
        s.ehlo("client.test")
        s.mail(sender)
        for r in rcpts:
            code, reply = s.rcpt(r)
            if code >= 400:
                raise smtplib.SMTPRecipientsRefused({r: (code, reply)})
        code, reply = s.data(data)
        if code != 250:
            raise smtplib.SMTPDataError(code, reply)
        return reply.decode().rsplit(" ", 1)[-1]


# Clients get threads of their own: blocking smtplib sessions in the loop's default
# executor would take the threads the site under test needs for its own work.
CLIENTS = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="test-client")


async def submit(site: Any, rcpts: list[str], data: bytes | None = None, **kw: Any) -> str:
    kw.setdefault("host", site.config.smtp.listen)
    call = functools.partial(send, site.bound_port, rcpts, data or message(), **kw)
    return await asyncio.get_running_loop().run_in_executor(CLIENTS, call)


def queued(site: Any) -> list:
    return list(Spool(site.config.data_dir).envelopes())


async def admin(site: Any, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    client = AdminClient.for_config(site.config, timeout=20)
    return await asyncio.to_thread(client.call, method, path, body)


def mailbox(data_dir: Path, alias: str) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(m, policy=email.policy.default) for m in maildir_messages(data_dir, alias)]


def human_text(report: email.message.EmailMessage) -> str:
    assert report.get_content_type() == "multipart/report"
    return report.get_payload()[0].get_content()


def status_text(report: email.message.EmailMessage) -> str:
    status = report.get_payload()[1]
    return "\n".join(str(block) for block in status.get_payload())
