"""InferenceWorker between tenants: a tenant with many rows queued waits its turn with
the others, is not counted ahead of them when they are admitted, and holds at most
its share of the mailbox."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from mlgate.workers.errors import DeadlineExpired, MailboxFull
from mlgate.workers.inference import batching
from tests.support import until
from tests.workers.conftest import WorkerFactory
from tests.workers.test_inference_worker import RecordingSession, rows, soon

FLOOD_ROWS = 16  # a flooding tenant's requests: each a batch of its own (max 8 rows)


def _position_of(session: RecordingSession, row: np.ndarray) -> int:
    """The index of the batch that computed ``row``."""
    for index, batch in enumerate(session.batches):
        if any(np.array_equal(row[0], computed) for computed in batch):
            return index
    raise AssertionError("the row was never computed")


async def _flooded_worker(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession, **options: object
) -> tuple[batching.InferenceWorker, RecordingSession, threading.Event, list[asyncio.Future]]:
    """A worker (batches of 8 rows) whose model is held at its first run, with ten of
    tenant ``flood``'s 16-row requests queued behind it."""
    gate = threading.Event()
    session = RecordingSession(demo_session, gate=gate)
    options.setdefault("mailbox_size", 64)
    worker = make_worker(session, max_batch_size=8, **options)
    flood = [worker.submit(rows(FLOOD_ROWS, seed), soon(), tenant="flood") for seed in range(10)]
    await asyncio.to_thread(session.entered.wait, 5)
    return worker, session, gate, flood


async def test_a_tenants_row_queued_behind_another_tenants_flood_is_computed_within_a_turn(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    worker, session, gate, flood = await _flooded_worker(make_worker, demo_session)
    single = rows(1, 99)
    answer = worker.submit(single, soon(), tenant="quiet")
    gate.set()
    await asyncio.gather(answer, *flood)
    # The one computing, the one already handed to the thread behind it, then at most
    # one more of the flood's before the quiet tenant's row.
    assert _position_of(session, single) <= 3
    assert len(session.batches) == 11


async def test_a_flooding_tenant_keeps_its_own_requests_in_order(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    worker, session, gate, flood = await _flooded_worker(make_worker, demo_session)
    gate.set()
    await asyncio.gather(*flood)
    firsts = [batch[0] for batch in session.batches]
    expected = [rows(FLOOD_ROWS, seed)[0] for seed in range(10)]
    assert all(np.array_equal(a, b) for a, b in zip(firsts, expected, strict=True))


async def test_a_tenant_is_not_shed_for_the_rows_another_tenant_queued(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    """Ten batches of the flood's wait ahead; the quiet tenant's row waits for two or
    three of them, and is admitted for a deadline the whole queue would miss."""
    session = RecordingSession(demo_session, delay_s=0.05)
    worker = make_worker(session, max_batch_size=8, mailbox_size=64)
    await worker.submit(rows(1), soon(), tenant="flood")  # a batch takes ~50 ms
    session.gate = gate = threading.Event()
    flood = [worker.submit(rows(8, seed), soon(), tenant="flood") for seed in range(10)]
    deadline = time.monotonic() + 0.45  # the flood's ten batches take 0.5 s
    with pytest.raises(MailboxFull, match="deadline"):
        worker.check_room(1, deadline, tenant="flood")
    answer = worker.submit(rows(1, 99), deadline, tenant="quiet")
    gate.set()
    assert (await answer)["probabilities"].shape == (1, 2)
    await asyncio.gather(*flood)


@pytest.mark.parametrize(
    "bound", [{"mailbox_size": 8}, {"mailbox_size": 100, "mailbox_bytes": 8 * rows(1).nbytes}]
)
async def test_a_tenant_holds_at_most_its_share_of_the_mailbox_in_requests_and_bytes(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession, bound: dict[str, int]
) -> None:
    gate = threading.Event()
    worker = make_worker(RecordingSession(demo_session, gate=gate), **bound)
    held = []
    with pytest.raises(MailboxFull, match="share"):
        for seed in range(8):
            held.append(worker.submit(rows(1, seed), soon(), tenant="flood"))
    assert len(held) == int(8 * batching.TENANT_SHARE)
    others = [worker.submit(rows(1, 50 + seed), soon(), tenant="quiet") for seed in range(2)]
    gate.set()
    await asyncio.gather(*held, *others)


async def test_a_tenants_requests_handed_to_the_thread_still_hold_its_share(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    """A review: a tenant's requests taken from the queue into the batch waiting behind
    the one computing left its share but still filled the mailbox, so the flood
    refilled its share behind them and another tenant was refused as full."""
    gate = threading.Event()
    session = RecordingSession(demo_session, gate=gate)
    worker = make_worker(session, mailbox_size=8, max_batch_size=8)
    held: list[asyncio.Future] = []

    def flood() -> None:  # until refused for its share (or a full mailbox)
        with pytest.raises(MailboxFull):
            while True:
                held.append(worker.submit(rows(1, len(held)), soon(), tenant="flood"))

    flood()
    await asyncio.to_thread(session.entered.wait, 5)  # a batch computes, held
    for _ in range(3):  # more batches formed and handed to the thread behind it
        await asyncio.sleep(0.05)
        flood()
    answer = worker.submit(rows(1, 99), soon(), tenant="quiet")
    gate.set()
    await asyncio.gather(answer, *held)


async def test_a_share_is_forgotten_once_requests_that_expired_waiting_in_the_thread_settle(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    """Requests counted as waiting in the thread that expire there, or whose batch ends
    before it computes, leave nothing counted: the tenant's share is whole again."""
    gate = threading.Event()
    session = RecordingSession(demo_session, gate=gate)
    worker = make_worker(session, mailbox_size=8, max_batch_size=2)
    computing = worker.submit(rows(1, 0), soon(), tenant="flood")
    await asyncio.to_thread(session.entered.wait, 5)  # held
    waiting = [worker.submit(rows(1, seed), soon(0.3), tenant="flood") for seed in (1, 2)]
    await asyncio.sleep(0.05)  # handed to the thread behind the one computing
    assert worker._shares["flood"].waiting == 2
    await asyncio.sleep(0.5)  # their deadline passes while they wait
    gate.set()
    outcomes = await asyncio.gather(computing, *waiting, return_exceptions=True)
    assert isinstance(outcomes[0], dict)
    assert all(isinstance(outcome, DeadlineExpired) for outcome in outcomes[1:])
    await until(lambda: worker._shares == {})
    # Its whole share (six of eight) again.
    again = [worker.submit(rows(1, 9 + n), soon(), tenant="flood") for n in range(6)]
    assert len(await asyncio.gather(*again)) == 6


async def test_requests_of_no_tenant_may_fill_the_whole_mailbox(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    """Without keys there are no tenants to keep room for."""
    gate = threading.Event()
    worker = make_worker(RecordingSession(demo_session, gate=gate), mailbox_size=8)
    held = [worker.submit(rows(1, seed), soon()) for seed in range(8)]
    with pytest.raises(MailboxFull, match="full"):
        worker.submit(rows(1, 8), soon())
    gate.set()
    await asyncio.gather(*held)


async def test_a_tenants_share_is_free_again_once_its_requests_are_answered(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    worker = make_worker(mailbox_size=8)
    for _ in range(3):
        await asyncio.gather(
            *(worker.submit(rows(1, seed), soon(), tenant="flood") for seed in range(6))
        )
    assert worker._shares == {} and worker._lane_rows == {}


async def test_tenants_together_may_fill_the_whole_mailbox(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    gate = threading.Event()
    worker = make_worker(RecordingSession(demo_session, gate=gate), mailbox_size=12)
    held = [
        worker.submit(rows(1, 10 * tenant + seed), soon(), tenant=f"tenant-{tenant}")
        for tenant in range(4)
        for seed in range(3)
    ]
    with pytest.raises(MailboxFull, match="is full"):
        worker.submit(rows(1, 99), soon(), tenant="fifth")
    gate.set()
    await asyncio.gather(*held)


async def _four_floods(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession, flood_rows: int
) -> tuple[batching.InferenceWorker, RecordingSession, threading.Event, list[asyncio.Future]]:
    """A worker (batches of 8 rows) computing one row, its gate closed, with four
    tenants' six ``flood_rows``-row requests each queued, submitted turn about."""
    gate = threading.Event()
    session = RecordingSession(demo_session, gate=gate)
    worker = make_worker(session, max_batch_size=8, mailbox_size=64)
    computing = worker.submit(rows(1), soon(), tenant="first")
    await asyncio.to_thread(session.entered.wait, 5)
    floods = [
        worker.submit(rows(flood_rows, 10 * tenant + seed), soon(), tenant=f"flood-{tenant}")
        for seed in range(6)
        for tenant in range(4)
    ]
    return worker, session, gate, [computing, *floods]


async def test_each_flooding_tenants_first_requests_wait_their_turns_too(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    """A review: a tenant's requests went to a lane shared with the light tenants
    until it had a batch of rows queued, so each flooding tenant's first request came
    before a light tenant's row, and the row ran after every flood batch."""
    worker, session, gate, floods = await _four_floods(make_worker, demo_session, 8)
    single = rows(1, 99)
    quiet = worker.submit(single, soon(), tenant="quiet")
    gate.set()
    await asyncio.gather(quiet, *floods)
    # The one computing, then a turn of each flooding tenant (one was handed to the
    # thread already), then the quiet tenant's.
    assert _position_of(session, single) <= 5


@pytest.mark.parametrize("flood_rows", [8, 5, 3])
async def test_the_admission_estimate_counts_as_many_batches_as_run_before_the_request(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession, flood_rows: int
) -> None:
    """A review: requests of 5 rows in batches of 8 fill a batch each, and an estimate
    of a turn as full batches was half the wait: 504s where 503s were due."""
    worker, session, gate, floods = await _four_floods(make_worker, demo_session, flood_rows)
    await asyncio.sleep(0.05)  # the worker takes what it takes while the gate holds
    estimated = worker._batches_ahead(1, "quiet")
    single = rows(1, 99)
    quiet = worker.submit(single, soon(), tenant="quiet")
    gate.set()
    await asyncio.gather(quiet, *floods)
    # Batches computed before the quiet row's, beyond the one computing and those
    # already with the thread or forming when it was asked.
    before = _position_of(session, single) - 1
    assert before <= estimated + 2


async def test_the_rows_of_several_light_tenants_fill_one_batch_between_a_floods(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    """A review: taken a request at a time, each light tenant's row ran as a batch of
    its own between the flood's, and 32 light tenants got a sixth of what they had."""
    worker, session, gate, flood = await _flooded_worker(make_worker, demo_session)
    singles = [rows(1, 100 + tenant) for tenant in range(8)]
    light = [worker.submit(row, soon(), tenant=f"light-{i}") for i, row in enumerate(singles)]
    gate.set()
    await asyncio.gather(*light, *flood)
    assert len({_position_of(session, row) for row in singles}) == 1


async def test_a_request_of_no_rows_leaves_no_share_behind_and_its_batch_is_answered(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    """A review: a tenant's share was forgotten when its request of no rows left the
    mailbox (it holds no bytes), so settling it raised, and the requests batched after
    it were never answered (and their shares held for good)."""
    gate = threading.Event()
    worker = make_worker(RecordingSession(demo_session, gate=gate), mailbox_size=16)
    held = worker.submit(rows(1), soon(), tenant="quiet")
    await asyncio.sleep(0.05)  # computing, its gate closed
    batched = [
        worker.submit(rows(0), soon(), tenant="empty"),
        *(worker.submit(rows(1, seed), soon(), tenant="quiet") for seed in range(3)),
    ]
    gate.set()
    answers = await asyncio.wait_for(asyncio.gather(held, *batched), 5)
    assert [answer["probabilities"].shape[0] for answer in answers] == [1, 0, 1, 1, 1]
    assert worker._shares == {} and worker._held_bytes == 0


async def test_a_run_whose_every_request_failed_meanwhile_ends_without_an_error(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    """A review: the statistics of such a run read its first request, and there was
    none (IndexError in the run's callback)."""
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    gate = threading.Event()
    worker = make_worker(RecordingSession(demo_session, gate=gate))
    late = worker.submit(rows(1), time.monotonic() + 0.05)  # fails at its deadline, computing
    with pytest.raises(DeadlineExpired):
        await late
    gate.set()
    assert (await worker.submit(rows(1, 1), soon()))["probabilities"].shape == (1, 2)
    assert errors == []


async def test_the_rows_of_many_light_tenants_count_as_the_batches_they_fill_together(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    """A review: counted a batch a tenant, 32 tenants of a row each beside a flood
    were refused 503 for the 32 batches they would have filled one of."""
    session = RecordingSession(demo_session, delay_s=0.05)
    worker = make_worker(session, max_batch_size=8, mailbox_size=64)
    await worker.submit(rows(1), soon(), tenant="flood")  # a batch takes ~50 ms
    session.gate = gate = threading.Event()
    flood = [worker.submit(rows(8, seed), soon(), tenant="flood") for seed in range(10)]
    light = [worker.submit(rows(1, 50 + i), soon(), tenant=f"light-{i}") for i in range(6)]
    deadline = time.monotonic() + 0.35  # seven batches of 50 ms would miss it
    answer = worker.submit(rows(1, 99), deadline, tenant="one-more")
    gate.set()
    assert (await answer)["probabilities"].shape == (1, 2)
    await asyncio.gather(*flood, *light)


async def test_the_admission_estimate_counts_a_tenants_own_queue_once(
    make_worker: WorkerFactory, demo_session: ort.InferenceSession
) -> None:
    gate = threading.Event()
    session = RecordingSession(demo_session, gate=gate)
    worker = make_worker(session, max_batch_size=8, mailbox_size=64)
    computing = worker.submit(rows(1), soon(), tenant="first")
    await asyncio.to_thread(session.entered.wait, 5)
    await asyncio.sleep(0.05)  # the worker waits for the run: nothing more is taken
    queued = [worker.submit(rows(8, seed), soon(), tenant="flood") for seed in range(10)]
    queued += [worker.submit(rows(1, 50 + seed), soon(), tenant="quiet") for seed in range(5)]
    # The flood's next turn (a batch), then the quiet tenant's six rows (one batch).
    assert worker._batches_ahead(1, "quiet") == 2
    gate.set()
    await asyncio.gather(computing, *queued)


@pytest.mark.parametrize(
    ("queued", "at_least"),
    [
        # A request of ten batches ahead of small ones: its turn is ten batches.
        ({"bulk": [80, 1, 1, 1, 1, 1]}, 11),
        # Turns of two 3-row requests (6 rows) leave no room for another's: a batch each.
        ({f"mid-{i}": [3, 3] for i in range(4)}, 5),
    ],
)
async def test_the_admission_estimate_counts_what_other_lanes_turns_really_take(
    make_worker: WorkerFactory, queued: dict[str, list[int]], at_least: int
) -> None:
    """A review: counted at each lane's mean rows and packed in full batches, these
    were admitted for deadlines they then missed (504)."""
    worker = make_worker(max_batch_size=8, mailbox_size=64)
    held = [
        worker.submit(rows(n, seed), soon(), tenant=tenant)
        for tenant, sizes in queued.items()
        for seed, n in enumerate(sizes)
    ]
    assert worker._batches_ahead(1, "quiet") >= at_least
    await asyncio.gather(*held)
