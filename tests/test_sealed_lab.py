"""The Internet in a box: a lab opens no connection outside itself, whatever the
recipient; the lab's Internet host keeps the rest of the Internet in a catch-all
mailbox (router and loader units; the embedded lab watched by an audit hook)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sitekit import config_of, site_mapping

from imsrelay.lab.embedded import INTERNET, REST_OF_INTERNET, SITES, internet_mapping, sealed_config
from imsrelay.model.errors import ConfigErrors
from imsrelay.routing.dns import DnsFailure, MailResolver
from imsrelay.routing.host_addresses import site_endpoints
from imsrelay.routing.router import FAIL, LOCAL, MX, RELAY, route_for, routing_table_for
from imsrelay.testing import EmbeddedLab

SEALED = {"lab": {"sealed": True}}


def table_of(mapping):
    config = config_of(mapping)
    return routing_table_for(config, addressing_domain=config.site_domain, learned_sites=(),
                             self_endpoints=site_endpoints(config, config.smtp.port))


def site_a(**extra):
    return site_mapping("SiteA", listen="127.10.10.10", port=2525, **extra)


# ------------------------------------------------------------------ the router (pure)


def test_unsealed_site_keeps_real_dns_routes():
    r = route_for("someone@elsewhere.example", None, table_of(site_a()))
    assert (r.kind, r.domain, r.port) == (MX, "elsewhere.example", 25)
    r = route_for("x@[192.0.2.1]", None, table_of(site_a()))
    assert (r.kind, r.host) == (RELAY, "192.0.2.1")


def test_sealed_site_without_dns_refuses_mx_with_its_reason():
    r = route_for("someone@elsewhere.example", None, table_of(site_a(**SEALED)))
    assert (r.kind, r.permanent, r.status) == (FAIL, True, "5.7.1")
    assert "outside this sealed lab" in r.reason and "no DNS of its own" in r.reason
    assert "no route:" in r.explain()


def test_sealed_site_with_lab_dns_may_use_mx():
    r = route_for("x@elsewhere.example", None, table_of(site_a(dns={"nameservers": ["127.0.0.1:5353"]}, **SEALED)))
    assert r.kind == MX and "only hosts inside the lab are tried" in r.steps[-1]


def test_sealed_site_refuses_address_literal_outside_the_lab():
    r = route_for("x@[192.0.2.1]", None, table_of(site_a(**SEALED)))
    assert (r.kind, r.status) == (FAIL, "5.7.1")
    assert "[192.0.2.1] is outside this sealed lab" in r.reason
    r = route_for("x@[127.10.10.15]", None, table_of(site_a(**SEALED)))
    assert (r.kind, r.host) == (RELAY, "127.10.10.15")


def test_sealed_smart_host_inside_the_lab_is_used():
    r = route_for("x@elsewhere.example", None,
                  table_of(site_a(delivery={"smart_host": "127.10.10.100:2525"}, **SEALED)))
    assert (r.kind, r.host) == (RELAY, "127.10.10.100")


def test_catch_all_keeps_the_rest_of_the_internet():
    config = config_of(internet_mapping(port=2525, data_dir=Path("/tmp/x")))
    table = routing_table_for(config, addressing_domain=config.site_domain, learned_sites=(),
                              self_endpoints=site_endpoints(config, 2525))
    r = route_for("someone@elsewhere.example", None, table)
    assert (r.kind, r.mailbox, r.domain) == (LOCAL, REST_OF_INTERNET, "elsewhere.example")
    assert "left the organisation to elsewhere.example" in r.explain()
    r = route_for("x@[192.0.2.7]", None, table)
    assert (r.kind, r.mailbox) == (LOCAL, REST_OF_INTERNET)
    # the organisation's domains still go where the seed's MX records send them
    r = route_for("User2@SiteB.microsoft.com", None, table)
    assert (r.kind, r.host) == (RELAY, "127.10.10.15")


# ------------------------------------------------------------------ the loader


def test_sealed_lab_file_refuses_a_host_outside_the_lab():
    mapping = site_a(email_domains=[{"domain": "SiteB.microsoft.com", "host": "10.10.10.15", "port": 2525}],
                     **SEALED)
    with pytest.raises(ConfigErrors) as err:
        config_of(mapping)
    text = str(err.value)
    assert "email_domains[0].host" in text and "10.10.10.15 is outside this sealed lab" in text


def test_sealed_lab_file_refuses_a_host_name_without_lab_dns_and_a_catch_all_without_sealing():
    with pytest.raises(ConfigErrors, match="delivery.smart_host: host name mail.example.net"):
        config_of(site_a(delivery={"smart_host": "mail.example.net"}, **SEALED))
    with pytest.raises(ConfigErrors, match="lab.catch_all: only a sealed lab"):
        config_of(site_a(lab={"catch_all": "User1"}))
    with pytest.raises(ConfigErrors, match="is not one of this site's"):
        config_of(site_a(lab={"sealed": True, "catch_all": "nobody"}))
    with pytest.raises(ConfigErrors, match="dns.nameservers"):
        config_of(site_a(dns={"nameservers": ["192.0.2.53"]}, **SEALED))


def test_check_config_names_the_lab_address_for_a_seed_address(tmp_path):
    from imsrelay.config import toml_text
    mapping = site_a(email_domains=[{"domain": "SiteB.microsoft.com", "host": "10.10.10.15", "port": 2525}],
                     **SEALED)
    path = tmp_path / "SiteA.toml"
    path.write_text(toml_text.dumps(mapping))
    out = subprocess.run([sys.executable, "-m", "imsrelay", "check-config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "10.10.10.15 is outside this sealed lab" in out.stderr
    assert "use 127.10.10.15 (the embedded lab puts the article's 10.10.10.15 at 127.10.10.15" in out.stderr
    # the hint's rule is the lab's own addresses
    assert any(s.address == "127.10.10.15" for s in SITES)


def test_sealed_config_seals_old_lab_files_and_adds_the_catch_all():
    old = internet_mapping(port=2525, data_dir=Path("/tmp/x"))
    del old["lab"]
    old["mailboxes"] = old["mailboxes"][:2]
    config = sealed_config(config_of(old))
    assert config.lab.sealed and config.lab.catch_all == REST_OF_INTERNET
    assert REST_OF_INTERNET in {m.alias for m in config.mailboxes}
    assert sealed_config(config_of(site_a())).lab.sealed


async def test_sealed_resolver_never_asks_the_system():
    resolver = MailResolver((), system=False)
    with pytest.raises(DnsFailure, match="no nameservers"):
        await resolver.mx_hosts("elsewhere.example")


# ------------------------------------------------------------------ the embedded lab, watched

AUDIT = textwrap.dedent('''
    import ipaddress, os, socket, sys
    _out = os.environ.get("IMSRELAY_AUDIT_OUT")
    def _outside(host):
        if host is None:
            return False
        try:
            ip = ipaddress.ip_address(str(host).split("%")[0])
        except ValueError:
            return True  # a name: the system resolver would be asked
        return not ip.is_loopback
    def _hook(event, args):
        if not _out or not event.startswith("socket."):
            return
        host = None
        if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            address = args[1]
            if isinstance(address, tuple):
                host = address[0]
        elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
            host = args[0]
            if isinstance(host, bytes):
                host = host.decode()
        if _outside(host):
            with open(_out, "a") as f:
                f.write(f"{event} {host!r}\\n")
            raise PermissionError(f"sealed-lab audit: {event} {host}")  # blocked before any packet leaves
    sys.addaudithook(_hook)
''')


def audited(tmp_path, monkeypatch) -> Path:
    """Python processes started from here record (and block) every socket use outside loopback."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT)
    audit = tmp_path / "audit.txt"
    monkeypatch.setenv("PYTHONPATH", str(hook_dir))
    monkeypatch.setenv("IMSRELAY_AUDIT_OUT", str(audit))
    return audit


def test_the_audit_hook_sees_an_outside_connection_and_blocks_it(tmp_path, monkeypatch):
    audit = audited(tmp_path, monkeypatch)
    code = ("import socket\ns = socket.socket()\ntry:\n    s.connect(('192.0.2.1', 9))\n"
            "except PermissionError as e:\n    print('blocked', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "blocked sealed-lab audit: socket.connect 192.0.2.1" in out.stdout, out.stderr
    assert "socket.connect '192.0.2.1'" in audit.read_text()


def test_no_lab_process_opens_a_socket_outside_loopback(tmp_path, monkeypatch):
    audit = audited(tmp_path, monkeypatch)
    with EmbeddedLab(tmp_path / "lab") as lab:
        lab.send(["someone@elsewhere.example", "bob@example.net"], sender="alice@example.net", subject="out")
        lab.send("ceo@real-company.com", sender="User1@microsoft.com", subject="from a site", via="SiteA")
        lab.send(["x@[192.0.2.1]", "y@[10.10.10.15]"], sender="User1@microsoft.com", subject="literals",
                 via="SiteA")
        caught = lab.wait_for(f"mailbox:{REST_OF_INTERNET} subject:out", timeout=30)
        assert (caught["site"], caught["envelope_recipient"]) == (INTERNET.name, "someone@elsewhere.example")
        caught = lab.wait_for("to:ceo@real-company.com", timeout=30)
        assert caught["mailbox"] == REST_OF_INTERNET
        tracked = lab.track(caught["message_id"])
        (r,) = [r for m in tracked["messages"] for r in m["recipients"]]
        assert (r["state"], r["left_to"], r["path"]) == ("delivered", "real-company.com", ["SiteA", "Internet"])
        assert "left the organisation to real-company.com" in r["detail"]
        assert tracked["messages"][0]["path"] == "SiteA -> Internet -> real-company.com (the rest of the Internet)"
        ndr = lab.wait_for("mailbox:User1 from:postmaster", timeout=30)  # the literals bounced: 5.7.1
        assert ndr["site"] == SITES[0].name
    assert audit.exists() is False or audit.read_text() == "", audit.read_text()
    assert all(ipaddress.ip_address(s.address).is_loopback for s in (*SITES, INTERNET))
