"""The ingress's fast paths give exactly what the slow ways they skip would give.

- ``parse_path``: a regular expression for ``<dot-atom@domain>``, else the email parser
  (aiosmtpd's own way, ``parse_path_with_email_parser``) — compared on a corpus of
  hand-picked and generated MAIL/RCPT arguments.
- ``with_enhanced_status`` / ``printable_reply``: the early returns.
- ``needs_header_rewrite``: when it says no, ``rewrite_message`` really leaves the
  message as it is; when rewriting would change it, it says yes.
"""

from __future__ import annotations

import random

import pytest

from imsrelay.ingress.adapter import (
    _FIXED_REPLIES,
    _SIMPLE_PATH,
    _UNPRINTABLE,
    parse_path,
    parse_path_with_email_parser,
    printable_reply,
    with_enhanced_status,
)
from imsrelay.ingress.handler import MAX_REWRITE_LOOKUPS, needs_header_rewrite
from imsrelay.policy.rewrite import RewriteRules, header_addresses, rewrite_message

HAND_PICKED = [
    "", "<>", "<a@b.c>", " <a@b.c>", "\t<a@b.c>", "<a@b.c> SIZE=12", "<a@b.c>  SIZE=12 BODY=8BITMIME",
    "<a@b.c>\tSIZE=1", "<a@b.c> (comment) SIZE=1", "<a@b.c>(comment)", "<a@b.c>x", "<a@b.c> ", "<a@b.c>\t",
    "<a.b@c>", "<a..b@c>", "<.a@c>", "<a.@c>", "<a@b..c>", "<a@b.c.>", "<a@-b.c>", "<a@[1.2.3.4]>",
    '<"x y"@c>', "<A@B.C>", "<user+tag@example.org>", "<a@b", "a@b.c", "a@b.c SIZE=1", "<@r:a@b.c>",
    "<a@b.c>>", "<<a@b.c>", "<a b@c>", "<a@b c>", "<a\\b@c>", "<ä@b.c>", "<a@bä.c>", "<x@y.z> \"q\"",
    "<a@b.c> SMTPUTF8", "%%@[ \t", "a@[ ", "<a@[ >", "<" + "l" * 70 + "@b.c>", "<a@" + "d" * 300 + ">", "<postmaster>", "<a@b.c>\r",
]


def generated(n: int, seed: int = 16) -> list[str]:
    rnd = random.Random(seed)
    alphabet = "ab.-_+@<> \t()\"[]\\:;,xZ09!#%"
    out = []
    for _ in range(n):
        core = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 18)))
        word = "".join(rnd.choice("ab.-_+xZ09!#%") for _ in range(rnd.randint(1, 8)))
        shape = rnd.randrange(5)
        out.append(core if shape == 0 else f"<{core}>" if shape == 1 else f"<{core}> SIZE=9"
                   if shape == 2 else f" <a.{core}@b.c>{core}" if shape == 3 else f"<{word}@{word}>{core}")
    return out


@pytest.mark.parametrize("arg", HAND_PICKED)
def test_parse_path_matches_the_email_parser_on_hand_picked_arguments(arg: str) -> None:
    assert parse_path(arg) == parse_path_with_email_parser(arg)
    assert parse_path(arg, 64) == parse_path_with_email_parser(arg, 64)


def test_parse_path_matches_the_email_parser_on_generated_arguments() -> None:
    fast_taken = 0
    for arg in generated(5000):
        assert parse_path(arg) == parse_path_with_email_parser(arg), arg
        assert parse_path(arg, 3) == parse_path_with_email_parser(arg, 3), arg
        fast_taken += _SIMPLE_PATH.match(arg) is not None
    assert fast_taken > 150  # the corpus does exercise the fast path


def test_an_address_the_email_parser_crashes_on_is_a_syntax_error() -> None:
    # Python 3.11's get_dtext raises UnboundLocalError on "a@[ ": a 553, not a 451
    assert parse_path("a@[ ") == (None, None)
    assert parse_path("%%@[ \t") == (None, None)


def test_parse_path_fast_path_results() -> None:
    assert parse_path("<bench@source.bench.example> SIZE=4096") == ("bench@source.bench.example", "SIZE=4096")
    assert parse_path("<" + "x" * 65 + "@b.c>", 64) == (None, None)  # the local-part limit still holds
    assert parse_path("<" + "x" * 64 + "@b.c>", 64) == ("x" * 64 + "@b.c", "")


def test_with_enhanced_status_early_return_is_the_old_answer() -> None:
    def old(reply: str) -> str:  # the function before its early return
        for before, after in _FIXED_REPLIES:
            if reply.startswith(before):
                return after
        return with_enhanced_status(reply)

    replies = ["250 2.0.0 Ok: queued as X", "250 OK", "221 Bye", "550 5.1.1 unknown", "503 Error: need MAIL command",
               "500 Line too long", "552 Error: Too much mail data", "451 4.3.0 Internal", "220 ready", "354 go",
               "250 2.1.0 <a@b> sender ok", "502 Error: command not implemented", "2500", "25"]
    replies += [after for _, after in _FIXED_REPLIES]
    for reply in replies:
        assert with_enhanced_status(reply) == old(reply), reply
    assert with_enhanced_status("250 OK") == "250 2.0.0 OK"
    assert with_enhanced_status("250 2.0.0 OK") == "250 2.0.0 OK"


@pytest.mark.parametrize("reply", ["250 2.0.0 OK", "550 5.1.1 <ä@b> unknown", "250 x\x00y", "250 \udc80bad", "250 a\x7f",
                                   "250 tab\there", "250 é"])
def test_printable_reply_fast_path_is_the_regex_answer(reply: str) -> None:
    assert printable_reply(reply) == _UNPRINTABLE.sub("?", reply)


RULES = RewriteRules("sitea.microsoft.com", "microsoft.com")


def message(*headers: str) -> bytes:
    return ("".join(h + "\r\n" for h in headers) + "\r\nbody\r\n").encode()


def lowered_addresses(raw: bytes) -> list[str]:
    return list(dict.fromkeys(a.lower() for a in header_addresses(raw)))[:MAX_REWRITE_LOOKUPS]


@pytest.mark.parametrize("headers,primaries", [
    (("From: <a@elsewhere.example>", "To: <b@sitea.microsoft.com>"), {}),  # To: is not rewritten
    (("From: A <a@microsoft.com>", "Reply-To: r@other.example"), {}),
    (("Subject: no addresses",), {}),
])
def test_no_rewrite_needed_means_rewrite_changes_nothing(headers: tuple[str, ...], primaries: dict[str, str]) -> None:
    raw = message(*headers)
    addrs = lowered_addresses(raw)
    assert not needs_header_rewrite(addrs, RULES, primaries)
    assert rewrite_message(raw, RULES, primaries) == raw


@pytest.mark.parametrize("headers,primaries", [
    (("From: <a@SiteA.microsoft.com>",), {}),  # the site domain becomes the addressing domain
    (("Sender: x@sitea.microsoft.com",), {}),
    (("From: USER1@microsoft.com",), {"user1@microsoft.com": "User1@microsoft.com"}),  # a change of case only
])
def test_a_rewrite_that_changes_the_message_is_always_seen(headers: tuple[str, ...], primaries: dict[str, str]) -> None:
    raw = message(*headers)
    assert rewrite_message(raw, RULES, primaries) != raw
    assert needs_header_rewrite(lowered_addresses(raw), RULES, primaries)


def test_a_cut_short_address_list_always_rewrites() -> None:
    many = [f"u{i}@other.example" for i in range(MAX_REWRITE_LOOKUPS)]
    assert needs_header_rewrite(many, RULES, {})
    assert not needs_header_rewrite(many[:-1], RULES, {})


def test_header_date_is_formatted_once_a_second_and_follows_the_clock() -> None:
    from datetime import UTC, datetime
    from email.utils import format_datetime, parsedate_to_datetime

    from imsrelay.model.header_date import header_date_now

    first = header_date_now(1_790_000_000.2)
    assert header_date_now(1_790_000_000.7) is first  # the same second: the same text, not formatted again
    second = header_date_now(1_790_000_001.0)
    assert second != first and parsedate_to_datetime(second).timestamp() == 1_790_000_001
    assert first == format_datetime(datetime.fromtimestamp(1_790_000_000, UTC))
    assert abs(parsedate_to_datetime(header_date_now()).timestamp() - datetime.now(UTC).timestamp()) < 5

def test_received_header_with_a_given_date_and_an_unprintable_helo() -> None:
    from imsrelay.ingress.handler import received_header

    line = received_header(helo="bad\x00helo é", peer_ip="127.0.0.1", by="mx.example", queue_id="Q1",
                           recipient="a@b.c", date="Wed, 02 Dec 2026 05:00:00 +0000")
    assert line == (b"Received: from bad?helo?? ([127.0.0.1])\r\n\tby mx.example (imsrelay) with ESMTP id Q1"
                    b"\r\n\tfor <a@b.c>; Wed, 02 Dec 2026 05:00:00 +0000\r\n")
    assert b"from " + b"h" * 255 + b" (" in received_header(helo="h" * 300, peer_ip="::1", by="x", queue_id="Q",
                                                            recipient=None, date="d")


def test_bound_methods_binds_on_lookup_and_reads_as_the_old_table() -> None:
    from imsrelay.ingress.adapter import BoundMethods

    class Proto:
        def __init__(self, name: str) -> None:
            self.name = name

        def smtp_NOOP(self, arg: str | None) -> str:
            return f"{self.name} noop {arg}"

        def smtp_QUIT(self, arg: str | None) -> str:
            return f"{self.name} quit"

    names = {"NOOP": "smtp_NOOP", "QUIT": "smtp_QUIT"}
    a, b = BoundMethods(Proto("a"), names), BoundMethods(Proto("b"), names)
    assert a.get("NOOP")("x") == "a noop x" and b["NOOP"]("y") == "b noop y"  # each bound to its own protocol
    assert a.get("BOGUS") is None
    assert sorted(a) == ["NOOP", "QUIT"] and len(a) == 2
    assert [(k, m(None)) for k, m in b.items()] == [("NOOP", "b noop None"), ("QUIT", "b quit")]
