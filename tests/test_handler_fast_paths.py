"""The ingress handler's per-message fast paths against the plain computations they stand for:
the loop checks' short cuts (``mail_loops.seen_before``, ``count_hops``), the RCPT policy's
memoised steps (``inbound.check_recipient``) and the directory look-ups' one-address path
(``MailboxLookups``): same answers, also after the directory or the policy changed."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imsrelay.directory.lookups import MailboxLookups
from imsrelay.directory.store import Directory
from imsrelay.model.addresses import parse_address
from imsrelay.model.message import _header_end, header_block
from imsrelay.policy import mail_loops
from imsrelay.policy.expansion import EXPANDED_HEADER
from imsrelay.policy.inbound import MEMO_SIZE, InboundPolicy, check_recipient
from imsrelay.policy.restrictions import Client, RelayRules

# ---------------------------------------------------------------- the plain computations (as they were)

_PLAIN_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_PLAIN_EXPANDED = re.compile(rb"^" + re.escape(EXPANDED_HEADER.lower().encode()) + rb":", re.MULTILINE)


def plain_count_hops(message: bytes) -> int:
    return len(_PLAIN_RECEIVED.findall(header_block(message)))


def plain_seen_before(message: bytes, marker: bytes) -> bool:
    header = header_block(message).lower()
    expanded = _PLAIN_EXPANDED.search(header)
    if expanded is not None:
        header = header[:expanded.start()]
    return marker in re.sub(rb"\s+", b" ", header)


# ---------------------------------------------------------------- loop checks

_PIECES = st.sampled_from([
    b"Received: from x ([192.0.2.1])\r\n", b"received :", b"RECEIVED\t: by a\r\n", b"X-Received: y\r\n",
    b" Received: z\r\n", b"\r\n\tby ServerA.SiteA.microsoft.com (imsrelay) with ESMTP\r\n",
    b"by  ServerA.SiteA.microsoft.com\r\n (IMSRELAY)", b"by serverb (imsrelay)", b"(imsrelay)", b"(imsrel",
    b"ay)", b"imsrelay", b"by", b" ", b"\t", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\n\n",
    EXPANDED_HEADER.encode() + b": list@x\r\n", b"Subject: hi\r\n", b"x", b"\x0b", b"\x0c"])

_MARKERS = [mail_loops.received_marker("ServerA.SiteA.microsoft.com"), mail_loops.received_marker("serverb"),
            b"by servera.sitea.microsoft.com", b"imsrelay"]  # (the last two: not markers; the plain path answers)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=25))
def test_loop_checks_answer_as_the_plain_ones(pieces: list[bytes]) -> None:
    message = b"".join(pieces)
    assert mail_loops.count_hops(message) == plain_count_hops(message)
    for marker in _MARKERS:
        assert mail_loops.seen_before(message, marker) == plain_seen_before(message, marker), marker


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_loop_checks_answer_as_the_plain_ones_on_any_bytes(message: bytes) -> None:
    assert mail_loops.count_hops(message) == plain_count_hops(message)
    for marker in _MARKERS:
        assert mail_loops.seen_before(message, marker) == plain_seen_before(message, marker)


def test_the_short_cut_still_finds_a_marker_split_by_white_space() -> None:
    marker = mail_loops.received_marker("ServerA.SiteA.microsoft.com")
    assert marker.endswith(b"(imsrelay)")
    came_back = b"Received: from x\r\n\tby ServerA.SiteA.microsoft.com\r\n\t (IMSRelay) id Q1\r\n\r\nbody"
    assert mail_loops.seen_before(came_back, marker)
    assert not mail_loops.seen_before(b"Received: from x by other (postfix)\r\n\r\nby ServerA.SiteA.microsoft.com"
                                      b" (imsrelay)", marker)
    assert mail_loops.count_hops(b"Received: a\r\nreceived\t: b\r\nX-Received: c\r\n\r\nReceived: d\r\n") == 2


# ---------------------------------------------------------------- RCPT policy memo

NETS = (ipaddress.ip_network("192.0.2.0/24"),)


def _policy(**changes: object) -> InboundPolicy:
    base = InboundPolicy(local_domains=("sitea.microsoft.com", "#exact.example"),
                         org_routing_domains=("siteb.microsoft.com", "sub.sitea.microsoft.com"),
                         relay_networks=NETS, max_recipients=100, max_message_size=10_000_000, max_hops=30,
                         self_addresses=frozenset({"192.0.2.25"}),
                         relay=RelayRules(authenticated=True, networks=NETS,
                                          never=(ipaddress.ip_network("192.0.2.128/25"),)))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


_DOMAINS = st.sampled_from(["sitea.microsoft.com", "x.sitea.microsoft.com", "sub.sitea.microsoft.com",
                            "a.sub.sitea.microsoft.com", "exact.example", "y.exact.example", "siteb.microsoft.com",
                            "elsewhere.example", "[192.0.2.25]", "[198.51.100.1]", "SiteA.Microsoft.COM"])
_CLIENTS = st.builds(Client, st.sampled_from([None, "192.0.2.1", "192.0.2.200", "198.51.100.7", "::1"]),
                     st.sampled_from([None, "192.0.2.25"]), st.sampled_from([None, "User1"]), st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_DOMAINS, _CLIENTS, st.booleans()), min_size=1, max_size=12))
def test_memoised_recipient_policy_answers_as_a_fresh_policy(asks: list[tuple[str, Client, bool]]) -> None:
    kept = _policy()
    for domain, client, plain_client in asks:
        address = parse_address(f"user@{domain}")
        who = None if plain_client else client
        fresh = _policy()  # nothing memoised yet: the plain computation
        expect = check_recipient(address, policy=fresh, client_ip=client.ip, known=False, accepted_so_far=0,
                                 client=who)
        assert check_recipient(address, policy=kept, client_ip=client.ip, known=False, accepted_so_far=0,
                               client=who) == expect


def test_a_changed_policy_does_not_inherit_the_memo() -> None:
    first = _policy()
    address = parse_address("user@siteb.microsoft.com")
    assert check_recipient(address, policy=first, client_ip="198.51.100.7", known=False, accepted_so_far=0).ok
    assert first.domain_memo  # the answer was kept
    changed = _policy(org_routing_domains=())
    assert not changed.domain_memo and not changed.relay_memo
    assert not check_recipient(address, policy=changed, client_ip="198.51.100.7", known=False,
                               accepted_so_far=0).ok  # relaying denied now
    assert changed == _policy(org_routing_domains=())  # the memo takes no part in equality


def test_the_memo_is_bounded() -> None:
    policy = _policy()
    for i in range(MEMO_SIZE + 50):
        reply = check_recipient(parse_address(f"u@d{i}.example"), policy=policy, client_ip="198.51.100.7",
                                known=False, accepted_so_far=0)
        assert reply.code == 554
    assert len(policy.domain_memo) == MEMO_SIZE


# ---------------------------------------------------------------- directory look-ups

@pytest.fixture
def directory(tmp_path: Path):
    d = Directory(tmp_path / "a.sqlite3", "SiteA")
    d.provision(organisation="ExchangeORG", server="ServerA", site_domain="SiteA.microsoft.com", hostname="h",
                mailboxes=[("User1", "User One", ["smtp:u1@alias.example"])])
    yield d
    d.close()


def _lookups(directory: Directory, own: frozenset[str] = frozenset({"192.0.2.25"})) -> MailboxLookups:
    return MailboxLookups(directory, site="SiteA", site_domain="sitea.microsoft.com", postmaster="User1",
                          accepted_domains=(), addressing_domain=lambda: "sitea.microsoft.com",
                          own_addresses=lambda: own)


ASKED = ["User1@SiteA.microsoft.com", "u1@ALIAS.example", "user1@[192.0.2.25]", "user1@[198.51.100.1]",
         "nobody@sitea.microsoft.com", "someone@elsewhere.example", "postmaster@sitea.microsoft.com",
         "User2@sitea.microsoft.com"]


def _plain(directory: Directory, addresses: list[str]) -> tuple[list[object], list[object]]:
    """What the directory itself answers (the mailbox of user@[own address] is user@site domain's)."""
    asked = [a.replace("[192.0.2.25]", "sitea.microsoft.com") for a in addresses]
    return directory.find_recipients(asked), directory.find_entries(addresses)


def test_one_address_look_ups_answer_as_the_directory_before_and_after_changes(directory: Directory) -> None:
    lookups = _lookups(directory)

    async def ask_each() -> tuple[list[object], list[object]]:
        mailboxes, entries = [], []
        for a in ASKED:  # one address a call: the RCPT path
            for _ in range(2):  # the second answer comes from memory
                mailboxes += await lookups.lookup([a])
                entries += await lookups.lookup_entries([a])
        return mailboxes, entries

    def expect() -> tuple[list[object], list[object]]:
        mailboxes, entries = _plain(directory, ASKED)
        return [m for m in mailboxes for _ in range(2)], [e for e in entries for _ in range(2)]

    assert asyncio.run(ask_each()) == expect()
    assert asyncio.run(lookups.lookup(ASKED)) == _plain(directory, ASKED)[0]  # several at once: as before
    directory.add_mailbox("User2")
    directory.add_custom_recipient("Ext", "ext@elsewhere.example")
    stale = asyncio.run(ask_each())
    assert stale != expect()  # (kept answers: the test can tell)
    lookups.clear()  # what the site does when the directory changed
    assert asyncio.run(ask_each()) == expect()
    assert (asyncio.run(lookups.lookup(["user2@sitea.microsoft.com"])))[0] is not None
    directory.delete_mailbox("User2")
    lookups.clear()
    assert asyncio.run(ask_each()) == expect()
    assert (asyncio.run(lookups.lookup(["user2@sitea.microsoft.com"])))[0] is None


def test_an_address_literal_is_looked_up_as_the_site_domain_only_when_it_is_ours(directory: Directory) -> None:
    ours, not_ours = _lookups(directory), _lookups(directory, frozenset())
    found = asyncio.run(ours.lookup(["user1@[192.0.2.25]"]))[0]
    assert found is not None and found.alias == "User1"
    assert asyncio.run(not_ours.lookup(["user1@[192.0.2.25]"])) == [None]
    assert asyncio.run(ours.lookup(["user1@[198.51.100.1]"])) == [None]


def test_one_address_mailbox_look_ups_answer_as_several_at_once(directory: Directory) -> None:
    """``lookup_mailboxes``' one-address path (postmaster at a local domain is the
    ``smtp.postmaster`` mailbox) against its path for several addresses."""
    one, several = _lookups(directory), _lookups(directory)
    asked = [*ASKED, "Postmaster@SiteA.microsoft.com.", "postmaster@elsewhere.example", "postmaster"]
    together = asyncio.run(several.lookup_mailboxes(asked))
    each = [asyncio.run(one.lookup_mailboxes([a]))[0] for a in asked]
    assert each == together
    assert together[asked.index("postmaster@sitea.microsoft.com")] is not None  # (User1 is the postmaster here)
    assert together[asked.index("postmaster@elsewhere.example")] is None


# ---------------------------------------------------------------- message priority

_PLAIN_PRIORITY = re.compile(rb"^(priority|importance|x-priority)[ \t]*:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
                             re.IGNORECASE | re.MULTILINE)


def plain_priority_of(message: bytes) -> str:
    from imsrelay.model import priority as p
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    header = (message if end < 0 else message[:end + 2])[:p.MAX_HEADER_SCAN]
    found: dict[str, str] = {}
    for m in _PLAIN_PRIORITY.finditer(header):
        found.setdefault(m.group(1).decode("ascii").lower(), re.sub(r"\s+", " ", m.group(2).decode("latin-1")))
    for name, parse in (("priority", p._from_priority), ("importance", p._from_importance),
                        ("x-priority", p._from_x_priority)):
        if name in found:
            value = parse(found[name])
            if value is not None:
                return value
    return p.NORMAL


_PRIORITY_PIECES = st.sampled_from([
    b"Priority: urgent\r\n", b"PRIORITY:non-urgent\r\n", b"X-Priority: 1 (Highest)\r\n", b"x-priority:5\r\n",
    b"Importance: High\r\n", b"importance : low\r\n", b"X-Priority: 3\r\n", b"Subject: priority\r\n",
    b"Priority: bogus\r\n", b"\tcontinued\r\n", b"From: a@b\r\n", b"\r\n", b"\n", b"Priorit", b"y: urgent\r\n",
    b"IMPORTANCE: HIGH\n", b"x", b" "])


@settings(max_examples=400, deadline=None)
@given(st.lists(_PRIORITY_PIECES, max_size=12))
def test_priority_answers_as_the_plain_reading(pieces: list[bytes]) -> None:
    from imsrelay.model.priority import priority_of
    message = b"".join(pieces)
    assert priority_of(message) == plain_priority_of(message)


# ---------------------------------------------------------------- sender lists, the client

def test_an_empty_sender_list_matches_no_sender() -> None:
    from imsrelay.policy.restrictions import matching_entry
    for sender in ("", "<>", "a@b.example", "not an address", "@x"):
        assert matching_entry(sender, ()) is None
    assert matching_entry("<>", ("<>",)) == "<>"
    assert matching_entry("a@sub.b.example", ("@b.example",)) == "@b.example"


def test_the_sessions_client_follows_auth_and_starttls() -> None:
    """``SiteHandler._client`` (kept for a session) against a Client made afresh each time."""
    from imsrelay.ingress.adapter import ImsSession
    from imsrelay.ingress.handler import SiteHandler, _client_of
    from imsrelay.policy.auth import Identity

    class Server:
        encrypted = False

    loop = asyncio.new_event_loop()
    try:
        session, server = ImsSession(loop), Server()
        session.peer, session.local_ip = ("192.0.2.7", 4000), "192.0.2.25"
        handler = SiteHandler.__new__(SiteHandler)  # (_client uses nothing of the site)

        def check() -> Client:
            identity = session.identity if session.authenticated else None
            fresh = _client_of(session, session.local_ip, identity, server.encrypted)
            got = handler._client(server, session)  # type: ignore[arg-type]
            assert got == fresh
            return got

        first = check()
        assert first == Client("192.0.2.7", "192.0.2.25", None, False, ()) and check() is first
        server.encrypted = True  # STARTTLS
        assert check().encrypted
        session.identity = Identity("User1", "SiteA", ("user1@sitea.example",))
        assert check().authenticated is None  # not authenticated: the identity does not count
        session.authenticated = True
        assert check() == Client("192.0.2.7", "192.0.2.25", "User1", True, ("user1@sitea.example",))
        session.identity = Identity("User2", "SiteA", ())
        assert check().authenticated == "User2"
        session.peer = ("192.0.2.8", 4001)
        assert check().ip == "192.0.2.8"
    finally:
        loop.close()


_PLAIN_HEADER_END = re.compile(rb"\r?\n\r?\n")


def plain_header_end(message: bytes) -> int:
    """The header end as found before the literal-first-byte search (the reference)."""
    m = _PLAIN_HEADER_END.search(message)
    if not m:
        return len(message)
    return m.start() + (2 if message[m.start():m.start() + 2] == b"\r\n" else 1)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"Subject: x", b":", b" "]), max_size=30).map(b"".join))
def test_header_end_agrees_with_the_plain_search(message):
    assert _header_end(message) == plain_header_end(message)
