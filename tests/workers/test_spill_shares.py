"""The spill's shares: past three quarters full, a tenant at its fair share adds
nothing more, one within it still does, and a tenant alone may fill it all; what is
forwarded is taken off the oldest writes first."""

from __future__ import annotations

from mlgate.workers.sinks.records import OutboundRecord
from mlgate.workers.sinks.spill_shares import SpillShares, runs_of


def test_a_tenant_alone_stops_at_the_share() -> None:
    shares = SpillShares(100, share=0.75)
    shares.add([("flood", 70)])
    assert shares.tenant_over_share([("flood", 5)], backlog=70) is None
    shares.add([("flood", 5)])
    assert shares.tenant_over_share([("flood", 1)], backlog=75) == "flood"


def test_a_share_of_one_lets_a_tenant_alone_fill_the_spill() -> None:
    shares = SpillShares(100, share=1.0)
    shares.add([("flood", 99)])
    assert shares.tenant_over_share([("flood", 1)], backlog=99) is None


def test_past_the_share_a_tenant_adds_up_to_its_fair_share_one_tenant_more_counted() -> None:
    shares = SpillShares(100, share=0.75)
    shares.add([("flood", 75)])
    shares.add([("calm", 10)])
    # Two tenants and one still to come: a fair share is a third.
    assert shares.tenant_over_share([("calm", 23)], backlog=85) is None
    assert shares.tenant_over_share([("calm", 24)], backlog=85) == "calm"
    shares.add([("calm", 10)])
    assert shares.tenant_over_share([("flood", 1)], backlog=95) == "flood"


def test_a_mixed_write_names_its_tenant_over_share() -> None:
    shares = SpillShares(100, share=0.75)
    shares.add([("flood", 70), ("calm", 5)])
    assert shares.tenant_over_share([("calm", 1), ("flood", 1), ("calm", 1)], backlog=75) == "flood"
    assert shares.tenant_over_share([("calm", 2), ("calm", 3)], backlog=75) is None


def test_forwarded_records_are_taken_off_the_oldest_writes_first() -> None:
    shares = SpillShares(100, unattributed=3)
    shares.add([("a", 4), ("b", 2)])
    shares.add([("a", 5)])
    shares.forwarded(3)  # from before this start: nobody's
    assert (shares.held_by("a"), shares.held_by("b")) == (9, 2)
    shares.forwarded(5)
    assert (shares.held_by("a"), shares.held_by("b")) == (5, 1)
    shares.forwarded(6)
    assert (shares.held_by("a"), shares.held_by("b")) == (0, 0)


def test_a_write_the_log_did_not_take_is_given_back_and_skipped() -> None:
    shares = SpillShares(100)
    shares.add([("a", 2)])
    refused = shares.add([("b", 7)])
    shares.add([("c", 3)])
    shares.give_back(refused)
    assert shares.held_by("b") == 0
    shares.forwarded(4)
    assert (shares.held_by("a"), shares.held_by("c")) == (0, 1)


def test_records_a_restarted_drainer_sends_again_come_before_every_write() -> None:
    shares = SpillShares(100)
    shares.add([("a", 4)])
    shares.forwarded(2)
    shares.sent_again(2)
    shares.forwarded(2)
    assert shares.held_by("a") == 2


def test_the_records_kafka_did_not_take_keep_their_tenants() -> None:
    records = [OutboundRecord(key=f"r{i}".encode(), value=b"", headers=[]) for i in range(6)]
    runs = [("a", 2), ("b", 3), ("a", 1)]
    unwritten = [records[1], records[2], records[4], records[5]]
    assert runs_of(unwritten, records, runs) == [("a", 1), ("b", 2), ("a", 1)]


def test_one_tenants_writes_in_a_row_share_a_span_and_give_back_by_count() -> None:
    shares = SpillShares(100)
    shares.add([("a", 5)])
    failed = shares.add([("a", 3)])
    shares.add([("a", 2)])
    shares.give_back(failed)
    assert shares.held_by("a") == 7
    shares.forwarded(7)
    assert shares.held_by("a") == 0


def test_a_tenant_holding_none_of_the_spill_adds_one_write_past_its_share() -> None:
    """Twelve tenants and one still to come: a share is 7 records, and a tenant with
    nothing spilled still adds its batch of 20; its next is refused."""
    shares = SpillShares(100, share=0.75)
    shares.add([(f"t{n}", 7) for n in range(10)] + [("flood", 5)])
    assert shares.tenant_over_share([("new", 20)], backlog=75) is None
    shares.add([("new", 20)])
    assert shares.tenant_over_share([("new", 1)], backlog=95) == "new"


def test_writes_on_their_way_to_kafka_count_as_their_tenants_until_they_land() -> None:
    shares = SpillShares(100, share=0.75)
    shares.took_off([("flood", 70)])
    shares.took_off([("flood", 5)])
    assert shares.tenant_over_share([("flood", 1)], backlog=0) == "flood"
    assert shares.tenant_over_share([("calm", 20)], backlog=0) is None  # holding none
    shares.landed([("flood", 70)])
    assert shares.tenant_over_share([("flood", 1)], backlog=0) is None
