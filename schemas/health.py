"""Liveness and readiness answers."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["ok"] = "ok"


class Readiness(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    status: Literal["ready", "not ready"]
    checks: dict[str, bool]
    reasons: Annotated[
        dict[str, str],
        msgspec.Meta(
            description=(
                "For each failing check what is wrong (a full disk and its directory, the "
                "model that failed to load and why); with several processes also "
                '"worker <n>" for a sibling that is not ready'
            )
        ),
    ] = {}
    degraded: Annotated[
        dict[str, str],
        msgspec.Meta(
            description=(
                "Dependencies failing without making the process not ready, and what is "
                'served meanwhile (e.g. "redis": rate limits and record dedup in process, '
                "requests with an Idempotency-Key refused 503)"
            )
        ),
    ] = {}
