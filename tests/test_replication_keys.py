"""Per-site Ed25519 replication keys: a site speaks only for the objects it owns, also
when another site relays them; the shared organisation key still works (labs)."""

import asyncio

from sitekit import ORG_HOSTS as HOSTS
from sitekit import Organisation, send_mail, wait_for

from imsrelay.objects import DirObject, Stamp
from imsrelay.replication import (
    BAD_SIGNATURE,
    REFUSED_OBJECT,
    UNTRUSTED_SITE,
    build_updates,
    render_message,
    sign_own_objects,
    trust_for,
    verify,
)
from imsrelay.replication_keys import Trust, generate_private_key


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
