"""The Internet Mail tab by E-Mail Domain and Message Journaling, as pure decisions:
how an automatic message is recognised, which entry applies to a domain, what may
leave, display names, which messages get a journal copy and what the copy holds."""

from __future__ import annotations

import email
import email.policy

import pytest
from sitekit import config_of, site_mapping

from imsrelay.model.errors import ConfigErrors
from imsrelay.model.settings import InternetMailDomain
from imsrelay.policy import internet_mail as im
from imsrelay.policy import journaling as jr


def msg(*headers: str, body: str = "hello") -> bytes:
    return ("\r\n".join(["From: Jo <jo@sitea.example>", "To: bob@partner.test", *headers]) + f"\r\n\r\n{body}\r\n"
            ).encode()


@pytest.mark.parametrize(("headers", "kind"), [
    ((), None),
    (("Subject: Out of Office AutoReply: figures",), im.OUT_OF_OFFICE),  # Exchange 5.5's OOF subject
    (("Auto-Submitted: auto-replied", "Subject: Out of office: back Monday"), im.OUT_OF_OFFICE),
    (("Subject: Out of office: back Monday",), None),  # a person may write that subject
    (("Auto-Submitted: auto-replied; owner-email=jo@x",), im.AUTO_REPLY),  # RFC 3834 with a parameter
    (("AUTO-SUBMITTED:  Auto-Replied",), im.AUTO_REPLY),
    (("X-Autoreply: yes",), im.AUTO_REPLY),
    (("X-Autorespond: on vacation",), im.AUTO_REPLY),
    (("Precedence: auto_reply",), im.AUTO_REPLY),
    (("Precedence: bulk",), None),
    (("Auto-Submitted: no",), None),
    (("Auto-Submitted: auto-generated",), None),  # reports and notifications are none of the three
    (("Autoforwarded: TRUE",), im.AUTO_FORWARD),  # RFC 2156
    (("Autoforwarded: FALSE",), None),
    (("Auto-Submitted: auto-forwarded",), im.AUTO_FORWARD),
    (("X-MS-Exchange-Inbox-Rules-Loop: jo@sitea.example",), im.AUTO_FORWARD),
    (("X-Auto-Response-Suppress: All",), None),  # a request to others, not a kind of message
    (("Auto-Submitted: auto-replied", "Autoforwarded: TRUE"), im.AUTO_REPLY),
])
def test_classify(headers, kind):
    assert im.classify(msg(*headers)) == kind


def test_classify_reads_the_header_only():
    assert im.classify(msg(body="Auto-Submitted: auto-replied\r\nSubject: Out of Office AutoReply: x")) is None


ENTRIES = (
    InternetMailDomain("*", out_of_office=False, max_message_size=5000),
    InternetMailDomain("partner.test", auto_replies=False, display_names=False),
    InternetMailDomain("#open.test", out_of_office=True, max_message_size=0),
    InternetMailDomain("fwd.test", auto_replies=False, auto_forwards=True),
)


def test_settings_for_takes_the_most_specific_entry_then_the_default_entry():
    partner = im.settings_for("mx.partner.test", ENTRIES)
    assert partner.entry == "partner.test"
    assert partner.out_of_office is False  # left out: from "*"
    assert partner.max_message_size == 5000  # from "*"
    assert partner.auto_replies is False and partner.display_names is False
    assert partner.auto_forwards is False  # left out: follows auto_replies (Q176161)
    assert im.settings_for("fwd.test", ENTRIES).auto_forwards is True  # given: its own switch
    other = im.settings_for("elsewhere.test", ENTRIES)
    assert (other.entry, other.out_of_office, other.auto_replies, other.display_names) == ("*", False, True, True)
    exact = im.settings_for("OPEN.test", ENTRIES)
    assert exact.entry == "#open.test" and exact.out_of_office and exact.max_message_size == 0
    assert im.settings_for("sub.open.test", ENTRIES).entry == "*"  # "#": that domain only
    assert im.settings_for("x.test", ()) == im.DomainMailSettings()  # no entries: everything allowed
    assert not im.DomainMailSettings().restricts and partner.restricts


def test_outbound_verdicts():
    partner = im.settings_for("partner.test", ENTRIES)
    discard = im.outbound_verdict(kind=im.AUTO_REPLY, size=10, domain="partner.test", settings=partner,
                                  outbound_limit=0)
    assert discard is not None and discard.action == im.DISCARD and discard.kind == im.AUTO_REPLY
    assert "partner.test" in discard.text and "without an NDR" in discard.text
    assert im.outbound_verdict(kind=None, size=10, domain="partner.test", settings=partner, outbound_limit=0) is None
    big = im.outbound_verdict(kind=None, size=5001, domain="partner.test", settings=partner, outbound_limit=0)
    assert big is not None and (big.action, big.status) == (im.FAIL, "5.3.4") and "5000" in big.text
    outbound = im.outbound_verdict(kind=None, size=300, domain="open.test", settings=im.settings_for(
        "open.test", ENTRIES), outbound_limit=200)
    assert outbound is not None and outbound.status == "5.3.4" and "outbound size limit" in outbound.text
    # another site of the organisation (settings None): the switches and the per-domain limit do not apply
    assert im.outbound_verdict(kind=im.OUT_OF_OFFICE, size=6000, domain="siteb.example", settings=None,
                               outbound_limit=0) is None
    assert im.outbound_verdict(kind=None, size=300, domain="siteb.example", settings=None,
                               outbound_limit=200) is not None
    oof = im.outbound_verdict(kind=im.OUT_OF_OFFICE, size=10, domain="open.test",
                              settings=im.settings_for("open.test", ENTRIES), outbound_limit=0)
    assert oof is None  # the exact entry allows what "*" disables


def test_strip_display_names_keeps_every_other_byte():
    original = (b"Received: from x\r\nFrom: \"Jo Smith\" <jo@sitea.example>\r\nTo: Bob <bob@partner.test>,\r\n"
                b" carol@partner.test\r\nCc: =?utf-8?q?Ren=C3=A9?= <rene@partner.test>\r\n"
                b"Reply-To: Jo <jo@sitea.example>\r\nSubject: To: Bob <bob@x>\r\n\r\nTo: Bob <bob@x>\r\n")
    out = im.strip_display_names(original)
    assert out == (b"Received: from x\r\nFrom: jo@sitea.example\r\nTo: bob@partner.test, carol@partner.test\r\n"
                   b"Cc: rene@partner.test\r\nReply-To: Jo <jo@sitea.example>\r\nSubject: To: Bob <bob@x>\r\n"
                   b"\r\nTo: Bob <bob@x>\r\n")
    assert im.strip_display_names(out) is out  # nothing left to strip: the same bytes
    group = b"From: a@b.example\r\nTo: undisclosed-recipients:;\r\n\r\nx\r\n"
    assert im.strip_display_names(group) == group


def test_config_loads_internet_mail_and_journaling():
    cfg = config_of(site_mapping(
        "SiteA", internet_mail=[{"domain": "*", "out_of_office": False},
                                {"domain": "#Partner.Test", "display_names": False, "max_message_size": 2048}],
        delivery={"max_message_size": 4096}, journaling={"recipient": "Journal", "reports": False}))
    assert cfg.internet_mail == (InternetMailDomain("*", out_of_office=False),
                                 InternetMailDomain("#Partner.Test", display_names=False, max_message_size=2048))
    assert cfg.delivery.max_message_size == 4096
    assert (cfg.journaling.recipient, cfg.journaling.reports) == ("Journal", False)
    assert config_of(site_mapping("SiteA")).journaling.recipient is None


@pytest.mark.parametrize(("extra", "key"), [
    ({"internet_mail": [{"domain": "a.test"}, {"domain": "A.test"}]}, "internet_mail[1].domain"),
    ({"internet_mail": [{"domain": "a.test", "oof": False}]}, "internet_mail[0].oof"),
    ({"internet_mail": [{"domain": "a.test", "auto_replies": "no"}]}, "internet_mail[0].auto_replies"),
    ({"internet_mail": [{"domain": "a.test", "max_message_size": -1}]}, "internet_mail[0].max_message_size"),
    ({"internet_mail": [{"out_of_office": False}]}, "internet_mail[0].domain"),
    ({"journaling": {"recipient": "not an alias"}}, "journaling.recipient"),
    ({"journaling": {"recipient": "bad@@x"}}, "journaling.recipient"),
    ({"delivery": {"max_message_size": -5}}, "delivery.max_message_size"),
])
def test_config_errors_name_the_key(extra, key):
    with pytest.raises(ConfigErrors) as info:
        config_of(site_mapping("SiteA", **extra))
    assert key in str(info.value)


# ------------------------------------------------------------ journaling

def test_journal_wanted():
    m = msg("Subject: hi")
    want = dict(message=m, journal_address="journal@sitea.example")
    assert jr.journal_wanted(origin="smtp", recipients=["bob@partner.test"], **want)
    assert not jr.journal_wanted(origin="journal", recipients=["journal@sitea.example"], **want)
    assert not jr.journal_wanted(origin="dirsync", recipients=["dirsync@siteb.example"], **want)
    assert not jr.journal_wanted(origin="smtp", recipients=["DirSync@sitea.example"], **want)  # replication in
    assert jr.journal_wanted(origin="ndr", recipients=["jo@sitea.example"], **want)
    assert not jr.journal_wanted(origin="ndr", recipients=["jo@sitea.example"], reports=False, **want)
    assert not jr.journal_wanted(origin="smtp", recipients=[], **want)
    # another site's journal copy for the same journal recipient: not again; for anyone else it is mail
    copy = msg(f"{jr.JOURNAL_HEADER}: 1234; site=SiteB")
    assert not jr.journal_wanted(origin="smtp", recipients=["Journal@SiteA.example"], message=copy,
                                 journal_address="journal@sitea.example")
    assert jr.journal_wanted(origin="smtp", recipients=["Journal@SiteA.example", "bob@partner.test"],
                             message=copy, journal_address="journal@sitea.example")
    assert jr.journal_wanted(origin="smtp", recipients=["journal@sitea.example"], message=m,
                             journal_address="journal@sitea.example")


def test_the_journal_copy_wraps_the_original_with_its_envelope():
    original = msg("Subject: Quarterly =?utf-8?q?figures?=", "Message-ID: <m1@sitea.example>",
                   body="caf\u00e9 --=_journal_ looks like a boundary")
    record = jr.JournalEnvelope(queue_id="Q1", sender="jo@sitea.example",
                                recipients=(("bob@partner.test", "Bob.Smith@Partner.test"), ("carol@partner.test", None)),
                                site="SiteA", hostname="ServerA.sitea.example",
                                received="Sun, 06 Dec 2026 13:00:00 +0000", client="127.0.0.1", helo="client.test")
    raw = jr.build_journal_copy(original, record, journal_address="journal@sitea.example",
                                from_address="postmaster@sitea.example", date="Sun, 06 Dec 2026 13:00:01 +0000")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["To"].addresses[0].addr_spec == "journal@sitea.example"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["Subject"] == "Journal: Quarterly figures"
    assert parsed[jr.JOURNAL_HEADER].startswith("Q1; site=SiteA")
    assert b"\r\nX-IMS-Journal-Sender: <jo@sitea.example>\r\n" in raw
    assert b"\r\nX-IMS-Journal-Recipients: <bob@partner.test>,\r\n <carol@partner.test>\r\n" in raw
    text, inner = parsed.get_payload()
    assert "Message-ID: <m1@sitea.example>" in text.get_content()
    assert "bob@partner.test (given as Bob.Smith@Partner.test)" in text.get_content()
    assert inner.get_content_type() == "message/rfc822"
    assert original in raw  # byte for byte
    assert raw.endswith(b"--\r\n")
