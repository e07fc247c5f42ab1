"""RFC 3461's DSN parameters, pure: xtext, NOTIFY/RET/ENVID/ORCPT parsing, splitting
them off a MAIL/RCPT argument, what the queue decides from them, and the reports'
fields (Original-Envelope-Id, Original-Recipient, "relayed")."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imsrelay.ingress.adapter import without_dsn_params
from imsrelay.model.dsn_params import (
    MAIL_PARAMS,
    RCPT_PARAMS,
    DsnSyntaxError,
    MailDsn,
    RcptDsn,
    mail_dsn,
    notify_wants,
    orcpt_param,
    parse_envid,
    parse_notify,
    parse_orcpt,
    rcpt_dsn,
    split_params,
    xtext_decode,
    xtext_encode,
)
from imsrelay.model.envelope import Envelope, RecipientState
from imsrelay.model.outcome import Outcome
from imsrelay.queue import dsn
from imsrelay.queue.rules import RetryPolicy, after_attempt
from imsrelay.transport.smtp import dsn_mail_params, dsn_rcpt_params

REPORTER = dsn.ReportingSite("ExchangeORG", "SiteA", "ServerA", "servera.microsoft.com")
T = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@given(st.text(st.characters(blacklist_categories=("Cs",))))
def test_xtext_round_trips_and_is_printable_ascii(text):
    encoded = xtext_encode(text)
    assert all("!" <= c <= "~" for c in encoded) and "=" not in encoded
    assert xtext_decode(encoded) == text  # non-ASCII: its UTF-8 bytes, one +XX each


def test_xtext_examples():
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_decode("a+2bb+3D") == "a+b="  # hexchar: ABNF is case-insensitive
    assert xtext_encode("é") == "+C3+A9" and xtext_decode("+C3+A9") == "é"
    for bad in ("a b", "a=b", "a+2", "a+zz", "é"):
        with pytest.raises(DsnSyntaxError):
            xtext_decode(bad)


def test_notify_values():
    assert parse_notify("never") == "NEVER"
    assert parse_notify("delay,Success") == "SUCCESS,DELAY"  # the stored order
    assert parse_notify("FAILURE,FAILURE") == "FAILURE"
    for bad in ("", "NEVER,DELAY", "SOMETIMES", "SUCCESS,", "SUCCESS;FAILURE"):
        with pytest.raises(DsnSyntaxError):
            parse_notify(bad)


def test_envid_and_orcpt():
    assert parse_envid("QQ+2B1") == "QQ+1"
    for bad in ("", "x" * 101, "a+0Ab", "a=b"):
        with pytest.raises(DsnSyntaxError):
            parse_envid(bad)
    assert parse_orcpt("RFC822;Bob+2Bx@Example.net") == "rfc822;Bob+x@Example.net"  # the address's case kept
    assert parse_orcpt("x-local;anything+20here") == "x-local;anything here"
    assert orcpt_param("rfc822;Bob+x@Example.net") == "rfc822;Bob+2Bx@Example.net"
    for bad in ("bob@example.net", ";bob@x", "rfc822;", "rfc 822;bob@x", "rfc822;a=b", "rfc822;" + "a" * 500,
                "rfc822;a+0Db", "rfc822;a+FFb"):
        with pytest.raises(DsnSyntaxError):
            parse_orcpt(bad)


def test_parameters_are_split_off_with_their_case_kept():
    rest, found = split_params("SIZE=10 ret=hdrs BODY=8BITMIME EnvId=Ab+2Bc", MAIL_PARAMS)
    assert rest == ["SIZE=10", "BODY=8BITMIME"] and found == {"RET": "hdrs", "ENVID": "Ab+2Bc"}
    assert mail_dsn(found) == MailDsn("HDRS", "Ab+c")
    assert rcpt_dsn(split_params("NOTIFY=SUCCESS ORCPT=rfc822;a@b", RCPT_PARAMS)[1]) == \
        RcptDsn("SUCCESS", "rfc822;a@b")
    for bad in ("RET=FULL RET=FULL", "RET", "ENVID="):
        with pytest.raises(DsnSyntaxError):
            split_params(bad, MAIL_PARAMS)


def test_the_adapter_takes_dsn_parameters_off_the_command_and_leaves_the_rest_to_aiosmtpd():
    assert without_dsn_params("FROM:<a@b.c> SIZE=5 ENVID=Xy RET=FULL", "FROM:", MAIL_PARAMS) == (
        "FROM:<a@b.c> SIZE=5", {"ENVID": "Xy", "RET": "FULL"})
    assert without_dsn_params('to: <"x y"@b.c> NOTIFY=NEVER', "TO:", RCPT_PARAMS) == ('TO:<"x y"@b.c>',
                                                                                     {"NOTIFY": "NEVER"})
    assert without_dsn_params("FROM:<a@b.c> SIZE=5", "FROM:", MAIL_PARAMS) is None  # none: aiosmtpd's as before
    assert without_dsn_params("FROM:<> RET=HDRS", "FROM:", MAIL_PARAMS) == ("FROM:<>", {"RET": "HDRS"})
    assert without_dsn_params("TO <a@b.c> NOTIFY=NEVER", "TO:", RCPT_PARAMS) is None  # its syntax error


def test_what_notify_asks_for():
    assert notify_wants(None, "FAILURE") and notify_wants(None, "DELAY") and not notify_wants(None, "SUCCESS")
    assert not any(notify_wants("NEVER", k) for k in ("SUCCESS", "FAILURE", "DELAY"))
    assert dsn.report_wanted("SUCCESS", "delivered") and dsn.report_wanted("SUCCESS", "relayed")
    assert not dsn.report_wanted("SUCCESS", "failed") and not dsn.report_wanted("FAILURE", "delayed")
    assert dsn.success_action(final=True, passed_on=False) == "delivered"
    assert dsn.success_action(final=False, passed_on=False) == "relayed"
    assert dsn.success_action(final=False, passed_on=True) is None
    assert dsn.returns_full_message("FULL", "failed")
    assert not dsn.returns_full_message("FULL", "delivered") and not dsn.returns_full_message(None, "failed")
    assert not dsn.returns_full_message("HDRS", "failed")


def test_delay_notices_follow_may_warn():
    policy = RetryPolicy((10.0,), 3600.0, delay_notice=60.0)
    r = RecipientState("bob@example.net")
    later = Outcome.temporary("4.2.1", "try later")
    assert after_attempt(r, later, now=100.0, received_at=0.0, policy=policy, may_report=True).delay_notice
    assert not after_attempt(r, later, now=100.0, received_at=0.0, policy=policy, may_report=True,
                             may_warn=False).delay_notice
    assert after_attempt(r, later, now=100.0, received_at=0.0, policy=policy, may_report=False,
                         may_warn=True).delay_notice
    failed = after_attempt(r, Outcome.permanent_failure("5.1.1", "unknown"), now=1.0, received_at=0.0,
                           policy=policy, may_report=False, may_warn=True)
    assert failed.suppressed and not failed.ndr


def test_the_transport_s_parameters():
    env = Envelope("Q1", "a@b.c", [], 0.0, ret="FULL", envid="x y+z")
    assert dsn_mail_params(env) == ["RET=FULL", "ENVID=x+20y+2Bz"]
    assert dsn_mail_params(Envelope("Q2", "a@b.c", [], 0.0)) == []
    assert dsn_rcpt_params(RecipientState("b@c.d", "b@c.d", notify="NEVER", orcpt="rfc822;B@c.d")) == [
        "NOTIFY=NEVER", "ORCPT=rfc822;B@c.d"]
    assert dsn_rcpt_params(RecipientState("b@c.d", "b@c.d")) == ["ORCPT=rfc822;b@c.d"]
    assert dsn_rcpt_params(RecipientState("b@c.d", "bé@c.d")) == []  # not an rfc822 address in xtext


def test_envelopes_keep_the_parameters_through_json():
    env = Envelope("Q1", "a@b.c", [RecipientState("b@c.d", "b@c.d", notify="SUCCESS,FAILURE",
                                                  orcpt="rfc822;B@c.d")], 1.0, ret="HDRS", envid="E+1")
    back = Envelope.from_json(env.to_json())
    assert back == env
    old = env.to_json().replace(b',"envid":"E+1"', b"").replace(b',"notify":"SUCCESS,FAILURE"', b"")
    assert Envelope.from_json(old).envid is None  # a journal written before DSN existed still loads


def test_reports_carry_envid_orcpt_and_relayed():
    original = b"From: a@b.c\r\nSubject: hi\r\n\r\nbody\r\n"
    raw = dsn.build_report(
        original=original, envelope_sender="a@b.c", reporter=REPORTER, queue_id="Q1", arrival_date=T, now=T,
        postmaster="postmaster@microsoft.com", envid="ENV 1",
        recipients=[dsn.RecipientStatus("x@y.z", "rfc822;X@y.z", "relayed", "2.0.0", "smtp; 250 2.0.0 Ok",
                                        remote_mta="mx.y.z [192.0.2.1]:25")])
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert report["Subject"] == "Relayed: hi"
    status = report.get_payload()[1].get_payload()
    assert str(status[0]["Original-Envelope-Id"]) == "ENV 1"
    assert str(status[1]["Original-Recipient"]) == "rfc822;X@y.z" and status[1]["Action"] == "relayed"
    assert "passed on" in report.get_payload()[0].get_content()
    without = email.message_from_bytes(dsn.build_report(
        original=original, envelope_sender="a@b.c", reporter=REPORTER, queue_id="Q1", arrival_date=T, now=T,
        postmaster="postmaster@microsoft.com",
        recipients=[dsn.RecipientStatus("x@y.z", None, "delivered", "2.0.0", "")]), policy=email.policy.default)
    assert "Original-Envelope-Id" not in str(without.get_payload()[1])
    assert without["Subject"] == "Delivered: hi"


@given(st.text(max_size=80), st.sampled_from(["FROM:", "TO:"]))
def test_splitting_any_argument_either_works_or_is_a_dsn_syntax_error(rest, keyword):
    names = MAIL_PARAMS if keyword == "FROM:" else RCPT_PARAMS
    for arg in (keyword + rest, f"{keyword}<a@b.c> {rest}", f"{keyword}<a@b.c> NOTIFY={rest} RET={rest}"):
        try:
            split = without_dsn_params(arg, keyword, names)
        except DsnSyntaxError:
            continue
        if split is not None:
            assert split[0].upper().startswith(keyword) and set(split[1]) <= set(names)


def test_postmaster_without_a_domain_keeps_its_parameters():
    assert without_dsn_params("TO:<postmaster> NOTIFY=NEVER", "TO:", RCPT_PARAMS) == (
        "TO:<postmaster>", {"NOTIFY": "NEVER"})
