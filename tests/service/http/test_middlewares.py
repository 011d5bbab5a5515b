"""The middlewares: request id, one canonical log line per request, and every error
(routing, worker, unexpected) answered as a problem document without internals."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from structlog.testing import LogCapture

from mlgate.config import Settings
from mlgate.service.app import create_app
from mlgate.service.http.front_door import RequestIds
from mlgate.service.state import RECORD_SINK
from mlgate.workers.errors import MailboxFull, SinkFailed, WorkerClosed
from mlgate.workers.sinks.records import OutboundRecord
from tests.conftest import AppClientFactory

Client = TestClient[web.Request, web.Application]
# Auth and rate limits have tests of their own; here they would only get in the way.
OPEN: dict[str, Any] = {"auth_disabled": True, "rate_limits_enabled": False}
INGEST = "/api/v2/ingest"
JSON = {"Content-Type": "application/json"}
BATCH = {"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(feature_dims=(4,), **OPEN)


@pytest.fixture
async def client(app_client: AppClientFactory, settings: Settings) -> Client:
    return await app_client(settings)


@pytest.fixture
def captured_logs() -> Iterator[LogCapture]:
    """Log events as the entrypoint configures them: request context merged first."""
    capture = LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        yield capture
    finally:
        structlog.reset_defaults()


def _assert_problem(body: dict[str, Any], status: int, instance: str) -> None:
    assert body["status"] == status
    assert body["type"].startswith("/problems/") and body["title"]
    assert body["instance"] == instance


# -- request id -----------------------------------------------------------------------


async def test_given_request_id_is_echoed(client: Client) -> None:
    response = await client.post(INGEST, json=BATCH, headers={"X-Request-ID": "abc-123"})
    assert response.status == 202
    assert response.headers["X-Request-ID"] == "abc-123"


async def test_request_id_is_generated_when_absent(client: Client) -> None:
    first = await client.get("/health")
    second = await client.get("/health")
    ids = [first.headers["X-Request-ID"], second.headers["X-Request-ID"]]
    assert ids[0] != ids[1]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_generated_request_ids_differ_between_processes() -> None:
    # Each process (each app) draws its own random prefix before its counter.
    request = make_mocked_request("GET", "/health")
    assert RequestIds()(request) != RequestIds()(request)


@pytest.mark.parametrize(
    "given",
    ["x" * 129, "tab\tinside", "\u00fc-\u65e5\u672c"],
    # Not ASCII: echoed as raw UTF-8, which clients read as Latin-1 (a review), and
    # which the door's answers to unparsed requests never echoed.
    ids=["too-long", "unprintable", "not-ascii"],
)
async def test_unusable_request_id_is_replaced(client: Client, given: str) -> None:
    response = await client.get("/health", headers={"X-Request-ID": given})
    assert response.headers["X-Request-ID"] != given
    assert len(response.headers["X-Request-ID"]) == 32


async def test_problem_carries_the_request_id_in_header_and_body(client: Client) -> None:
    response = await client.post(INGEST, data=b"{", headers={**JSON, "X-Request-ID": "req-9"})
    assert response.status == 400
    assert response.headers["X-Request-ID"] == "req-9"
    assert (await response.json(content_type=None))["request_id"] == "req-9"


async def test_one_log_line_per_request_with_request_id_status_and_latency(
    client: Client, captured_logs: LogCapture
) -> None:
    await client.post(INGEST, json=BATCH, headers={"X-Request-ID": "req-1"})
    await client.post(INGEST, data=b"{", headers={**JSON, "X-Request-ID": "req-2"})
    lines = [e for e in captured_logs.entries if e["event"] == "request"]
    assert [(e["request_id"], e["status"], e["path"]) for e in lines] == [
        ("req-1", 202, INGEST),
        ("req-2", 400, INGEST),
    ]
    assert all(e["latency_ms"] >= 0 and e["method"] == "POST" for e in lines)
    # Every other line of those requests carries the request id too.
    assert all("request_id" in e for e in captured_logs.entries if e["event"] != "request")


# -- routing errors -------------------------------------------------------------------


async def test_unknown_route_is_404_problem(client: Client) -> None:
    response = await client.get("/no/such/route")
    assert response.status == 404
    assert response.content_type == "application/problem+json"
    _assert_problem(await response.json(content_type=None), 404, "/no/such/route")
    assert "X-Request-ID" in response.headers


async def test_wrong_method_is_405_problem_with_allow(client: Client) -> None:
    response = await client.get(INGEST)
    assert response.status == 405
    assert response.content_type == "application/problem+json"
    _assert_problem(await response.json(content_type=None), 405, INGEST)
    assert "POST" in response.headers["Allow"]


async def test_routing_problem_in_msgpack_when_preferred(client: Client) -> None:
    response = await client.get("/nowhere", headers={"Accept": "application/msgpack"})
    assert response.status == 404
    assert response.content_type == "application/msgpack"
    _assert_problem(msgspec.msgpack.decode(await response.read()), 404, "/nowhere")


# -- worker and unexpected errors -----------------------------------------------------


def _failing_write(error: Exception) -> Callable[..., Awaitable[None]]:
    async def write(records: list[OutboundRecord], lane: str = "", tenants=()) -> None:
        raise error

    return write


@pytest.mark.parametrize(
    "error",
    [MailboxFull("mailbox full"), WorkerClosed("stopping"), SinkFailed("disk gone")],
    ids=["mailbox-full", "worker-closed", "sink-failed"],
)
async def test_sink_that_cannot_take_the_write_is_503_with_retry_after(
    client: Client, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    monkeypatch.setattr(client.app[RECORD_SINK], "write", _failing_write(error))
    response = await client.post(INGEST, json=BATCH)
    assert response.status == 503
    assert int(response.headers["Retry-After"]) >= 1
    body = await response.json(content_type=None)
    _assert_problem(body, 503, INGEST)
    assert body["retry_after_s"] >= 1


async def test_retry_after_comes_from_the_settings(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await app_client(make_settings(feature_dims=(4,), retry_after_s=7, **OPEN))
    monkeypatch.setattr(client.app[RECORD_SINK], "write", _failing_write(MailboxFull("full")))
    response = await client.post(INGEST, json=BATCH)
    assert response.status == 503
    assert response.headers["Retry-After"] == "7"


async def test_unexpected_exception_is_500_problem_without_internals(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings
) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret internal state")

    app = create_app(settings)
    app.router.add_get("/boom", boom)
    client = await aiohttp_client(app)
    response = await client.get("/boom")
    assert response.status == 500
    assert response.content_type == "application/problem+json"
    text = await response.text()
    assert "secret" not in text and "Traceback" not in text
    _assert_problem(msgspec.json.decode(text), 500, "/boom")
    assert (await client.get("/health")).status == 200


async def test_accept_is_read_whatever_the_case_of_its_media_types(client: Client) -> None:
    response = await client.get("/nowhere", headers={"Accept": "APPLICATION/MsgPack; Q=1"})
    assert response.status == 404
    assert response.content_type == "application/msgpack"
    _assert_problem(msgspec.msgpack.decode(await response.read()), 404, "/nowhere")
