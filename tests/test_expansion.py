"""Custom recipients and distribution lists: the pure decisions (KB Q258203, Q185194),
their validation, and the directory's store of them."""

from __future__ import annotations

import pytest

from imsrelay.directory.store import Directory, DirectoryError, DirectoryInputError
from imsrelay.model.object_rules import object_problem
from imsrelay.model.objects import CustomRecipient, DirObject, DistributionList, Mailbox, Stamp
from imsrelay.policy.expansion import EXPANDED_HEADER, expand, expanded_marks, mark_lines


def mbx(address: str) -> Mailbox:
    return Mailbox(address.split("@")[0], address, "SiteA", (f"SMTP:{address}",))


def dl(address: str, *members: str, owner: str = "", site: str = "") -> DistributionList:
    return DistributionList(address.split("@")[0], address, "SiteA", (f"SMTP:{address}",), members, owner, site)


def custom(address: str, target: str) -> CustomRecipient:
    return CustomRecipient(address.split("@")[0], address, "SiteA", (f"SMTP:{address}",), target)


def resolver(*entries):
    table = {e.primary_address.lower(): e for e in entries}
    return lambda a: table.get(a.lower())


def addresses(exp) -> list[str]:
    return [d.address for d in exp.recipients]


def test_custom_recipient_redirects_to_its_target_keeping_the_original():
    r = resolver(custom("Partner@microsoft.com", "partner@example.net"), mbx("alice@microsoft.com"))
    exp = expand([("Partner@microsoft.com", None), ("alice@microsoft.com", None)], r, site="SiteA")
    assert addresses(exp) == ["partner@example.net", "alice@microsoft.com"]
    assert exp.recipients[0].original == "Partner@microsoft.com"
    assert exp.redirected == (("Partner@microsoft.com", "partner@example.net"),) and exp.changed


def test_plain_recipients_are_left_alone():
    exp = expand([("alice@microsoft.com", None), ("x@example.net", None)], resolver(mbx("alice@microsoft.com")),
                 site="SiteA")
    assert addresses(exp) == ["alice@microsoft.com", "x@example.net"] and not exp.changed


def test_nested_lists_expand_with_duplicates_removed_and_loops_detected():
    r = resolver(mbx("a@m.com"), mbx("b@m.com"), custom("p@m.com", "p@example.net"),
                 dl("all@m.com", "a@m.com", "team@m.com", "p@m.com"),
                 dl("team@m.com", "b@m.com", "A@m.com", "all@m.com"))
    exp = expand([("all@m.com", None), ("b@m.com", None)], r, site="SiteA")
    assert addresses(exp) == ["b@m.com", "a@m.com", "p@example.net"]
    assert exp.expanded == ("all@m.com", "team@m.com")
    assert exp.loops == ("all@m.com",)  # team contains all: met again inside itself
    assert sorted(exp.duplicates) == ["A@m.com", "b@m.com"]


def test_a_list_reached_twice_without_a_loop_is_a_duplicate_not_a_loop():
    r = resolver(mbx("c@m.com"), dl("x@m.com", "l1@m.com", "l2@m.com"), dl("l1@m.com", "shared@m.com"),
                 dl("l2@m.com", "shared@m.com"), dl("shared@m.com", "c@m.com"))
    exp = expand([("x@m.com", None)], r, site="SiteA")
    assert addresses(exp) == ["c@m.com"] and exp.loops == () and exp.duplicates == ("shared@m.com",)


def test_ndrs_go_to_the_nearest_owner_else_the_sender():
    r = resolver(dl("outer@m.com", "a@m.com", "inner@m.com", owner="boss@m.com"),
                 dl("inner@m.com", "b@m.com", owner="lead@m.com"), dl("free@m.com", "c@m.com"))
    exp = expand([("outer@m.com", None), ("free@m.com", None)], r, site="SiteA")
    by = {d.address: d.report_to for d in exp.recipients}
    assert by == {"a@m.com": "boss@m.com", "b@m.com": "lead@m.com", "c@m.com": None}
    groups = exp.groups()
    assert groups[0][0] is None and [d.address for d in groups[0][1]] == ["c@m.com"]
    assert {g for g, _ in groups} == {None, "boss@m.com", "lead@m.com"}


def test_a_list_with_another_expansion_site_is_sent_there_unexpanded():
    r = resolver(dl("far@m.com", "a@m.com", site="SiteB"), dl("near@m.com", "far@m.com", "b@m.com"))
    exp = expand([("near@m.com", None)], r, site="SiteA")
    assert addresses(exp) == ["far@m.com", "b@m.com"] and exp.forwarded == (("far@m.com", "SiteB"),)
    at_b = expand([("far@m.com", None)], r, site="siteb", already_expanded=["near@m.com"])
    assert addresses(at_b) == ["a@m.com"] and at_b.expanded == ("far@m.com",)


def test_a_list_expanded_upstream_is_not_expanded_again():
    r = resolver(dl("all@m.com", "a@m.com"))
    exp = expand([("all@m.com", None), ("z@m.com", None)], r, site="SiteA", already_expanded=["ALL@m.com"])
    assert addresses(exp) == ["z@m.com"] and exp.loops == ("all@m.com",) and exp.expanded == ()


def test_trace_header_marks_round_trip():
    lines = mark_lines(["all@m.com", "team@m.com"])
    assert lines == f"{EXPANDED_HEADER}: all@m.com\r\n{EXPANDED_HEADER}: team@m.com\r\n".encode()
    header = (lines + b"Subject: x\r\nX-IMS-Expanded-DL: a@b.c, d@e.f\r\n").decode()
    assert expanded_marks(header) == ["all@m.com", "team@m.com", "a@b.c", "d@e.f"]


def obj(kind: str, alias: str, data: dict, home: str = "SiteB") -> DirObject:
    return DirObject(f"{kind}:{home}:{alias.lower()}", kind, home, Stamp(1, 1.0, home), False,
                     {"alias": alias, "proxy_addresses": [f"SMTP:{alias}@m.com"], **data})


@pytest.mark.parametrize(("kind", "data", "problem"), [
    ("custom", {"target": "p@example.net"}, None),
    ("custom", {"target": "not an address"}, "bad target"),
    ("custom", {}, "bad target"),
    ("dl", {"members": ["a@m.com"], "owner": "o@m.com", "expansion_site": "SiteC"}, None),
    ("dl", {"members": "a@m.com"}, "bad members"),
    ("dl", {"members": ["@@"]}, "bad member"),
    ("dl", {"owner": "x"}, "bad owner"),
    ("dl", {"expansion_site": "../x"}, "bad expansion site"),
])
def test_replicated_objects_are_checked(kind, data, problem):
    found = object_problem(obj(kind, "Thing", data), receiving_site="SiteA")
    assert (found is None) if problem is None else (found is not None and problem in found), found
    w = obj(kind, "Thing", data).to_wire()
    assert DirObject.from_wire(w).kind == kind


def test_object_id_must_match_the_kind():
    o = obj("custom", "Thing", {"target": "p@example.net"})
    wrong = DirObject("mailbox:SiteB:thing", "custom", "SiteB", o.stamp, False, o.data)
    assert "does not match" in (object_problem(wrong, receiving_site="SiteA") or "")


@pytest.fixture
def directory(tmp_path):
    d = Directory(tmp_path / "directory.sqlite3", "SiteA")
    d.provision(organisation="ExchangeORG", server="ServerA", site_domain="SiteA.microsoft.com", hostname="h",
                mailboxes=[("alice", "Alice", ()), ("bob", "Bob", ())])
    yield d
    d.close()


def test_store_addresses_custom_recipients_and_lists_like_mailboxes(directory):
    directory.set_site_addressing("@microsoft.com", update_mailboxes=True)
    p = directory.add_custom_recipient("Partner", "partner@example.net", "Partner Inc")
    assert p.primary_address == "Partner@microsoft.com"  # Q258203: the company domain, like a mailbox
    staff = directory.add_distribution_list("Staff", ["alice@microsoft.com", "Partner@microsoft.com"],
                                            owner="bob@microsoft.com")
    assert isinstance(directory.find_entry("partner@MICROSOFT.com"), CustomRecipient)
    assert directory.find_entry("staff@microsoft.com") == staff
    assert directory.find_recipient("staff@microsoft.com") is None  # not a mailbox: the door expands it
    with pytest.raises(DirectoryError, match="taken"):
        directory.add_custom_recipient("alice", "x@example.net")
    with pytest.raises(DirectoryError, match="already belongs"):
        directory.add_distribution_list("Other", extra_addresses=["Partner@microsoft.com"])
    with pytest.raises(DirectoryError, match="already belongs"):
        directory.add_mailbox("carol", extra_addresses=["staff@microsoft.com"])
    with pytest.raises(DirectoryInputError, match="own addresses"):
        directory.add_custom_recipient("Loop", "loop@microsoft.com")
    with pytest.raises(DirectoryInputError, match="member"):
        directory.add_distribution_list("Bad", ["not an address"])
    changed = directory.set_distribution_list("Staff", add=["bob@microsoft.com"], remove=["ALICE@microsoft.com"],
                                              owner="", expansion_site="SiteB")
    assert changed.members == ("Partner@microsoft.com", "bob@microsoft.com") and changed.owner == ""
    view = directory.find_recipient("staff@microsoft.com")  # expanded at SiteB: routed there
    assert view is not None and view.home_site == "SiteB"
    directory.delete_recipient("custom", "Partner")
    assert directory.find_entry("partner@microsoft.com") is None
    assert [r.alias for r in directory.recipients("custom", include_deleted=True)] == ["Partner"]
    directory.add_mailbox("Partner2", extra_addresses=["Partner@microsoft.com"])  # the address is free again


def test_site_addressing_bulk_update_readdresses_them_too(directory):
    directory.add_custom_recipient("Partner", "partner@example.net")
    directory.add_distribution_list("Staff", ["alice@SiteA.microsoft.com"])
    assert directory.find_entry("Partner@SiteA.microsoft.com") is not None
    report = directory.set_site_addressing("@microsoft.com", update_mailboxes=True)
    assert report.updated == 4
    assert directory.find_entry("partner@microsoft.com").alias == "Partner"
    assert directory.find_entry("staff@microsoft.com").alias == "Staff"
    assert directory.find_entry("staff@SiteA.microsoft.com").alias == "Staff"  # the old one kept


def test_configured_ones_are_created_once(directory):
    made = directory.ensure_configured([("Partner", "", "partner@example.net", ())],
                                       [("Staff", "All staff", ["alice@SiteA.microsoft.com"], "", "", ()),
                                        ("alice", "", [], "", "", ())])
    assert made[:2] == ["Partner", "Staff"] and "alice: not created" in made[2]
    directory.delete_recipient("dl", "Staff")
    again = directory.ensure_configured([("Partner", "", "partner@example.net", ())],
                                        [("Staff", "All staff", [], "", "", ())])
    assert again == []  # once deleted, it stays deleted


def test_console_recipients_show_custom_recipients_and_lists():
    from imsrelay.console.views import recipients

    home = {"custom_recipients": [{"alias": "Partner", "display_name": "Partner Inc", "home_site": "SiteA",
                                   "primary_address": "Partner@m.com", "proxy_addresses": ["SMTP:Partner@m.com"],
                                   "kind": "custom", "target": "partner@example.net"}],
            "distribution_lists": [{"alias": "Staff", "display_name": "Staff", "home_site": "SiteA",
                                    "primary_address": "Staff@m.com", "proxy_addresses": ["SMTP:Staff@m.com"],
                                    "kind": "dl", "members": ["a@m.com"], "owner": "", "expansion_site": ""}],
            "mailboxes": [{"alias": "Staff", "display_name": "Staff", "home_site": "SiteA",
                           "primary_address": "Staff2@m.com", "proxy_addresses": ["SMTP:Staff2@m.com"]}]}
    older = {"distribution_lists": [{**home["distribution_lists"][0], "members": []}]}
    rows = recipients({"SiteA": home, "SiteB": older})
    assert [(r["kind"], r["alias"]) for r in rows] == [("mailbox", "Staff"), ("custom", "Partner"), ("dl", "Staff")]
    assert rows[1]["target"] == "partner@example.net" and rows[1]["known_at"] == ["SiteA"]
    assert rows[2]["members"] == ["a@m.com"] and rows[2]["known_at"] == ["SiteA", "SiteB"]
    assert rows[2]["differs_at"] == ["SiteB"]  # its members changed at home, not yet replicated there
