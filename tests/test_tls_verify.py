"""Outbound TLS ``verify``: the peer's certificate must chain to the configured CA and
name the host; ``require`` only encrypts.  A real peer site with STARTTLS on loopback."""

import asyncio
import smtplib

import pytest
from sitekit import free_port, maildir_messages, make_config, running_site, site_mapping, wait_for
from tls_kit import make_ca, make_cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d / "ca")
    good = make_cert(d, "good", "IP:127.0.0.1", ca=ca)
    wrong_name = make_cert(d, "wrongname", "IP:127.0.0.2", ca=ca)
    self_signed = make_cert(d, "selfsigned", "IP:127.0.0.1", ca=None)
    return ca, {"good": good, "wrongname": wrong_name, "selfsigned": self_signed}


def send(port, rcpt):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("a@example.org", [rcpt], b"Subject: tls\r\n\r\nbody\r\n")


@pytest.mark.parametrize("cert, level, with_ca, delivered", [
    ("good", "verify", True, True),
    ("wrongname", "verify", True, False),
    ("selfsigned", "verify", True, False),
    ("good", "verify", False, False),  # the system store does not know our CA
    ("selfsigned", "require", True, True),  # require encrypts without checking
])
async def test_verify_level(tmp_path, pki, cert, level, with_ca, delivered):
    ca, certs = pki
    cert_file, key_file = certs[cert]
    peer_port = free_port()
    peer = make_config(tmp_path, site_mapping("SiteB", port=peer_port,
                                              smtp={"tls_cert": str(cert_file), "tls_key": str(key_file)}))
    delivery = {"retry_intervals": ["1h"]}
    if with_ca:
        delivery["tls_ca_file"] = str(ca)
    sender = make_config(tmp_path, site_mapping("SiteA", delivery=delivery, email_domains=[
        {"domain": "SiteB.microsoft.com", "host": "127.0.0.1", "port": peer_port, "starttls": level}]))
    async with running_site(peer), running_site(sender) as a:
        await asyncio.to_thread(send, a.bound_port, "User2@SiteB.microsoft.com")
        if delivered:
            got = await wait_for(lambda: maildir_messages(peer.data_dir, "User2"))
            assert b"ESMTPS" in got[0]
        else:
            env = await wait_for(lambda: next((e for e in a.qmgr.envelopes.values()
                                              if e.recipients[0].attempts), None))
            r = env.recipients[0]
            assert r.state == "pending" and r.status == "4.7.5", (r.status, r.diagnostic)
            assert "certificate" in r.diagnostic.lower() or "verify" in r.diagnostic.lower(), r.diagnostic
            assert maildir_messages(peer.data_dir, "User2") == []


def test_smart_host_level_is_its_own(tmp_path):
    from imsrelay.routing.router import route_for, routing_table_for

    cfg = make_config(tmp_path, site_mapping("SiteA", delivery={
        "smart_host": "relay.example:2525", "smart_host_starttls": "verify"}))
    table = routing_table_for(cfg, addressing_domain="SiteA.microsoft.com", learned_sites=(),
                              self_endpoints=frozenset())
    route = route_for("bob@example.com", None, table)
    assert route.host == "relay.example" and route.starttls == "verify"
