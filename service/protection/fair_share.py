"""FairShareMap: the bounded in-process map behind every per-tenant store.

The in-process idempotency entries, record-dedup ids and rate-limit buckets each hold
at most ``max_entries`` in all, kept per tenant, oldest first. When the map is full an
insert evicts the oldest entry of its own tenant if that tenant holds at least its fair
share (``max_entries`` / tenants present), else the oldest entry of the tenant holding
the most. So a tenant that floods the map pushes out only its own entries once it holds
its share, and a tenant within its share loses nothing to anyone.

Eviction is ``OrderedDict.popitem(last=False)``: constant time however long the map has
run (STYLE.md habit 20). Finding the largest tenant scans the tenants present, which
happens only while the inserting tenant is under its share.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class FairShareMap(Generic[V]):
    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._size = 0
        self._tenants: dict[str, OrderedDict[str, V]] = {}

    def __len__(self) -> int:
        return self._size

    def held_by(self, tenant: str) -> int:
        entries = self._tenants.get(tenant)
        return 0 if entries is None else len(entries)

    def get(self, tenant: str, key: str) -> V | None:
        entries = self._tenants.get(tenant)
        return None if entries is None else entries.get(key)

    def put(self, tenant: str, key: str, value: V) -> None:
        """Store ``value`` as ``tenant``'s newest entry, evicting one if the map is full."""
        entries = self._tenants.get(tenant)
        if entries is not None and key in entries:
            entries[key] = value
            entries.move_to_end(key)
            return
        if self._size >= self._max:
            self._evict_for(tenant)
        entries = self._tenants.setdefault(tenant, OrderedDict())
        entries[key] = value
        self._size += 1

    def pop(self, tenant: str, key: str) -> V | None:
        entries = self._tenants.get(tenant)
        if entries is None or key not in entries:
            return None
        value = entries.pop(key)
        self._size -= 1
        if not entries:
            del self._tenants[tenant]
        return value

    def drop_oldest_while(self, tenant: str, stale: Callable[[V], bool]) -> None:
        """Drop ``tenant``'s oldest entries for as long as ``stale`` says so."""
        entries = self._tenants.get(tenant)
        if entries is None:
            return
        while entries:
            key = next(iter(entries))  # an OrderedDict's first key: constant time
            if not stale(entries[key]):
                return
            del entries[key]
            self._size -= 1
        del self._tenants[tenant]

    def tenants(self) -> Iterator[str]:
        return iter(self._tenants)

    def _evict_for(self, tenant: str) -> None:
        present = len(self._tenants) + (tenant not in self._tenants)
        share = self._max // present
        victim = tenant
        if self.held_by(tenant) < max(1, share):
            victim = max(self._tenants, key=lambda name: len(self._tenants[name]))
        entries = self._tenants[victim]
        entries.popitem(last=False)
        self._size -= 1
        if not entries:
            del self._tenants[victim]
