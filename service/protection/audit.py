"""The audit trail: one structured event per ingest, key change and repository change.

Events go to their own logger (``"channel": "audit"`` on every line, so a log
pipeline can route them to retention storage), written whatever the log level, and carry who, what and the outcome:
time, tenant, key id (never the key), route, tracking id, record counts, outcome.
Never payloads: no features, labels or metadata values appear here.

    ingest, ingest_stream     service.routes.ingest: source, tracking id, counts
    key_create, key_revoke    service.cli.keys (no request: ``audit_admin``)
    model_load, model_unload  the repository API (``/v2/repository/models/{model}/load``
                              and ``/unload``, service.routes.oip): ``model``, and the
                              ``model_version`` now serving after a load; outcome
                              ``loaded``/``unloaded``, ``not_found``, ``failed`` (no
                              version could be loaded) or ``rejected`` (a body or option
                              refused before anything was done)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import structlog
from aiohttp import web

from mlgate.service.http.context import KEY_ID, REQUEST_ID, TENANT
from mlgate.service.http.logs import write_info_line

# Its own level: an audit event reaches the trail whatever MLGATE_LOG_LEVEL drops
# (a service logging warnings only still records who ingested what). Not cached, so it
# follows the configuration of the moment (the entrypoint's, or a test's capture);
# initial values, not .bind(), for the same reason.
audit_log = structlog.wrap_logger(
    None,
    wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    cache_logger_on_first_use=False,
    channel="audit",
)

Action = Literal["ingest", "ingest_stream", "key_create", "key_revoke", "model_load", "model_unload"]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request: what every audit event of it carries."""

    tenant: str | None
    key_id: str | None
    route: str  # "POST /api/v2/ingest"
    request_id: str | None

    @classmethod
    def of(cls, request: web.Request) -> Caller:
        return cls(
            request.get(TENANT), request.get(KEY_ID), f"{request.method} {request.path}",
            request.get(REQUEST_ID),
        )


def audit_call(caller: Caller, action: Action, outcome: str, **counts: int | str | None) -> None:
    """An audit event for an HTTP request made by ``caller``."""
    _emit(
        action,
        {
            "outcome": outcome,
            "tenant": caller.tenant,
            "key_id": caller.key_id,
            "route": caller.route,
            "request_id": caller.request_id,
            **counts,
        },
    )


def audit_request(
    request: web.Request, action: Action, outcome: str, **counts: int | str | None
) -> None:
    """An audit event for an HTTP request, with the caller's identity from the request."""
    audit_call(Caller.of(request), action, outcome, **counts)


def audit_admin(action: Action, outcome: str, **details: str | int | None) -> None:
    """An audit event for an action taken outside a request (CLI, SIGHUP reload)."""
    _emit(action, {"outcome": outcome, **details})


def _emit(action: Action, fields: dict[str, int | str | None]) -> None:
    # One on every ingest: written straight as the entrypoint's configuration renders
    # it (a third of structlog's cost), through structlog under any other.
    if not write_info_line({"channel": "audit", **fields, "event": action}):
        audit_log.info(action, **fields)
