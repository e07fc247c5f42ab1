"""Accounts and restrictions in the directory (SQLite), their config keys, the
``Received:`` protocol names: unit tests without sockets."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from imsrelay.config.loader import ConfigError, config_from_mapping
from imsrelay.directory.store import Directory, DirectoryError
from imsrelay.ingress.handler import received_protocol
from imsrelay.policy.auth import hash_password, verify_password


@pytest.fixture
def directory(tmp_path: Path):
    d = Directory(tmp_path / "directory.sqlite3", "SiteA")
    d.provision(organisation="ExchangeORG", server="ServerA", site_domain="SiteA.microsoft.com", hostname="h",
                mailboxes=[("User1", "User One", ["smtp:u1@alias.example"]), ("Boss", "Boss", [])])
    yield d
    d.close()


def test_password_stays_local_unless_replicated(directory: Directory):
    h = hash_password("pw")
    directory.set_password_hash("User1", h)
    found = directory.credential("User1")
    assert found is not None and found[0].alias == "User1" and found[1] == h
    assert directory.credential("U1@Alias.Example")[1] == h  # any SMTP address is a login
    assert directory.credential("user1")[1] == h  # aliases ignore case
    # not in the replicated object: nothing to send to other sites
    obj = [o for o in directory.all_objects() if o.object_id == "mailbox:SiteA:user1"][0]
    assert "password_hash" not in obj.data
    directory.set_password_hash("User1", h, replicate=True)
    obj = [o for o in directory.all_objects() if o.object_id == "mailbox:SiteA:user1"][0]
    assert obj.data["password_hash"] == h
    directory.set_password_hash("User1", h, replicate=False)  # the org switched it off again
    obj = [o for o in directory.all_objects() if o.object_id == "mailbox:SiteA:user1"][0]
    assert "password_hash" not in obj.data


def test_replicated_hash_used_only_when_allowed(tmp_path: Path, directory: Directory):
    h = hash_password("pw")
    directory.set_password_hash("User1", h, replicate=True)
    other = Directory(tmp_path / "b.sqlite3", "SiteB")
    try:
        other.apply(directory.all_objects())
        assert other.credential("User1@SiteA.microsoft.com") is None
        found = other.credential("User1@SiteA.microsoft.com", replicated=True)
        assert found is not None and verify_password("pw", found[1])
        assert other.credential("User1") is None  # a bare alias names a mailbox of this site
    finally:
        other.close()


def test_no_account_without_password_and_ensure_sets_once(directory: Directory):
    assert directory.credential("Boss") is None
    assert directory.credential("nobody@SiteA.microsoft.com") is None
    assert directory.ensure_password_hash("Boss", hash_password("one"))
    assert not directory.ensure_password_hash("Boss", hash_password("two"))  # kept: set only when none
    assert verify_password("one", directory.credential("Boss")[1])
    assert not directory.ensure_password_hash("Nobody", hash_password("x"))


def test_deleting_a_mailbox_removes_its_account(directory: Directory):
    directory.set_password_hash("User1", hash_password("pw"), replicate=True)
    directory.delete_mailbox("User1")
    assert directory.credential("User1") is None and not directory.has_password("User1")
    obj = [o for o in directory.all_objects() if o.object_id == "mailbox:SiteA:user1"][0]
    assert obj.deleted and "password_hash" not in obj.data
    with pytest.raises(DirectoryError):
        directory.set_password_hash("User1", hash_password("pw"))


def test_sender_rules_are_part_of_the_mailbox(directory: Directory):
    m = directory.set_sender_rules("Boss", accept_from=["@Corp.Example"], reject_from=["Mallory@corp.example"],
                                   filter_senders=["@junk.example"], filter_action="delete")
    assert (m.sender_rules.accept_from, m.sender_rules.reject_from) == (("@corp.example",), ("mallory@corp.example",))
    found = directory.find_recipient("Boss@SiteA.microsoft.com")
    assert found.sender_rules == m.sender_rules
    usn = directory.highest_usn
    directory.set_sender_rules("Boss", accept_from=["@corp.example"])  # no change: no new version
    assert directory.highest_usn == usn
    m = directory.set_sender_rules("Boss", accept_from=[])
    assert m.sender_rules.accept_from == () and m.sender_rules.filter_action == "delete"
    with pytest.raises(DirectoryError, match="not a sender address"):
        directory.set_sender_rules("Boss", reject_from=["no at sign"])
    with pytest.raises(DirectoryError, match="filter action"):
        directory.set_sender_rules("Boss", filter_action="bounce")


def test_received_protocol_names():
    assert received_protocol(utf8=False, tls=False, authenticated=False) == "ESMTP"
    assert received_protocol(utf8=False, tls=True, authenticated=False) == "ESMTPS"
    assert received_protocol(utf8=False, tls=False, authenticated=True) == "ESMTPA"
    assert received_protocol(utf8=False, tls=True, authenticated=True) == "ESMTPSA"
    assert received_protocol(utf8=True, tls=True, authenticated=True) == "UTF8SMTPSA"


BASE = {"site": {"organisation": "O", "name": "SiteA", "server": "S", "email_domain": "SiteA.example"}}


def load(extra: dict) -> object:
    return config_from_mapping({**BASE, **extra}, Path("/tmp/x/site.toml"))


def test_new_sections_defaults():
    c = load({})
    assert c.auth.enabled and not c.auth.allow_plaintext and c.auth.mechanisms == ("PLAIN", "LOGIN")
    assert not c.auth.replicate_credentials
    assert c.submission.port is None and c.submission.tls_port is None
    r = c.restrictions
    assert r.relay_authenticated and r.accept == "all" and r.never_relay == () and not r.sender_must_match
    assert c.turf_dir == Path("/tmp/x/data/SiteA/turf")


def test_new_sections_parse():
    c = load({"auth": {"mechanisms": ["login"], "lockout": "1m", "failure_delay": "250ms"},
              "smtp": {"tls_generate": True}, "submission": {"port": 587, "tls_port": 465},
              "restrictions": {"never_relay": ["192.0.2.0/24"], "accept": "encrypted",
                               "filter_senders": ["@Spam.Example"], "turf_dir": "turf"}})
    assert c.auth.mechanisms == ("LOGIN",) and c.auth.lockout == 60 and c.auth.failure_delay == 0.25
    assert (c.submission.port, c.submission.tls_port) == (587, 465)
    assert c.restrictions.never_relay == (ipaddress.ip_network("192.0.2.0/24"),)
    assert c.restrictions.filter_senders == ("@spam.example",)
    assert c.turf_dir == Path("/tmp/x/turf")


@pytest.mark.parametrize(("extra", "key"), [
    ({"auth": {"mechanisms": ["CRAM-MD5"]}}, "auth.mechanisms[0]"),
    ({"auth": {"allow_plaintext": "yes"}}, "auth.allow_plaintext"),
    ({"auth": {"bogus": 1}}, "auth.bogus"),
    ({"submission": {"port": 587}}, "submission.port"),  # no TLS for it
    ({"submission": {"port": 70000}, "smtp": {"tls_generate": True}}, "submission.port"),
    ({"restrictions": {"accept": "some"}}, "restrictions.accept"),
    ({"restrictions": {"never_relay": ["nope"]}}, "restrictions.never_relay[0]"),
    ({"restrictions": {"filter_senders": ["no-at"]}}, "restrictions.filter_senders[0]"),
    ({"restrictions": {"filter_action": "bounce"}}, "restrictions.filter_action"),
    ({"mailboxes": [{"alias": "U", "password_hash": "plain"}]}, "mailboxes[0].password_hash"),
])
def test_new_keys_errors_name_the_key(extra: dict, key: str):
    with pytest.raises(ConfigError) as err:
        load(extra)
    assert err.value.key == key


def test_lab_ca_issues_verifiable_certificates_once(tmp_path: Path):
    import ssl

    from imsrelay.ingress.lab_ca import ensure_ca, ensure_certificate

    ca = ensure_ca(tmp_path)
    assert ensure_ca(tmp_path) == ca and (ca[1].stat().st_mode & 0o777) == 0o600
    cert = ensure_certificate(tmp_path, "SiteA", ca=ca, hostnames=["ServerA.SiteA.example"], addresses=["127.0.0.1"])
    first = cert[0].read_bytes()
    assert ensure_certificate(tmp_path, "SiteA", ca=ca, hostnames=["serverA.siteA.example"],
                              addresses=["127.0.0.1"])[0].read_bytes() == first  # same names: kept
    ensure_certificate(tmp_path, "SiteA", ca=ca, hostnames=["other.example"], addresses=[])
    assert cert[0].read_bytes() != first  # names changed: re-issued
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))  # key and certificate belong together
    client = ssl.create_default_context(cafile=str(ca[0]))
    assert client.cert_store_stats()["x509_ca"] == 1


def test_check_config_shows_submission_and_reports_every_new_key_error(tmp_path: Path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "imsrelay", "check-config", str(root / "config" / "docker" / "siteA.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "  submission 0.0.0.0:587 (STARTTLS + AUTH), 0.0.0.0:465 (TLS + AUTH)" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[site]\norganisation="O"\nname="S"\nserver="s"\nemail_domain="s.example"\n'
                   '[auth]\nmechanisms=["CRAM-MD5"]\n[restrictions]\naccept="x"\n[submission]\nport=587\n')
    r = subprocess.run([sys.executable, "-m", "imsrelay", "check-config", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    keys = [line.split(": ")[3] for line in r.stderr.splitlines()]  # imsrelay: configuration error: FILE: KEY: …
    assert keys == ["auth.mechanisms[0]", "restrictions.accept", "submission.port"]
