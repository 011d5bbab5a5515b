"""The in-process record-dedup table stays small per remembered id, and its written ids
expire and are evicted a generation at a time with the same fairness as before."""

from __future__ import annotations

import tracemalloc

from mlgate.service.ingest.dedup import NEW, WRITTEN, LocalSeen
from mlgate.service.protection.fair_share import FairShareGenerations

IDS = 100_000


def test_a_written_record_id_costs_under_100_bytes_in_the_local_table() -> None:
    seen = LocalSeen(window_s=600, lapse_s=30, max_entries=10 * IDS)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in range(IDS // 500):
            ids = [f"{batch:010d}-{i:05d}" for i in range(500)]
            seen.claim("t", ids, "token")
            seen.confirm("t", ids, "token")
            del ids
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / IDS < 100


def test_written_ids_stay_duplicates_and_new_ids_are_new() -> None:
    seen = LocalSeen(window_s=600, lapse_s=30, max_entries=1000)
    assert seen.claim("t", ["a", "b"], "one") == NEW * 2
    seen.confirm("t", ["a", "b"], "one")
    assert seen.claim("t", ["a", "c"], "two") == WRITTEN + NEW
    assert seen.claim("u", ["a"], "three") == NEW


def test_a_generation_expires_whole_after_its_time_to_live() -> None:
    store = FairShareGenerations(max_entries=100, ttl_s=10, span_s=1)
    store.add("t", [1, 2], now=0)
    store.add("t", [3], now=0.5)
    assert store.holding("t", [1, 2, 3], now=10.9) == {1, 2, 3}
    assert store.holding("t", [1, 2, 3], now=11) == set()
    assert len(store) == 0


def test_a_flooding_tenant_evicts_its_own_oldest_generation() -> None:
    store = FairShareGenerations(max_entries=16, ttl_s=10, span_s=10)
    store.add("victim", [0], now=0)
    store.add("flooder", list(range(1, 100)), now=0)
    assert len(store) <= 16
    assert store.holding("victim", [0], now=1) == {0}
    assert store.holding("flooder", [99], now=1) == {99}
    assert store.holding("flooder", [1], now=1) == set()


def test_a_tenant_under_its_share_evicts_from_the_largest() -> None:
    store = FairShareGenerations(max_entries=16, ttl_s=10, span_s=10)
    store.add("a", list(range(16)), now=0)
    store.add("b", [100, 101], now=0)
    assert len(store) <= 16
    assert store.holding("b", [100, 101], now=1) == {100, 101}
    assert store.holding("a", [0], now=1) == set() and store.holding("a", [15], now=1) == {15}


def test_a_digest_added_again_is_remembered_from_its_first_add() -> None:
    store = FairShareGenerations(max_entries=100, ttl_s=10, span_s=1)
    store.add("t", [1], now=0)
    store.add("t", [1, 2], now=5)  # a newer generation
    assert len(store) == store.held_by("t") == 2
    assert store.holding("t", [1, 2], now=10.9) == {1, 2}
    assert store.holding("t", [1, 2], now=11) == {2}
    assert len(store) == store.held_by("t") == 1
    assert store.holding("t", [1, 2], now=16) == set()
    assert len(store) == 0
