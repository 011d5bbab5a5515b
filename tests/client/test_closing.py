"""Closing a producer: every record gets its one report however the close ends (a
timeout, the caller cancelled), and nothing holds it for the retries' budget; and a
success status that is not mlgate's answer is not taken for one."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from mlgate_client import Producer, ProducerClosed, RetryPolicy, SyncProducer, UnexpectedAnswer

from tests.client.scripted import Scripted, accepted, problem

PATIENT = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.1, timeout_s=120)


async def test_close_with_a_timeout_fails_what_is_unreported_at_once(scripted: Scripted) -> None:
    """A review: against a dead server, close() took each queued batch's whole retry
    budget (120 s each, four at a time)."""
    scripted.script = [problem(503, "0")]
    producer = Producer(scripted.url, "s", linger_ms=1, max_records=10, retry=PATIENT)
    futures = [await producer.send([1.0]) for _ in range(200)]
    started = time.monotonic()
    await producer.close(timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert all(future.done() for future in futures)
    assert all(isinstance(future.exception(), ProducerClosed) for future in futures)


async def test_a_cancelled_close_still_reports_every_record_once(scripted: Scripted) -> None:
    """A review: cancelling the task inside ``async with Producer`` left 160 of 200
    futures pending for good and the connection pool open."""
    scripted.script = [problem(503, "0")]
    reports: list[str] = []
    sent: list[asyncio.Future[object]] = []

    async def produce() -> None:
        async with Producer(
            scripted.url,
            "s",
            linger_ms=1,
            max_records=10,
            retry=PATIENT,
            on_delivery=lambda record_id, _: reports.append(record_id),
        ) as producer:
            for _ in range(200):
                sent.append(await producer.send([1.0]))  # type: ignore[arg-type]

    task = asyncio.create_task(produce())
    await asyncio.sleep(0.5)  # sending, retrying; then the block's close() flushes
    for _ in range(3):
        task.cancel()
        await asyncio.sleep(0.05)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert len(sent) == 200 and all(future.done() for future in sent)
    assert sorted(reports) == sorted(set(reports)) and len(reports) == 200


async def test_cancelling_the_task_inside_async_with_cuts_the_close_short(
    scripted: Scripted,
) -> None:
    """A review: one cancel of a task inside ``async with Producer`` (its work, not its
    close, interrupted) left the block's close flushing against a dead server for the
    whole retry budget (115 s) before the cancellation ended the task."""
    scripted.script = [problem(503, "0")]
    sent: list[asyncio.Future[object]] = []

    async def produce() -> None:
        async with Producer(scripted.url, "s", linger_ms=1, max_records=10, retry=PATIENT) as producer:
            for _ in range(30):
                sent.append(await producer.send([1.0]))  # type: ignore[arg-type]
            await asyncio.sleep(3600)  # the application's own work, then cancelled

    task = asyncio.create_task(produce())
    for _ in range(500):  # until the batches are being retried against the 503s
        if scripted.seen:
            break
        await asyncio.sleep(0.01)
    task.cancel()  # once
    done, _ = await asyncio.wait([task], timeout=5)
    if not done:  # still flushing: a second cancel ends it, so nothing outlives the test
        task.cancel()
        await asyncio.wait([task], timeout=5)
    assert done, "the close waited out the retries' budget"
    assert task.cancelled() and len(sent) == 30
    assert all(isinstance(future.exception(), ProducerClosed) for future in sent)


async def test_a_202_naming_a_rejected_record_outside_the_batch_fails_the_batch(
    scripted: Scripted,
) -> None:
    """A review: an error index past the batch was taken as read, every record of the
    batch reported written, the one the server rejected among them."""

    async def out_of_range(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "tracking_id": "t",
                "records_accepted": 2,
                "records_rejected": 1,
                "records_duplicate": 0,
                "errors": [{"index": 7, "record_id": None, "error": "bad"}],
            },
            status=202,
        )

    scripted.script = [out_of_range]
    async with Producer(scripted.url, "s", linger_ms=1, retry=PATIENT) as producer:
        futures = [await producer.send([1.0]) for _ in range(3)]
    assert all(isinstance(future.exception(), UnexpectedAnswer) for future in futures)


async def test_a_success_status_that_is_not_mlgates_answer_fails_the_batch(
    scripted: Scripted,
) -> None:
    """A review: a captive portal's 200 page was reported as three records accepted."""

    async def portal(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<html>sign in to the wifi</html>", content_type="text/html")

    scripted.script = [portal]
    async with Producer(scripted.url, "s", linger_ms=1, retry=PATIENT) as producer:
        futures = [await producer.send([1.0]) for _ in range(3)]
    assert all(isinstance(future.exception(), UnexpectedAnswer) for future in futures)


async def test_a_202_that_does_not_count_every_record_fails_the_batch(scripted: Scripted) -> None:
    async def short(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "tracking_id": "t",
                "records_accepted": 1,
                "records_rejected": 0,
                "records_duplicate": 0,
                "errors": [],
            },
            status=202,
        )

    scripted.script = [short]
    async with Producer(scripted.url, "s", linger_ms=1, retry=PATIENT) as producer:
        futures = [await producer.send([1.0]) for _ in range(3)]
    assert all(isinstance(future.exception(), UnexpectedAnswer) for future in futures)


def test_a_closed_sync_producer_refuses_work_and_closes_again_quietly(scripted: Scripted) -> None:
    producer = SyncProducer(scripted.url, "s")
    producer.close()
    producer.close()
    with pytest.raises(ProducerClosed):
        producer.send([1.0])
    with pytest.raises(ProducerClosed):
        producer.flush()


def test_a_sync_producer_with_bad_options_leaves_no_thread_running(scripted: Scripted) -> None:
    before = {thread.name for thread in threading.enumerate()}
    with pytest.raises(ValueError):
        SyncProducer(scripted.url, "s", max_records=0)
    assert "mlgate-producer" not in {t.name for t in threading.enumerate()} - before


class _Stop(BaseException):
    """Raised by a careless callback: not an ``Exception``."""


async def test_a_callback_raising_a_base_exception_does_not_report_records_twice(
    scripted: Scripted,
) -> None:
    """A review: the sender's catch-all then failed the batch again, so records already
    reported delivered were reported failed too."""
    from tests.client.scripted import accepted

    scripted.script = [accepted]
    reports: list[tuple[str, bool]] = []

    def careless(record_id: str, result: object) -> None:
        reports.append((record_id, isinstance(result, Exception)))
        raise _Stop

    async with Producer(scripted.url, "s", linger_ms=1, on_delivery=careless) as producer:
        futures = [await producer.send([1.0]) for _ in range(3)]
    assert [failed for _, failed in reports] == [False]  # the first report, then it raised
    assert futures[0].result().delivered


async def test_a_predict_deadline_passing_without_an_answer_is_deadline_exceeded(
    scripted: Scripted,
) -> None:
    """A review: a server that never answered gave a TransportError, where the client's
    README names DeadlineExceeded for a passed deadline."""
    from mlgate_client import Predictor
    from mlgate_client.errors import DeadlineExceeded

    async def never(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2)  # well past the deadline
        return web.Response()

    scripted.script = [never]
    async with Predictor(scripted.url, timeout_ms=300) as predictor:
        with pytest.raises(DeadlineExceeded):
            await predictor.predict([1.0, 2.0])


def test_stopping_a_sync_producer_mid_close_still_reports_every_record(scripted: Scripted) -> None:
    """A review: Ctrl-C during SyncProducer.close() stopped its loop with the close
    still running there: all 50 futures pending for good. Stopping the loop now cancels
    what runs on it first, which is a close cut short: each record failed at once."""
    scripted.script = [problem(503, "0")]
    producer = SyncProducer(scripted.url, "s", linger_ms=1, max_records=10, retry=PATIENT)
    futures = [producer.send([1.0]) for _ in range(50)]
    closing = threading.Thread(target=lambda: _quietly(producer.close))
    closing.start()
    time.sleep(0.5)  # the close is flushing against 503s
    producer._thread.stop()  # what close()'s finally does when Ctrl-C interrupts its wait
    closing.join(10)
    assert not closing.is_alive()
    assert all(isinstance(future.exception(timeout=5), ProducerClosed) for future in futures)


async def test_ctrl_c_inside_with_sync_producer_cuts_the_close_short(scripted: Scripted) -> None:
    """A review: leaving ``with SyncProducer`` on KeyboardInterrupt flushed against a
    dead server for the whole retry budget (120 s here) before the interrupt ended it."""
    scripted.script = [problem(503, "0")]
    futures: list[concurrent.futures.Future[object]] = []

    def produce() -> None:  # in a thread: the scripted server answers on this loop
        with SyncProducer(scripted.url, "s", linger_ms=1, max_records=10, retry=PATIENT) as producer:
            futures.extend(producer.send([1.0]) for _ in range(30))
            while not scripted.seen:  # the batches are being retried against the 503s
                time.sleep(0.01)
            raise KeyboardInterrupt

    raised: list[BaseException] = []

    def run() -> None:
        try:
            produce()
        except BaseException as exc:  # KeyboardInterrupt: kept here, not raised in pytest
            raised.append(exc)

    producing = threading.Thread(target=run)
    producing.start()
    for _ in range(2000):  # the scripted server answers on this loop meanwhile
        if not producing.is_alive():
            break
        await asyncio.sleep(0.01)
    assert not producing.is_alive(), "the close waited out the retries' budget"
    assert [type(exc) for exc in raised] == [KeyboardInterrupt]
    assert len(futures) == 30
    assert all(isinstance(future.exception(timeout=5), ProducerClosed) for future in futures)


@pytest.mark.parametrize("leaving", ["an exception", "sys.exit", "a generator closed early"])
async def test_leaving_with_sync_producer_otherwise_than_by_ctrl_c_flushes(
    scripted: Scripted, leaving: str
) -> None:
    """A review: ``sys.exit(0)`` and a generator closed early (GeneratorExit) were taken
    for Ctrl-C: every buffered record failed with ProducerClosed, none sent."""
    from tests.client.scripted import accepted

    scripted.script = [accepted]
    futures: list[concurrent.futures.Future[object]] = []

    def records() -> Iterator[int]:
        with SyncProducer(scripted.url, "s", linger_ms=50) as producer:
            for n in range(5):
                futures.append(producer.send([1.0]))
                yield n
            if leaving == "an exception":
                raise ValueError("the application's own error")
            if leaving == "sys.exit":
                sys.exit(0)
            yield 5

    def produce() -> None:
        for n in records():
            if n == 4 and leaving == "a generator closed early":
                break  # the generator is closed: GeneratorExit inside its with block

    def run() -> None:
        try:
            produce()
        except (ValueError, SystemExit):
            pass

    await asyncio.wait_for(asyncio.to_thread(run), 20)
    assert len(futures) == 5
    assert all(future.result(timeout=5).delivered for future in futures)  # type: ignore[attr-defined]


def test_a_send_racing_close_from_another_thread_is_refused_never_hung(scripted: Scripted) -> None:
    from tests.client.scripted import accepted

    scripted.script = [accepted]
    producer = SyncProducer(scripted.url, "s", linger_ms=1)
    outcomes: list[str] = []

    def keep_sending() -> None:
        try:
            while True:
                producer.send([1.0])
        except ProducerClosed:
            outcomes.append("closed")

    sender = threading.Thread(target=keep_sending)
    sender.start()
    time.sleep(0.2)
    producer.close(timeout=5)  # ends although the other thread never stops sending
    sender.join(10)
    assert not sender.is_alive() and outcomes == ["closed"]


async def test_a_second_close_returns_only_once_the_first_has_reported_everything(
    scripted: Scripted,
) -> None:
    scripted.script = [problem(503, "0")]
    producer = Producer(scripted.url, "s", linger_ms=1, retry=PATIENT)
    futures = [await producer.send([1.0]) for _ in range(4)]
    first = asyncio.create_task(producer.close(timeout_s=0.3))
    await asyncio.sleep(0.05)
    await producer.close()
    assert all(future.done() for future in futures)
    await first


async def test_a_callback_raising_cancelled_error_does_not_stop_the_sender(
    scripted: Scripted,
) -> None:
    """A review: the sender took the callback's CancelledError for its own and ended;
    with one sender, the next batch was never sent and flush() waited for ever."""
    from tests.client.scripted import accepted

    scripted.script = [accepted]
    raised = False

    def once(record_id: str, result: object) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise asyncio.CancelledError

    async with Producer(
        scripted.url, "s", linger_ms=1, max_in_flight=1, on_delivery=once
    ) as producer:
        first = await producer.send([1.0])
        await producer.flush(timeout_s=5)
        second = await producer.send([2.0])
        await producer.flush(timeout_s=5)
    assert first.result().delivered and second.result().delivered


def _quietly(call: Callable[[], object]) -> None:
    try:
        call()
    except Exception:
        pass


async def test_a_producer_used_under_a_second_event_loop_says_so(scripted: Scripted) -> None:
    """A review: reused under a second ``asyncio.run`` it never posted its records, and
    a flush without a timeout waited for ever."""
    scripted.script = [accepted]
    producer = Producer(scripted.url, "s", linger_ms=1)

    async def send_and_flush() -> None:
        await producer.send([0.5])
        await producer.flush()

    async def first_run() -> None:
        await send_and_flush()
        await producer._transport.close()  # its connections, not to leak them here

    def refusal(step: Callable[[], Any]) -> BaseException | None:
        try:
            asyncio.run(step())
        except RuntimeError as exc:
            return exc
        return None

    def second_loops() -> list[BaseException | None]:
        asyncio.run(first_run())
        return [refusal(send_and_flush), refusal(producer.flush), refusal(producer.close)]

    refused = await asyncio.wait_for(asyncio.to_thread(second_loops), 10)
    assert all(exc is not None and "event loop" in str(exc) for exc in refused), refused


async def test_closing_a_closed_producer_under_another_event_loop_does_nothing(
    scripted: Scripted,
) -> None:
    """A review of the loop check: a cleanup's second close, in another loop, raised."""
    scripted.script = [accepted]
    producer = Producer(scripted.url, "s", linger_ms=1)

    async def send_and_close() -> None:
        await producer.send([0.5])
        await producer.close()

    def twice() -> None:
        asyncio.run(send_and_close())
        asyncio.run(producer.close())

    await asyncio.wait_for(asyncio.to_thread(twice), 10)
