"""How records become batches (count, bytes, linger) and how answers become reports,
against the scripted server."""

from __future__ import annotations

import msgpack
from aiohttp import web
from mlgate_client import Delivery, MlgateError, Outcome, Producer, RetryPolicy

from tests.client.scripted import Scripted, accepted, problem

ONE_TRY = RetryPolicy(max_attempts=1)


def batch_sizes(server: Scripted) -> list[int]:
    return sorted(len(msgpack.unpackb(body)["records"]) for _, body in server.seen)


async def test_batches_close_at_max_records_and_the_rest_goes_at_flush(scripted: Scripted) -> None:
    scripted.script = [accepted]
    async with Producer(scripted.url, "s", max_records=10, linger_ms=60_000) as producer:
        futures = [await producer.send([1.0]) for _ in range(25)]
        await producer.flush()
        assert all(f.done() for f in futures)
    assert batch_sizes(scripted) == [5, 10, 10]


async def test_batch_bodies_stay_within_max_bytes(scripted: Scripted) -> None:
    scripted.script = [accepted]
    async with Producer(scripted.url, "s", max_bytes=4096, linger_ms=60_000) as producer:
        for _ in range(40):
            await producer.send([0.5] * 100)  # about 950 bytes each
    assert sum(batch_sizes(scripted)) == 40
    assert max(len(body) for _, body in scripted.seen) <= 4096


async def test_a_lone_record_goes_out_after_linger_without_a_flush(scripted: Scripted) -> None:
    scripted.script = [accepted]
    async with Producer(scripted.url, "s", linger_ms=10) as producer:
        report = await (await producer.send([1.0]))
    assert report.outcome is Outcome.ACCEPTED and len(scripted.seen) == 1


async def test_a_batch_with_new_and_known_records_reports_them_as_either(scripted: Scripted) -> None:
    async def mixed(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"tracking_id": "t", "records_accepted": 1, "records_rejected": 1,
             "records_duplicate": 1,
             "errors": [{"index": 1, "record_id": "b", "error": "features has NaN"}]},
            status=202,
        )

    scripted.script = [mixed]
    async with Producer(scripted.url, "s", linger_ms=60_000) as producer:
        futures = [await producer.send([1.0], record_id=i) for i in "abc"]
    delivered = [f.result() for f in futures]
    assert [d.outcome for d in delivered] == [
        Outcome.ACCEPTED_OR_DUPLICATE, Outcome.REJECTED, Outcome.ACCEPTED_OR_DUPLICATE
    ]
    assert delivered[1].reason == "features has NaN" and delivered[0].tracking_id == "t"
    assert producer.stats.rejected_by_reason == {"features has NaN": 1}


async def test_on_delivery_hears_of_every_record(scripted: Scripted) -> None:
    heard: dict[str, Delivery | MlgateError] = {}
    scripted.script = [accepted, problem(400)]
    async with Producer(
        scripted.url, "s", max_records=2, max_in_flight=1, linger_ms=60_000, retry=ONE_TRY,
        on_delivery=heard.__setitem__,
    ) as producer:
        for record_id in "abcd":
            await producer.send([1.0], record_id=record_id)
    assert isinstance(heard["a"], Delivery) and isinstance(heard["b"], Delivery)
    assert isinstance(heard["c"], MlgateError) and isinstance(heard["d"], MlgateError)
