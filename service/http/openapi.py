"""The OpenAPI 3.1 document, generated from the msgspec wire types, and the /docs page.

Each route module declares its ``ROUTES`` (``service.http.routing``); their request and response types are the
same Structs that validate requests, turned into JSON Schema 2020-12 by msgspec, so
the document cannot drift from the code. ``/docs`` renders it with Swagger UI served
from the ``swagger-ui-py`` package (Swagger UI 5, which reads OpenAPI 3.1; no CDN).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from mlgate.config import Settings
from mlgate.schemas.problem import Problem
from mlgate.service.http.compression import preferred_coding
from mlgate.service.http.routing import BODY_TYPES, Route, add_static

REF = "#/components/schemas/{name}"
PROBLEM_TYPES = ("application/problem+json", "application/msgpack")
# The Open Inference Protocol routes answer errors as application/json (same document).
OIP_PROBLEM_TYPES = ("application/json", "application/msgpack")
# As service.protection.middleware accepts it: 1-255 printable ASCII characters.
IDEMPOTENCY_KEY_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"}


PROBLEM_STATUSES = {
    400: "Malformed request: an undecodable body, or a bad header, Host or framing",
    414: "Request line (its URI) over 8 KB",
    408: "Body sent too slowly (under MLGATE_BODY_MIN_RATE_BYTES per second)",
    417: "An Expect other than 100-continue",
    401: "Missing or unknown API key",
    403: "The key lacks the scope",
    404: "Not found",
    409: "Same Idempotency-Key (or a record_id of the batch) still in flight",
    413: "Body over the size limit",
    415: "Unsupported Content-Type",
    422: "Validation failed",
    429: "Rate limited",
    503: "Overloaded (queue full, dependency down) or a model that failed to load here; retry after Retry-After",
    504: "Deadline exceeded",
    431: "Request head over 32 KB",
    501: "A transfer coding other than chunked (compress with Content-Encoding instead)",
    505: "An HTTP version other than 1.x",
}
# What any request may be answered, whatever its route and method: refused as HTTP
# (its head, its framing, its version) before a route reads it.
ANY_REQUEST_STATUSES = (400, 414, 417, 431, 501, 505)
# The binary tensor extension's body: a JSON header, then the tensors' raw bytes.
BINARY_TENSORS = "application/octet-stream"
BINARY_TENSORS_SCHEMA = {
    "type": "string",
    "contentMediaType": BINARY_TENSORS,
    "description": (
        "The binary tensor extension: the JSON document (its first "
        "Inference-Header-Content-Length bytes), then each binary tensor's raw bytes in order"
    ),
}


# Response headers, by the answers that carry them (``_response_headers``).
HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-ID": {
        "description": "The request's id (the client's X-Request-ID, else a new one); in every log line of the request.",
        "schema": {"type": "string"},
    },
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}},
    "RateLimit-Policy": {
        "description": (
            'Each token bucket that limits the request, the key\'s and (when configured) its tenant\'s: '
            '"key";q=<burst>;w=<seconds to refill an empty bucket>, "tenant";q=...;w=... '
            "(IETF RateLimit headers)."
        ),
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": (
            'Per bucket of RateLimit-Policy, "key";r=<whole tokens left>;t=<seconds>: with a token '
            "left, t is the time until the bucket is full again; with none, until the next token "
            "(what Retry-After names on a 429)."
        ),
        "schema": {"type": "string"},
    },
    "Idempotent-Replayed": {
        "description": "true: the answer stored for this Idempotency-Key, replayed; nothing was run again.",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "WWW-Authenticate": {"description": "Bearer: how to authenticate.", "schema": {"type": "string"}},
    "Deprecation": {"description": "When this version was deprecated (RFC 9745).", "schema": {"type": "string"}},
    "Sunset": {"description": "When this version goes away (RFC 8594).", "schema": {"type": "string"}},
    "Link": {"description": "The successor version of this route.", "schema": {"type": "string"}},
    "Inference-Header-Content-Length": {
        "description": "The binary tensor extension: the length of the JSON document the body begins with.",
        "schema": {"type": "integer"},
    },
}
# Answers the door gives before the rate limit and idempotency run.
_BEFORE_THE_ROUTE = (414, 431, 501, 505)
REQUEST_ID_PARAMETER = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": (
        "Your id for the request, echoed and logged: 1-128 printable ASCII characters; one is made"
        " when absent, and in place of a longer or unprintable one."
    ),
    "schema": {"type": "string"},
}


def _response_headers(op: Route, status: int) -> dict[str, Any]:
    names = ["X-Request-ID"]
    # A route's own 503 of its own type (``/ready``'s not ready) is a state, not a
    # refusal to retry after (a review: documented, never sent).
    if status in (409, 429, 504) or status == 503 and op.responses.get(503) is None:
        names.append("Retry-After")
    if op.scope is not None and status not in (401, 403, *_BEFORE_THE_ROUTE):
        names += ["RateLimit-Policy", "RateLimit"]
    # Replays: what the idempotency layer stores; it runs after the key and scope
    # checks and reads the body first (its limit, its pace, the Expect before it).
    if op.method == "post" and status < 500 and status not in (401, 403, 408, 409, 413, 417, 429, *_BEFORE_THE_ROUTE):
        names.append("Idempotent-Replayed")
    if status == 200 and BINARY_TENSORS in op.request_media:
        names.append("Inference-Header-Content-Length")
    if status in (401, 403):  # a 403 names the scope it lacks (``insufficient_scope``)
        names.append("WWW-Authenticate")
    # Not on what the parser answers before the route is known (a review).
    if op.deprecated and status not in _BEFORE_THE_ROUTE:
        names += ["Deprecation", "Sunset", "Link"]
    return {name: HEADERS[name] for name in names}


def build_document(routes: list[Route], version: str, settings: Settings | None = None) -> dict[str, Any]:
    """The document of ``routes``; with ``settings``, the limits they set (a batch's
    records, the feature dimensions) in place of the wire types' widest ones."""
    operations = [route for route in routes if route.documented]
    types: list[Any] = [Problem]
    for op in operations:
        if op.request is not None:
            types.append(op.request)
        types.extend(t for t in op.responses.values() if t is not None)
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    schema_of = dict(zip(map(id, types), schemas, strict=True))

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry: dict[str, Any] = {
            "summary": op.summary,
            "tags": [op.tag],
            "operationId": _operation_id(op),
            "responses": {},
        }
        if op.description:
            entry["description"] = op.description
        if op.deprecated:
            entry["deprecated"] = True
        parameters = list(op.parameters) + _path_parameters(op.path) + [REQUEST_ID_PARAMETER]
        if op.method == "post":
            parameters.append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": IDEMPOTENCY_KEY_SCHEMA,
                }
            )
        if parameters:
            entry["parameters"] = parameters
        if op.request is not None:
            media = {
                name: {"schema": BINARY_TENSORS_SCHEMA if name == BINARY_TENSORS else schema_of[id(op.request)]}
                for name in op.request_media
            }
            entry["requestBody"] = {"required": not op.body_optional, "content": media}
        problem_types = OIP_PROBLEM_TYPES if _is_oip(op.path) else PROBLEM_TYPES
        for status, response_type in op.responses.items():
            described: dict[str, Any] = {"description": _status_text(status, op.path)}
            if response_type is not None:
                described["content"] = {
                    name: {"schema": schema_of[id(response_type)]} for name in BODY_TYPES
                }
                if status == 200 and BINARY_TENSORS in op.request_media:
                    described["content"][BINARY_TENSORS] = {"schema": BINARY_TENSORS_SCHEMA}
            elif op.answer_media is not None and status < 400:
                kind = "object" if op.answer_media == "application/json" else "string"
                described["content"] = {op.answer_media: {"schema": {"type": kind}}}
            elif status >= 400:  # an error the route names without a type: a problem
                described["content"] = {name: {"schema": schema_of[id(Problem)]} for name in problem_types}
            entry["responses"][str(status)] = described
        for status in _error_statuses(op):
            problem = {name: {"schema": schema_of[id(Problem)]} for name in problem_types}
            own = entry["responses"].get(str(status))
            if own is None:
                entry["responses"][str(status)] = {"description": PROBLEM_STATUSES[status], "content": problem}
            elif op.responses.get(status) is not None:
                # The route's own answer of that status (OIP's not ready: 400), or a
                # problem from before it (a malformed request's 400; a review).
                own["description"] += f"; or {PROBLEM_STATUSES[status][0].lower()}{PROBLEM_STATUSES[status][1:]}"
                for name, media in own["content"].items():
                    if name in problem:
                        media["schema"] = {"anyOf": [media["schema"], problem[name]["schema"]]}
        for status, described in entry["responses"].items():
            described["headers"] = _response_headers(op, int(status))
        if op.scope is None:
            entry["security"] = []
        paths.setdefault(op.path, {})[op.method] = entry

    _for_json_schema(components)
    _for_json_schema(paths)
    if settings is not None:
        _configured_limits(components, settings)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlgate",
            "version": version,
            "description": (
                "Validated ingestion to Kafka and batched ONNX prediction. Beyond each "
                "operation's answers: a method a path does not serve is answered 405 with "
                "Allow (a problem document), and HEAD is answered wherever GET is, without "
                "a body."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }


# msgspec runs a pattern with Python's ``re.search``, whose ``$`` also matches before a
# final newline: the schemas end theirs with this lookahead to refuse one. JSON Schema's
# (ECMA-262) ``$`` never matches there, so the document leaves it out.
_PYTHON_END_GUARD = "$(?!\\n)"


def _for_json_schema(node: Any) -> None:
    """Patterns as JSON Schema reads them (``_PYTHON_END_GUARD``), in place."""
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if isinstance(pattern, str) and pattern.endswith(_PYTHON_END_GUARD):
            node["pattern"] = pattern[: -len(_PYTHON_END_GUARD)] + "$"
        for value in node.values():
            _for_json_schema(value)
    elif isinstance(node, list):
        for value in node:
            _for_json_schema(value)


def _configured_limits(components: dict[str, Any], settings: Settings) -> None:
    """The limits the server holds requests to, which the settings narrow: the records
    of a batch (``MLGATE_MAX_BATCH_RECORDS``), the feature counts a record may have
    (``MLGATE_FEATURE_DIMS``) and the range of its values (``MLGATE_FEATURE_MIN`` and
    ``MLGATE_FEATURE_MAX``)."""
    batch = components.get("IngestRequest", {}).get("properties", {}).get("records")
    if batch is not None:
        batch["maxItems"] = settings.max_batch_records
    features = components.get("Record", {}).get("properties", {}).get("features")
    if features is not None:
        dims = sorted(set(settings.feature_dims))
        features["minItems"], features["maxItems"] = dims[0], dims[-1]
        features["anyOf"] = [{"minItems": d, "maxItems": d} for d in dims]
        features["description"] = "One of these many features: " + ", ".join(map(str, dims))
        values = features.get("items")
        if isinstance(values, dict):
            if settings.feature_min is not None:
                values["minimum"] = settings.feature_min
            if settings.feature_max is not None:
                values["maximum"] = settings.feature_max


def _operation_id(op: Route) -> str:
    cleaned = op.path.strip("/").replace("/", "_").replace("{", "").replace("}", "")
    return f"{op.method}_{cleaned or 'root'}"


def _path_parameters(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


def _status_text(status: int, path: str) -> str:
    if status == 400 and path.endswith("/ready"):  # the protocol's "not ready", no error
        return "Not ready"
    return {200: "OK", 202: "Accepted", 503: "Not ready"}.get(status, PROBLEM_STATUSES.get(status, ""))


def _is_oip(path: str) -> bool:
    # The same rule service.http.front_door applies when it shapes an error.
    return path == "/v2" or path.startswith("/v2/")


def _error_statuses(op: Route) -> list[int]:
    """Errors any operation of this shape can answer, then the operation's own."""
    statuses = list(ANY_REQUEST_STATUSES)
    if op.request is not None:
        statuses += [408, 413, 415, 422]
    if op.parameters or op.method == "post":  # a bad query or header (Idempotency-Key)
        statuses += [400, 422]
    if "{" in op.path:  # names something that may not exist
        statuses.append(404)
    if op.scope is not None:
        # 503: also the key store (Redis) unreachable, on any method.
        statuses += [401, 429, 503] if op.scope == "any" else [401, 403, 429, 503]
        if op.method == "post":
            statuses.append(409)
    statuses += op.errors
    return list(dict.fromkeys(statuses))


_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mlgate API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script></body></html>
"""
_DOCS_INIT = "window.ui = SwaggerUIBundle({url: '/openapi.json', dom_id: '#swagger-ui'});\n"


def docs_routes(documented: list[Route], version: str, settings: Settings) -> list[Route]:
    """``/openapi.json`` for ``documented`` and itself, as ``settings`` configure them,
    and the ``/docs`` page that renders it."""

    async def openapi_json(request: web.Request) -> web.Response:
        # Compressed when the client takes gzip: 10x smaller, so a client that reads
        # it slowly holds 10x less of it in the connection's buffer (an open route).
        if accepts_gzip(request.headers.get("Accept-Encoding", "")):
            return web.Response(
                body=compressed,
                content_type="application/json",
                headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"},
            )
        return web.Response(body=document, content_type="application/json", headers={"Vary": "Accept-Encoding"})

    async def docs(request: web.Request) -> web.Response:
        return web.Response(text=_DOCS_PAGE, content_type="text/html")

    async def docs_init(request: web.Request) -> web.Response:
        return web.Response(text=_DOCS_INIT, content_type="application/javascript")

    own = [
        Route(
            "get", "/openapi.json", openapi_json, "This document (OpenAPI 3.1)", "operations", {200: None},
            answer_media="application/json",
        ),
        Route(
            "get", "/docs", docs, "Swagger UI rendering this document", "operations", {200: None},
            answer_media="text/html",
        ),
        Route("get", "/docs/init.js", docs_init, "Swagger UI set-up", "operations", documented=False),
    ]
    document = msgspec.json.encode(build_document([*documented, *own], version, settings))
    compressed = gzip.compress(document, compresslevel=9, mtime=0)
    return own


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` takes gzip (RFC 9110, 12.5.3): its weight, as
    ``gzip`` or ``x-gzip`` (the higher, if both), else as ``*``, is above 0."""
    return preferred_coding(accept_encoding, ("gzip",)) == "gzip"


def add_docs_assets(app: web.Application) -> None:
    assets = _swagger_ui_path()
    if assets is not None:
        add_static(app, "/docs/static/", str(assets))


def _swagger_ui_path() -> Path | None:
    """The Swagger UI 5 assets of ``swagger-ui-py``, found without importing it (its
    package imports web-framework glue we do not use). Swagger UI 4 (the
    ``swagger-ui-bundle`` package) reads OpenAPI 3.0 only: ``/docs`` rendered
    nothing of this 3.1 document (a review)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None
