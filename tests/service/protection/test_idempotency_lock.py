"""An Idempotency-Key claim outlives ``MLGATE_IDEMPOTENCY_LOCK_S`` while its request
still runs: a retry meanwhile is told "in flight", never given a second run."""

from __future__ import annotations

import asyncio
from typing import Any

from mlgate.service.protection.idempotency import Claim, Entry, fingerprint
from mlgate.service.state import IDEMPOTENCY
from tests.conftest import AppClientFactory

FINGERPRINT = fingerprint("POST", "/api/v2/ingest", b"{}")
LOCK_S = 1


async def test_a_claim_whose_request_runs_past_the_lock_is_still_held(
    app_client: AppClientFactory, settings_for: Any, backend: str | None
) -> None:
    client = await app_client(settings_for(backend, idempotency_lock_s=LOCK_S))
    store = client.app[IDEMPOTENCY]
    first = await store.claim("t", "k", FINGERPRINT)
    assert isinstance(first, Claim)
    # The request behind ``first`` is still running, 2.5 locks later (the lapse is a
    # duration: there is no event to await instead).
    await asyncio.sleep(2.5 * LOCK_S)
    retry = await store.claim("t", "k", FINGERPRINT)
    assert isinstance(retry, Entry) and retry.response is None  # 409: still in flight



async def test_a_claim_left_unfinished_by_its_ended_request_still_lapses(
    app_client: AppClientFactory, settings_for: Any, backend: str | None
) -> None:
    """Extension follows the request that claimed: one that ended without storing or
    releasing (a bug, a crash) must not hold the key for ever."""
    client = await app_client(settings_for(backend, idempotency_lock_s=LOCK_S))
    store = client.app[IDEMPOTENCY]
    ended = asyncio.create_task(store.claim("t", "k", FINGERPRINT))
    assert isinstance(await ended, Claim)
    await asyncio.sleep(2.5 * LOCK_S)
    assert isinstance(await store.claim("t", "k", FINGERPRINT), Claim)
