"""The retry policy both the producer and the predictor follow.

What is retried: connection errors and timeouts (``TransportError``) and the statuses
in ``RetryPolicy.retry_statuses``: 409 (the same Idempotency-Key or a record_id still
in flight), 429, 502, 503 and 504. Every other 4xx and 5xx is final.

How long it waits: exponential backoff with "equal jitter" (half the step fixed, half
random), from ``initial_backoff_s`` up to ``max_backoff_s``; when the answer carries
``Retry-After``, at least that long (plus up to 10 % jitter, so a crowd of clients told
the same second does not come back in step). Retries stop after ``max_attempts``
attempts (``None``: no count limit) or when the next attempt would start after
``timeout_s`` from the first; the last error is raised.

The caller keeps the request identical across attempts (same body, same
``Idempotency-Key``, same ``record_id``s): retrying is safe because the server
deduplicates.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from mlgate_client.errors import ApiError, MlgateError, TransportError

T = TypeVar("T")
RETRY_STATUSES = frozenset({409, 429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 10.0
    multiplier: float = 2.0
    max_attempts: int | None = None
    timeout_s: float = 120.0
    retry_statuses: frozenset[int] = field(default=RETRY_STATUSES)

    def __post_init__(self) -> None:
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (or None)")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")

    def retries(self, error: BaseException) -> bool:
        """Whether ``error`` is worth another attempt under this policy."""
        if isinstance(error, TransportError):
            return True
        return isinstance(error, ApiError) and error.status in self.retry_statuses

    def backoff_s(self, retry: int) -> float:
        """The jittered wait before retry number ``retry`` (1 for the first retry)."""
        step = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return step / 2 + random.random() * step / 2

    def delay_s(self, retry: int, retry_after_s: float | None) -> float:
        backoff = self.backoff_s(retry)
        if retry_after_s is None:
            return backoff
        return max(backoff, retry_after_s * (1 + 0.1 * random.random()))


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds (digits only, RFC 9110) or an
    HTTP date, always GMT (``email.utils`` reads asctime's form and a ``-0000`` zone
    as naive: taken as local time, a review saw a 2 s Retry-After read as five hours
    in New York, and as none in Tokyo). None for anything else (``inf``, ``1e400``,
    ``-3``: a retriable answer then waits its backoff, not for ever or never)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - time.time())


OnRetry = Callable[[int, MlgateError, float], None]


async def call_with_retries(
    attempt: Callable[[float], Awaitable[T]],
    policy: RetryPolicy,
    on_retry: OnRetry | None = None,
    timeout_s: float | None = None,
) -> T:
    """``await attempt(remaining_s)`` until it returns or fails for good.

    ``remaining_s`` is what is left of the budget (``timeout_s``, default the policy's):
    the attempt bounds itself by it. ``on_retry(retry, error, delay_s)`` is called before
    each wait."""
    deadline = time.monotonic() + (policy.timeout_s if timeout_s is None else timeout_s)
    retry = 0
    while True:
        try:
            return await attempt(max(0.001, deadline - time.monotonic()))
        except MlgateError as error:
            if not policy.retries(error):
                raise
            retry += 1
            if policy.max_attempts is not None and retry >= policy.max_attempts:
                raise
            delay = policy.delay_s(retry, getattr(error, "retry_after_s", None))
            if time.monotonic() + delay >= deadline:
                raise
            if on_retry is not None:
                on_retry(retry, error, delay)
            await asyncio.sleep(delay)
