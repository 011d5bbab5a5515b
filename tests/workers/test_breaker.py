"""Breaker: our interface over aiobreaker; failures counted as aiobreaker counts them."""

from __future__ import annotations

import asyncio
import time

import pytest

from mlgate.workers.breaker import Breaker, BreakerOpen
from mlgate.workers.errors import MailboxFull


async def succeed() -> str:
    return "ok"


async def fail() -> str:
    raise ConnectionError("down")


async def full() -> str:
    raise MailboxFull("busy")


async def failures(breaker: Breaker, count: int) -> None:
    for _ in range(count):
        with pytest.raises(ConnectionError):
            await breaker.call(fail)


async def test_consecutive_failures_open_it_and_it_refuses_at_once() -> None:
    breaker = Breaker("dep", fail_max=3, reset_s=60)
    await failures(breaker, 2)
    with pytest.raises(BreakerOpen) as opened:
        await breaker.call(fail)  # the third failure opens it
    assert opened.value.retry_after_s >= 1 and breaker.state == "open"
    with pytest.raises(BreakerOpen):
        await breaker.call(succeed)


async def test_the_call_that_opens_it_carries_its_own_failure() -> None:
    """Its caller must know the call was made (Kafka may hold part of a write); a call
    refused by the open breaker was not made."""
    breaker = Breaker("dep", fail_max=1, reset_s=60)
    with pytest.raises(BreakerOpen) as opened:
        await breaker.call(fail)
    assert isinstance(opened.value.failure, ConnectionError)
    with pytest.raises(BreakerOpen) as refused:
        await breaker.call(fail)
    assert refused.value.failure is None


async def test_a_call_failing_after_another_opened_it_still_carries_its_failure() -> None:
    breaker = Breaker("dep", fail_max=1, reset_s=60)
    started = asyncio.Event()

    async def slow_fail() -> str:
        started.set()
        await asyncio.sleep(0.01)
        raise ConnectionError("made, and failed later")

    slow = asyncio.create_task(breaker.call(slow_fail))
    await started.wait()
    with pytest.raises(BreakerOpen):
        await breaker.call(fail)  # opens it while the slow call runs
    with pytest.raises(BreakerOpen) as late:
        await slow
    assert isinstance(late.value.failure, ConnectionError)
    assert str(late.value.failure) == "made, and failed later"


async def test_a_success_between_failures_starts_the_count_again() -> None:
    breaker = Breaker("dep", fail_max=3, reset_s=60)
    await failures(breaker, 2)
    assert await breaker.call(succeed) == "ok"
    await failures(breaker, 2)
    assert breaker.state == "closed"


async def test_excluded_errors_do_not_count_as_failures() -> None:
    breaker = Breaker("dep", fail_max=2, reset_s=60)
    for _ in range(5):
        with pytest.raises(MailboxFull):
            await breaker.call(full)
    assert breaker.state == "closed"
    assert await breaker.call(succeed) == "ok"


async def test_a_success_finishing_after_failures_resets_the_count_as_aiobreaker_does() -> None:
    # Calls finish in this order: fail, three successes that started before it, fail,
    # fail. Consecutive failures in finishing order never reach three.
    breaker = Breaker("dep", fail_max=3, reset_s=60)
    gate = asyncio.Event()

    async def slow_success() -> str:
        await gate.wait()
        return "ok"

    running = [asyncio.create_task(breaker.call(slow_success)) for _ in range(3)]
    await asyncio.sleep(0)  # they have started, while nothing had failed
    await failures(breaker, 1)
    gate.set()
    assert await asyncio.gather(*running) == ["ok"] * 3
    await failures(breaker, 2)
    assert breaker.state == "closed"


async def echo(first: int, *, second: int) -> tuple[int, int]:
    return first, second


async def test_keyword_arguments_reach_the_call_closed_or_counting_failures() -> None:
    breaker = Breaker("dep", fail_max=3, reset_s=60)
    assert await breaker.call(echo, 1, second=2) == (1, 2)
    await failures(breaker, 1)  # a failure counted: the call goes through aiobreaker
    assert await breaker.call(echo, 3, second=4) == (3, 4)


async def test_an_open_breaker_refuses_with_its_retry_time_on_a_host_east_of_utc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiobreaker's error reckons the reopen time against local time from a UTC clock:
    east of UTC it says None, and a refusal became a TypeError (a 500). The same gives
    None anywhere at the instant the breaker's timeout ends (seen in CI: a Redis
    Cluster master killed under load)."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        breaker = Breaker("dep", fail_max=1, reset_s=60)
        with pytest.raises(BreakerOpen):
            await breaker.call(fail)  # opens it
        with pytest.raises(BreakerOpen) as refused:
            await breaker.call(succeed)
        assert 1 <= refused.value.retry_after_s <= 60
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


async def _open(breaker: Breaker) -> None:
    with pytest.raises((ConnectionError, BreakerOpen)):
        await breaker.call(fail)


async def test_an_outage_is_logged_once_each_way_and_reported_down_through_its_trials() -> None:
    """A review: a broker down logged a warning pair every few seconds (open, half-open,
    open, ...), and the state gauge flapped between 2 and 1 under an alert on 2."""
    import structlog.testing

    breaker = Breaker("dep", fail_max=1, reset_s=0.05)
    with structlog.testing.capture_logs() as logs:
        await _open(breaker)
        seen = set()
        for _ in range(3):  # three trials, each failing: still down throughout
            await asyncio.sleep(0.06)
            seen.add(breaker.reported_state)
            assert breaker.unavailable
            await _open(breaker)
        await asyncio.sleep(0.06)
        assert await breaker.call(succeed) == "ok"
    assert seen == {"half_open"}  # its time up, the next call is a trial
    assert not breaker.unavailable and breaker.reported_state == "closed"
    changes = [(e["log_level"], e["state"]) for e in logs if e["event"] == "breaker_state_changed"]
    loud = [change for change in changes if change[0] != "debug"]
    assert loud == [("warning", "open"), ("info", "closed")]


async def test_a_trial_failing_after_another_call_closed_it_counts_as_one_failure() -> None:
    """aiobreaker settles a call by the state it began in: a half-open trial failing
    after another call had closed the breaker opened it again for a full reset time
    (a review: a model that had just answered refused every request for 10 s)."""
    import structlog.testing

    breaker = Breaker("dep", fail_max=2, reset_s=0.05)
    await failures(breaker, 1)
    with pytest.raises(BreakerOpen):
        await breaker.call(fail)
    await asyncio.sleep(0.06)  # its time up: calls are trials
    release = asyncio.Event()

    async def slow_failure() -> str:
        await release.wait()
        raise ConnectionError("late")

    with structlog.testing.capture_logs() as logs:
        trial = asyncio.create_task(breaker.call(slow_failure))
        await asyncio.sleep(0)
        assert await breaker.call(succeed) == "ok"  # closes it
        release.set()
        with pytest.raises(ConnectionError, match="late"):
            await trial
    assert breaker.state == "closed"  # one failure of two
    with pytest.raises(BreakerOpen):
        await breaker.call(fail)  # the second opens it
    changes = [(e["log_level"], e["state"]) for e in logs if e["event"] == "breaker_state_changed"]
    assert [change for change in changes if change[0] != "debug"] == [("info", "closed")]


async def test_a_late_trial_failure_adds_to_the_closed_breakers_count_not_resets_it() -> None:
    """A review of the first fix: the late failure, handed back to aiobreaker as a
    success, zeroed the failures the closed breaker had counted meanwhile."""
    breaker = Breaker("dep", fail_max=3, reset_s=0.05)
    await failures(breaker, 2)
    with pytest.raises(BreakerOpen):
        await breaker.call(fail)
    await asyncio.sleep(0.06)
    release = asyncio.Event()

    async def slow_failure() -> str:
        await release.wait()
        raise ConnectionError("late")

    trial = asyncio.create_task(breaker.call(slow_failure))
    await asyncio.sleep(0)
    assert await breaker.call(succeed) == "ok"  # closes it
    await failures(breaker, 2)  # two of three
    release.set()
    with pytest.raises(BreakerOpen):  # the third: the late one opens it
        await trial
    assert breaker.state == "open"
