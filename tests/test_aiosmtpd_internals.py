"""What the ingress relies on inside aiosmtpd (imsrelay.ingress.adapter), checked loudly.

``server_factory`` builds the first protocol of a site normally and later ones by
copying its ``__dict__`` and rebuilding the per-connection parts; ``ImsSMTP._getaddr``
replaces aiosmtpd's address parser.  Both depend on aiosmtpd's private attributes:
when an aiosmtpd release changes them, these tests fail with a message that says
what changed (pyproject.toml pins the tested range)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect

import aiosmtpd
import pytest
import structlog
from aiosmtpd.smtp import SMTP, _AuthMechAttr
from sitekit import config_of, site_mapping

from imsrelay.ingress.adapter import ImsSMTP, LineReader, server_factory
from imsrelay.ingress.handler import SiteHandler

# aiosmtpd state the template copy shares between connections: read-only tables
SHARED_CONTAINERS = {"_handle_hooks", "_call_limit_base"}
# rebuilt for each copy by server_factory
REBUILT = {"_drain_waiters", "_stream_reader_wr", "_strong_reader", "_client_connected_cb", "_closed",
           "_smtp_methods", "_auth_methods", "_ehlo_lines"}


def test_aiosmtpd_is_the_tested_version():
    major, minor = (int(x) for x in aiosmtpd.__version__.split(".")[:2])
    assert (major, minor) == (1, 4), (
        f"aiosmtpd {aiosmtpd.__version__}: imsrelay.ingress.adapter was tested with 1.4.x; check server_factory "
        "and ImsSMTP._getaddr against the new release, then widen the pin in pyproject.toml")


def test_the_private_names_the_ingress_uses_exist():
    for name in ("_getaddr", "_cb_client_connected", "push", "smtp_EHLO", "connection_made", "connection_lost"):
        assert hasattr(SMTP, name), f"aiosmtpd.smtp.SMTP.{name} is gone"
    assert list(inspect.signature(SMTP._getaddr).parameters) == ["self", "arg"]
    assert {"method", "is_builtin"} <= set(_AuthMechAttr._fields), "_AuthMechAttr changed"
    assert isinstance(SMTP.line_length_limit, int) and hasattr(SMTP, "local_part_limit")
    assert issubclass(SMTP, asyncio.StreamReaderProtocol)


@pytest.fixture
async def protocols():
    handler = SiteHandler(None, config_of(site_mapping("SiteA")), structlog.get_logger(), lambda: 0.0)  # type: ignore[arg-type]
    factory = server_factory(handler, None)
    first, copy = factory(), factory()
    yield first, copy


async def test_a_copied_protocol_has_the_same_state_and_its_own_per_connection_parts(protocols):
    first, copy = protocols
    assert set(first.__dict__) == set(copy.__dict__), "aiosmtpd's SMTP.__init__ sets other attributes now"
    for name, value in first.__dict__.items():
        other = copy.__dict__[name]
        mutable = isinstance(value, dict | list | set) or name in REBUILT
        if name in REBUILT:
            assert other is not value, f"{name} must be made afresh for each connection"
        elif mutable:
            assert name in SHARED_CONTAINERS, (
                f"SMTP.{name} ({type(value).__name__}) would be shared by every connection of a site: "
                "server_factory must rebuild it")
    for table in ("_smtp_methods", "_auth_methods"):
        assert set(getattr(first, table)) == set(getattr(copy, table))
    assert all(m.__self__ is copy for m in copy._smtp_methods.values())
    assert all(a.method.__self__ is copy for a in copy._auth_methods.values() if a.is_builtin)
    assert copy._stream_reader_wr() is copy._strong_reader


@pytest.mark.parametrize("arg", ["<user@example.net>", "<user@example.net> SIZE=100", "user@example.net",
                                 "<>", "", "<bad", "<\"quoted name\"@example.net>", "<a@[192.0.2.1]>"])
async def test_getaddr_gives_aiosmtpd_s_answers(protocols, arg):
    first, _ = protocols
    assert ImsSMTP._getaddr(first, arg) == SMTP._getaddr(first, arg)


# ImsSMTP._data is aiosmtpd 1.4.6's smtp_DATA with the content read in chunks
# (imsrelay.ingress.data_reader): the checks before 354, the replies, the envelope fields and
# the hook are copied from it.  A release that changes it must be read again.
SMTP_DATA_SHA256 = "3a33f30d3fd6d02f39c7d78a08288bffea9170525b62e2161568041ae7e018df"
DATA_REPLIES = ("503 Error: need RCPT command", "501 Syntax: DATA", "354 End data with <CR><LF>.<CR><LF>",
                "500 Line too long (see RFC5321 4.5.3.1.6)", "552 Error: Too much mail data",
                "500 Error: strict ASCII mode", "250 OK")


def test_smtp_data_is_the_one_the_chunked_reader_copies():
    source = inspect.getsource(SMTP.smtp_DATA)
    for reply in DATA_REPLIES:
        assert f"'{reply}'" in source or f'"{reply}"' in source, f"aiosmtpd's DATA reply {reply!r} changed"
        assert f'"{reply}"' in inspect.getsource(ImsSMTP._data), reply
    for name in ("check_helo_needed", 'check_auth_needed("DATA")', "_call_handler_hook('DATA')",
                 "_set_post_data_state()", "readuntil(b'\\r\\n')", "line == b'.\\r\\n'", "del text[0]",
                 "self.envelope.content = content", "self.envelope.original_content = original_content",
                 "limit and num_bytes > limit", "self._writer.close()"):
        assert name in source, f"aiosmtpd's smtp_DATA no longer has {name!r}: check ImsSMTP._data"
    assert hashlib.sha256(source.encode()).hexdigest() == SMTP_DATA_SHA256, (
        "aiosmtpd's smtp_DATA changed: compare it with ImsSMTP._data and imsrelay.ingress.data_reader, "
        "then update SMTP_DATA_SHA256")
    for name in ("_handle_hooks", "_decode_data", "data_size_limit", "enable_SMTPUTF8", "_reader", "_writer"):
        assert name in inspect.getsource(SMTP.__init__) + inspect.getsource(SMTP._cb_client_connected), name
    assert SMTP.line_length_limit == 1001


async def test_the_reader_can_put_back_what_was_read_past_the_end():
    """LineReader.unread puts bytes back into asyncio's StreamReader buffer (a
    private ``bytearray``): the next readuntil reads them first."""
    reader = LineReader(limit=1001)
    assert isinstance(reader._buffer, bytearray)
    reader.feed_data(b".\r\nQUIT\r\nNOOP")
    chunk = await reader.read(65536)
    assert chunk == b".\r\nQUIT\r\nNOOP"
    reader.unread(chunk[3:])
    reader.feed_data(b"\r\n")
    assert await reader.readuntil(b"\n") == b"QUIT\r\n"
    assert await reader.readuntil(b"\n") == b"NOOP\r\n"


async def test_the_reader_hands_over_what_it_holds_and_resumes_reading():
    """DATA is read by ``data_received`` (ImsSMTP._read_data): what the reader holds
    already is taken from asyncio's StreamReader buffer, and a reader paused for a full
    buffer (``_paused``, ``_maybe_resume_transport``) resumes reading; the end of the
    stream is told (``on_end``) to a DATA phase reading without the reader."""

    class Transport:
        paused = resumed = 0

        def pause_reading(self) -> None:
            self.paused += 1

        def resume_reading(self) -> None:
            self.resumed += 1

    reader = LineReader(limit=10)
    transport = Transport()
    reader.set_transport(transport)  # type: ignore[arg-type]
    reader.feed_data(b"x" * 25)  # more than twice the limit: asyncio pauses the transport
    assert transport.paused == 1 and reader._paused
    assert reader.take_buffered() == b"x" * 25 and reader.take_buffered() == b""
    assert transport.resumed == 1 and not reader._paused
    ended: list[str] = []
    reader.on_end = lambda: ended.append("end")
    reader.feed_eof()
    assert ended == ["end"] and reader.at_eof()
