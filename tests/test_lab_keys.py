"""Per-site replication keys in the shipped labs.

The embedded lab (``imsrelay lab``) makes each site's Ed25519 key in
``<data>/keys/SiteX.pem`` at install and writes every site's public key into each
site's file; the Docker lab's throwaway keys are committed under
``config/docker/keys/`` and their public halves in ``config/docker/siteX.toml``
(written by ``imsrelay.lab.docker_configs``).  In both, a site can speak only for the
objects it owns.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import stat
import tomllib
from pathlib import Path

import pytest
import pytest_asyncio
from sitekit import free_port, send_mail, wait_for
from structlog.testing import capture_logs

from imsrelay.admin.client import AdminClient
from imsrelay.config.loader import load_config
from imsrelay.directory.keys import PER_SITE_KEYS, Trust, load_private_key, public_key_text
from imsrelay.directory.replication import (
    BAD_SIGNATURE,
    REFUSED_OBJECT,
    build_updates,
    render_message,
    sign_own_objects,
    trust_for,
)
from imsrelay.lab.docker_configs import (
    COMPOSE_KEY_PATH,
    CONFIG_DIR,
    committed_public_keys,
    compose_site_mapping,
    config_name,
    key_file,
    regenerate_keys,
    with_trusted_keys,
)
from imsrelay.lab.docker_configs import main as docker_configs_main
from imsrelay.lab.embedded import (
    ADMIN_TOKEN,
    COMPANY_DOMAIN,
    ORGANISATION,
    SITES,
    STAGE_NAMES,
    Lab,
    key_path,
    stage_index,
)
from imsrelay.model.objects import DirObject, Stamp

REPO = Path(__file__).resolve().parent.parent
A, B, C = SITES

# ------------------------------------------------------------------ the Docker lab's committed keys (no Docker)


def test_committed_docker_keys_match_the_public_keys_in_the_site_files():
    keys = {s.name: public_key_text(load_private_key(REPO / "config" / "docker" / "keys" / f"{config_name(s)}.pem"))
            for s in SITES}
    assert len(set(keys.values())) == 3  # one key per site
    for s in SITES:
        config = load_config(REPO / "config" / "docker" / f"{config_name(s)}.toml")
        assert dict(config.replication.trusted_keys) == keys, s.name
        assert config.replication.signing_key == Path(COMPOSE_KEY_PATH)
        assert config.replication.key is None  # no shared organisation key any more
    assert committed_public_keys() == keys


def test_compose_mounts_each_site_its_own_key_and_no_organisation_key():
    compose = (REPO / "docker-compose.yml").read_text()
    assert "IMSRELAY_ORG_KEY" not in compose
    for s in SITES:
        service = compose.split(f"\n  {s.name.lower()}:\n", 1)[1].split("\n\n", 1)[0]
        assert f"- ./config/docker/keys/{config_name(s)}.pem:{COMPOSE_KEY_PATH}:ro" in service, s.name
        assert re.findall(r"keys/(site\w)\.pem", service) == [config_name(s)]


def test_every_stage_of_the_compose_walk_signs_with_the_sites_own_key():
    keys = committed_public_keys()
    for stage in range(len(STAGE_NAMES)):
        for s in SITES:
            replication = compose_site_mapping(s, stage, keys)["replication"]
            assert replication["signing_key"] == COMPOSE_KEY_PATH
            assert replication["trusted_keys"] == keys
            assert "key" not in replication


def test_regenerating_the_docker_keys_rewrites_only_the_trusted_keys(tmp_path: Path):
    config_dir = tmp_path / "docker"
    shutil.copytree(CONFIG_DIR, config_dir)
    before = {s.name: (config_dir / f"{config_name(s)}.toml").read_text() for s in SITES}
    old = committed_public_keys(config_dir)
    lines: list[str] = []
    new = regenerate_keys(config_dir, say=lines.append)
    assert len(lines) == 7  # three keys, three site files, the two-server topology's files
    assert set(new.values()).isdisjoint(old.values()) and len(set(new.values())) == 3
    assert committed_public_keys(config_dir) == new
    for s in SITES:
        pem = key_file(s, config_dir)
        assert stat.S_IMODE(pem.stat().st_mode) == 0o644  # the containers' user reads the bind mount
        path = config_dir / f"{config_name(s)}.toml"
        assert dict(load_config(path).replication.trusted_keys) == new
        after = path.read_text()
        changed = [(o, n) for o, n in zip(before[s.name].splitlines(), after.splitlines(), strict=True) if o != n]
        assert [o.split(" = ")[0] for o, _ in changed] == ["SiteA", "SiteB", "SiteC"]  # every comment kept
    assert sorted(p.name for p in (config_dir / "keys").iterdir()) == ["README.md", "siteA.pem", "siteB.pem", "siteC.pem"]


def test_regenerating_writes_nothing_when_a_site_file_cannot_take_the_keys(tmp_path: Path, capsys):
    config_dir = tmp_path / "docker"
    shutil.copytree(CONFIG_DIR, config_dir)
    broken = config_dir / "siteC.toml"
    broken.write_text(broken.read_text().replace("[replication.trusted_keys]", "# (table removed)"))
    before = {p.name: p.read_bytes() for p in config_dir.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="siteC.toml: no \\[replication.trusted_keys\\] table"):
        regenerate_keys(config_dir, say=lambda line: None)
    assert docker_configs_main(["regenerate-keys", "--config-dir", str(config_dir)]) == 1
    assert "siteC.toml: no [replication.trusted_keys] table; nothing written" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in config_dir.rglob("*") if p.is_file()} == before


def test_with_trusted_keys_keeps_comments_and_refuses_a_file_without_the_table():
    text = ('[replication]\nstartup_delay = "5m"\n\n[replication.trusted_keys]  # the keys\n'
            '# a note\nSiteA = "ed25519:old"\nSiteZ = "ed25519:gone"\n\n[dns]\ntimeout = "5s"\n')
    got = with_trusted_keys(text, {"SiteB": "ed25519:bbb", "SiteA": "ed25519:aaa"})
    assert got == ('[replication]\nstartup_delay = "5m"\n\n[replication.trusted_keys]  # the keys\n'
                   'SiteA = "ed25519:aaa"\nSiteB = "ed25519:bbb"\n# a note\n\n[dns]\ntimeout = "5s"\n')
    assert tomllib.loads(got)["dns"] == {"timeout": "5s"}
    with pytest.raises(ValueError, match="no \\[replication.trusted_keys\\] table"):
        with_trusted_keys('[replication]\nstartup_delay = "5m"\n', {"SiteA": "ed25519:aaa"})


# ------------------------------------------------------------------ the embedded lab

ASYNC = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory):
    data = tmp_path_factory.mktemp("lab")
    lab = Lab(data, port=free_port(A.address), admin_port=free_port(A.address), startup_delay="1h",
              say=lambda s: None, submission_port=free_port(A.address), smtps_port=free_port(A.address))
    await lab.start(stage_index("replication-connectors"))  # configured; no replication done yet
    try:
        yield lab
    finally:
        await lab.stop()


def admin(lab: Lab, name: str) -> AdminClient:
    config = lab.sites[name].config
    return AdminClient(f"http://{config.admin.listen}:{config.admin.port}", ADMIN_TOKEN)


async def call(lab: Lab, name: str, method: str, path: str, body: dict | None = None):
    return await asyncio.to_thread(admin(lab, name).call, method, path, body)


@ASYNC
async def test_the_lab_makes_one_key_per_site_and_keeps_it(lab: Lab):
    keys = {}
    for s in SITES:
        pem = key_path(lab.data_dir, s)
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
        keys[s.name] = public_key_text(load_private_key(pem))
    assert len(set(keys.values())) == 3
    for s in SITES:
        config = load_config(lab.config_path(s.name))
        assert config.replication.signing_key == key_path(lab.data_dir, s)
        assert dict(config.replication.trusted_keys) == keys
        assert config.replication.key is None
        status = await call(lab, s.name, "GET", "/status")
        assert status["replication"]["key_scheme"] == PER_SITE_KEYS
        assert status["replication"]["trusted_sites"] == ["SiteA", "SiteB", "SiteC"]
    assert lab.ensure_keys() == keys  # the next start of the lab uses the same keys


async def knows(lab: Lab, at: str, alias: str, home: str) -> bool:
    snapshot = await call(lab, at, "GET", "/directory")
    return any(m["alias"] == alias and m["home_site"] == home for m in snapshot["mailboxes"])


@ASYNC
async def test_a_site_cannot_speak_for_another_sites_objects_and_replication_still_works(lab: Lab):
    c = lab.sites["SiteC"]
    b_config = lab.sites["SiteB"].config
    b_key = load_private_key(b_config.replication.signing_key)
    b_trust = trust_for(b_config)
    now = c.clock()
    # SiteA's User1 taken over, signed with SiteB's key as if SiteB were its home
    hijacked = DirObject("mailbox:SiteA:user1", "mailbox", "SiteA", Stamp(50, now, "SiteA"), False,
                         {"alias": "User1", "display_name": "User One",
                          "proxy_addresses": [f"SMTP:hijacked@{COMPANY_DOMAIN}"]})
    forged = sign_own_objects([hijacked], Trust("SiteA", private_key=b_key), ORGANISATION)
    assert forged[0].sig  # it does carry a signature: SiteB's

    def update(from_site: str, trust: Trust) -> bytes:
        payload = build_updates(organisation=ORGANISATION, from_site=from_site, to_site="SiteC",
                                invocation=lab.sites[from_site].directory.invocation, highest_usn=0, since_usn=0,
                                full=False, in_reply_to="ab" * 16, batches=[(0, 0, forged)], now=now)[0]
        return render_message(payload, key=trust, from_domain=f"{from_site}.{COMPANY_DOMAIN}",
                              to_domain=f"SiteC.{COMPANY_DOMAIN}", hostname=f"ServerB.SiteB.{COMPANY_DOMAIN}")

    before = dict(c.replicator.rejected)
    with capture_logs() as logs:
        # SiteB's own update (its message key is right) carrying SiteA's object
        await asyncio.to_thread(send_mail, C.address, lab.port, f"dirsync@SiteB.{COMPANY_DOMAIN}",
                                [f"dirsync@SiteC.{COMPANY_DOMAIN}"], update("SiteB", b_trust))
        # SiteB claiming to be SiteA
        await asyncio.to_thread(send_mail, C.address, lab.port, f"dirsync@SiteA.{COMPANY_DOMAIN}",
                                [f"dirsync@SiteC.{COMPANY_DOMAIN}"], update("SiteA", b_trust))
        await wait_for(lambda: c.replicator.rejected[REFUSED_OBJECT] == before.get(REFUSED_OBJECT, 0) + 1
                       and c.replicator.rejected[BAD_SIGNATURE] == before.get(BAD_SIGNATURE, 0) + 1, timeout=30)
        # counted first, then logged (after the count is stored)
        await wait_for(lambda: len([e for e in logs if e["event"] == "replication.rejected"]) == 2, timeout=10)
    rejected = [e for e in logs if e["event"] == "replication.rejected"]
    assert sorted(e["reason"] for e in rejected) == [BAD_SIGNATURE, REFUSED_OBJECT]
    refused = next(e for e in rejected if e["reason"] == REFUSED_OBJECT)
    assert refused["peer"] == "SiteB" and "home site SiteA" in refused["detail"]
    assert "key of site SiteA" in next(e for e in rejected if e["reason"] == BAD_SIGNATURE)["detail"]
    assert await c.directory.run(c.directory.find_recipient, f"hijacked@{COMPANY_DOMAIN}") is None
    status = await call(lab, "SiteC", "GET", "/replication/status")
    assert status["rejected"][REFUSED_OBJECT] == before.get(REFUSED_OBJECT, 0) + 1
    assert status["rejected"][BAD_SIGNATURE] == before.get(BAD_SIGNATURE, 0) + 1

    # normal replication between the three sites: Request Now moves a new mailbox to the peers
    await call(lab, "SiteA", "POST", "/directory/mailboxes", {"alias": "Keyed", "display_name": "Keyed User"})
    for peer in ("SiteB", "SiteC"):
        await call(lab, peer, "POST", "/replication/request-now", {"site": "SiteA", "full": False})
    for peer in ("SiteB", "SiteC"):
        await wait_for(lambda p=peer: knows(lab, p, "Keyed", "SiteA"), timeout=60)
    await call(lab, "SiteC", "POST", "/replication/request-now", {"site": "SiteB", "full": False})
    await wait_for(lambda: knows(lab, "SiteC", "User2", "SiteB"), timeout=60)
    assert c.replicator.rejected[REFUSED_OBJECT] == before.get(REFUSED_OBJECT, 0) + 1  # nothing else refused
    user1 = await c.directory.run(c.directory.mailbox, "User1", "SiteA")
    assert user1 is not None and "hijacked" not in user1.primary_address
