"""The retry contract, against a scripted HTTP server (mlgate's answers on demand):
what is retried, that every attempt carries the same Idempotency-Key and body, and
that waits honour Retry-After."""

from __future__ import annotations

import time

import pytest
from aiohttp import web
from mlgate_client import Outcome, Predictor, Producer, RetryPolicy
from mlgate_client.errors import BadRequest, Overloaded, RateLimited, TransportError
from mlgate_client.retry import call_with_retries, parse_retry_after

from tests.client.scripted import Scripted, accepted, hang_up, problem

FAST = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.02, timeout_s=30)


async def send_one_batch(url: str, records: int = 3) -> list[Outcome]:
    async with Producer(url, "s", linger_ms=1, retry=FAST) as producer:
        futures = [await producer.send([1.0, 2.0]) for _ in range(records)]
    return [(await f).outcome for f in futures]


@pytest.mark.parametrize("status", [409, 429, 502, 503, 504])
async def test_retriable_statuses_are_retried_with_the_same_key_and_body(
    scripted: Scripted, status: int
) -> None:
    scripted.script = [problem(status, "0"), problem(status), accepted]
    assert await send_one_batch(scripted.url) == [Outcome.ACCEPTED] * 3
    assert len(scripted.seen) == 3
    keys = {headers["Idempotency-Key"] for headers, _ in scripted.seen}
    bodies = {body for _, body in scripted.seen}
    assert len(keys) == 1 and len(bodies) == 1


async def test_a_dropped_connection_is_retried(scripted: Scripted) -> None:
    scripted.script = [hang_up, accepted]
    assert await send_one_batch(scripted.url) == [Outcome.ACCEPTED] * 3
    assert len({headers["Idempotency-Key"] for headers, _ in scripted.seen}) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 413, 415, 500])
async def test_other_errors_fail_the_batch_at_once_with_the_problem(
    scripted: Scripted, status: int
) -> None:
    scripted.script = [problem(status), accepted]
    async with Producer(scripted.url, "s", linger_ms=1, retry=FAST) as producer:
        future = await producer.send([1.0])
    error = future.exception()
    assert error is not None and getattr(error, "status", None) == status
    assert getattr(error, "problem", {})["title"] == "scripted"
    assert len(scripted.seen) == 1


async def test_exhausted_retries_fail_the_records_with_the_last_problem(scripted: Scripted) -> None:
    scripted.script = [problem(503, "0")]
    retries = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.01, max_attempts=4)
    async with Producer(scripted.url, "s", linger_ms=1, retry=retries) as producer:
        futures = [await producer.send([1.0]) for _ in range(2)]
    for future in futures:
        error = future.exception()
        assert isinstance(error, Overloaded) and error.status == 503
        assert error.problem["status"] == 503
    assert len(scripted.seen) == 4


async def test_waits_honour_retry_after() -> None:
    delays: list[float] = []
    answers: list[Exception] = [RateLimited(429, {}, retry_after_s=0.3), TransportError("reset")]

    async def attempt(remaining_s: float) -> str:
        if answers:
            raise answers.pop(0)
        return "done"

    result = await call_with_retries(attempt, FAST, lambda _r, _e, delay: delays.append(delay))
    assert result == "done"
    assert 0.3 <= delays[0] <= 0.33 + FAST.max_backoff_s
    assert delays[1] <= FAST.max_backoff_s


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Tokyo", "UTC"])
@pytest.mark.parametrize("form", ["%a, %d %b %Y %H:%M:%S GMT", "%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"])
def test_an_http_date_in_any_of_its_three_forms_is_gmt_wherever_the_client_runs(
    monkeypatch: pytest.MonkeyPatch, zone: str, form: str
) -> None:
    """A review: asctime's form (``Sun Nov  6 08:49:37 1994``) was read as local time:
    a Retry-After 20 s ahead read as five hours in New York, and as none in Tokyo."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        ahead = parse_retry_after(time.strftime(form, time.gmtime(time.time() + 20)))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert ahead is not None and 15 <= ahead <= 20


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-3", "0x10", "1.5", "\u0663"])
def test_a_retry_after_that_is_no_http_value_is_none(value: str) -> None:
    """Delta-seconds are ASCII digits only (RFC 9110): a review saw ``inf`` read as for
    ever, which failed a retriable batch at once; the backoff decides instead."""
    assert parse_retry_after(value) is None


def test_backoff_grows_with_jitter_up_to_its_ceiling() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    for retry, step in ((1, 0.1), (2, 0.2), (3, 0.4), (8, 1.0)):
        assert all(step / 2 <= policy.backoff_s(retry) <= step for _ in range(50))


async def test_predict_sends_the_remaining_deadline_on_every_attempt(scripted: Scripted) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"prediction": 1, "confidence": 0.9, "label": "positive", "model": "demo",
             "model_version": "1", "request_id": None, "latency_ms": 0.5}
        )

    scripted.script = [problem(503), answer]
    async with Predictor(scripted.url, timeout_ms=5000) as predictor:
        result = await predictor.predict([1.0, 2.0])
    assert (result.prediction, result.label, result.model_version) == (1, "positive", "1")
    budgets = [int(headers["X-Request-Timeout"]) for headers, _ in scripted.seen]
    assert len(budgets) == 2 and 5000 >= budgets[0] >= budgets[1] > 0


async def test_predict_errors_other_than_pushback_are_not_retried(scripted: Scripted) -> None:
    scripted.script = [problem(400)]
    async with Predictor(scripted.url) as predictor:
        with pytest.raises(BadRequest):
            await predictor.predict([1.0])
    assert len(scripted.seen) == 1
