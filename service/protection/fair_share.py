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

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

V = TypeVar("V")


class FairShareMap(Generic[V]):
    def __init__(
        self, max_entries: int, on_evict: Callable[[str, str, V], None] | None = None
    ) -> None:
        self._max = max_entries
        self._size = 0
        self._tenants: dict[str, OrderedDict[str, V]] = {}
        self._on_evict = on_evict  # told (tenant, key, value) of each entry evicted

    def __len__(self) -> int:
        return self._size

    def held_by(self, tenant: str) -> int:
        entries = self._tenants.get(tenant)
        return 0 if entries is None else len(entries)

    def get(self, tenant: str, key: str) -> V | None:
        entries = self._tenants.get(tenant)
        return None if entries is None else entries.get(key)

    def oldest(self, tenant: str) -> tuple[str, V] | None:
        entries = self._tenants.get(tenant)
        if not entries:
            return None
        key = next(iter(entries))  # an OrderedDict's first key: constant time
        return key, entries[key]

    def of(self, tenant: str) -> Mapping[str, V]:
        """``tenant``'s entries, oldest first (read only; empty when it holds none)."""
        return self._tenants.get(tenant) or {}

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

    def put_all(self, tenant: str, keys: list[str], value: V) -> None:
        """``put`` of ``value`` under each of ``keys`` (distinct, none held by ``tenant``
        yet): while the map has room for them all, a bare store a key rather than a
        call (the in-flight ids of a batch; ``OrderedDict.update`` takes twice as long)."""
        if not keys:
            return
        if self._size + len(keys) > self._max:
            for key in keys:  # evicting as it goes, exactly as ``put``
                self.put(tenant, key, value)
            return
        entries = self._tenants.setdefault(tenant, OrderedDict())
        before = len(entries)
        for key in keys:
            entries[key] = value
        self._size += len(entries) - before

    def pop_all(self, tenant: str, keys: Iterable[str]) -> None:
        """``pop`` of each of ``keys`` ``tenant`` holds."""
        entries = self._tenants.get(tenant)
        if entries is None:
            return
        before = len(entries)
        for key in keys:
            entries.pop(key, None)
        self._size -= before - len(entries)
        if not entries:
            del self._tenants[tenant]

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
        key, value = entries.popitem(last=False)
        self._size -= 1
        if not entries:
            del self._tenants[victim]
        if self._on_evict is not None:
            self._on_evict(victim, key, value)


class _Remembered:
    """One tenant's digests: all of them in one set (a lookup is one probe, not one a
    generation), and per generation, oldest first, (expiry, the digests it added)."""

    __slots__ = ("digests", "generations")

    def __init__(self) -> None:
        self.digests: set[int] = set()
        self.generations: deque[tuple[float, list[int]]] = deque()

    def drop_oldest(self) -> int:
        """Forget the oldest generation's digests; how many they were."""
        _, dropped = self.generations.popleft()
        self.digests.difference_update(dropped)
        return len(dropped)


class FairShareGenerations:
    """A bounded set of 64-bit digests per tenant, each remembered until its
    generation expires: the compact store behind the record-dedup table's written ids.

    A tenant's new digests go into its newest generation, which takes at most
    ``max_entries // GENERATIONS`` of them and stays open for ``span_s``; the generation
    expires ``ttl_s`` after it was opened plus ``span_s``: a digest is remembered
    for ``ttl_s`` and at most ``span_s`` longer, from when it was first added. Expired and evicted generations are
    dropped whole (constant time per digest). A lookup probes one set of the tenant's
    digests, not each generation's (0.47 µs a digest with eight generations of a
    million digests). Eviction follows ``FairShareMap``'s rule, a generation at a time:
    the inserting tenant's oldest when it holds at least its fair share, else the
    largest tenant's.
    """

    GENERATIONS = 8

    def __init__(self, max_entries: int, ttl_s: float, span_s: float) -> None:
        self._max = max_entries
        self._ttl_s = ttl_s
        self._span_s = span_s
        self._cap = max(1, max_entries // self.GENERATIONS)
        self._size = 0
        self._tenants: dict[str, _Remembered] = {}

    def __len__(self) -> int:
        return self._size

    def held_by(self, tenant: str) -> int:
        remembered = self._tenants.get(tenant)
        return 0 if remembered is None else len(remembered.digests)

    def tenants(self) -> Iterator[str]:
        return iter(self._tenants)

    def holding(self, tenant: str, digests: Iterable[int], now: float) -> set[int]:
        """Which of ``digests`` ``tenant`` remembers at ``now`` (dropping what expired)."""
        remembered = self._expire(tenant, now)
        if remembered is None:
            return set()
        wanted = digests if isinstance(digests, set | frozenset) else set(digests)
        return remembered.digests & wanted

    def add(self, tenant: str, digests: Iterable[int], now: float) -> None:
        """Remember ``digests`` for ``tenant`` from ``now``, evicting if the store is full."""
        remembered = self._expire(tenant, now)
        if remembered is None:
            remembered = self._tenants[tenant] = _Remembered()
        # One already remembered stays in the generation that has it: remembered from
        # its first add, and each digest in one generation only (``drop_oldest`` drops
        # from the set what its generation added, and the sizes stay true).
        pending = list(set(digests).difference(remembered.digests))
        generations = remembered.generations
        start = 0
        while start < len(pending):
            if not generations or len(generations[-1][1]) >= self._cap or generations[-1][0] - self._ttl_s <= now:
                # the newest is full, or was opened span_s ago (its expiry - ttl_s)
                generations.append((now + self._ttl_s + self._span_s, []))
            newest = generations[-1][1]
            chunk = pending[start : start + self._cap - len(newest)]
            newest += chunk
            remembered.digests.update(chunk)
            self._size += len(chunk)
            start += len(chunk)
        while self._size > self._max:
            self._evict_for(tenant)

    def _expire(self, tenant: str, now: float) -> _Remembered | None:
        remembered = self._tenants.get(tenant)
        if remembered is None:
            return None
        generations = remembered.generations
        while generations and generations[0][0] <= now:
            self._size -= remembered.drop_oldest()
        if not generations:
            del self._tenants[tenant]
            return None
        return remembered

    def _evict_for(self, tenant: str) -> None:
        present = len(self._tenants) + (tenant not in self._tenants)
        share = self._max // present
        victim = tenant
        if self.held_by(tenant) < max(1, share):
            victim = max(self._tenants, key=self.held_by)
        remembered = self._tenants[victim]
        self._size -= remembered.drop_oldest()
        if not remembered.generations:
            del self._tenants[victim]
