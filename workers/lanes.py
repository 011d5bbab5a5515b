"""LaneMailbox: a bounded mailbox whose items are taken lane by lane in turn.

An actor shared by many callers (the Kafka writer, by every tenant's ingests) takes
its work first come, first served from a plain queue: a tenant that queues a hundred
large writes then makes every other tenant's small write wait for all of them. Here
each item names its ``lane``; items of one lane keep their order, and the lanes take
turns (round robin), so a lane's next item waits for at most one item of each other
lane (or, with ``take_turns_of``, one turn's weight of each: the inference worker's
lanes, a tenant's each, take turns of a batch of rows at most). Most work goes in the ``SHARED_LANE``; a caller heavy enough to hold up the rest
(a tenant with many records on their way: ``IngestPipeline``) gets a lane of its own,
and the lanes of their own hold at most ``LANE_SHARE`` of the mailbox together, the
rest kept for the shared lane, so heavy callers cannot fill the mailbox and have the
others' work refused.

It is an ``asyncio.Queue`` (``get``, ``put_nowait``, ``join``, ``task_done`` as
always) whose storage is a dict of deques, the way ``PriorityQueue`` swaps in a heap.
Actors only ``put_nowait``; an awaited ``put`` waits while the mailbox is full, but a
lane at its share raises ``QueueFull`` as ``put_nowait`` does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

# The most of the mailbox the lanes of their own may hold together.
LANE_SHARE = 0.75
# The lane of everything not given one of its own: no share applies to it.
SHARED_LANE = ""


class HasLane(Protocol):
    @property
    def lane(self) -> str: ...


ItemT = TypeVar("ItemT", bound=HasLane)


class _Lanes:
    """The items of each lane, in the order the lanes take their turns next. A lane's
    turn takes items while they weigh ``quantum`` at most together by ``weight`` (an
    item each, unless told otherwise), one item at least however heavy, or until it
    has nothing left."""

    __slots__ = ("by_lane", "size", "quantum", "weight", "turn_used")

    def __init__(self) -> None:
        self.by_lane: dict[str, deque[Any]] = {}
        self.size = 0
        self.quantum = 1
        self.weight: Callable[[Any], int] | None = None
        self.turn_used = 0  # of the quantum, by the lane whose turn it is (the first)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Any]:
        """The items, lane by lane (``Queue.__repr__`` lists them)."""
        for items in self.by_lane.values():
            yield from items

    def held_by(self, lane: str) -> int:
        items = self.by_lane.get(lane)
        return 0 if items is None else len(items)

    @property
    def held_by_own_lanes(self) -> int:
        return self.size - self.held_by(SHARED_LANE)

    def append(self, item: HasLane) -> None:
        items = self.by_lane.get(item.lane)
        if items is None:
            items = self.by_lane[item.lane] = deque()
        items.append(item)
        self.size += 1

    def popleft(self) -> Any:
        # The first lane in the dict has its turn (the one that waited longest); once
        # its turn is over it goes last (re-inserted), or away when it has nothing left.
        by_lane = self.by_lane
        lane = next(iter(by_lane))
        items = by_lane[lane]
        item = items.popleft()
        self.size -= 1
        if not items:
            del by_lane[lane]
            self.turn_used = 0
            return item
        if len(by_lane) == 1:
            # Alone, it keeps the turn, counted afresh once another lane waits: what
            # turns cost (a dict's re-insertion an item) the common case does not pay.
            self.turn_used = 0
            return item
        weigh = self.weight
        if weigh is None:
            self.turn_used += 1
            over = self.turn_used + 1 > self.quantum
        else:
            # The turn ends before an item that would take it past the quantum (a
            # review: turns of two 40-row requests were two batches each, and the
            # inference worker's estimate of a turn as one batch was half the wait).
            self.turn_used += weigh(item)
            over = self.turn_used + weigh(items[0]) > self.quantum
        if over:
            del by_lane[lane]
            by_lane[lane] = items
            self.turn_used = 0
        return item


class LaneMailbox(asyncio.Queue[ItemT]):
    """``asyncio.Queue`` taken lane by lane in turn; ``put_nowait`` raises
    ``QueueFull`` also for an item of a lane of its own when those lanes hold their
    share (``LANE_SHARE``)."""

    _queue: _Lanes

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self._bound = maxsize
        self._lane_limit = max(1, int(maxsize * LANE_SHARE)) if maxsize > 0 else 0

    def _init(self, maxsize: int) -> None:
        self._queue = _Lanes()

    # ``Queue``'s own ask ``len(self._queue)``, a call of ``_Lanes.__len__`` more each,
    # several a request on the inference worker's path.
    def qsize(self) -> int:
        return self._queue.size

    def empty(self) -> bool:
        return not self._queue.size

    def full(self) -> bool:
        return 0 < self._bound <= self._queue.size

    def _put(self, item: ItemT) -> None:
        self._queue.append(item)

    def _get(self) -> ItemT:
        item: ItemT = self._queue.popleft()
        return item

    def put_nowait(self, item: ItemT) -> None:
        if (
            item.lane != SHARED_LANE
            and self._lane_limit
            and self._queue.held_by_own_lanes >= self._lane_limit
        ):
            raise asyncio.QueueFull
        super().put_nowait(item)

    def held_by(self, lane: str) -> int:
        """How many items ``lane`` has waiting."""
        return self._queue.held_by(lane)

    def head_of(self, lane: str) -> ItemT | None:
        """The item ``lane`` gives next (None when it has none)."""
        items = self._queue.by_lane.get(lane)
        return items[0] if items else None

    @property
    def held_by_own_lanes(self) -> int:
        return self._queue.held_by_own_lanes

    def take_turns_of(self, quantum: int, weight: Callable[[ItemT], int]) -> None:
        """Each lane's turn takes items while they weigh ``quantum`` at most together
        (one at least), rather than one item."""
        self._queue.quantum, self._queue.weight = quantum, weight

    def share_own_lanes(self, share: float) -> None:
        """The lanes of their own may hold ``share`` of the mailbox together (rather
        than ``LANE_SHARE``); 1: all of it, unchecked."""
        if self.maxsize > 0:
            self._lane_limit = 0 if share >= 1 else max(1, int(self.maxsize * share))

    @property
    def lane_limit(self) -> int:
        """The most items the lanes of their own may hold together (0: no limit)."""
        return self._lane_limit
