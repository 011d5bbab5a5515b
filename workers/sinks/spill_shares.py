"""SpillShares: whose spilled records wait for Kafka, and who may spill more.

During a Kafka outage every tenant's writes go to the one spill, bounded by
``spill_max_records``. Without shares a tenant posting large batches filled it, and
then every tenant's ingests were refused. Past ``spill_tenant_share`` of the bound
(three quarters by default) a tenant may add to the spill only while it would hold no
more than its fair share: the bound over the tenants holding spilled records, the
writer counted, and one more for a tenant still to come. So a tenant alone stops at
the share, and the rest is kept for the others; beside a flooding tenant, one within
its share spills on to the end, and a tenant holding none of it may always add one
write. Records already spilled are durable and never evicted: the share limits what
is added.

Writes on their way to Kafka count too (``took_off``, ``landed``): one that fails
spills whatever its tenant holds (Kafka may hold part of it), so a freeze turned a
flooding tenant's writes in flight (two produce timeouts of them) into the room kept
for the others (a review: beside a tenant posting 2,000 records a second, one posting
100 was refused for the last 10 s of a 20 s freeze). So, once Kafka is slow to answer
(``SpillingKafkaSink``), a new write of a tenant whose spilled and flying records
would pass its share is refused before Kafka is tried, nothing written; while Kafka
answers, what flies is not held against anyone.

The counts follow the log: each write's records are attributed in the order they are
handed to the log, and the drainer forwards in that order, so what it forwards is
taken off the oldest writes first. Records spilled before this process started (or
that a restarted drainer sends again) belong to no tenant and come first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from mlgate.workers.sinks.records import OutboundRecord

TenantRuns = Sequence[tuple[str, int]]
"""Whose records a write holds, in their order: runs of (tenant, how many)."""


@dataclass(slots=True, eq=False)
class Span:
    """One tenant's records next to each other in the log, not yet forwarded."""

    tenant: str
    records: int


Claim = tuple[Span, int]
"""The records a write added to a span: given back if the log does not take them."""


class SpillShares:
    def __init__(self, max_records: int, share: float = 0.75, unattributed: int = 0) -> None:
        self._max = max_records
        self._shared_beyond = share * max_records
        self._spans: deque[Span] = deque()
        self._held: dict[str, int] = {}
        self._flying: dict[str, int] = {}  # on their way to Kafka, not spilled
        self._flying_total = 0
        self.unattributed = unattributed  # in the log ahead of every span

    def held_by(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    def tenant_over_share(self, runs: TenantRuns, backlog: int) -> str | None:
        """With ``backlog`` records in the spill, the first tenant of ``runs`` that
        would hold more than its fair share with them, or None. A tenant holding none
        of the spill is never named: its write goes in whatever its size, within the
        bound (a review: with many tenants in the spill the share fell below one
        batch, and a tenant with nothing spilled was refused with room to spare)."""
        wants: dict[str, int] = {}
        for tenant, count in runs:
            wants[tenant] = wants.get(tenant, 0) + count
        if backlog + self._flying_total + sum(wants.values()) <= self._shared_beyond:
            return None
        holding = self._held.keys() | self._flying.keys()
        present = len(holding) + sum(1 for tenant in wants if tenant not in holding)
        share = self._max / (present + 1)
        for tenant, count in wants.items():
            held = self._held.get(tenant, 0) + self._flying.get(tenant, 0)
            if held and held + count > share:
                return tenant
        return None

    def took_off(self, runs: TenantRuns) -> None:
        """A write on its way to Kafka: counted as its tenants' until ``landed``."""
        flying = self._flying
        for tenant, count in runs:
            flying[tenant] = flying.get(tenant, 0) + count
            self._flying_total += count

    def landed(self, runs: TenantRuns) -> None:
        """The write ``took_off`` is no longer on its way: in Kafka, or to spill."""
        flying = self._flying
        for tenant, count in runs:
            left = flying.get(tenant, 0) - count
            if left > 0:
                flying[tenant] = left
            else:
                flying.pop(tenant, None)
            self._flying_total -= count

    def add(self, runs: TenantRuns) -> list[Claim]:
        """Attribute a write handed to the log now (after every write added before).
        A run of the tenant of the newest span joins it: a spill filled by one-record
        writes holds few spans, not one a write."""
        held, spans = self._held, self._spans
        claims: list[Claim] = []
        for tenant, count in runs:
            if not count:
                continue
            if spans and spans[-1].tenant == tenant:
                span = spans[-1]
                span.records += count
            else:
                span = Span(tenant, count)
                spans.append(span)
            held[tenant] = held.get(tenant, 0) + count
            claims.append((span, count))
        return claims

    def give_back(self, claims: list[Claim]) -> None:
        """A write the log did not take: its records are not in it. Its spans stay in
        place, the smaller, so the order of the others holds."""
        for span, count in claims:
            taken = min(count, span.records)
            self._take(span.tenant, taken)
            span.records -= taken

    def forwarded(self, records: int) -> None:
        """The oldest ``records`` of the log reached Kafka."""
        from_before = min(records, self.unattributed)
        self.unattributed -= from_before
        records -= from_before
        spans = self._spans
        while records and spans:
            span = spans[0]
            taken = min(records, span.records)
            self._take(span.tenant, taken)
            span.records -= taken
            records -= taken
            if not span.records:
                spans.popleft()
        while spans and not spans[0].records:
            spans.popleft()

    def sent_again(self, records: int) -> None:
        """A restarted drainer reads on from an older offset: what it sends again
        comes ahead of every span."""
        self.unattributed += records

    def _take(self, tenant: str, records: int) -> None:
        left = self._held.get(tenant, 0) - records
        if left > 0:
            self._held[tenant] = left
        else:
            self._held.pop(tenant, None)


def runs_of(subset: list[OutboundRecord], records: list[OutboundRecord], runs: TenantRuns) -> TenantRuns:
    """Whose records ``subset`` (some of ``records``, in their order) holds."""
    owner: dict[int, str] = {}
    start = 0
    for tenant, count in runs:
        for record in records[start : start + count]:
            owner[id(record)] = tenant
        start += count
    subset_runs: list[tuple[str, int]] = []
    for record in subset:
        tenant = owner.get(id(record), "")
        if subset_runs and subset_runs[-1][0] == tenant:
            subset_runs[-1] = (tenant, subset_runs[-1][1] + 1)
        else:
            subset_runs.append((tenant, 1))
    return subset_runs
