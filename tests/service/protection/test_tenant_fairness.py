"""The in-process stores are shared fairly among tenants: one tenant's flood of
Idempotency-Keys or API-key buckets evicts only its own entries, never another's."""

from __future__ import annotations

from typing import Any

import pytest

from mlgate.config import Settings
from mlgate.service.protection.fair_share import FairShareMap
from mlgate.service.protection.rate_limits import Limit, LocalBuckets
from mlgate.service.state import RECORD_SINK
from tests.conftest import AppClientFactory
from tests.support import KeyMaker

INGEST = {"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}
MAX_ENTRIES = 20


async def test_a_tenants_flood_of_idempotency_keys_keeps_another_tenants_replay(
    app_client: AppClientFactory, make_settings: Any, api_keys: KeyMaker
) -> None:
    """A tenant with only the predict scope sent bad predicts under fresh keys (4xx
    answers are stored too) until another tenant's stored ingest answer was evicted:
    that tenant's retry was then written a second time."""
    victim = api_keys.create(tenant="victim", scopes="ingest")
    flooder = api_keys.create(tenant="flooder", scopes="predict")
    settings: Settings = make_settings(
        keys_file=str(api_keys.path),
        auth_disabled=False,
        rate_limits_enabled=False,
        feature_dims=(4,),
        idempotency_max_entries=MAX_ENTRIES,
    )
    client = await app_client(settings)
    victim_headers = {"X-API-Key": victim, "Idempotency-Key": "ingest-1"}
    first = await client.post("/api/v2/ingest", json=INGEST, headers=victim_headers)
    assert first.status == 202

    for i in range(3 * MAX_ENTRIES):
        bad = await client.post(
            "/api/v2/predict",
            json={"features": "not a list"},
            headers={"X-API-Key": flooder, "Idempotency-Key": f"flood-{i}"},
        )
        assert 400 <= bad.status < 500

    retry = await client.post("/api/v2/ingest", json=INGEST, headers=victim_headers)
    assert retry.status == 202
    assert retry.headers.get("Idempotent-Replayed") == "true"
    assert await retry.read() == await first.read()
    assert client.app[RECORD_SINK].next_offset == 1


def test_a_tenants_flood_of_key_buckets_keeps_another_tenants_drained_bucket() -> None:
    """Evicting a bucket refills it: a tenant with many keys must not be able to refill
    another tenant's drained buckets by pushing them out."""
    buckets = LocalBuckets(max_buckets=8)
    one = Limit(rate=1e-6, burst=1)
    assert buckets.take("victim", "k:victim", one, "t:victim", one)[0]
    assert not buckets.take("victim", "k:victim", one, "t:victim", one)[0]

    for i in range(100):
        buckets.take("flooder", f"k:flooder-{i}", one, f"t:flooder-{i}", one)

    assert not buckets.take("victim", "k:victim", one, "t:victim", one)[0]


# -- FairShareMap ----------------------------------------------------------------------


def test_a_tenant_over_its_share_evicts_its_own_oldest_entry() -> None:
    shared: FairShareMap[int] = FairShareMap(4)
    shared.put("b", "b0", 0)
    for i in range(10):
        shared.put("a", f"a{i}", i)
    assert len(shared) == 4
    assert shared.get("b", "b0") == 0
    assert [shared.get("a", f"a{i}") for i in (7, 8, 9)] == [7, 8, 9]
    assert shared.get("a", "a6") is None


def test_a_tenant_under_its_share_evicts_from_the_largest() -> None:
    shared: FairShareMap[int] = FairShareMap(4)
    for i in range(4):
        shared.put("a", f"a{i}", i)
    shared.put("b", "b0", 0)
    shared.put("b", "b1", 1)
    assert (shared.held_by("a"), shared.held_by("b")) == (2, 2)
    assert shared.get("a", "a0") is None and shared.get("a", "a3") == 3


@pytest.mark.parametrize("tenants", [1, 3])
def test_fair_share_map_never_holds_more_than_its_bound(tenants: int) -> None:
    shared: FairShareMap[int] = FairShareMap(50)
    for i in range(1000):
        shared.put(f"t{i % tenants}", str(i), i)
        shared.pop(f"t{(i + 1) % tenants}", str(i - 7))
    assert len(shared) <= 50
    assert len(shared) == sum(shared.held_by(t) for t in shared.tenants())


def test_dropping_stale_entries_stops_at_the_first_fresh_one() -> None:
    shared: FairShareMap[int] = FairShareMap(10)
    for i in range(5):
        shared.put("a", str(i), i)
    shared.drop_oldest_while("a", lambda value: value < 3)
    assert shared.held_by("a") == 2 and shared.get("a", "3") == 3
    shared.drop_oldest_while("a", lambda value: True)
    assert len(shared) == 0 and list(shared.tenants()) == []


@pytest.mark.parametrize("held_by_b", [0, 4])
def test_putting_keys_at_once_ends_as_putting_them_one_by_one(held_by_b: int) -> None:
    """With room for them all and without (a tenant under its share evicts from the
    largest, never its own new keys)."""
    at_once: FairShareMap[int] = FairShareMap(4)
    one_by_one: FairShareMap[int] = FairShareMap(4)
    for shared in (at_once, one_by_one):
        for i in range(held_by_b):
            shared.put("b", f"b{i}", i)
    at_once.put_all("a", ["a0", "a1"], 7)
    for key in ("a0", "a1"):
        one_by_one.put("a", key, 7)
    for shared in (at_once, one_by_one):
        assert len(shared) == min(4, held_by_b + 2)
        assert shared.get("a", "a0") == shared.get("a", "a1") == 7
    assert at_once.held_by("b") == one_by_one.held_by("b") == min(held_by_b, 2)


def test_popping_keys_at_once_drops_only_those_held() -> None:
    shared: FairShareMap[int] = FairShareMap(10)
    shared.put_all("a", ["a0", "a1", "a2"], 1)
    shared.pop_all("a", ["a0", "a2", "never-held"])
    assert len(shared) == 1 and shared.get("a", "a1") == 1
    shared.pop_all("a", ["a1"])
    shared.pop_all("nobody", ["a1"])
    assert len(shared) == 0 and list(shared.tenants()) == []
