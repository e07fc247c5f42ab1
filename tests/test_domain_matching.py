"""Exchange-style domain matching (pure): whole sub-domain trees, ``#`` exact, most specific wins."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from imsrelay.model.addresses import domain_matches, most_specific

label = st.from_regex(r"[a-z][a-z0-9-]{0,6}[a-z0-9]|[a-z]", fullmatch=True)
domain = st.lists(label, min_size=1, max_size=4).map(".".join)


def test_seed_examples():
    assert domain_matches("sea.com", "x.sea.com") and domain_matches("sea.com", "a.b.SEA.com.")
    assert not domain_matches("sea.com", "chelsea.com") and not domain_matches("sea.com", "sea.com.au")
    assert domain_matches("#sea.com", "SEA.COM") and not domain_matches("#sea.com", "x.sea.com")


@given(domain, st.lists(label, max_size=3), label)
def test_property_subtree_not_suffix(base, prefix, glued):
    assert domain_matches(base, ".".join([*prefix, base]))
    assert not domain_matches(base, glued + base)  # "chelsea.com" is not under "sea.com"
    assert domain_matches("#" + base, base) and (not prefix or not domain_matches("#" + base, ".".join([*prefix, base])))


@given(st.lists(domain, min_size=1, max_size=8, unique=True), domain, st.randoms())
def test_property_most_specific_is_the_longest_match_in_any_order(patterns, target, rnd):
    entries = [(p, p) for p in patterns]
    rnd.shuffle(entries)
    found = most_specific(target, entries)
    matching = [p for p in patterns if domain_matches(p, target)]
    if not matching:
        assert found is None
    else:
        assert found is not None and len(found[0]) == max(len(p) for p in matching)
        rnd.shuffle(entries)
        assert most_specific(target, entries) == found  # the order of the table does not matter


@given(domain)
def test_property_exact_entry_beats_subdomain_entry_of_the_same_name(d):
    assert most_specific(d, [(d, "tree"), ("#" + d, "exact")])[1] == "exact"
    assert most_specific("x." + d, [(d, "tree"), ("#" + d, "exact")])[1] == "tree"
