"""``Expect: 100-continue``: a request that cannot succeed is refused before its body is
sent (413 for an announced length over the limit, 401/403 for its key, 415 for a media
type or content encoding its route does not take); the others get ``100 Continue``.
Raw sockets: common clients cannot send the expectation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from structlog.testing import capture_logs

from mlgate.config import Settings
from tests.conftest import AppClientFactory
from tests.support import KeyMaker

Client = TestClient[web.Request, web.Application]
LIMIT = 1024
# A guard against a hang (a server waiting for a body the client holds back), not a
# measurement: every answer here comes at once.
HANG_GUARD_S = 10
BATCH = msgspec.json.encode({"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]})


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes


class RawConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send_head(self, path: str, length: int, **headers: str) -> None:
        lines = [f"POST {path} HTTP/1.1", "Host: mlgate", f"Content-Length: {length}"]
        lines += ["Expect: 100-continue", *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()

    async def send_body(self, body: bytes) -> None:
        self.writer.write(body)
        await self.writer.drain()

    async def answer(self) -> Answer:
        """The next answer: an interim ``100 Continue`` or the final one with its body."""
        async with asyncio.timeout(HANG_GUARD_S):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode().split("\r\n")[:-2]
            headers: CIMultiDict[str] = CIMultiDict()
            for line in lines:
                name, _, value = line.partition(":")
                headers.add(name.strip(), value.strip())
            length = int(headers.get("Content-Length", "0"))
            body = await self.reader.readexactly(length) if length else b""
        return Answer(int(status_line.split()[1]), headers, body)

    async def closed_by_server_once_the_client_is_done(self) -> bool:
        """The client sends no body and says so (half-close, as after reading
        ``Connection: close``); the server then closes too, awaiting nothing more."""
        self.writer.write_eof()
        async with asyncio.timeout(HANG_GUARD_S):
            return await self.reader.read() == b""


@pytest.fixture
def keys(api_keys: KeyMaker) -> dict[str, str]:
    return {
        "ingest": api_keys.create(tenant="acme", scopes="ingest"),
        "predict": api_keys.create(tenant="acme", scopes="predict"),
    }


@pytest.fixture
async def client(
    app_client: AppClientFactory,
    make_settings: Callable[..., Settings],
    api_keys: KeyMaker,
    keys: dict[str, str],
) -> Client:
    settings = make_settings(
        max_body_bytes=LIMIT,
        feature_dims=(4,),
        keys_file=str(api_keys.path),
        auth_disabled=False,
        rate_limits_enabled=False,
    )
    return await app_client(settings)


@pytest.fixture
async def connect(client: Client) -> AsyncIterator[Callable[[], asyncio.Future[RawConnection]]]:
    opened: list[asyncio.StreamWriter] = []

    async def open_connection() -> RawConnection:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        opened.append(writer)
        return RawConnection(reader, writer)

    yield open_connection  # type: ignore[misc]
    for writer in opened:
        writer.close()
        await writer.wait_closed()


async def test_an_announced_body_over_the_limit_is_413_instead_of_100_continue(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str]
) -> None:
    connection = await connect()
    await connection.send_head(
        "/api/v2/ingest", LIMIT + 1, Content_Type="application/json", X_API_Key=keys["ingest"]
    )
    answer = await connection.answer()
    assert answer.status == 413
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    problem = msgspec.json.decode(answer.body)
    assert problem["status"] == 413 and problem["type"] == "/problems/payload-too-large"
    assert answer.headers["X-Request-ID"] == problem["request_id"]
    assert answer.headers["Connection"] == "close"
    assert await connection.closed_by_server_once_the_client_is_done()


async def test_a_request_without_a_key_is_401_before_100_continue(
    connect: Callable[[], asyncio.Future[RawConnection]],
) -> None:
    connection = await connect()
    await connection.send_head("/api/v2/ingest", len(BATCH), Content_Type="application/json")
    answer = await connection.answer()
    assert answer.status == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert msgspec.json.decode(answer.body)["status"] == 401
    assert await connection.closed_by_server_once_the_client_is_done()


async def test_a_key_without_the_route_scope_is_403_before_100_continue(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str]
) -> None:
    connection = await connect()
    await connection.send_head(
        "/api/v2/ingest", len(BATCH), Content_Type="application/json", X_API_Key=keys["predict"]
    )
    answer = await connection.answer()
    assert answer.status == 403
    assert 'error="insufficient_scope"' in answer.headers["WWW-Authenticate"]
    assert msgspec.json.decode(answer.body)["status"] == 403


async def test_a_valid_request_within_the_limit_gets_100_continue_then_its_answer(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str]
) -> None:
    connection = await connect()
    await connection.send_head(
        "/api/v2/ingest", len(BATCH), Content_Type="application/json", X_API_Key=keys["ingest"]
    )
    assert (await connection.answer()).status == 100
    await connection.send_body(BATCH)
    answer = await connection.answer()
    assert answer.status == 202, answer.body
    assert msgspec.json.decode(answer.body)["records_accepted"] == 1


async def test_a_stream_may_announce_more_than_the_body_limit(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str]
) -> None:
    line = b'{"features": [1.0, 2.0, 3.0, 4.0]}\n'
    body = line * (LIMIT // len(line) + 1)
    assert len(body) > LIMIT
    connection = await connect()
    await connection.send_head(
        "/api/v2/ingest/stream?source=s",
        len(body),
        Content_Type="application/x-ndjson",
        X_API_Key=keys["ingest"],
    )
    assert (await connection.answer()).status == 100
    await connection.send_body(body)
    answer = await connection.answer()
    assert answer.status == 202, answer.body


async def test_the_refusal_is_the_answer_the_route_gives_without_the_expectation(
    client: Client, connect: Callable[[], asyncio.Future[RawConnection]]
) -> None:
    """Through the same middlewares: v1's deprecation headers, OIP's ``error`` member."""
    for path in ("/api/v1/predict", "/v2/models/demo/infer"):
        connection = await connect()
        await connection.send_head(path, 2, Content_Type="application/json", X_Request_ID="rid-1")
        early = await connection.answer()
        plain = await client.post(path, data=b"{}", headers={"X-Request-ID": "rid-1"})
        assert early.status == plain.status == 401
        assert early.body == await plain.read()
        for header in ("Content-Type", "WWW-Authenticate", "X-Request-ID", "Deprecation", "Link"):
            assert early.headers.get(header) == plain.headers.get(header), header


@pytest.mark.parametrize(
    ("path", "key", "content_type"),
    [
        ("/api/v2/ingest", "ingest", "text/csv"),
        ("/api/v2/predict", "predict", "text/plain"),
        ("/api/v1/predict", "predict", "application/xml"),
        ("/api/v2/ingest/stream?source=s", "ingest", "text/csv"),
    ],
)
async def test_a_media_type_the_route_does_not_take_is_415_instead_of_100_continue(
    client: Client,
    connect: Callable[[], asyncio.Future[RawConnection]],
    keys: dict[str, str],
    path: str,
    key: str,
    content_type: str,
) -> None:
    connection = await connect()
    await connection.send_head(
        path, len(BATCH), Content_Type=content_type, X_API_Key=keys[key], X_Request_ID="rid-1"
    )
    early = await connection.answer()
    assert early.status == 415
    assert early.headers["Connection"] == "close"
    assert await connection.closed_by_server_once_the_client_is_done()
    headers = {"Content-Type": content_type, "X-API-Key": keys[key], "X-Request-ID": "rid-1"}
    plain = await client.post(path, data=BATCH, headers=headers)
    assert plain.status == 415
    assert early.body == await plain.read()


async def test_a_content_encoding_the_service_does_not_take_is_415_instead_of_100_continue(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str]
) -> None:
    connection = await connect()
    await connection.send_head(
        "/api/v2/ingest",
        len(BATCH),
        Content_Type="application/json",
        Content_Encoding="compress",
        X_API_Key=keys["ingest"],
    )
    answer = await connection.answer()
    assert answer.status == 415
    assert "Accept-Encoding" in answer.headers
    assert msgspec.json.decode(answer.body)["status"] == 415


async def test_a_wrong_media_type_is_refused_before_an_announced_length_over_the_limit(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str]
) -> None:
    """The order the handler refuses in without the expectation: media type first."""
    connection = await connect()
    await connection.send_head(
        "/api/v2/ingest", LIMIT + 1, Content_Type="text/csv", X_API_Key=keys["ingest"]
    )
    assert (await connection.answer()).status == 415


async def test_a_stream_without_a_source_is_422_before_its_media_type_is_looked_at(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str]
) -> None:
    connection = await connect()
    await connection.send_head(
        "/api/v2/ingest/stream", 10, Content_Type="text/csv", X_API_Key=keys["ingest"]
    )
    answer = await connection.answer()
    assert answer.status == 422
    assert msgspec.json.decode(answer.body)["errors"][0]["loc"] == "query.source"


async def test_an_oip_infer_takes_any_media_type_so_it_gets_100_continue(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str]
) -> None:
    """Triton's clients send binary tensors as application/octet-stream, and the OIP
    route reads any body that is not msgpack as JSON: nothing to refuse early."""
    connection = await connect()
    await connection.send_head(
        "/v2/models/demo/infer",
        len(b"{}"),
        Content_Type="application/octet-stream",
        X_API_Key=keys["predict"],
    )
    assert (await connection.answer()).status == 100


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_client_gone_before_its_body_ended_is_logged_as_gone_not_as_an_error(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str], framing: str
) -> None:
    connection = await connect()
    with capture_logs() as logs:
        if framing == "length":
            await connection.send_head(
                "/api/v2/ingest", len(BATCH), Content_Type="application/json", X_API_Key=keys["ingest"]
            )
        else:
            head = (
                "POST /api/v2/ingest HTTP/1.1\r\nHost: mlgate\r\nTransfer-Encoding: chunked\r\n"
                f"Expect: 100-continue\r\nContent-Type: application/json\r\n"
                f"X-API-Key: {keys['ingest']}\r\n\r\n"
            )
            connection.writer.write(head.encode())
        assert (await connection.answer()).status == 100
        body = BATCH[:10] if framing == "length" else b"a\r\n" + BATCH[:10] + b"\r\n"
        await connection.send_body(body)
        connection.writer.close()
        async with asyncio.timeout(HANG_GUARD_S):
            while not any(entry["event"] == "request" for entry in logs):  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # polling the captured log
    [access] = [entry for entry in logs if entry["event"] == "request"]
    assert access["status"] == 499
    assert [entry for entry in logs if entry["log_level"] == "error"] == []


@pytest.mark.parametrize("path", ["/api/v2/ingest", "/v2/models/demo/infer"])
async def test_an_expectation_other_than_100_continue_is_a_417_problem(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str], path: str
) -> None:
    connection = await connect()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: mlgate\r\nContent-Length: {len(BATCH)}\r\n"
        f"Expect: foo\r\nContent-Type: application/json\r\nX-Request-ID: exp-1\r\n"
        f"X-API-Key: {keys['ingest'] if 'ingest' in path else keys['predict']}\r\n\r\n"
    )
    connection.writer.write(head.encode())
    answer = await connection.answer()
    assert answer.status == 417
    # problem+json; the OIP routes' errors are application/json, as Triton's
    assert answer.headers["Content-Type"].split(";")[0].endswith("json")
    assert answer.headers["X-Request-ID"] == "exp-1"
    problem = msgspec.json.decode(answer.body)
    assert problem["type"] == "/problems/expectation-failed"
    assert ("error" in problem) == path.startswith("/v2/")


async def test_a_stream_with_an_idempotency_key_is_held_to_the_body_limit_before_100_continue(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str]
) -> None:
    """With an Idempotency-Key the stream's body is read whole first (its answer is
    stored), within the body limit: a longer one is refused before it is sent."""
    connection = await connect()
    await connection.send_head(
        "/api/v2/ingest/stream?source=s",
        LIMIT + 1,
        Content_Type="application/x-ndjson",
        X_API_Key=keys["ingest"],
        Idempotency_Key="stream-1",
    )
    answer = await connection.answer()
    assert answer.status == 413
    assert answer.headers["Connection"] == "close"


async def test_a_malformed_idempotency_key_is_400_before_100_continue(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str]
) -> None:
    connection = await connect()
    await connection.send_head(
        "/api/v2/ingest", len(BATCH), Content_Type="application/json",
        X_API_Key=keys["ingest"], Idempotency_Key="x" * 300,
    )  # fmt: skip
    assert (await connection.answer()).status == 400


async def test_a_client_sending_its_body_without_waiting_still_reads_the_refusal(
    connect: Callable[[], asyncio.Future[RawConnection]],
) -> None:
    """RFC 9110 lets a client send its body without waiting for 100 Continue (curl does
    after 1 s). A review saw a first fix, closing at once after the refusal, reset such
    clients before they read their 401: the connection must drain what they send."""
    connection = await connect()
    body = b"x" * (4 * 1024 * 1024)
    await connection.send_head("/api/v2/ingest", len(body), Content_Type="application/json")
    async with asyncio.timeout(HANG_GUARD_S):
        await connection.send_body(body)  # all of it, before reading anything
    answer = await connection.answer()
    assert answer.status == 401 and answer.headers["Connection"] == "close"
    async with asyncio.timeout(HANG_GUARD_S):  # closed cleanly, not reset
        assert await connection.reader.read() == b""


async def test_an_announced_body_over_the_limit_without_expect_is_413_closing_the_connection(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str]
) -> None:
    connection = await connect()
    head = (
        f"POST /api/v2/ingest HTTP/1.1\r\nHost: mlgate\r\nContent-Length: {LIMIT + 1}\r\n"
        f"Content-Type: application/json\r\nX-API-Key: {keys['ingest']}\r\n\r\n"
    )
    connection.writer.write(head.encode())
    await connection.writer.drain()
    answer = await connection.answer()
    assert answer.status == 413
    assert answer.headers["Connection"] == "close"


@pytest.mark.parametrize(
    "path", ["/api/v2/ingest", "/api/v2/predict", "/api/v2/ingest/stream?source=s"]
)
async def test_a_media_type_refused_with_an_idempotency_key_is_415_before_100_continue(
    connect: Callable[[], asyncio.Future[RawConnection]], keys: dict[str, str], path: str
) -> None:
    """The key's body is never read: the refusal does not wait for a body the client
    holds back (it waited the body timeout, then answered 408)."""
    connection = await connect()
    scope = "predict" if "predict" in path else "ingest"
    await connection.send_head(
        path, 16, Content_Type="text/plain", X_API_Key=keys[scope], Idempotency_Key="k-415"
    )
    answer = await connection.answer()
    assert answer.status == 415
    assert msgspec.json.decode(answer.body)["status"] == 415
    assert await connection.closed_by_server_once_the_client_is_done()


async def test_a_key_over_its_rate_limit_is_429_before_100_continue_and_pays_one_token(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], api_keys: KeyMaker
) -> None:
    """A review: the 429 came after 100 Continue, so megabytes were uploaded for it.
    Within the limit the request takes its one token before 100 Continue, not two."""
    key = api_keys.create(tenant="acme", scopes="ingest", rate=0.01, burst=2)
    client = await app_client(
        make_settings(
            max_body_bytes=LIMIT, feature_dims=(4,), keys_file=str(api_keys.path), auth_disabled=False,
            rate_limits_enabled=True,
        )
    )
    for _ in range(2):  # the burst: each with its 100 Continue, each one token
        reader, writer = await asyncio.open_connection(client.host, client.port)
        connection = RawConnection(reader, writer)
        await connection.send_head("/api/v2/ingest", len(BATCH), Content_Type="application/json", X_API_Key=key)
        assert (await connection.answer()).status == 100
        await connection.send_body(BATCH)
        assert (await connection.answer()).status == 202
        writer.close()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    connection = RawConnection(reader, writer)
    try:
        await connection.send_head("/api/v2/ingest", len(BATCH), Content_Type="application/json", X_API_Key=key)
        answer = await connection.answer()
        assert answer.status == 429
        assert answer.headers["RateLimit"].startswith('"key";r=0;')
        assert "Retry-After" in answer.headers
    finally:
        writer.close()
