"""Data-quality routes: ``GET /api/v2/quality/sources/{source}`` and ``.../models/{model}``.

Each answers the drift of one source or model against its profile, as the process
that serves the request has seen it: the features with the highest PSI first (``top``,
default 10), their out-of-range share and both distributions, the window the scores
cover, and the records dropped, rejected and flagged. 404 when there is no profile;
503 with Retry-After when its file is there but cannot be read (none in force).
Scope ``quality`` (or ``admin``).
"""

from __future__ import annotations

from aiohttp import web

from mlgate.schemas.problem import FieldError
from mlgate.schemas.quality import DriftReport, ProfileKind
from mlgate.service.http.codec import respond
from mlgate.service.http.errors import NotFound, Overloaded, ValidationFailed
from mlgate.service.http.routing import Route
from mlgate.service.ingest.quality_screen import unreadable_retry_after_s
from mlgate.service.state import DRIFT_MONITOR, SETTINGS

DEFAULT_TOP = 10
# Each feature listed carries its bins three times (edges, reference, recent): at the
# largest profile (1001 bins) 100 features are 300k numbers, ~4.5 MB of JSON encoded
# on the event loop (~10 ms); a review's 4096 were 182 MB and held it 2 s, 256 still
# 40 ms a request.
MAX_TOP = 100

_TOP = {
    "name": "top",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_TOP, "default": DEFAULT_TOP},
    "description": "How many features to list, highest PSI first",
}
_DESCRIPTION = (
    "Per-feature population stability index and out-of-range share over the last "
    "complete tumbling window of MLGATE_DRIFT_WINDOW_RECORDS records (or the window "
    "being filled, before the first completes), as seen by the process answering. "
    "404 when no profile exists; 503 when its file cannot be read."
)



def _top(request: web.Request) -> int:
    given = request.query.getall("top", [])
    if not given:
        return DEFAULT_TOP
    raw = given[0]
    # ASCII digits only: Python's int() also reads "+3", " 3", "1_0" and full-width
    # digits (a review), which the document's integer does not.
    top = int(raw) if len(given) == 1 and raw.isascii() and raw.isdigit() and len(raw) <= 6 else -1
    if not 0 <= top <= MAX_TOP:
        raise ValidationFailed(
            f"top must be an integer from 0 to {MAX_TOP}",
            errors=[FieldError(loc="query.top", msg=f"integer 0..{MAX_TOP}")],
        )
    return top


async def _answer(request: web.Request, kind: ProfileKind, name: str) -> web.Response:
    monitor = request.app[DRIFT_MONITOR]
    report = await monitor.report(kind, name, _top(request))
    if report is None:
        if monitor.profile_unreadable(kind, name):
            # As its ingests are answered (a review: 404 "no profile" while they were 503).
            raise Overloaded(
                f"The {kind} profile {name!r} is there but cannot be read: no drift is "
                "measured until it loads",
                retry_after_s=unreadable_retry_after_s(request.app[SETTINGS]),
            )
        raise NotFound(f"No {kind} profile named {name!r}")
    return respond(request, report)


async def source_quality(request: web.Request) -> web.Response:
    """Drift of one source against its profile."""
    return await _answer(request, "source", request.match_info["source"])


async def model_quality(request: web.Request) -> web.Response:
    """Drift of one model's inputs against its profile."""
    return await _answer(request, "model", request.match_info["model"])

ROUTES = [
    Route(
        "get",
        "/api/v2/quality/sources/{source}", source_quality,
        "Drift of a source's records against its feature profile",
        "quality",
        {200: DriftReport},
        scope="quality",
        parameters=[_TOP],
        description=_DESCRIPTION,
    ),
    Route(
        "get",
        "/api/v2/quality/models/{model}", model_quality,
        "Drift of a model's inputs against its feature profile",
        "quality",
        {200: DriftReport},
        scope="quality",
        parameters=[_TOP],
        description=_DESCRIPTION,
    ),
]
