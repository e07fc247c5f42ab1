"""Per-site Ed25519 replication keys: a site speaks only for the objects it owns, also
when another site relays them; the shared organisation key still works (labs)."""

import asyncio
import dataclasses
import json
import os
import stat

import pytest
from sitekit import ORG_HOSTS as HOSTS
from sitekit import ORG_KEY, Organisation, run_cli, send_mail, wait_for

from imsrelay.admin.client import AdminClient
from imsrelay.directory.keys import (
    ORGANISATION_KEY,
    PER_SITE_KEYS,
    ReplicationKeyError,
    Trust,
    generate_private_key,
    load_private_key,
    public_key_text,
    site_key,
    write_private_key,
)
from imsrelay.directory.replication import (
    BAD_SIGNATURE,
    REFUSED_OBJECT,
    UNTRUSTED_SITE,
    build_updates,
    render_message,
    sign_own_objects,
    trust_for,
    verify,
)
from imsrelay.lab.org_setup import key_scheme_problem
from imsrelay.model.objects import DirObject, Stamp


async def test_transitive_replication_with_per_site_keys(organisation):
    org = organisation(links={"SiteA": ["SiteB"], "SiteB": ["SiteA", "SiteC"], "SiteC": ["SiteB"]},
                      per_site_keys=True)
    await org.start()
    assert org.sites["SiteA"].replicator._key.per_site
    await org.ok("directory", "add", "Remote9", site="SiteC")
    await org.request_now("SiteB", "SiteC")
    await org.knows("SiteB", "Remote9", "SiteC")
    await org.quiet()
    await org.request_now("SiteA", "SiteB")  # SiteB relays SiteC's object with SiteC's signature
    m = await org.knows("SiteA", "Remote9", "SiteC")
    assert m.home_site == "SiteC"
    assert org.sites["SiteA"].replicator.rejected == {}


async def test_a_site_cannot_speak_for_objects_it_does_not_own(organisation):
    org = organisation(per_site_keys=True)
    await org.start("SiteA")
    a = org.sites["SiteA"]
    c_trust = trust_for(org.configs["SiteC"])  # SiteC's own, trusted key
    now = a.clock()

    def update(from_site, objects, trust):
        payload = build_updates(organisation="ExchangeORG", from_site=from_site, to_site="SiteA",
                                invocation="c0c0", highest_usn=3, since_usn=0, full=True, in_reply_to="ab" * 16,
                                batches=[(0, 3, objects)], now=now)[0]
        return render_message(payload, key=trust, from_domain=f"{from_site}.microsoft.com",
                              to_domain="SiteA.microsoft.com", hostname="x.example")

    fake_b = DirObject("mailbox:SiteB:evil", "mailbox", "SiteB", Stamp(1, now, "SiteB"), False,
                       {"alias": "Evil", "proxy_addresses": ["SMTP:evil@microsoft.com"]})
    own_c = DirObject("mailbox:SiteC:user9", "mailbox", "SiteC", Stamp(1, now, "SiteC"), False,
                      {"alias": "User9", "proxy_addresses": ["SMTP:user9@microsoft.com"]})
    signed = sign_own_objects([fake_b, own_c], c_trust, "ExchangeORG")  # SiteC signs only its own
    port = a.bound_port
    await asyncio.to_thread(send_mail, HOSTS["SiteA"], port, "dirsync@SiteC.microsoft.com", ["dirsync@SiteA.microsoft.com"],
                            update("SiteC", signed, c_trust))
    await org.knows("SiteA", "User9", "SiteC")
    assert await a.directory.run(a.directory.find_recipient, "evil@microsoft.com") is None
    assert a.replicator.rejected[REFUSED_OBJECT] == 1
    # SiteC claiming to be SiteB: its key is not SiteB's
    await asyncio.to_thread(send_mail, HOSTS["SiteA"], port, "dirsync@SiteB.microsoft.com", ["dirsync@SiteA.microsoft.com"],
                            update("SiteB", [fake_b], c_trust))
    # a stranger's key
    stranger = Trust("SiteX", private_key=generate_private_key())
    await asyncio.to_thread(send_mail, HOSTS["SiteA"], port, "dirsync@SiteX.microsoft.com", ["dirsync@SiteA.microsoft.com"],
                            update("SiteX", [], stranger))
    await wait_for(lambda: a.replicator.rejected[BAD_SIGNATURE] == 1 and a.replicator.rejected[UNTRUSTED_SITE] == 1)
    assert await a.directory.run(a.directory.find_recipient, "evil@microsoft.com") is None


def test_hmac_messages_do_not_verify_at_a_per_site_key_site(tmp_path):
    from test_replication_signing import render, request

    org = Organisation(tmp_path, per_site_keys=True)
    a = trust_for(org.configs["SiteA"])
    raw = render(request(to_site="SiteA", from_site="SiteB", now=1_700_000_000.0))  # organisation key
    got = verify(raw, key=a, organisation="ExchangeORG", site="SiteA", now=1_700_000_000.0, max_age=3600)
    assert got.reason == BAD_SIGNATURE
    assert set(HOSTS) <= set(a.public_keys)


# ------------------------------------------------------------------ key files


def test_write_private_key_is_owner_only_and_never_replaces_a_key(tmp_path):
    path = tmp_path / "keys" / "SiteA.pem"
    key = generate_private_key()
    old_umask = os.umask(0)  # a permissive umask must not make the key readable by others
    try:
        write_private_key(path, key)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_text(load_private_key(path)) == public_key_text(key)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_private_key(path, generate_private_key())
    assert path.read_bytes() == before  # the site's identity is kept
    assert [p.name for p in path.parent.iterdir()] == ["SiteA.pem"]  # no temporary file left


def test_site_key_is_made_once_and_kept_across_restarts(tmp_path):
    path = tmp_path / "keys" / "SiteB.pem"
    first = site_key(path)
    assert path.exists()
    again = site_key(path)  # the next start reads the same key
    assert public_key_text(again) == public_key_text(first)
    other = site_key(tmp_path / "keys" / "SiteC.pem")
    assert public_key_text(other) != public_key_text(first)


def test_site_key_refuses_a_file_that_is_no_key(tmp_path):
    path = tmp_path / "SiteA.pem"
    path.write_text("not a key\n")
    with pytest.raises(ReplicationKeyError, match="not a PEM private key"):
        site_key(path)
    assert path.read_text() == "not a key\n"


def test_keygen_refuses_to_replace_a_key_without_force(tmp_path):
    out = tmp_path / "SiteA.pem"
    code, line, err = run_cli("replicate", "keygen", "--site", "SiteA", "--out", str(out))
    assert code == 0, err
    assert line.startswith('SiteA = "ed25519:')
    before = out.read_bytes()
    code, _, err = run_cli("replicate", "keygen", "--site", "SiteA", "--out", str(out))
    assert code != 0 and "exists already" in err and out.read_bytes() == before
    code, again, err = run_cli("replicate", "keygen", "--site", "SiteA", "--out", str(out), "--force")
    assert code == 0, err
    assert out.read_bytes() != before and again != line


# ------------------------------------------------------------------ which scheme


def test_key_scheme_problem_refuses_a_mix_and_missing_trust():
    every = ["SiteA", "SiteB", "SiteC"]
    per_site = {n: {"key_scheme": PER_SITE_KEYS, "trusted_sites": every} for n in every}
    assert key_scheme_problem(per_site) is None
    assert key_scheme_problem({n: {"key_scheme": ORGANISATION_KEY, "trusted_sites": []} for n in every}) is None
    mixed = {**per_site, "SiteC": {"key_scheme": ORGANISATION_KEY, "trusted_sites": []}}
    problem = key_scheme_problem(mixed)
    assert problem is not None
    assert "different replication key schemes" in problem
    assert "per-site ed25519: SiteA, SiteB" in problem and "shared organisation key: SiteC" in problem
    short = {**per_site, "SiteB": {"key_scheme": PER_SITE_KEYS, "trusted_sites": ["SiteA", "SiteB"]}}
    assert key_scheme_problem(short) == ("SiteB has no trusted public key for SiteC: add [replication.trusted_keys] "
                                         "entries (imsrelay replicate keygen prints them) at SiteB")


async def test_status_and_replicate_status_show_the_key_scheme(organisation):
    per_site = organisation(per_site_keys=True)
    await per_site.start("SiteA")
    out = await per_site.ok("replicate", "status", site="SiteA")
    assert "keys: per-site ed25519 (trusted: SiteA, SiteB, SiteC)" in out
    status = json.loads(await per_site.ok("replicate", "status", "--json", site="SiteA"))
    assert (status["key_scheme"], status["trusted_sites"]) == ("per-site ed25519", ["SiteA", "SiteB", "SiteC"])
    admin = per_site.sites["SiteA"].config.admin
    client = AdminClient(f"http://{admin.listen}:{admin.port}", per_site.token)
    replication = (await asyncio.to_thread(client.call, "GET", "/status"))["replication"]
    assert replication["key_scheme"] == "per-site ed25519"
    await per_site.close()

    shared = organisation()
    await shared.start("SiteA")
    out = await shared.ok("replicate", "status", site="SiteA")
    assert "keys: shared organisation key\n" in out
    assert json.loads(await shared.ok("replicate", "status", "--json", site="SiteA"))["trusted_sites"] == []


async def test_org_setup_refuses_sites_with_different_key_schemes(organisation):
    org = organisation(per_site_keys=True)
    c = org.configs["SiteC"]
    org.configs["SiteC"] = dataclasses.replace(c, replication=dataclasses.replace(
        c.replication, signing_key=None, trusted_keys=(), key=ORG_KEY))
    await org.start()
    before = {n: s.directory.highest_usn for n, s in org.sites.items()}
    code, out, err = await asyncio.to_thread(run_cli, "org-setup", *org.site_args(), "--wait", "10")
    assert code != 0
    assert ("the sites use different replication key schemes (per-site ed25519: SiteA, SiteB; "
            "shared organisation key: SiteC)") in err
    assert "Request Now" not in out  # nothing was done
    assert {n: s.directory.highest_usn for n, s in org.sites.items()} == before


def test_a_key_that_does_not_match_its_trusted_entry_is_one_line_at_check_config_and_serve(tmp_path):
    from sitekit import site_mapping, write_site_file

    key = tmp_path / "SiteA.pem"
    write_private_key(key, generate_private_key())
    mapping = site_mapping("SiteA", replication={
        "signing_key": str(key), "trusted_keys": {"SiteA": public_key_text(generate_private_key())}})
    del mapping["replication"]["key"]
    path, _ = write_site_file(tmp_path, mapping)
    for argv in (["check-config", str(path)], ["serve", "--config", str(path)]):
        code, out, err = run_cli(*argv)
        assert code == 2, argv
        assert err == (f"imsrelay: {path}: replication.trusted_keys must list this site (SiteA) with the "
                       "public key of replication.signing_key\n")
        assert ": ok" not in out
    key.unlink()
    code, out, err = run_cli("serve", "--config", str(path))
    assert (code, err) == (2, f"imsrelay: {path}: replication.signing_key: {key}: No such file or directory\n")
    # a key that is not on this machine (a container's): check-config checks the rest and says so
    code, out, err = run_cli("check-config", str(path))
    assert code == 0, err
    assert f"replication keys: per-site ed25519, own key {key} (not on this machine: not checked); trusted: SiteA" in out


async def test_a_schedule_is_written_one_way_in_the_cli_and_the_api(organisation):
    org = organisation(schedule="3h")
    await org.start("SiteA")
    out = await org.ok("replicate", "status", site="SiteA")
    assert out.count("every 3 h") == 2, out  # SiteB and SiteC, Exchange's default schedule (Q195918)
    status = json.loads(await org.ok("replicate", "status", "--json", site="SiteA"))
    assert {p["schedule_text"] for p in status["peers"]} == {"every 3 h"}
