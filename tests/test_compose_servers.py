"""SiteA as two servers in the Docker compose lab (issue 24 item 4; the compose profile
``two-servers``, ``docker/lab.sh up --servers SiteA=2``).

ServerA (service ``sitea``, 10.10.10.10) and Server1 (``sitea-server1``, 10.10.10.11,
the seed's MX) are two containers, each its own imsrelay process and volume, both in
the ``[[servers]]`` of config/docker/two-servers/siteA*.toml; the lab DNS gives both as
equal-preference MX of microsoft.com, so the Internet's Postfix reaches SiteA by either.
The lab comes up the way ``docker/lab.sh up`` brings it, ``setup`` included: the
article's end state.  The test then checks the walkthrough's essential steps on this
topology, from the host only (ports published on 127.0.0.1, ``docker exec``): mail from
outside by equal MX reaching a mailbox homed on either server; a mailbox created on
Server1 replicated to ServerA and to SiteB/SiteC, and their mail for it ending on
Server1; mail from Server1 to SiteB/SiteC and the Internet; ServerA stopped: mail for
the site still accepted by Server1, the mail for ServerA's mailboxes held in Server1's
queue and delivered, once, when ServerA is back.

Also, with no Docker: the profile's files are what ``imsrelay.lab.docker_configs``
generates, and its zones differ from config/dns's only in SiteA's servers.

Needs a Docker engine (marker ``docker``); own compose project (``imsrelayservers``),
the machine-wide compose-lab lock, removed with its volumes at the end
(IMSRELAY_DOCKER_KEEP=1 keeps it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from compose_kit import (
    ENDPOINTS,
    INTERNET_SMTP,
    REPO,
    SERVERS,
    ComposeLab,
    docker_skip_reason,
    engine_lock,
    header,
    poll,
    progress_to_terminal,
)

from imsrelay.config.loader import load_config
from imsrelay.lab.docker_configs import (
    SERVERS_PROFILE,
    committed_public_keys,
    compose_servers,
    compose_site_mapping,
    compose_site_toml,
    profile_files,
)
from imsrelay.lab.embedded import SITES as LAB_SITES
from imsrelay.lab.embedded import STAGE_NAMES

PROJECT = os.environ.get("IMSRELAY_TEST_SERVERS_PROJECT", "imsrelayservers")
A, B, C = LAB_SITES
END = len(STAGE_NAMES) - 1
ALICE, BOB = "/home/alice/Maildir", "/home/bob/Maildir"
SMTP = {service: port for service, (_, port, _, _) in ENDPOINTS.items()}
DNS_DIR = REPO / "config" / "dns"

# ------------------------------------------------------------------ the profile's files (no Docker)


def test_profile_files_are_the_generated_ones_and_differ_from_site_a_only_in_its_servers():
    keys = committed_public_keys()
    files = profile_files()
    assert {p.relative_to(REPO).as_posix(): name for p, (_, _, name) in files.items()} == {
        "config/docker/two-servers/siteA.toml": "ServerA", "config/docker/two-servers/siteA-Server1.toml": "Server1"}
    for path, (site, count, name) in files.items():
        assert path.read_text() == compose_site_toml(site, END, keys, servers=count, server=name), path
        config = load_config(path)
        assert config.server == name and [s.name for s in config.peer_servers] == [
            other for other in ("ServerA", "Server1") if other != name]
        assert [(s.name, s.host, s.port, s.admin) for s in config.servers] == [
            ("ServerA", "10.10.10.10", 25, "http://10.10.10.10:8025"),
            ("Server1", "10.10.10.11", 25, "http://10.10.10.11:8025")]
        assert config.bridgehead == (name == "ServerA")
        assert {m.home_server for m in config.mailboxes} == {"ServerA"}
        # everything else is SiteA's one-server configuration (config/docker/siteA.toml)
        one = compose_site_mapping(A, END, keys)
        two = compose_site_mapping(A, END, keys, servers=2, server=name)
        for m in two["mailboxes"]:
            del m["home_server"]
        del two["servers"], two["replication"]["bridgehead"], two["replication"]["intrasite_interval"]
        two["site"]["server"] = one["site"]["server"]
        assert two == one
    assert compose_servers(B, 1) == (("ServerB", "10.10.10.15"),)
    with pytest.raises(ValueError, match="not one of SiteA's 2 servers"):
        compose_site_mapping(A, END, keys, servers=2, server="ServerB")


def _records(path: Path) -> set[str]:
    return {" ".join(line.split(";")[0].split()) for line in path.read_text().splitlines()
            if line.split(";")[0].strip()}


def test_two_server_zones_give_equal_mx_and_change_nothing_else():
    base, two = DNS_DIR / "microsoft.com.zone", DNS_DIR / SERVERS_PROFILE / "microsoft.com.zone"
    assert _records(two) - _records(base) == {
        "IN MX 10 ServerA.SiteA.microsoft.com.", "SiteA IN MX 10 ServerA.SiteA.microsoft.com.",
        "Server1.SiteA IN A 10.10.10.11"}
    assert _records(base) - _records(two) == {"Server1.SiteA IN A 10.10.10.10"}
    base, two = DNS_DIR / "10.10.10.in-addr.arpa.zone", DNS_DIR / SERVERS_PROFILE / "10.10.10.in-addr.arpa.zone"
    assert _records(two) - _records(base) == {"10 IN PTR ServerA.SiteA.microsoft.com.",
                                              "11 IN PTR Server1.SiteA.microsoft.com."}
    assert _records(base) - _records(two) == {"10 IN PTR Server1.SiteA.microsoft.com."}
    # the other zones are served from config/dns as they are
    assert sorted(p.name for p in (DNS_DIR / SERVERS_PROFILE).iterdir()) == [
        "10.10.10.in-addr.arpa.zone", "microsoft.com.zone"]


def test_compose_profile_wiring():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    server1 = services["sitea-server1"]
    assert server1["profiles"] == [SERVERS_PROFILE]
    assert server1["networks"]["lab"]["ipv4_address"] == SERVERS["sitea-server1"][3] == "10.10.10.11"
    assert server1["volumes"] == ["./config/docker/two-servers/siteA-Server1.toml:/etc/imsrelay/site.toml:ro",
                                  "./config/docker/keys/siteA.pem:/etc/imsrelay/replication-key.pem:ro",
                                  "sitea-server1-data:/var/lib/imsrelay"]
    assert "sitea-server1-data" in compose["volumes"]
    assert all(p.startswith("127.0.0.1:") for p in server1["ports"])
    _, smtp, admin, _ = SERVERS["sitea-server1"]  # what tests/compose_kit.py talks to
    assert f"127.0.0.1:${{LAB_SITEA_SERVER1_SMTP_PORT:-{smtp}}}:25" in server1["ports"]
    assert f"127.0.0.1:${{LAB_SITEA_SERVER1_ADMIN_PORT:-{admin}}}:8025" in server1["ports"]
    # one switch: COMPOSE_PROFILES picks SiteA's file and the lab DNS's zones too
    assert services["sitea"]["volumes"][0] == "./config/docker/${COMPOSE_PROFILES:-.}/siteA.toml:/etc/imsrelay/site.toml:ro"
    assert services["dns"]["environment"]["NSD_ZONES_OVERLAY"] == "${COMPOSE_PROFILES:-}"
    assert all("profiles" not in s for name, s in services.items() if name != "sitea-server1")


@pytest.mark.skipif(shutil.which("docker-compose") is None and shutil.which("docker") is None,
                    reason="docker/lab.sh needs docker-compose or the compose plugin")
def test_lab_sh_refuses_topologies_it_does_not_have():
    env = {**os.environ, "COMPOSE_PROJECT_NAME": "imsrelaynothing"}
    env.pop("COMPOSE_PROFILES", None)
    for args, extra, message in (
            (["up", "--servers", "SiteA=3"], {}, "--servers SiteA=3: the Docker lab runs SiteA=1 or SiteA=2"),
            (["up", "--servers", "SiteB=2"], {}, "--servers SiteB=2: the Docker lab runs SiteA=1 or SiteA=2"),
            (["status"], {"COMPOSE_PROFILES": "three-servers"}, "the lab's only profile is two-servers"),
            (["up", "--servers", "SiteA=1"], {"COMPOSE_PROFILES": "two-servers"}, "disagree")):
        proc = subprocess.run([str(REPO / "docker" / "lab.sh"), *args], env={**env, **extra}, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)


# ------------------------------------------------------------------ the two-server lab (Docker)


@pytest.fixture(scope="module")
def lab(pytestconfig):
    reason = docker_skip_reason()
    if reason:
        pytest.skip(reason)
    lab = ComposeLab(PROJECT, progress=progress_to_terminal(pytestconfig))
    lab.env["COMPOSE_PROFILES"] = SERVERS_PROFILE
    with engine_lock():
        try:
            seconds = lab.up()
            print(f"compose lab (profile {SERVERS_PROFILE}) up and set up in {seconds:.0f}s")
            yield lab
        finally:
            if os.environ.get("IMSRELAY_DOCKER_KEEP") != "1":
                lab.down()


def send(lab: ComposeLab, port: int, sender: str, rcpt: str, subject: str) -> str:
    msgid, body = lab.message(sender, rcpt, subject, re.sub(r"\W+", "-", subject))
    lab.send(port, sender, rcpt, body)
    return msgid


def arrives(lab: ComposeLab, service: str, where: str, msgid: str, timeout: float = 60.0) -> bytes:
    """``msgid`` delivered once to a mailbox (an alias at a site) or a Maildir (the Internet's)."""
    path = where if where.startswith("/") else f"/var/lib/imsrelay/mailboxes/{where}"
    got = poll(lambda: lab.find(service, path, msgid), timeout=timeout, what=f"{msgid} in {service}:{where}")
    assert len(got) == 1, f"{msgid} delivered {len(got)} times to {service}:{where}"
    return got[0]


def directory(lab: ComposeLab, service: str) -> dict[tuple[str, str], tuple[str, str]]:
    d = lab.admin(service, "GET", "/directory")
    return {(m["home_site"], m["alias"]): (m["primary_address"], m.get("home_server") or "") for m in d["mailboxes"]}


def hop(server: str, address: str) -> bytes:
    """The Received: line a server of SiteA writes for a hop from ``server``."""
    return f"from {server}.SiteA.microsoft.com ([{address}])".encode()


@pytest.mark.docker
def test_setup_brings_both_servers_to_the_end_state_and_dns_gives_equal_mx(lab: ComposeLab):
    mx = lab.exec("internet", "dig", "+short", "MX", "microsoft.com").stdout.split("\n")
    assert sorted(line.strip().lower() for line in mx if line.strip()) == [
        "10 server1.sitea.microsoft.com.", "10 servera.sitea.microsoft.com."]
    assert lab.exec("internet", "dig", "+short", "server1.sitea.microsoft.com").stdout.strip() == "10.10.10.11"
    everyone = {(s.name, alias): f"{alias}@microsoft.com" for s in LAB_SITES for alias in (s.user,)}
    for service in ("sitea", "sitea-server1"):
        known = directory(lab, service)
        assert {k: v[0] for k, v in known.items() if k[1] != "Administrator"} == everyone, service
        assert known[("SiteA", "User1")][1] == "ServerA"
    assert directory(lab, "sitea") == directory(lab, "sitea-server1")  # one directory, two replicas
    status = lab.admin("sitea-server1", "GET", "/directory/intrasite")
    assert (status["server"], status["bridgehead"], status["servers"]) == ("Server1", False, ["ServerA", "Server1"])
    assert lab.admin("sitea", "GET", "/directory/intrasite")["bridgehead"] is True


@pytest.mark.docker
def test_a_mailbox_made_on_server1_reaches_the_organisation_and_mail_reaches_either_server(lab: ComposeLab):
    made = lab.admin("sitea-server1", "POST", "/directory/mailboxes", {"alias": "User5", "display_name": "User Five"})
    assert (made["home_server"], made["primary_address"]) == ("Server1", "User5@microsoft.com")
    # intra-site replication: ServerA has it within seconds (notification)
    poll(lambda: directory(lab, "sitea").get(("SiteA", "User5")), timeout=30, what="User5 at ServerA")
    assert directory(lab, "sitea")[("SiteA", "User5")] == ("User5@microsoft.com", "Server1")
    # the other sites get it from ServerA, the bridgehead (Request Now)
    for service in ("siteb", "sitec"):
        lab.admin(service, "POST", "/replication/request-now", {"site": "SiteA", "full": False})
    for service in ("siteb", "sitec"):
        poll(lambda s=service: directory(lab, s).get(("SiteA", "User5")), timeout=30, what=f"User5 at {service}")
        assert directory(lab, service)[("SiteA", "User5")][0] == "User5@microsoft.com"
    sent = {
        # from outside: Postfix, by microsoft.com's equal MX, to either server
        "outside-user1": (INTERNET_SMTP, "alice@example.net", "User1@microsoft.com", "sitea", "User1"),
        "outside-user5": (INTERNET_SMTP, "alice@example.net", "User5@microsoft.com", "sitea-server1", "User5"),
        # each server takes mail for the other's mailboxes and relays it to the home server
        "via-servera": (SMTP["sitea"], "alice@example.net", "User5@microsoft.com", "sitea-server1", "User5"),
        "via-server1": (SMTP["sitea-server1"], "alice@example.net", "User1@microsoft.com", "sitea", "User1"),
        # SiteB's mail for a mailbox homed on Server1: to ServerA (E-Mail Domain entry), one hop on
        "from-siteb": (SMTP["siteb"], "user2@SiteB.microsoft.com", "User5@microsoft.com", "sitea-server1", "User5"),
        # Server1 sends to SiteB, SiteC and the Internet
        "server1-to-b": (SMTP["sitea-server1"], "alice@example.net", "User2@microsoft.com", "siteb", "User2"),
        "server1-to-c": (SMTP["sitea-server1"], "alice@example.net", "User3@microsoft.com", "sitec", "User3"),
        "server1-out": (SMTP["sitea-server1"], "User1@microsoft.com", "bob@example.net", "internet", BOB),
    }
    ids = {tag: send(lab, port, sender, rcpt, f"servers {tag}") for tag, (port, sender, rcpt, _, _) in sent.items()}
    got = {tag: arrives(lab, service, where, ids[tag]) for tag, (_, _, _, service, where) in sent.items()}
    for tag in ("outside-user1", "outside-user5"):
        assert b"by mail.example.net (Postfix" in header(got[tag])
    assert hop("ServerA", "10.10.10.10") in header(got["via-servera"])
    assert hop("Server1", "10.10.10.11") in header(got["via-server1"])
    assert hop("ServerA", "10.10.10.10") in header(got["from-siteb"])  # through the bridgehead
    assert hop("Server1", "10.10.10.11") in header(got["server1-to-b"]) and hop("Server1", "10.10.10.11") in header(
        got["server1-to-c"])
    assert b"by Server1.SiteA.microsoft.com (imsrelay)" in header(got["server1-out"])
    assert not lab.mailbox("sitea", "User5")  # homed on Server1: nothing on ServerA


@pytest.mark.docker
def test_one_server_stopped_the_other_still_takes_the_sites_mail(lab: ComposeLab):
    lab.stop("sitea")  # ServerA, the bridgehead
    try:
        # the Internet's Postfix finds ServerA down and uses the other MX of equal preference
        to_user5 = send(lab, INTERNET_SMTP, "alice@example.net", "User5@microsoft.com", "servers down user5")
        to_user1 = send(lab, INTERNET_SMTP, "alice@example.net", "User1@microsoft.com", "servers down user1")
        direct = send(lab, SMTP["sitea-server1"], "alice@example.net", "User1@microsoft.com", "servers down direct")
        got = arrives(lab, "sitea-server1", "User5", to_user5, timeout=90)
        assert b"by Server1.SiteA.microsoft.com (imsrelay)" in header(got)
        # mail for ServerA's mailboxes waits in Server1's queue while ServerA is down
        poll(lambda: len(lab.queued_for("sitea-server1", "User1@microsoft.com")) == 2, timeout=90,
             what="the mail for User1 held in Server1's queue")
        assert lab.state("sitea")["Status"] == "exited"
    finally:
        lab.start("sitea")
    poll(lambda: lab.healthy("sitea"), timeout=90, what="ServerA healthy again", interval=1)
    for msgid in (to_user1, direct):  # delivered once ServerA is back: nothing acknowledged is lost
        got = arrives(lab, "sitea", "User1", msgid, timeout=90)
        assert hop("Server1", "10.10.10.11") in header(got)
    poll(lambda: not lab.queued_for("sitea-server1", "User1@microsoft.com"), timeout=30, what="Server1's queue empty")

