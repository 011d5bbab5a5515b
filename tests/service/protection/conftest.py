"""What the protection tests share: settings with authentication on, and /ready read
until it says what a test waits for."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import KeyMaker


@pytest.fixture
def secured(make_settings, api_keys: KeyMaker):
    """Settings with keys required (from ``api_keys``' file) and 4 features a record."""

    def make(**overrides):
        return make_settings(
            auth_disabled=False, keys_file=str(api_keys.path), feature_dims=(4,), **overrides
        )

    return make


async def ready_once(client: Any, holds: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """/ready's body once ``holds`` says so, or after 10 s (the last one): a trial ping
    may wait out an open breaker's reset."""
    body: dict[str, Any] = {}
    for _ in range(100):
        body = await (await client.get("/ready")).json()
        if holds(body):
            break
        await asyncio.sleep(0.1)
    return body
