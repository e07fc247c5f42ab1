"""The Docker lab with SiteA as two servers (issue 24 item 4; docker/servers.override.yml,
``docker/lab.sh up --servers SiteA=2``).

Without Docker: the files each server reads are what the generator writes, they load,
and they agree with each other, with the compose override's addresses and with the lab
DNS's equal-preference MX; docker/lab.sh refuses topologies it does not have.

With Docker (marker ``docker``): ServerA (service ``sitea``, 10.10.10.10) and Server1
(``sitea-server1``, 10.10.10.11, the seed's MX), each its own container and volume, come
up the way ``docker/lab.sh up --servers SiteA=2`` brings them, ``setup`` included (the
article's end state), and the walkthrough's essential steps are checked on this topology
from the host only (ports on 127.0.0.1, ``docker exec``): mail from outside by equal MX
reaching a mailbox homed on either server; a mailbox created on Server1 replicated to
ServerA and to SiteB/SiteC, their mail for it ending on Server1; Server1's mail to
SiteB/SiteC and the Internet; ServerA stopped: the site's mail still accepted by Server1,
the mail for ServerA's mailboxes held in Server1's queue and delivered, once, when ServerA
is back.  Own compose project (``imsrelayservers``), the machine-wide compose-lab lock,
removed with its volumes at the end (IMSRELAY_DOCKER_KEEP=1 keeps it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from compose_kit import (
    ENDPOINTS,
    INTERNET_SMTP,
    ComposeLab,
    docker_skip_reason,
    header,
    lab_held,
    poll,
    progress_to_terminal,
)

from imsrelay.config.loader import load_config
from imsrelay.lab.docker_configs import (
    COMPOSE_ADDRESSES,
    COMPOSE_ADMIN_PORT,
    COMPOSE_KEY_PATH,
    CONFIG_DIR,
    SERVERS_DIR,
    committed_public_keys,
    compose_server_toml,
    compose_servers,
    compose_site_mapping,
    regenerate_keys,
    server_config_name,
)
from imsrelay.lab.embedded import SITES, STAGE_NAMES, site_servers

yaml = pytest.importorskip("yaml")
REPO = Path(__file__).resolve().parents[1]
OVERRIDE = REPO / "docker" / "servers.override.yml"
ZONES = CONFIG_DIR / SERVERS_DIR / "dns"
PROJECT = os.environ.get("IMSRELAY_TEST_SERVERS_PROJECT", "imsrelayservers")
BOB = "/home/bob/Maildir"
SMTP = {service: port for service, (_, port, _, _) in ENDPOINTS.items()}  # published on 127.0.0.1


def test_the_committed_server_files_are_the_generators():
    for server in compose_servers():
        path = CONFIG_DIR / SERVERS_DIR / f"{server_config_name(server)}.toml"
        assert path.read_text(encoding="utf-8") == compose_server_toml(server), \
            f"{path} is stale: python -m imsrelay.lab.docker_configs servers"


def test_the_two_servers_agree_with_each_other_and_with_the_embedded_lab():
    servers = compose_servers()
    assert [v.name for v in servers] == [v.name for v in site_servers(SITES[0], 2)] == ["ServerA", "Server1"]
    assert [v.address for v in servers] == [COMPOSE_ADDRESSES["SiteA"], "10.10.10.11"]
    configs = {v.name: load_config(CONFIG_DIR / SERVERS_DIR / f"{server_config_name(v)}.toml") for v in servers}
    lists = {name: c.servers for name, c in configs.items()}
    assert lists["ServerA"] == lists["Server1"]  # one [[servers]] table for the site
    assert [(s.name, s.host, s.admin) for s in lists["ServerA"]] == [
        (v.name, v.address, f"http://{v.address}:{COMPOSE_ADMIN_PORT}") for v in servers]
    single = compose_site_mapping(SITES[0], len(STAGE_NAMES) - 1, committed_public_keys())
    for name, c in configs.items():
        assert c.server == name and c.site == "SiteA" and c.bridgehead == (name == "ServerA")
        assert [(m.alias, m.home_server) for m in c.mailboxes] == [("User1", "ServerA"), ("Administrator", "ServerA")]
        assert dict(c.replication.trusted_keys) == committed_public_keys()
        assert c.replication.signing_key == Path(COMPOSE_KEY_PATH)
        assert [e.domain for e in c.email_domains] == [e["domain"] for e in single["email_domains"]]
        assert c.replication.intrasite_interval is not None and c.replication.intrasite_interval < 300


def test_the_override_runs_each_server_at_its_address_with_its_own_file_and_volume():
    override = yaml.safe_load(OVERRIDE.read_text())
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = {"ServerA": "sitea", "Server1": "sitea-server1"}
    for server in compose_servers():
        service = services[server.name]
        mine = override["services"][service]
        address = (mine.get("networks") or base["services"][service]["networks"])["lab"]["ipv4_address"]
        assert address == server.address
        assert f"./config/docker/{SERVERS_DIR}/{server_config_name(server)}.toml:/etc/imsrelay/site.toml:ro" \
            in mine["volumes"]
    server1 = override["services"]["sitea-server1"]
    assert "./config/docker/keys/siteA.pem:" + COMPOSE_KEY_PATH + ":ro" in server1["volumes"]
    assert "sitea-server1-data:/var/lib/imsrelay" in server1["volumes"] and "sitea-server1-data" in override["volumes"]
    assert {p.split(":")[1] for p in server1["ports"]}.isdisjoint(
        {p.split(":")[1] for s in base["services"].values() for p in s.get("ports", [])})
    for zone in ("microsoft.com.zone", "10.10.10.in-addr.arpa.zone"):
        assert f"./config/docker/{SERVERS_DIR}/dns/{zone}:/etc/nsd/zones/{zone}:ro" in override["services"]["dns"]["volumes"]


def _records(path: Path, origin: str) -> list[tuple[str, str, str]]:
    """(name, type, data) of a simple zone file (the lab's: one record a line, owner or blank)."""
    out, owner = [], "@"
    for line in path.read_text().splitlines():
        line = line.split(";", 1)[0].rstrip()
        m = re.match(r"^(\S+)?\s+IN\s+(A|MX|PTR)\s+(.+)$", line)
        if not m:
            continue
        owner = m.group(1) or owner
        out.append((owner if owner != "@" else origin, m.group(2), " ".join(m.group(3).split())))
    return out


def test_the_lab_dns_gives_both_servers_as_mx_of_equal_preference():
    records = _records(ZONES / "microsoft.com.zone", "microsoft.com.")
    a = {name: data for name, kind, data in records if kind == "A"}
    for server in compose_servers():
        assert a[f"{server.name}.SiteA"] == server.address
    for owner in ("microsoft.com.", "SiteA"):
        mx = sorted(data for name, kind, data in records if kind == "MX" and name == owner)
        assert mx == ["10 Server1.SiteA.microsoft.com.", "10 ServerA.SiteA.microsoft.com."], owner
    ptr = {name: data for name, kind, data in _records(ZONES / "10.10.10.in-addr.arpa.zone", "") if kind == "PTR"}
    assert ptr["10"] == "ServerA.SiteA.microsoft.com." and ptr["11"] == "Server1.SiteA.microsoft.com."
    nsd = shutil.which("nsd-checkzone") or "/usr/sbin/nsd-checkzone"
    if Path(nsd).exists():
        for zone, name in (("microsoft.com.zone", "microsoft.com"), ("10.10.10.in-addr.arpa.zone", "10.10.10.in-addr.arpa")):
            done = subprocess.run([nsd, name, str(ZONES / zone)], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stdout + done.stderr


def test_new_lab_keys_reach_the_server_files(tmp_path: Path):
    config_dir = tmp_path / "docker"
    shutil.copytree(CONFIG_DIR, config_dir)
    new = regenerate_keys(config_dir, say=lambda line: None)
    for server in compose_servers():
        text = (config_dir / SERVERS_DIR / f"{server_config_name(server)}.toml").read_text()
        assert tomllib.loads(text)["replication"]["trusted_keys"] == new


@pytest.mark.skipif(shutil.which("docker-compose") is None and shutil.which("docker") is None,
                    reason="docker/lab.sh needs docker-compose or the compose plugin")
def test_lab_sh_refuses_topologies_it_does_not_have():
    env = {**os.environ, "COMPOSE_PROJECT_NAME": "imsrelaynothing"}
    env.pop("IMSRELAY_LAB_SERVERS", None)
    for args, extra, message in (
            (["up", "--servers", "SiteA=3"], {}, "servers SiteA=3: the Docker lab runs SiteA=1 or SiteA=2"),
            (["up", "--servers", "SiteB=2"], {}, "servers SiteB=2: the Docker lab runs SiteA=1 or SiteA=2"),
            (["status"], {"IMSRELAY_LAB_SERVERS": "SiteA=3"}, "servers SiteA=3: the Docker lab runs SiteA=1"),
            (["up", "--servers", "SiteA=1"], {"IMSRELAY_LAB_SERVERS": "SiteA=2"}, "disagree")):
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
    lab.env["IMSRELAY_LAB_SERVERS"] = "SiteA=2"  # docker/lab.sh adds docker/servers.override.yml
    with lab_held(lab, lab.up, "compose lab (SiteA as two servers) up and set up"):
        yield lab


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
    everyone = {(s.name, alias): f"{alias}@microsoft.com" for s in SITES for alias in (s.user,)}
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
    # homed on Server1: its Maildir is on Server1's volume only (ServerA's message API answers for
    # the whole site, so look at ServerA's own disk)
    assert "User5" not in lab.exec("sitea", "ls", "/var/lib/imsrelay/mailboxes").stdout.split()
    assert "User5" in lab.exec("sitea-server1", "ls", "/var/lib/imsrelay/mailboxes").stdout.split()


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

