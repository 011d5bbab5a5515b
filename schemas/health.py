"""Liveness and readiness answers."""

from __future__ import annotations

from typing import Literal

import msgspec


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["ok"] = "ok"


class Readiness(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    status: Literal["ready", "not ready"]
    checks: dict[str, bool]
    # For each failing check, what is wrong (a full disk and its directory, the model
    # that failed to load and why, ...).
    reasons: dict[str, str] = {}
