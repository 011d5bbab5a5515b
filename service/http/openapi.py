"""The OpenAPI 3.1 document, generated from the msgspec wire types, and the /docs page.

Each route module lists its ``OPERATIONS``; their request and response types are the
same Structs that validate requests, turned into JSON Schema 2020-12 by msgspec, so
the document cannot drift from the code. ``/docs`` renders it with Swagger UI served
from the ``swagger-ui-bundle`` package (no CDN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from mlgate.schemas.problem import Problem

REF = "#/components/schemas/{name}"
BODY_TYPES = ("application/json", "application/msgpack")
PROBLEM_TYPES = ("application/problem+json", "application/msgpack")
# The Open Inference Protocol routes answer errors as application/json (same document).
OIP_PROBLEM_TYPES = ("application/json", "application/msgpack")
# As service.idempotency accepts it: 1-255 printable ASCII characters.
IDEMPOTENCY_KEY_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    tag: str
    responses: dict[int, Any]
    request: Any = None
    scope: str | None = None
    request_media: tuple[str, ...] = BODY_TYPES
    parameters: list[dict[str, Any]] = field(default_factory=list)
    deprecated: bool = False
    description: str = ""
    # Error statuses the handler answers beyond those implied by the operation's shape
    # (see ``_error_statuses``), e.g. 404 for a model named in the body, 504 for a deadline.
    errors: tuple[int, ...] = ()


PROBLEM_STATUSES = {
    400: "Body is not decodable",
    401: "Missing or unknown API key",
    403: "The key lacks the scope",
    404: "Not found",
    409: "Same Idempotency-Key (or a record_id of the batch) still in flight",
    413: "Body over the size limit",
    415: "Unsupported Content-Type",
    422: "Validation failed",
    429: "Rate limited",
    503: "Overloaded: queue full or dependency down; retry after Retry-After",
    504: "Deadline exceeded",
}


def build_document(operations: list[Operation], version: str) -> dict[str, Any]:
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
        parameters = list(op.parameters) + _path_parameters(op.path)
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
            media = {name: {"schema": schema_of[id(op.request)]} for name in op.request_media}
            entry["requestBody"] = {"required": True, "content": media}
        for status, response_type in op.responses.items():
            described: dict[str, Any] = {"description": _status_text(status)}
            if response_type is not None:
                described["content"] = {
                    name: {"schema": schema_of[id(response_type)]} for name in BODY_TYPES
                }
            entry["responses"][str(status)] = described
        problem_types = OIP_PROBLEM_TYPES if _is_oip(op.path) else PROBLEM_TYPES
        for status in _error_statuses(op):
            entry["responses"].setdefault(
                str(status),
                {
                    "description": PROBLEM_STATUSES[status],
                    "content": {name: {"schema": schema_of[id(Problem)]} for name in problem_types},
                },
            )
        if op.scope is None:
            entry["security"] = []
        paths.setdefault(op.path, {})[op.method] = entry

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlgate",
            "version": version,
            "description": "Validated ingestion to Kafka and batched ONNX prediction.",
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


def _operation_id(op: Operation) -> str:
    cleaned = op.path.strip("/").replace("/", "_").replace("{", "").replace("}", "")
    return f"{op.method}_{cleaned or 'root'}"


def _path_parameters(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


def _status_text(status: int) -> str:
    return {200: "OK", 202: "Accepted", 503: "Not ready"}.get(status, PROBLEM_STATUSES.get(status, ""))


def _is_oip(path: str) -> bool:
    # The same rule service.middlewares applies when it shapes an error.
    return path == "/v2" or path.startswith("/v2/")


def _error_statuses(op: Operation) -> list[int]:
    """Errors any operation of this shape can answer, then the operation's own."""
    statuses = []
    if op.request is not None:
        statuses += [400, 413, 415, 422]
    if op.parameters or op.method == "post":  # a bad query or header (Idempotency-Key)
        statuses += [400, 422]
    if "{" in op.path:  # names something that may not exist
        statuses.append(404)
    if op.scope is not None:
        statuses += [401, 403, 429]
        if op.method == "post":
            statuses += [409, 503]
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


def setup(app: web.Application, operations: list[Operation], version: str) -> None:
    document = msgspec.json.encode(build_document(operations, version))

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    async def docs(request: web.Request) -> web.Response:
        return web.Response(text=_DOCS_PAGE, content_type="text/html")

    async def docs_init(request: web.Request) -> web.Response:
        return web.Response(text=_DOCS_INIT, content_type="application/javascript")

    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
    app.router.add_get("/docs/init.js", docs_init)
    assets = _swagger_ui_path()
    if assets is not None:
        app.router.add_static("/docs/static/", assets)


def _swagger_ui_path() -> Path | None:
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return Path(swagger_ui_bundle.swagger_ui_path)
