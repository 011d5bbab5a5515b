"""LaneMailbox: items are taken lane by lane in turn, each lane's in order, and no
lane holds more than its share of the mailbox."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from mlgate.workers.lanes import SHARED_LANE, LaneMailbox


@dataclass
class Item:
    lane: str
    n: int


def _take_all(mailbox: LaneMailbox[Item]) -> list[tuple[str, int]]:
    taken = []
    while not mailbox.empty():
        item = mailbox.get_nowait()
        taken.append((item.lane, item.n))
    return taken


async def test_lanes_take_turns_whatever_order_their_items_came_in() -> None:
    mailbox: LaneMailbox[Item] = LaneMailbox(100)
    for n in range(4):
        mailbox.put_nowait(Item("flood", n))
    mailbox.put_nowait(Item("calm", 0))
    mailbox.put_nowait(Item("third", 0))

    assert _take_all(mailbox) == [
        ("flood", 0), ("calm", 0), ("third", 0), ("flood", 1), ("flood", 2), ("flood", 3)
    ]


async def test_a_lane_that_empties_and_comes_back_waits_its_turn_behind_the_others() -> None:
    mailbox: LaneMailbox[Item] = LaneMailbox(100)
    mailbox.put_nowait(Item("a", 0))
    mailbox.put_nowait(Item("b", 0))
    mailbox.put_nowait(Item("b", 1))
    assert mailbox.get_nowait() == Item("a", 0)
    mailbox.put_nowait(Item("a", 1))

    assert _take_all(mailbox) == [("b", 0), ("a", 1), ("b", 1)]


async def test_lanes_of_their_own_hold_at_most_three_quarters_of_the_mailbox() -> None:
    mailbox: LaneMailbox[Item] = LaneMailbox(8)
    for n in range(6):
        mailbox.put_nowait(Item("flood", n))
    with pytest.raises(asyncio.QueueFull):
        mailbox.put_nowait(Item("flood", 6))
    mailbox.put_nowait(Item(SHARED_LANE, 0))  # the rest is the shared lane's
    mailbox.put_nowait(Item(SHARED_LANE, 1))
    with pytest.raises(asyncio.QueueFull):  # the mailbox itself is full
        mailbox.put_nowait(Item(SHARED_LANE, 2))
    assert mailbox.qsize() == 8 and mailbox.held_by("flood") == 6


async def test_a_waiting_get_and_join_work_as_on_any_queue() -> None:
    mailbox: LaneMailbox[Item] = LaneMailbox(4)
    getter = asyncio.ensure_future(mailbox.get())
    await asyncio.sleep(0)
    mailbox.put_nowait(Item("a", 0))
    assert await getter == Item("a", 0)
    joined = asyncio.ensure_future(mailbox.join())
    await asyncio.sleep(0)
    assert not joined.done()
    mailbox.task_done()
    await asyncio.wait_for(joined, 1)


async def test_the_shared_lane_may_fill_the_whole_mailbox() -> None:
    mailbox: LaneMailbox[Item] = LaneMailbox(4)
    for n in range(4):
        mailbox.put_nowait(Item(SHARED_LANE, n))
    assert mailbox.full()


async def test_a_mailbox_holding_items_has_a_repr_listing_them() -> None:
    mailbox: LaneMailbox[Item] = LaneMailbox(4)
    mailbox.put_nowait(Item("a", 0))
    mailbox.put_nowait(Item("b", 0))
    assert "Item(lane='a', n=0), Item(lane='b', n=0)" in repr(mailbox)


async def test_several_lanes_of_their_own_together_leave_the_shared_lane_its_quarter() -> None:
    mailbox: LaneMailbox[Item] = LaneMailbox(8)
    for n in range(3):
        mailbox.put_nowait(Item("a", n))
        mailbox.put_nowait(Item("b", n))
    with pytest.raises(asyncio.QueueFull):
        mailbox.put_nowait(Item("c", 0))
    mailbox.put_nowait(Item(SHARED_LANE, 0))
    mailbox.put_nowait(Item(SHARED_LANE, 1))
    assert mailbox.full()


async def test_a_lanes_turn_lasts_its_quantum_by_weight_and_one_item_at_least() -> None:
    mailbox: LaneMailbox[Item] = LaneMailbox(100)
    mailbox.take_turns_of(4, lambda item: item.n)
    for n in (1, 1, 1, 1, 1, 1):
        mailbox.put_nowait(Item("light", n))
    for n in (9, 2):
        mailbox.put_nowait(Item("heavy", n))

    assert _take_all(mailbox) == [
        ("light", 1), ("light", 1), ("light", 1), ("light", 1),  # a turn: weight 4
        ("heavy", 9),  # one item, heavier than a turn
        ("light", 1), ("light", 1),
        ("heavy", 2),
    ]
