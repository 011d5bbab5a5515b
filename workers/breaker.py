"""Breaker: our small interface over aiobreaker's in-memory circuit breaker.

One per dependency and process (the Kafka sink, Redis, each model). aiobreaker's Redis
storage is synchronous, so breakers stay in memory; across processes each one learns
on its own, which is what a breaker is for.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import NoReturn, TypeVar, cast

import aiobreaker
import structlog

from mlgate.workers.errors import MailboxFull

T = TypeVar("T")
log = structlog.get_logger("mlgate.breaker")


class BreakerOpen(Exception):
    """The dependency's breaker is open; ``retry_after_s`` is when it next lets a call try.
    ``failure``: the call's own failure when this call was made and its failure opened
    the breaker; None when the call was refused without being made."""

    def __init__(self, name: str, retry_after_s: int, failure: BaseException | None = None) -> None:
        super().__init__(f"{name} is unavailable (circuit open); retry in {retry_after_s} s")
        self.name = name
        self.retry_after_s = retry_after_s
        self.failure = failure


class _LogTransitions(aiobreaker.CircuitBreakerListener):
    """An outage logged once each way: opened (warning) and closed again (info, with how
    long it lasted). Its trials in between (half-open, open again when one fails, every
    ``reset_s`` for as long as the dependency is down) at debug: a broker down for an
    hour would otherwise log a pair of warnings every few seconds."""

    def __init__(self) -> None:
        self.down_since: float | None = None  # ``time.monotonic()`` when it opened

    def state_change(self, breaker: aiobreaker.CircuitBreaker, old: object, new: object) -> None:
        state = _state_name(new)
        if state == "open" and self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("breaker_state_changed", breaker=breaker.name, state=state)
        elif state == "closed" and self.down_since is not None:
            down_s = time.monotonic() - self.down_since
            self.down_since = None
            log.info("breaker_state_changed", breaker=breaker.name, state=state, down_s=round(down_s, 1))
        else:
            log.debug("breaker_state_changed", breaker=breaker.name, state=state)


def _state_name(state: object) -> str:
    value = getattr(state, "state", state)
    return str(getattr(value, "name", value)).lower()


class Breaker:
    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_s: float = 10.0,
        exclude: tuple[type[BaseException], ...] = (MailboxFull,),
    ) -> None:
        self.name = name
        self._transitions = _LogTransitions()
        self._breaker = aiobreaker.CircuitBreaker(
            fail_max=fail_max,
            timeout_duration=timedelta(seconds=reset_s),
            exclude=list(exclude),
            listeners=[self._transitions],
            name=name,
        )

    @property
    def state(self) -> str:
        """"closed", "open" or "half_open"."""
        return _state_name(self._breaker.current_state)

    @property
    def reported_state(self) -> str:
        """The state for metrics: an open breaker whose time is up is "half_open" (its
        next call is a trial), though aiobreaker changes it only at that call."""
        state = self.state
        return "half_open" if state == "open" and self.retry_after_s == 0 else state

    @property
    def unavailable(self) -> bool:
        """From the failure that opened it until a call succeeds again: steady through
        the trials, where ``state`` goes open, half-open, open, ..."""
        return self._transitions.down_since is not None

    @property
    def is_open(self) -> bool:
        return self.state == "open" and self.retry_after_s > 0

    @property
    def retry_after_s(self) -> int:
        opened_at = self._breaker._state_storage.opened_at
        if self.state != "open" or opened_at is None:
            return 0
        remaining = opened_at + self._breaker.timeout_duration - datetime.utcnow()
        return max(0, math.ceil(remaining.total_seconds()))

    def close(self) -> None:
        """Closed now, its failures forgotten: the dependency answered a probe made past
        the breaker."""
        if self.state != "closed" or self._breaker.fail_counter:
            self._breaker.close()

    async def call(self, func: Callable[..., Awaitable[T]], *args: object, **kwargs: object) -> T:
        """Run ``func`` through the breaker; ``BreakerOpen`` at once when it is open.

        Closed with no failure counted, a success changes nothing in the breaker, so
        ``func`` runs directly and only a failure goes through aiobreaker (which counts
        it exactly as its own call would have): this runs on every model, Redis and
        Kafka call, and aiobreaker's bookkeeping costs ~16 Python calls each time."""
        breaker = self._breaker
        if breaker.current_state is aiobreaker.CircuitBreakerState.CLOSED and not breaker.fail_counter:
            try:
                result = await func(*args, **kwargs)
            except Exception as exc:
                failure = exc
            else:
                if breaker.fail_counter:
                    # Failures of calls that finished while this one ran: a success ends
                    # the run of consecutive failures, as aiobreaker's own call would.
                    breaker._state_storage.reset_counter()
                return result
            try:
                return await self._guarded(_raise, failure)
            except BreakerOpen as refused:
                # Another call's failure opened it meanwhile: this call was made all the
                # same, and its caller must know how it failed.
                if refused.failure is None:
                    refused.failure = failure
                raise
        return await self._guarded(func, *args, **kwargs)

    async def _guarded(
        self, func: Callable[..., Awaitable[T]], *args: object, **kwargs: object
    ) -> T:
        breaker = self._breaker
        late: list[Exception] = []
        counted: list[int] = []  # the closed breaker's failures when a late one came
        if breaker.current_state is not aiobreaker.CircuitBreakerState.CLOSED:
            # aiobreaker settles a call by the state it began in: a trial that fails
            # after another call closed the breaker opened it again, for a full reset
            # time, a model that had just answered (a review). Such a failure is the
            # closed breaker's to count, as one of ``fail_max``: handed back to
            # aiobreaker as a success (its trial state then closes the closed breaker
            # again, zeroing its count, which is put back), then counted as a failure.
            inner = func

            async def trial(*args: object, **kwargs: object) -> T:
                try:
                    return await inner(*args, **kwargs)
                except Exception as exc:
                    if breaker.current_state is not aiobreaker.CircuitBreakerState.CLOSED:
                        raise
                    late.append(exc)
                    counted.append(breaker.fail_counter)
                    return cast(T, None)

            func = trial
        try:
            result: T = await breaker.call_async(func, *args, **kwargs)
        except aiobreaker.CircuitBreakerError as exc:
            # Not the error's own reopen time: aiobreaker reckons it against local time
            # from a UTC clock (None all the time east of UTC, and anywhere at the
            # instant the timeout ends), and None made the refusal a TypeError, a 500.
            # aiobreaker raises it ``from`` the failure that opened the breaker.
            raise BreakerOpen(self.name, max(1, self.retry_after_s), exc.__cause__) from None
        if late:
            for _ in range(counted[0] - breaker.fail_counter):
                breaker._state_storage.increment_counter()
            return await self._guarded(_raise, late[0])
        return result


async def _raise(exc: Exception) -> NoReturn:
    raise exc
