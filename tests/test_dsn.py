"""imsrelay.queue.dsn: RFC 3464 reports read back by the stdlib parser, and loop safety."""

from __future__ import annotations

import email
import email.policy
import email.utils
from datetime import UTC, datetime, timedelta
from email.message import Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imsrelay.queue.dsn import (
    EXPIRED_TEXT,
    RecipientStatus,
    ReportingSite,
    build_report,
    may_send_report,
)

SITE = ReportingSite("ExchangeORG", "SiteA", "ServerA", "ServerA.SiteA.microsoft.com")
ARRIVED = datetime(2024, 3, 11, 8, 21, tzinfo=UTC)
NOW = ARRIVED + timedelta(minutes=1)

ORIGINAL = (
    b"Received: from client.test ([192.0.2.5]) by ServerA.SiteA.microsoft.com\r\n"
    b"From: Ed Dekort <ed@SiteA.microsoft.com>\r\n"
    b"To: my.user@company.test\r\n"
    b"Subject: Test Message\r\n"
    b"Message-ID: <original-1@SiteA.microsoft.com>\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b"From here on, a line that an mbox writer would mangle.\r\n"
)


def unknown_user(address: str = "my.user@company.test") -> RecipientStatus:
    return RecipientStatus(
        final_recipient=address,
        original_recipient=f"rfc822;{address}",
        action="failed",
        status="5.1.1",
        diagnostic="smtp; 550 5.1.1 <my.user@company.test>: User unknown",
        remote_mta="mx.company.test",
        last_attempt=NOW,
    )


def report(recipients: list[RecipientStatus] | None = None, **overrides: object) -> bytes:
    arguments: dict[str, object] = dict(
        original=ORIGINAL,
        envelope_sender="ed@SiteA.microsoft.com",
        recipients=recipients or [unknown_user()],
        reporter=SITE,
        queue_id="Q0001",
        arrival_date=ARRIVED,
        now=NOW,
        postmaster="postmaster@SiteA.microsoft.com",
    )
    arguments.update(overrides)
    return build_report(**arguments)  # type: ignore[arg-type]


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.default)


def parts(data: bytes) -> tuple[Message, Message, Message, Message]:
    message = parse(data)
    human, status, returned = message.get_payload()  # type: ignore[misc]
    return message, human, status, returned


def test_ndr_headers_and_structure() -> None:
    data = report()
    message, human, status, returned = parts(data)
    assert message["From"] == "Postmaster <postmaster@SiteA.microsoft.com>"
    assert message["To"] == "ed@SiteA.microsoft.com"
    assert message["Subject"] == "Undeliverable: Test Message"
    assert message["Auto-Submitted"] == "auto-replied"
    assert email.utils.parsedate_to_datetime(message["Date"]) == NOW
    assert message["Message-ID"].endswith("@ServerA.SiteA.microsoft.com>")
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [human.get_content_type(), status.get_content_type(), returned.get_content_type()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_wire_format_is_crlf_and_7bit_for_an_ascii_original() -> None:
    data = report()
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert data.isascii()
    assert b"Content-Transfer-Encoding: 8bit" not in data
    assert b"\r\n>From here" not in data


def test_human_text_in_ims_style() -> None:
    _, human, _, _ = parts(report())
    text = human.get_content()
    assert "Your message did not reach some or all of the intended recipients." in text
    assert "Subject:  Test Message" in text
    assert "The following recipient(s) could not be reached:" in text
    assert "The recipient name is not recognized" in text
    assert "MSEXCH:IMC:ExchangeORG:SiteA:ServerA 3553 553 5.1.1 unknown or illegal user" in text
    assert "mx.company.test said: 550 5.1.1 <my.user@company.test>: User unknown" in text


def test_delivery_status_fields_read_back() -> None:
    _, _, status, _ = parts(report())
    per_message, per_recipient = status.get_payload()  # type: ignore[misc]
    assert per_message["Reporting-MTA"] == "dns; ServerA.SiteA.microsoft.com"
    assert per_message["X-IMS-Queue-ID"] == "Q0001"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVED
    assert per_recipient["Final-Recipient"] == "rfc822; my.user@company.test"
    assert per_recipient["Original-Recipient"] == "rfc822;my.user@company.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.company.test"
    assert per_recipient["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <my.user@company.test>: User unknown"
    )
    assert email.utils.parsedate_to_datetime(per_recipient["Last-Attempt-Date"]) == NOW
    assert per_recipient["Will-Retry-Until"] is None


def test_original_headers_are_returned_byte_for_byte() -> None:
    data = report()
    headers_only = ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    assert headers_only in data
    assert b"Hello." not in data  # the body stays out by default
    _, _, _, returned = parts(data)
    assert "Message-ID: <original-1@SiteA.microsoft.com>" in returned.get_content()


def test_full_message_as_message_rfc822() -> None:
    data = report(include_full_message=True)
    assert ORIGINAL in data
    _, _, _, returned = parts(data)
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload(0)
    assert inner["Subject"] == "Test Message"
    assert inner.get_content().startswith("Hello.")


def test_huge_original_returns_only_truncated_headers() -> None:
    many = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"y" * 60) for i in range(2000))
    original = many + b"Subject: big\r\n\r\n" + b"z" * 1_000_000 + b"\r\n"
    data = report(original=original, include_full_message=True, max_original_bytes=10_000)
    assert len(data) < 20_000
    _, _, _, returned = parts(data)
    assert returned.get_content_type() == "text/rfc822-headers"
    lines = returned.get_content().splitlines()
    assert lines[0].startswith("X-Filler-00000: ")
    assert all(len(line) == len("X-Filler-00000: ") + 60 for line in lines)  # whole lines only
    assert parse(data)["Subject"] == "Undeliverable: big"


def test_delay_notice() -> None:
    until = ARRIVED + timedelta(days=2)
    delayed = RecipientStatus(
        final_recipient="user@slow.test",
        original_recipient=None,
        action="delayed",
        status="4.4.1",
        diagnostic="connection refused by mx.slow.test",
        last_attempt=NOW,
        will_retry_until=until,
    )
    message, human, status, _ = parts(report([delayed]))
    assert message["Subject"] == "Delivery delayed: Test Message"
    text = human.get_content()
    assert "has not yet reached" in text
    assert "MSEXCH:IMC:ExchangeORG:SiteA:ServerA 4.4.1 connection refused by mx.slow.test" in text
    assert "you do not need to send the message again" in " ".join(text.split())
    block = status.get_payload()[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert block["Original-Recipient"] is None
    assert block["Diagnostic-Code"] == "X-IMS; connection refused by mx.slow.test"
    assert email.utils.parsedate_to_datetime(block["Will-Retry-Until"]) == until


def test_time_out_text_and_several_recipients() -> None:
    expired = RecipientStatus(
        final_recipient="late@slow.test",
        original_recipient=None,
        action="failed",
        status="4.4.7",
        diagnostic=f"{EXPIRED_TEXT} (last error: 421 try later)",
    )
    _, human, status, _ = parts(report([unknown_user(), expired]))
    text = human.get_content()
    assert EXPIRED_TEXT in text
    assert text.index("my.user@company.test") < text.index("late@slow.test")
    blocks = status.get_payload()
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; my.user@company.test",
        "rfc822; late@slow.test",
    ]
    assert blocks[2]["Status"] == "4.4.7"


def test_eight_bit_original_is_kept_and_labelled() -> None:
    original = (
        "From: Jörg <joerg@SiteA.microsoft.com>\r\nSubject: Grüße aus Köln\r\n\r\nSchöne Grüße\r\n"
    ).encode()
    original += b"Latin-1 junk: \xe9\xff\r\n"
    data = report(original=original, include_full_message=True)
    assert original in data
    message, human, status, returned = parts(data)
    assert message["Subject"] == "Undeliverable: Grüße aus Köln"
    assert message["Content-Transfer-Encoding"] == "8bit"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert "Grüße aus Köln" in human.get_content()
    assert status.get_payload()[1]["Status"] == "5.1.1"
    # the headers of the report itself stay 7-bit (RFC 2047) for any peer
    assert data.split(b"\r\n\r\n", 1)[0].isascii()


def test_rfc2047_subject_and_lf_only_original() -> None:
    original = b"Subject: =?utf-8?q?caf=C3=A9?=\nFrom: a@b.test\n\nbody\n"
    data = report(original=original)
    assert parse(data)["Subject"] == "Undeliverable: café"
    assert b"Subject: =?utf-8?q?caf=C3=A9?=\r\nFrom: a@b.test\r\n" in data


def test_no_subject_and_no_headers() -> None:
    assert parse(report(original=b"\r\njust a body\r\n"))["Subject"] == (
        "Undeliverable: (no subject)"
    )


def test_diagnostic_cannot_inject_lines() -> None:
    evil = RecipientStatus(
        final_recipient="x@y.test",
        original_recipient=None,
        action="failed",
        status="5.0.0",
        diagnostic="smtp; 550 no\r\nX-Injected: yes\r\n\r\nmore",
    )
    _, _, status, _ = parts(report([evil]))
    block = status.get_payload()[1]
    assert block["X-Injected"] is None
    assert block["Diagnostic-Code"] == "smtp; 550 no X-Injected: yes more"


def test_non_ascii_sender_uses_utf8_headers() -> None:
    data = report(envelope_sender="jörg@SiteA.microsoft.com")
    assert parse(data)["To"] == "jörg@SiteA.microsoft.com"


def test_success_report() -> None:
    delivered = RecipientStatus("a@b.test", None, "delivered", "2.0.0", "smtp; 250 ok")
    message, human, status, _ = parts(report([delivered]))
    assert message["Subject"] == "Delivered: Test Message"
    assert status.get_payload()[1]["Action"] == "delivered"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"envelope_sender": "<>"}, "null sender"),
        ({"envelope_sender": ""}, "null sender"),
        ({"recipients": []}, "at least one recipient"),
    ],
)
def test_refuses_impossible_reports(changes: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = dict(
        original=ORIGINAL,
        envelope_sender="a@b.test",
        recipients=[unknown_user()],
        reporter=SITE,
        queue_id="Q",
        arrival_date=ARRIVED,
        now=NOW,
        postmaster="postmaster@b.test",
    )
    arguments.update(changes)
    with pytest.raises(ValueError, match=message):
        build_report(**arguments)  # type: ignore[arg-type]


def test_refuses_bad_action_or_status() -> None:
    with pytest.raises(ValueError, match="action"):
        report([RecipientStatus("a@b.test", None, "bounced", "5.0.0", "")])
    with pytest.raises(ValueError, match="status"):
        report([RecipientStatus("a@b.test", None, "failed", "550", "")])


def test_naive_datetimes_are_utc() -> None:
    naive = datetime(2024, 3, 11, 8, 22)
    message = parse(report(now=naive, arrival_date=naive))
    assert email.utils.parsedate_to_datetime(message["Date"]) == naive.replace(tzinfo=UTC)


@settings(max_examples=60, deadline=None)
@given(
    original=st.binary(max_size=3000),
    diagnostic=st.text(max_size=200),
    full=st.booleans(),
)
def test_any_original_gives_a_parseable_report(
    original: bytes, diagnostic: str, full: bool
) -> None:
    recipient = RecipientStatus("u@v.test", None, "failed", "5.0.0", diagnostic)
    data = report([recipient], original=original, include_full_message=full)
    message = parse(data)
    assert message.get_content_type() == "multipart/report"
    status = message.get_payload()[1]
    assert status.get_payload()[1]["Final-Recipient"] == "rfc822; u@v.test"
    assert status.get_payload()[1]["Status"] == "5.0.0"


# ---------------------------------------------------------------- may_send_report


def test_no_report_to_the_null_sender() -> None:
    assert not may_send_report("", ORIGINAL)
    assert not may_send_report("<>", ORIGINAL)
    assert not may_send_report(" <> ", ORIGINAL)
    assert may_send_report("ed@SiteA.microsoft.com", ORIGINAL)


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        (b"Auto-Submitted: no\r\n", True),
        (b"Auto-Submitted: No ; comment\r\n", True),
        (b"Auto-Submitted: auto-replied\r\n", False),
        (b"Auto-Submitted: auto-generated\r\n", False),
        (b"Auto-Submitted: auto-notified; owner-email=x@y\r\n", False),
        (b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n", False),
        (b'Content-Type: Multipart/Report; report-type="Disposition-Notification"\r\n', False),
        (b"Content-Type: multipart/report; report-type=feedback-report\r\n", True),
        (b"Content-Type: multipart/mixed; boundary=x\r\n", True),
    ],
)
def test_no_report_about_automatic_messages(header: bytes, allowed: bool) -> None:
    original = header + ORIGINAL
    assert may_send_report("someone@else.test", original) is allowed
    parsed = email.message_from_bytes(original, policy=email.policy.default)
    assert may_send_report("someone@else.test", parsed) is allowed


def test_a_report_we_built_never_gets_a_report() -> None:
    assert not may_send_report("ed@SiteA.microsoft.com", report())
