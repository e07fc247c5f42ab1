"""One real site on loopback, spoken to with smtplib, aiosmtplib and swaks."""

import asyncio
import shutil
import smtplib
import socket
import subprocess

import aiosmtplib
import pytest
from sitekit import maildir_messages, make_config, running_site, send_mail, site_mapping, wait_for

from imsrelay.queue.spool import Spool

HOST = "127.0.0.1"


def cfg(tmp_path, **extra):
    return make_config(tmp_path, site_mapping("SiteA", listen=HOST, **extra))


def smtp(site, source=None):
    return smtplib.SMTP(HOST, site.bound_port, timeout=10, source_address=(source, 0) if source else None)


async def in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


def send(site, sender, rcpts, body, source=None):
    return send_mail(HOST, site.bound_port, sender, rcpts, body, source=source)


MSG = b"From: user1@SiteA.microsoft.com\r\nTo: user1@SiteA.microsoft.com\r\nSubject: t\r\n\r\nhello \xe9 8-bit\r\n"


async def test_delivery_by_primary_and_secondary_address(tmp_path):
    mailboxes = [{"alias": "User1", "display_name": "User One", "addresses": ["smtp:u1@alias.example"]}]
    config = cfg(tmp_path, mailboxes=mailboxes, smtp={"accepted_domains": ["alias.example"]})
    async with running_site(config) as site:
        await in_thread(send, site, "x@example.org", ["User1@SiteA.microsoft.com"], MSG)
        await in_thread(send, site, "x@example.org", ["U1@Alias.Example"], MSG)
        msgs = await wait_for(lambda: len(maildir_messages(config.data_dir, "User1")) == 2 and
                              maildir_messages(config.data_dir, "User1"))
    for m in msgs:
        assert m.startswith(b"Return-Path: <x@example.org>\r\nDelivered-To: ")
        assert b"Received: from " in m and b"by ServerA.SiteA.microsoft.com (imsrelay)" in m
        assert m.endswith(b"\r\n\r\nhello \xe9 8-bit\r\n")  # body bytes untouched
    assert {m.split(b"\r\n")[1] for m in msgs} == {b"Delivered-To: User1@SiteA.microsoft.com",
                                                  b"Delivered-To: U1@Alias.Example"}


async def test_aiosmtplib_and_ehlo_extensions(tmp_path):
    config = cfg(tmp_path)
    async with running_site(config) as site:
        client = aiosmtplib.SMTP(hostname=HOST, port=site.bound_port, start_tls=False)
        await client.connect()
        code, _ = await client.ehlo()
        assert code == 250
        for ext in ("size", "8bitmime", "smtputf8", "enhancedstatuscodes", "pipelining"):
            assert client.supports_extension(ext), ext
        assert client.esmtp_extensions["size"] == str(config.smtp.max_message_size)
        errors, reply = await client.sendmail("x@example.org", ["user1@sitea.microsoft.com"], MSG)
        assert errors == {} and reply.startswith("2.0.0 Ok: queued as ")
        await client.quit()
        await wait_for(lambda: maildir_messages(config.data_dir, "User1"))


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (apt-get install swaks)")
async def test_swaks_as_in_the_readme(tmp_path):
    config = cfg(tmp_path)
    async with running_site(config) as site:
        r = await asyncio.to_thread(subprocess.run, [
            "swaks", "--server", f"{HOST}:{site.bound_port}", "-f", "user1@SiteA.microsoft.com",
            "-t", "user1@SiteA.microsoft.com", "--timeout", "10"], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "<-  250 2.0.0 Ok: queued as" in r.stdout
        msgs = await wait_for(lambda: maildir_messages(config.data_dir, "User1"))
    assert b"X-Mailer: swaks" in msgs[0]


async def test_rewriting_off_then_on(tmp_path):
    config = cfg(tmp_path)
    async with running_site(config) as site:
        await in_thread(send, site, "user1@SiteA.microsoft.com", ["Administrator@SiteA.microsoft.com"], MSG)
        first = await wait_for(lambda: maildir_messages(config.data_dir, "Administrator"))
        assert first[0].startswith(b"Return-Path: <user1@SiteA.microsoft.com>")
        assert b"From: user1@SiteA.microsoft.com\r\n" in first[0]
        # KB Q196927 "Setting up a single e-mail domain": Site Addressing -> @microsoft.com
        await site.directory.run(site.directory.set_site_addressing, "@microsoft.com", update_mailboxes=True)
        await site.refresh()
        msg = MSG.replace(b"To:", b"Sender: postmaster@SiteA.microsoft.com\r\nTo:")
        await in_thread(send, site, "user1@SiteA.microsoft.com", ["Administrator@microsoft.com"], msg)
        both = await wait_for(lambda: len(maildir_messages(config.data_dir, "Administrator")) == 2 and
                              maildir_messages(config.data_dir, "Administrator"))
    second = both[1]
    assert second.startswith(b"Return-Path: <User1@microsoft.com>")
    assert b"From: User1@microsoft.com\r\n" in second
    assert b"Sender: postmaster@microsoft.com\r\n" in second
    assert b"To: user1@SiteA.microsoft.com\r\n" in second


def reply_to(s, cmd):
    code, text = s.docmd(cmd)
    return code, text.decode()


async def test_rejection_codes(tmp_path):
    config = cfg(tmp_path, smtp={"relay_networks": ["127.0.0.2/32"], "max_recipients": 2,
                                 "max_message_size": 4096, "max_hops": 3})
    async with running_site(config) as site:
        def check():
            with smtp(site) as s:
                s.ehlo("client.example")
                assert reply_to(s, "MAIL FROM:<x@example.org> SIZE=5000")[0] == 552
                assert reply_to(s, "MAIL FROM:<x@example.org> SIZE=5000")[1].startswith("5.3.4")
                assert reply_to(s, "MAIL FROM:<x@example.org>")[0] == 250
                code, text = reply_to(s, "RCPT TO:<someone@example.org>")
                assert (code, text[:5]) == (554, "5.7.1")
                code, text = reply_to(s, "RCPT TO:<nobody@SiteA.microsoft.com>")
                assert (code, text[:5]) == (550, "5.1.1")
                assert reply_to(s, "RCPT TO:<User1@SiteA.microsoft.com>")[0] == 250
                assert reply_to(s, "RCPT TO:<Administrator@SiteA.microsoft.com>")[0] == 250
                code, text = reply_to(s, "RCPT TO:<postmaster@SiteA.microsoft.com>")
                assert (code, text[:5]) == (452, "4.5.3")
                code, text = reply_to(s, "RCPT TO:<bad address>")
                assert code == 553
            with smtp(site, source="127.0.0.2") as s:  # inside relay_networks
                s.ehlo("client.example")
                s.mail("x@example.org")
                assert s.rcpt("someone@example.org")[0] == 250
            # actual DATA over the limit (no SIZE= given)
            with smtp(site) as s:
                s.helo("client.example")  # plain SMTP: no SIZE= declared
                with pytest.raises(smtplib.SMTPDataError) as err:
                    s.sendmail("x@example.org", ["User1@SiteA.microsoft.com"], (b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n") * 80)
                assert err.value.smtp_code == 552 and err.value.smtp_error.startswith(b"5.3.4")
            # too many Received: lines
            with smtp(site) as s:
                looped = b"Received: from a\r\n" * 4 + b"Subject: loop\r\n\r\nx\r\n"
                with pytest.raises(smtplib.SMTPDataError) as err:
                    s.sendmail("x@example.org", ["User1@SiteA.microsoft.com"], looped)
                assert err.value.smtp_code == 554 and err.value.smtp_error.startswith(b"5.4.6")
        await in_thread(check)
    assert maildir_messages(config.data_dir, "User1") == []


async def test_message_that_comes_back_is_refused(tmp_path):
    config = cfg(tmp_path)
    async with running_site(config) as site:
        def check():
            mine = (b"Received: from x ([127.0.0.1])\r\n\tby ServerA.SiteA.microsoft.com (imsrelay) with ESMTP id 1;"
                    b" Tue, 24 Nov 2026 10:00:00 +0000\r\nSubject: back\r\n\r\nx\r\n")
            with smtp(site) as s, pytest.raises(smtplib.SMTPDataError) as err:
                s.sendmail("x@example.org", ["User1@SiteA.microsoft.com"], mine)
            assert err.value.smtp_code == 554 and b"5.4.6" in err.value.smtp_error
        await in_thread(check)


async def test_internal_error_answers_451_and_nothing_is_lost(tmp_path):
    config = cfg(tmp_path)
    async with running_site(config) as site:
        await in_thread(send, site, "x@example.org", ["User1@SiteA.microsoft.com"], MSG)
        await wait_for(lambda: maildir_messages(config.data_dir, "User1") and not site.qmgr.envelopes)
        await asyncio.sleep(0.1)  # the finished message's DONE record is written
        # a real I/O error: the journal's segment becomes unwritable under the writer
        import os
        journal = site.spool.journal
        os.close(journal._fd)
        journal._fd = os.open(os.devnull, os.O_RDONLY)  # write() now fails with EBADF

        def check():
            with smtp(site) as s, pytest.raises(smtplib.SMTPDataError) as err:
                s.sendmail("x@example.org", ["User1@SiteA.microsoft.com"], MSG)
            assert err.value.smtp_code == 451 and err.value.smtp_error.startswith(b"4.3.0")
        await in_thread(check)
        # the journal moves on to a fresh segment: the client's retry is accepted
        await in_thread(send, site, "x@example.org", ["User1@SiteA.microsoft.com"], MSG)
        await wait_for(lambda: len(maildir_messages(config.data_dir, "User1")) == 2)


async def test_idle_time_counts_from_the_last_command(tmp_path):
    # One idle timer per session, re-armed lazily: a command pushes the deadline back,
    # so the session closes idle_timeout after the NOOP, not after the greeting.
    config = cfg(tmp_path, smtp={"idle_timeout": 1.0, "session_timeout": 60.0})
    async with running_site(config) as site:
        def idle_after_noop():
            import time
            with socket.create_connection((HOST, site.bound_port), timeout=10) as sock:
                f = sock.makefile("rb")
                assert f.readline().startswith(b"220 ")
                time.sleep(0.7)
                noop_sent = time.monotonic()
                sock.sendall(b"NOOP\r\n")
                assert f.readline().startswith(b"250 ")
                assert f.readline() == b""  # closed by the server after idling
                return time.monotonic() - noop_sent
        assert await in_thread(idle_after_noop) >= 0.95


async def test_session_limits(tmp_path):
    # Generous margins: the NOOPs below come every 0.3 s, far inside the idle time-out
    # even on a loaded machine, and the session limit ends them after ~4 s.
    config = cfg(tmp_path, smtp={"idle_timeout": 2.0, "session_timeout": 4.0, "max_errors": 3})
    async with running_site(config) as site:
        def idle():
            with socket.create_connection((HOST, site.bound_port), timeout=5) as sock:
                f = sock.makefile("rb")
                assert f.readline().startswith(b"220 ")
                assert f.readline() == b""  # closed by the server after idling
        await in_thread(idle)

        def long_session():
            with socket.create_connection((HOST, site.bound_port), timeout=5) as sock:
                f = sock.makefile("rb")
                f.readline()
                lines = []
                for _ in range(40):
                    sock.sendall(b"NOOP\r\n")
                    line = f.readline()
                    lines.append(line)
                    if not line or line.startswith(b"421"):
                        break
                    import time
                    time.sleep(0.3)
                assert any(x.startswith(b"421 4.4.2") for x in lines), lines
        await in_thread(long_session)

        def errors():
            with socket.create_connection((HOST, site.bound_port), timeout=5) as sock:
                f = sock.makefile("rb")
                f.readline()
                sock.sendall(b"EHLO x\r\n")
                while not f.readline().startswith(b"250 "):
                    pass
                replies = []
                for _ in range(3):
                    sock.sendall(b"RCPT TO:<a@b.example>\r\n")
                    replies.append(f.readline())
                replies.append(f.readline())
                assert replies[-1].startswith(b"421 4.7.0"), replies
                assert f.readline() == b""
        await in_thread(errors)


async def test_client_disconnect_mid_data(tmp_path):
    config = cfg(tmp_path)
    async with running_site(config) as site:
        def vanish():
            with socket.create_connection((HOST, site.bound_port), timeout=5) as sock:
                f = sock.makefile("rb")
                f.readline()
                for cmd in (b"HELO x", b"MAIL FROM:<x@example.org>", b"RCPT TO:<User1@SiteA.microsoft.com>", b"DATA"):
                    sock.sendall(cmd + b"\r\n")
                    f.readline()
                sock.sendall(b"Subject: half\r\n\r\nsome of the bo")
        await in_thread(vanish)
        await asyncio.sleep(0.2)
        await in_thread(send, site, "x@example.org", ["User1@SiteA.microsoft.com"], MSG)
        msgs = await wait_for(lambda: maildir_messages(config.data_dir, "User1"))
        # the Maildir file comes before the queue's completion record: wait for both
        await wait_for(lambda: not site.qmgr.envelopes)
    assert len(msgs) == 1 and b"half" not in msgs[0]
    assert Spool(config.data_dir).queue_ids() == []


async def test_starttls_when_a_certificate_is_configured(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=ServerA.SiteA.microsoft.com", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    config = cfg(tmp_path, smtp={"tls_cert": "cert.pem", "tls_key": "key.pem"})
    async with running_site(config) as site:
        def check():
            import ssl
            with smtp(site) as s:
                s.ehlo()
                assert s.has_extn("starttls")
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                s.starttls(context=ctx)
                s.ehlo()
                assert not s.has_extn("starttls")
                s.sendmail("x@example.org", ["User1@SiteA.microsoft.com"], MSG)
        await in_thread(check)
        msgs = await wait_for(lambda: maildir_messages(config.data_dir, "User1"))
    assert b"with ESMTPS id" in msgs[0]


async def test_smtputf8_address_and_bytes(tmp_path):
    config = cfg(tmp_path)
    async with running_site(config) as site:
        def check():
            with smtp(site) as s:
                s.ehlo()
                body = "From: jürgen@example.org\r\nSubject: grüße\r\n\r\nhallo\r\n".encode()
                s.sendmail("jürgen@example.org", ["User1@SiteA.microsoft.com"], body,
                           mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        await in_thread(check)
        msgs = await wait_for(lambda: maildir_messages(config.data_dir, "User1"))
    assert "Return-Path: <jürgen@example.org>".encode() in msgs[0]
    assert "Subject: grüße".encode() in msgs[0]


async def test_null_sender_is_accepted_for_reports(tmp_path):
    config = cfg(tmp_path)
    async with running_site(config) as site:
        def check():
            with smtp(site) as s:
                s.ehlo()
                assert s.mail("")[0] == 250  # MAIL FROM:<>
                assert s.rcpt("User1@SiteA.microsoft.com")[0] == 250
                assert s.data(b"Subject: bounce\r\n\r\nreport\r\n")[0] == 250
        await in_thread(check)
        msgs = await wait_for(lambda: maildir_messages(config.data_dir, "User1"))
    assert msgs[0].startswith(b"Return-Path: <>\r\n")


async def test_nearly_full_disk_defers_with_452(tmp_path):
    config = cfg(tmp_path, smtp={"queue_minfree": 1 << 60})  # more than any real file system has free
    async with running_site(config) as site:
        def check():
            with smtp(site) as s:
                s.ehlo()
                code, text = reply_to(s, "MAIL FROM:<x@example.org>")
                assert (code, text[:5]) == (452, "4.3.1")
        await in_thread(check)
