"""Merge rules of the replicated directory (docs/design.md invariant 6), with hypothesis.

Applying a set of object versions in any order, any number of times, gives the same
directory; a tombstone wins exactly when its stamp is greater; the owner of an SMTP
address claimed by several mailboxes does not depend on arrival order; USN batches
advance a high-water mark only over contiguous coverage, in any order.
"""

import json
import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imsrelay.directory.replication import advance_high_water
from imsrelay.directory.store import Directory, merge_order
from imsrelay.model.objects import DirObject, Stamp

OBJECT_IDS = ["mailbox:SiteA:user1", "mailbox:SiteB:user2", "mailbox:SiteC:user3", "mailbox:SiteC:admin"]
ADDRESSES = ["user@microsoft.com", "admin@microsoft.com", "user1@sitea.microsoft.com", "x@example.net"]
SITES = ["SiteA", "SiteB", "SiteC"]


def memory_directory(site: str = "SiteZ") -> Directory:
    return Directory(Path(":memory:"), site)


@st.composite
def versions(draw) -> DirObject:
    object_id = draw(st.sampled_from(OBJECT_IDS))
    home = object_id.split(":")[1]
    alias = object_id.split(":")[2]
    addresses = draw(st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=3, unique=True))
    primary = draw(st.integers(0, len(addresses) - 1))
    proxies = [("SMTP:" if i == primary else "smtp:") + a for i, a in enumerate(addresses)]
    stamp = Stamp(draw(st.integers(1, 4)), draw(st.sampled_from([100.0, 200.0, 300.5])), draw(st.sampled_from(SITES)))
    data = {"alias": alias, "display_name": draw(st.sampled_from(["One", "Two"])), "proxy_addresses": proxies}
    return DirObject(object_id, "mailbox", home, stamp, draw(st.booleans()), data)


def snapshot(d: Directory) -> tuple[dict, dict]:
    objects = {o.object_id: (o.stamp, o.deleted, json.dumps(o.data, sort_keys=True), o.home_site)
               for o in d.all_objects()}
    owners = {}
    for a in ADDRESSES:
        m = d.find_recipient(a)
        owners[a] = (m.home_site, m.alias) if m else None
    return objects, owners


def expected_objects(objs: list[DirObject]) -> dict:
    best: dict[str, DirObject] = {}
    for o in objs:
        if o.object_id not in best or merge_order(o) > merge_order(best[o.object_id]):
            best[o.object_id] = o
    return {k: (o.stamp, o.deleted, json.dumps(o.data, sort_keys=True), o.home_site) for k, o in best.items()}


def expected_owner(objs: list[DirObject], address: str) -> tuple[str, str] | None:
    """The documented rule: primary beats secondary, then the smallest object id."""
    winners = [o for o in _final(objs).values() if not o.deleted]
    claims = []
    for o in winners:
        for p in o.data["proxy_addresses"]:
            if p.split(":", 1)[1].lower() == address:
                claims.append((0 if p.startswith("SMTP:") else 1, o.object_id, o))
    if not claims:
        return None
    o = min(claims, key=lambda c: (c[0], c[1]))[2]
    return o.home_site, o.data["alias"]


def _final(objs: list[DirObject]) -> dict[str, DirObject]:
    best: dict[str, DirObject] = {}
    for o in objs:
        if o.object_id not in best or merge_order(o) > merge_order(best[o.object_id]):
            best[o.object_id] = o
    return best


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(versions(), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_any_order_any_duplicates_same_directory(objs, rnd):
    first = memory_directory()
    first.apply(objs)
    shuffled = objs + rnd.sample(objs, k=min(len(objs), 4))  # duplicates
    rnd.shuffle(shuffled)
    second = memory_directory()
    for o in shuffled:  # one at a time, as separate updates would arrive
        second.apply([o])
    second.apply(objs)  # everything again: idempotent
    assert snapshot(first) == snapshot(second)
    objects, owners = snapshot(first)
    assert objects == expected_objects(objs)
    assert owners == {a: expected_owner(objs, a) for a in ADDRESSES}


@settings(max_examples=75, deadline=None)
@given(st.lists(versions(), min_size=2, max_size=12), st.randoms(use_true_random=False))
def test_two_peers_converge_by_exchanging_changes(objs, rnd):
    """Each peer saw a different part; after exchanging change batches both agree."""
    cut = rnd.randint(0, len(objs))
    a, b = memory_directory("SiteA"), memory_directory("SiteB")
    a.apply(objs[:cut])
    b.apply(objs[cut:])
    batches_a, _ = a.change_batches(0, 3)
    batches_b, _ = b.change_batches(0, 2)
    for _, _, chunk in reversed(batches_a):
        b.apply(chunk)
    for _, _, chunk in batches_b:
        a.apply(chunk)
    assert snapshot(a) == snapshot(b)
    assert snapshot(a)[0] == expected_objects(objs)


def mailbox(alias, home, version, when, proxies, deleted=False, origin=None):
    return DirObject(f"mailbox:{home}:{alias.lower()}", "mailbox", home, Stamp(version, when, origin or home),
                     deleted, {"alias": alias, "display_name": alias, "proxy_addresses": proxies})


def test_tombstone_wins_by_stamp_in_either_order():
    live = mailbox("User3", "SiteC", 1, 100.0, ["SMTP:User3@SiteC.microsoft.com"])
    gone = mailbox("User3", "SiteC", 2, 200.0, ["SMTP:User3@SiteC.microsoft.com"], deleted=True)
    back = mailbox("User3", "SiteC", 3, 300.0, ["SMTP:User3@SiteC.microsoft.com"])
    for order in ([live, gone], [gone, live]):
        d = memory_directory()
        d.apply(order)
        assert d.find_recipient("user3@sitec.microsoft.com") is None
        assert d.mailboxes() == [] and d.mailboxes(include_deleted=True)[0].deleted
    for order in ([gone, back, live], [back, gone], [live, back, gone]):
        d = memory_directory()
        d.apply(order)
        assert d.find_recipient("User3@SiteC.microsoft.com").home_site == "SiteC"  # re-created, newer


def test_address_owner_is_order_independent_and_survives_unrelated_edits():
    # Two sites handed out admin@microsoft.com before hearing of each other.
    b = mailbox("Admin", "SiteB", 2, 500.0, ["SMTP:Admin@microsoft.com"])
    c = mailbox("Admin", "SiteC", 2, 400.0, ["SMTP:Admin@microsoft.com"])
    s = mailbox("Sales", "SiteA", 1, 900.0, ["SMTP:Sales@microsoft.com", "smtp:Admin@microsoft.com"])
    owners = set()
    for order in ([b, c, s], [s, c, b], [c, s, b]):
        d = memory_directory()
        for o in order:
            d.apply([o])
        owners.add(d.find_recipient("admin@microsoft.com").home_site)
        conflicts = d.address_conflicts()
        assert conflicts == [("admin@microsoft.com", "mailbox:SiteB:admin",
                              ["mailbox:SiteA:sales", "mailbox:SiteC:admin"])]
    assert owners == {"SiteB"}  # primary claims first, then the smallest object id
    d = memory_directory()
    d.apply([b, c, s])
    # an unrelated edit (newer stamp) at SiteC does not move the address
    d.apply([mailbox("Admin", "SiteC", 3, 999.0, ["SMTP:Admin@microsoft.com"])])
    assert d.find_recipient("admin@microsoft.com").home_site == "SiteB"
    # when the owner is deleted, the next claimant gets the address
    d.apply([mailbox("Admin", "SiteB", 3, 600.0, ["SMTP:Admin@microsoft.com"], deleted=True)])
    assert d.find_recipient("admin@microsoft.com").home_site == "SiteC"


def test_equal_stamps_different_content_still_converge():
    one = mailbox("User1", "SiteA", 1, 100.0, ["SMTP:User1@SiteA.microsoft.com"])
    two = DirObject(one.object_id, "mailbox", "SiteA", one.stamp, False, {**one.data, "display_name": "Other"})
    d1, d2 = memory_directory(), memory_directory()
    d1.apply([one, two])
    d2.apply([two, one])
    assert snapshot(d1) == snapshot(d2)


def test_older_database_index_is_rebuilt(tmp_path):
    d = Directory(tmp_path / "dir.sqlite3", "SiteA")
    d.apply([mailbox("User1", "SiteA", 1, 100.0, ["SMTP:User1@microsoft.com"])])
    d._db.execute("DELETE FROM address_claims")
    d._db.execute("DELETE FROM proxy_addresses")
    d.set_meta("address_index", "1")
    d.close()
    again = Directory(tmp_path / "dir.sqlite3", "SiteA")
    assert again.find_recipient("user1@microsoft.com").alias == "User1"
    again.close()


def test_change_batches_cover_every_usn_once():
    d = memory_directory("SiteC")
    d.provision(organisation="ExchangeORG", server="ServerC", site_domain="SiteC.microsoft.com",
                hostname="ServerC.SiteC.microsoft.com",
                mailboxes=[(f"User{i}", f"User {i}", ()) for i in range(23)])
    d.delete_mailbox("User5")  # moves one object to a higher USN
    batches, highest = d.change_batches(0, 5)
    assert highest == d.highest_usn
    assert batches[0][0] == 0 and batches[-1][1] == highest
    assert all(b[1] == nxt[0] for b, nxt in zip(batches, batches[1:], strict=False))
    assert all(0 < len(objs) <= 5 for _, _, objs in batches)
    ids = [o.object_id for _, _, objs in batches for o in objs]
    assert len(ids) == len(set(ids)) == 24  # 23 mailboxes + the site object
    assert all(f < o.usn <= t for f, t, objs in batches for o in objs)
    later, top = d.change_batches(highest, 5)
    assert later == [(highest, highest, [])] and top == highest


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=10, unique=True), st.integers(0, 3),
       st.randoms(use_true_random=False))
def test_high_water_advances_only_over_contiguous_batches(cuts, start, rnd):
    bounds = [start] + sorted(start + c for c in cuts)
    batches = list(zip(bounds, bounds[1:], strict=False))
    arrivals = batches + rnd.sample(batches, k=min(2, len(batches)))
    rnd.shuffle(arrivals)
    hw, ranges = start, []
    seen: set[tuple[int, int]] = set()
    for f, t in arrivals:
        hw, ranges = advance_high_water(hw, ranges, f, t)
        seen.add((f, t))
        # never beyond the first batch not yet received
        missing = [b for b in batches if b not in seen]
        assert hw <= (missing[0][0] if missing else bounds[-1])
        assert all(a > hw for a, _ in ranges)
    assert (hw, ranges) == (bounds[-1], [])


def test_high_water_gap_keeps_ranges_until_filled():
    hw, ranges = advance_high_water(0, [], 10, 20)
    assert (hw, ranges) == (0, [[10, 20]])
    hw, ranges = advance_high_water(hw, ranges, 20, 30)
    assert (hw, ranges) == (0, [[10, 30]])
    hw, ranges = advance_high_water(hw, ranges, 0, 10)
    assert (hw, ranges) == (30, [])
    assert advance_high_water(30, [], 0, 5) == (30, [])  # old news changes nothing


def test_random_stress_against_reference():
    rnd = random.Random(7)
    pool = [mailbox(f"U{i % 5}", SITES[i % 3], rnd.randint(1, 5), rnd.choice([1.0, 2.0]),
                    [f"SMTP:u{rnd.randint(0, 6)}@microsoft.com"], deleted=rnd.random() < 0.3) for i in range(60)]
    reference = memory_directory()
    reference.apply(pool)
    for _ in range(5):
        d = memory_directory()
        order = pool[:]
        rnd.shuffle(order)
        for i in range(0, len(order), 7):
            d.apply(order[i:i + 7])
        assert snapshot(d) == snapshot(reference)


def test_change_batches_also_bounded_by_bytes():
    d = memory_directory("SiteC")
    d.provision(organisation="ExchangeORG", server="ServerC", site_domain="SiteC.microsoft.com",
                hostname="ServerC.SiteC.microsoft.com",
                mailboxes=[(f"User{i}", "x" * 300, ()) for i in range(40)])
    batches, highest = d.change_batches(0, 1000, max_bytes=4000)
    assert len(batches) > 4 and batches[-1][1] == highest
    assert all(b[1] == nxt[0] for b, nxt in zip(batches, batches[1:], strict=False))
    assert sum(len(objs) for _, _, objs in batches) == 41
    assert all(sum(len(json.dumps(o.data)) + 200 for o in objs) <= 4000 for _, _, objs in batches)


def test_a_mailbox_keeps_its_home_server(tmp_path):
    from imsrelay.directory.store import Directory
    d = Directory(tmp_path / "d.sqlite3", "SiteA")
    d.provision(organisation="O", server="Server1", site_domain="SiteA.example", hostname="server1.sitea.example", mailboxes=())
    assert d.add_mailbox("U1", home_server="Server2").home_server == "Server2"
    assert d.add_mailbox("U2").home_server == ""
    assert d.mailbox("U1").home_server == "Server2"
