"""A serving process settles its garbage collector once the site has started
(``imsrelay.commands.serve.settle_gc``): what exists then is frozen, and the first
generation is collected less often; cycles made afterwards are still collected."""

from __future__ import annotations

import gc
import weakref

from imsrelay.commands.serve import GC_THRESHOLDS, settle_gc


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_settle_gc_freezes_what_exists_and_still_collects_later_cycles():
    before = gc.get_threshold()
    try:
        settle_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # the objects alive at start are out of the collector's sight
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made while serving
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
