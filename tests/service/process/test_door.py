"""The door: predict requests for a model at capacity refused from their head, before
the app, on the server ``mlgate serve`` runs (``CappedAppRunner``) over real sockets."""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import msgspec
import pytest
from aiohttp import http_exceptions, web
from structlog.testing import capture_logs

from mlgate.config import Settings
from mlgate.service.app import create_app
from mlgate.service.http.codec import Format
from mlgate.service.http.front_door import as_api_error
from mlgate.service.process import door
from mlgate.service.process.door import (
    MAX_INSTANCE_CHARS,
    Door,
    RefusalTemplates,
    parser_reason,
    refusal_answer,
)
from mlgate.service.process.server import CappedAppRunner, CappedServer
from mlgate.service.protection.api_keys import KeyStoreUnavailable
from mlgate.service.state import KEY_STORE, METRICS, MODEL_REPOSITORY
from mlgate.workers.errors import MailboxFull
from mlgate.workers.inference.batching import InferenceWorker
from tests.service.predict.test_predict_api import GatedSession, add_version, gate_worker, rows
from tests.support import KeyMaker, free_port

ROW = rows(1)[0].tolist()


@dataclass
class FullModel:
    """A served demo model whose mailbox is full: one row computing behind the gate,
    one queued."""

    url: str
    door: Door
    gated: GatedSession
    held: list[asyncio.Task[int]]
    session: aiohttp.ClientSession

    async def post(self, path: str, body: Any, **headers: str) -> aiohttp.ClientResponse:
        response = await self.session.post(f"{self.url}{path}", json=body, headers=headers)
        await response.read()
        return response

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw connection, to send requests byte for byte."""
        host, port = self.url.removeprefix("http://").split(":")
        return await asyncio.open_connection(host, int(port))

    async def release(self) -> list[int]:
        self.gated.gate.set()
        return await asyncio.wait_for(asyncio.gather(*self.held), 10)


FullModelFactory = Callable[..., Awaitable[FullModel]]


@pytest.fixture
def app_worker() -> Callable[[FullModel], Any]:
    """The demo model's worker behind ``model``'s door."""
    return lambda model: model.door._app[MODEL_REPOSITORY].resolve("demo").worker


@pytest.fixture
async def full_model(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FullModelFactory]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def make(
        key: str | None = None, keepalive_timeout: float = 75.0, fill: bool = True, **settings: Any
    ) -> FullModel:
        """``fill``: one row computing and one queued, on connections of their own;
        otherwise the model idle, its gate closed."""
        repo_root = tmp_path / "models"
        add_version(repo_root, 1, seed=1, config='{"max_batch_size": 1}')
        app = create_app(
            make_settings(
                model_repository=str(repo_root),
                inference_mailbox_size=1,
                request_timeout_ms=60_000,  # the gated batch makes the queue look slow
                **settings,
            )
        )
        runner = CappedAppRunner(
            app, max_connections=100, access_log=None, keepalive_timeout=keepalive_timeout
        )
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        gated = gate_worker(app[MODEL_REPOSITORY].resolve("demo").worker, monkeypatch)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        session = aiohttp.ClientSession()
        sessions.append(session)

        async def held(seed: int) -> int:
            async with aiohttp.ClientSession(headers=headers) as own:
                async with own.post(
                    f"{url}/api/v2/predict", json={"features": rows(1, seed)[0].tolist()}
                ) as r:
                    return r.status

        server = runner.server
        assert isinstance(server, CappedServer)
        if not fill:
            return FullModel(url, server.door, gated, [], session)
        first = asyncio.create_task(held(0))
        await asyncio.to_thread(gated.entered.wait, 5)
        second = asyncio.create_task(held(1))
        worker = app[MODEL_REPOSITORY].resolve("demo").worker
        for _ in range(100):
            if worker.mailbox_full:
                break
            await asyncio.sleep(0.01)
        assert worker.mailbox_full
        return FullModel(url, server.door, gated, [first, second], session)

    yield make
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


async def test_a_full_models_predict_is_refused_at_the_door_with_a_problem_document(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    response = await model.post("/api/v2/predict", {"features": ROW}, **{"X-Request-ID": "storm-1"})
    problem = msgspec.json.decode(await response.read())
    assert response.status == 503
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["Retry-After"] == "1"
    assert response.headers["X-Request-ID"] == "storm-1"
    assert problem["type"] == "/problems/overloaded" and problem["status"] == 503
    assert problem["request_id"] == "storm-1" and problem["instance"] == "/api/v2/predict"
    assert "demo/1" in problem["detail"]
    assert model.door.refused == 1
    assert await model.release() == [200, 200]


async def test_the_oip_infer_route_is_refused_at_the_door_with_its_error_member(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    body = {"inputs": [{"name": "input", "shape": [1, 128], "datatype": "FP32", "data": ROW}]}
    response = await model.post("/v2/models/demo/infer", body)
    document = msgspec.json.decode(await response.read())
    assert response.status == 503
    assert response.headers["Content-Type"] == "application/json"
    assert "demo/1" in document["error"]
    assert model.door.refused == 1
    await model.release()


async def test_a_connection_refused_at_the_door_serves_its_next_request(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    refused = await model.post("/api/v2/predict", {"features": ROW})
    assert refused.status == 503 and model.door.refused == 1
    assert await model.release() == [200, 200]
    served = await model.post("/api/v2/predict", {"features": ROW})
    assert served.status == 200
    assert len(model.session.connector._conns) == 1  # type: ignore[union-attr]  # one keep-alive connection


async def test_the_deprecated_v1_route_keeps_its_deprecation_headers_at_the_door(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    response = await model.post("/api/v1/predict", {"features": ROW})
    assert response.status == 503 and model.door.refused == 1
    assert response.headers["Deprecation"]
    await model.release()


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        ({"features": ROW, "model": "other"}, {}, 404),  # the body names a model
        ({"features": ROW}, {"Idempotency-Key": "k-1"}, 503),  # a replay may be due
        ({"features": ROW}, {"X-Request-Timeout": "soon"}, 400),  # the app's 400
    ],
    ids=["body-names-a-model", "idempotency-key", "invalid-timeout-header"],
)
async def test_what_the_door_cannot_decide_alone_is_left_to_the_app(
    full_model: FullModelFactory, body: dict[str, Any], headers: dict[str, str], status: int
) -> None:
    model = await full_model()
    response = await model.post("/api/v2/predict", body, **headers)
    assert response.status == status
    assert model.door.refused == 0
    await model.release()


def _gzipped_past(limit: int) -> bytes:
    padding = " " * (2 * limit)  # JSON whitespace: a valid body, decompressed past the limit
    return gzip.compress(json.dumps({"features": ROW}).encode() + padding.encode())


@pytest.mark.parametrize(
    ("extra_headers", "body", "status"),
    [
        ({"Content-Type": "text/plain"}, None, 415),
        ({"Content-Type": "application/json", "Content-Encoding": "compress"}, None, 415),
        (
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            _gzipped_past(20_000),
            413,
        ),
        ({"Content-Type": "application/json", "Expect": "something-else"}, None, 417),
    ],
    ids=["content-type", "content-encoding", "decompressed-past-the-limit", "expect"],
)
async def test_a_body_the_app_refuses_for_its_own_sake_gets_that_answer_when_the_model_is_full(
    full_model: FullModelFactory, extra_headers: dict[str, str], body: bytes | None, status: int
) -> None:
    """A permanently bad request is told what is wrong with it, not to retry (a review:
    the door answered each 503 while the model was busy)."""
    model = await full_model(max_body_bytes=20_000)
    payload = body if body is not None else json.dumps({"features": ROW}).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in extra_headers.items())
    reader, writer = await model.connect()
    writer.write(
        f"POST /api/v2/predict HTTP/1.1\r\nHost: x\r\n{head}"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.split()[1] == str(status).encode()
    assert model.door.refused == 0
    await model.release()


async def test_a_known_key_with_the_predict_scope_is_refused_at_the_door(
    full_model: FullModelFactory, api_keys: KeyMaker
) -> None:
    key = api_keys.create(scopes="predict")
    model = await full_model(key, keys_file=str(api_keys.path), auth_disabled=False)
    response = await model.post("/api/v2/predict", {"features": ROW}, Authorization=f"Bearer {key}")
    assert response.status == 503 and model.door.refused == 1
    assert await model.release() == [200, 200]


async def test_a_missing_or_unknown_key_is_still_401_when_the_model_is_full(
    full_model: FullModelFactory, api_keys: KeyMaker
) -> None:
    key = api_keys.create(scopes="predict")
    model = await full_model(key, keys_file=str(api_keys.path), auth_disabled=False)
    missing = await model.post("/api/v2/predict", {"features": ROW})
    unknown = await model.post(
        "/api/v2/predict", {"features": ROW}, Authorization=f"Bearer {key[:-4]}abcd"
    )
    assert (missing.status, unknown.status) == (401, 401)
    assert model.door.refused == 0
    await model.release()


async def test_a_key_without_the_predict_scope_is_still_403_when_the_model_is_full(
    full_model: FullModelFactory, api_keys: KeyMaker
) -> None:
    key = api_keys.create(scopes="predict")
    ingest_only = api_keys.create(scopes="ingest")
    model = await full_model(key, keys_file=str(api_keys.path), auth_disabled=False)
    response = await model.post(
        "/api/v2/predict", {"features": ROW}, Authorization=f"Bearer {ingest_only}"
    )
    assert response.status == 403
    assert model.door.refused == 0
    await model.release()


def raw_predict(features: list[float], timeout_ms: int | None = None, **headers: str) -> bytes:
    body = msgspec.json.encode({"features": features})
    timeout = "" if timeout_ms is None else f"X-Request-Timeout: {timeout_ms}\r\n"
    more = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    head = (
        "POST /api/v2/predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"{timeout}{more}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    return int(head.split()[1])


async def refused_connection(
    model: FullModel, timeout_ms: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection whose first predict the door refused: it is now held."""
    reader, writer = await model.connect()
    writer.write(raw_predict(ROW, timeout_ms))
    assert await asyncio.wait_for(read_answer(reader), 5) == 503
    return reader, writer


async def test_a_refused_connection_is_not_read_again_until_the_model_has_room(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    reader, writer = await refused_connection(model)
    writer.write(raw_predict(ROW))  # a retry at once
    retry = asyncio.ensure_future(read_answer(reader))
    await asyncio.sleep(0.3)
    assert not retry.done()  # waits in the socket, not refused again
    assert model.door.refused == 1
    assert await model.release() == [200, 200]
    assert await asyncio.wait_for(retry, 5) == 200
    writer.close()


async def test_a_refused_connection_answered_while_others_wait_joins_the_back_of_their_line(
    full_model: FullModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(door, "HOLD_TICK_S", 0.3)  # the line moves between the test's steps
    model = await full_model(retry_after_s=60)
    first_reader, first_writer = await refused_connection(model)
    first_writer.write(raw_predict(ROW))  # a retry at once: waits, held first
    second_reader, second_writer = await refused_connection(model)
    second_writer.write(raw_predict(ROW))  # held behind it
    try:
        assert await model.release() == [200, 200]
        assert await asyncio.wait_for(read_answer(first_reader), 5) == 200
        first_writer.write(raw_predict(ROW))  # its next request, at once
        # The second connection comes back before it; the first waits its turn behind
        # it and is served then, rather than read at once and refused again.
        next_answer = asyncio.ensure_future(read_answer(first_reader))
        assert await asyncio.wait_for(read_answer(second_reader), 5) == 200
        assert not next_answer.done()
        assert await asyncio.wait_for(next_answer, 5) == 200
        assert model.door.refused == 2
    finally:
        first_writer.close()
        second_writer.close()


async def test_a_connection_never_refused_is_read_at_once_after_its_answer_while_others_wait(
    full_model: FullModelFactory, app_worker: Callable[[FullModel], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its next request may be anything (a health check on a pooled connection): it is
    not held for the model it last asked, a line it was never told about."""
    model = await full_model(fill=False, retry_after_s=60)
    served_reader, served_writer = await model.connect()
    served_writer.write(raw_predict(ROW))
    await asyncio.to_thread(model.gated.entered.wait, 5)  # computing, behind the gate
    queued_reader, queued_writer = await model.connect()
    queued_writer.write(raw_predict(ROW))
    for _ in range(100):
        if app_worker(model).mailbox_full:
            break
        await asyncio.sleep(0.01)
    held_reader, held_writer = await refused_connection(model)
    monkeypatch.setattr(app_worker(model), "room_within", lambda seconds: 0)  # stays full
    model.gated.gate.set()
    try:
        assert await asyncio.wait_for(read_answer(served_reader), 5) == 200
        served_writer.write(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert await asyncio.wait_for(read_answer(served_reader), 0.5) == 200
        assert model.door.holds(held_connection(model)) and len(model.door._holding) == 1
    finally:
        for writer in (served_writer, queued_writer, held_writer):
            writer.close()


def held_connection(model: FullModel) -> Any:
    (connection,) = model.door._holding
    return connection


async def test_a_connection_held_again_before_it_used_its_kept_room_gives_that_room_back(
    full_model: FullModelFactory, app_worker: Callable[[FullModel], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipelined refusal holds a connection while the lane answers the request behind
    it; let go meanwhile, room is kept for it; the lane's answer holds it again. Let go
    once more, the room first kept must not stay counted for good."""
    model = await full_model(fill=False)
    worker, room = app_worker(model), {"rows": 5}
    monkeypatch.setattr(worker, "room_within", lambda seconds: room["rows"])
    monkeypatch.setattr(door, "HOLD_TICK_S", 3600)  # the test lets go by hand
    pipelined, other = await model.connect(), await model.connect()
    await asyncio.sleep(0.05)  # both accepted
    held_twice, waiting = _handlers(model)
    now = asyncio.get_running_loop().time()
    model.door._hold(held_twice, worker, 0.032)  # its first request refused: held
    model.door._let_go(now)  # room: let go, with room kept (the lane still answers)
    room["rows"] = 0
    model.door._hold(waiting, worker, 32.768)  # another connection held
    assert model.door.hold_behind_line(held_twice, worker, 32.768)  # the lane's answer
    room["rows"] = 5
    model.door._let_go(now + 0.01)  # both let go
    model.door._let_go(now + 10)  # every room kept has lapsed
    assert model.door._reservations == {} and model.door._holding == {}
    assert model.door.on_the_way == {}
    for _, writer in (pipelined, other):
        writer.close()


def _handlers(model: FullModel) -> list[door.DoorRequestHandler]:
    """The server's open connections (aiohttp keeps them in no public place)."""
    return [
        handler
        for handler in gc.get_objects()
        if isinstance(handler, door.DoorRequestHandler)
        and handler._door is model.door
        and handler.transport is not None
    ]


async def test_a_held_connection_is_read_again_after_retry_after_even_if_the_model_stays_full(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    reader, writer = await refused_connection(model)
    started = asyncio.get_running_loop().time()
    writer.write(raw_predict(ROW))
    assert await asyncio.wait_for(read_answer(reader), 5) == 503
    assert asyncio.get_running_loop().time() - started >= 0.9  # Retry-After: 1
    assert model.door.refused == 2
    writer.close()
    await model.release()


async def test_a_connection_held_for_a_tight_deadline_does_not_hold_up_a_looser_one(
    full_model: FullModelFactory,
) -> None:
    model = await full_model(retry_after_s=60)  # any answer within the test is not Retry-After
    tight_reader, tight_writer = await refused_connection(model, timeout_ms=10)
    tight_writer.write(raw_predict(ROW, timeout_ms=10))  # held: first in line
    loose_reader, loose_writer = await refused_connection(model)
    loose_writer.write(raw_predict(ROW))  # held behind it
    tight_retry = asyncio.ensure_future(read_answer(tight_reader))
    try:
        await asyncio.sleep(0.1)  # the gated batch teaches the model a batch takes 100 ms
        assert await model.release() == [200, 200]
        assert await asyncio.wait_for(read_answer(loose_reader), 5) == 200
        assert not tight_retry.done()
        # Let go once the model has idled for four of its estimated batch times (~80 ms:
        # the 100 ms gated batch, then the loose one's fast batch): its estimate is
        # measured again, with this request. Let in, it is answered long before the
        # minute of Retry-After: 200, or 504 on a machine too busy to answer within
        # its 10 ms (the deadline is the client's, not the test's).
        assert await asyncio.wait_for(tight_retry, 5) in (200, 504)
    finally:
        tight_writer.close()
        loose_writer.close()


async def test_held_connections_wait_in_few_lines_whatever_timeouts_they_send(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    connections = [await refused_connection(model, timeout_ms=300 + n) for n in range(40)]
    assert len(model.door._held) == 1  # 300..339 ms: the 256 ms line
    for _, writer in connections:
        writer.close()
    await model.release()


async def test_a_held_connection_whose_peer_reads_no_answers_is_let_go_once_they_drain(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    reader, writer = await refused_connection(model)
    (connection,) = model.door._holding
    connection.pause_writing()  # as the transport does past its write buffer's high water
    writer.write(raw_predict(ROW))
    retry = asyncio.ensure_future(read_answer(reader))
    assert await model.release() == [200, 200]
    await asyncio.sleep(0.3)  # room for it, but its answers have not drained
    assert not retry.done()
    connection.resume_writing()
    assert await asyncio.wait_for(retry, 5) == 200
    writer.close()


async def test_connections_held_for_a_deadline_the_model_cannot_meet_keep_no_looser_request_out(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    await asyncio.sleep(0.2)  # the gated batch teaches the model a batch takes 200 ms
    assert await model.release() == [200, 200]
    # Deadlines shorter than one batch: refused, and held.
    tight = [await refused_connection(model, timeout_ms=50) for _ in range(3)]
    served = await model.post("/api/v2/predict", {"features": ROW})  # a 60 s deadline
    assert served.status == 200
    for _, writer in tight:
        writer.close()


async def test_more_pipelined_refusals_than_the_parser_emits_at_once_are_all_answered(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    reader, writer = await model.connect()
    writer.write(raw_predict(ROW) * 40)  # aiohttp's parser emits 32 at a time
    assert await asyncio.wait_for(read_answer(reader), 5) == 503
    assert await model.release() == [200, 200]
    statuses = [await asyncio.wait_for(read_answer(reader), 5) for _ in range(39)]
    assert set(statuses) <= {200, 503} and len(statuses) == 39
    writer.close()


async def test_requests_pipelined_behind_refusals_past_the_parsers_limit_are_answered(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    reader, writer = await model.connect()
    writer.write(raw_predict(ROW) * 5 + b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n" * 35)
    statuses = [await asyncio.wait_for(read_answer(reader), 5) for _ in range(40)]
    assert statuses == [503] * 5 + [200] * 35
    writer.close()
    await model.release()


async def test_a_held_connection_that_closes_leaves_no_room_kept(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    reader, writer = await refused_connection(model)
    writer.close()
    await writer.wait_closed()
    assert await model.release() == [200, 200]
    await asyncio.sleep(0.1)  # a few of the door's ticks
    assert model.door.on_the_way == {}
    served = await model.post("/api/v2/predict", {"features": ROW})
    assert served.status == 200


async def test_pipelined_requests_keep_their_order_the_app_answers_behind_an_earlier_one(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    reader, writer = await model.connect()
    writer.write(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n" + raw_predict(ROW))
    assert await asyncio.wait_for(read_answer(reader), 5) == 200
    assert await asyncio.wait_for(read_answer(reader), 5) == 503
    assert model.door.refused == 0  # the app answered it, after the first
    writer.close()
    await model.release()


async def test_a_body_still_arriving_is_left_to_the_app(full_model: FullModelFactory) -> None:
    model = await full_model()
    reader, writer = await model.connect()
    request = raw_predict(ROW)
    writer.write(request[:-10])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(request[-10:])
    assert await asyncio.wait_for(read_answer(reader), 5) == 503
    assert model.door.refused == 0
    writer.close()
    await model.release()


async def test_a_failing_tick_is_logged_counted_and_the_held_connection_still_let_go(
    full_model: FullModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = await full_model()
    let_go = model.door._let_go
    failures: list[float] = []

    def fail_once(now: float) -> None:
        if not failures:
            failures.append(now)
            raise RuntimeError("bug")
        let_go(now)

    monkeypatch.setattr(model.door, "_let_go", fail_once)
    reader, writer = await refused_connection(model)
    writer.write(raw_predict(ROW))
    assert await model.release() == [200, 200]
    assert await asyncio.wait_for(read_answer(reader), 5) == 200
    crashes = model.door._app[METRICS].background_task_crashes.labels("door-tick")._value.get()
    assert failures and crashes == 1
    writer.close()


async def test_pipelined_refusals_hold_the_connection_once_and_keep_no_room_for_good(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    reader, writer = await model.connect()
    writer.write(raw_predict(ROW) * 3)
    for _ in range(3):
        assert await asyncio.wait_for(read_answer(reader), 5) == 503
    assert model.door.refused == 3
    writer.write(raw_predict(ROW))
    assert await model.release() == [200, 200]
    assert await asyncio.wait_for(read_answer(reader), 5) == 200
    await asyncio.sleep(0.2)  # past the time room is kept for a held connection
    assert model.door.on_the_way == {}
    writer.close()


def teach_way(model: FullModel, worker: Any, seconds: float) -> None:
    """Make the door's estimate of the way to the app about ``seconds``, as a run of
    requests taking that long over the last 0.2 s would."""
    now = time.monotonic()
    for step in range(100, -1, -1):  # a rise every 2.5 ms: each sample may raise it
        model.door.way.took(worker, seconds, now - step * 1.25 * door.WAY_RISES_EVERY_S)


async def test_a_deadline_shorter_than_the_way_to_the_app_and_back_is_refused_at_the_door(
    full_model: FullModelFactory, app_worker: Callable[[FullModel], Any]
) -> None:
    model = await full_model()
    assert await model.release() == [200, 200]
    teach_way(model, app_worker(model), 0.5)  # ~1 s there and back, under 80 ms in ~0.7 s
    tight = await model.post("/api/v2/predict", {"features": ROW}, **{"X-Request-Timeout": "80"})
    assert tight.status == 503  # not let through to expire on the way: a 504 after the work
    assert "deadline" in msgspec.json.decode(await tight.read())["detail"]
    assert model.door.refused == 1
    loose = await model.post("/api/v2/predict", {"features": ROW}, **{"X-Request-Timeout": "5000"})
    assert loose.status == 200


async def test_a_connection_held_for_a_deadline_shorter_than_the_way_there_waits_it_out(
    full_model: FullModelFactory, app_worker: Callable[[FullModel], Any]
) -> None:
    """Room in the model is not enough: the held connection is let go once the way
    there and back fits its deadline again (here the estimate is forgotten; how it
    fades is ``test_the_way_to_the_app_rises_fast_and_fades_in_time``), long before
    ``Retry-After``."""
    model = await full_model(retry_after_s=60)
    reader, writer = await refused_connection(model, timeout_ms=80)  # held, the 64 ms line
    writer.write(raw_predict(ROW, timeout_ms=80))
    retry = asyncio.ensure_future(read_answer(reader))
    teach_way(model, app_worker(model), 50.0)  # fades under 64 ms only after ~2 s
    assert await model.release() == [200, 200]
    await asyncio.sleep(0.3)
    assert not retry.done()  # the model has room, the way does not
    model.door.way = door.WayToTheApp()  # the way is short again
    assert await asyncio.wait_for(retry, 5) == 200  # not the minute of Retry-After
    writer.close()


async def test_the_door_learns_the_way_to_the_app_from_the_requests_it_lets_through(
    full_model: FullModelFactory, app_worker: Callable[[FullModel], Any]
) -> None:
    model = await full_model()
    assert await model.release() == [200, 200]
    model.door.way = door.WayToTheApp()  # forget what the held requests taught it
    assert model.door.way.seconds(app_worker(model), time.monotonic()) == 0.0
    assert (await model.post("/api/v2/predict", {"features": ROW})).status == 200  # the lane
    assert 0 < model.door.way.seconds(app_worker(model), time.monotonic()) < 1


async def test_the_door_learns_the_way_from_requests_the_app_answers_too(
    full_model: FullModelFactory, app_worker: Callable[[FullModel], Any]
) -> None:
    model = await full_model()
    assert await model.release() == [200, 200]
    model.door.way = door.WayToTheApp()
    body = {"inputs": [{"name": "input", "shape": [1, 128], "datatype": "FP32", "data": ROW}]}
    assert (await model.post("/v2/models/demo/infer", body)).status == 200  # not the lane's
    assert 0 < model.door.way.seconds(app_worker(model), time.monotonic()) < 1


async def test_room_kept_for_a_loose_deadline_is_not_spent_on_a_tighter_request(
    full_model: FullModelFactory, app_worker: Callable[[FullModel], Any]
) -> None:
    """A connection let go with room kept for the line it was held in: its next
    request, tighter than the way there and back, is refused like any other."""
    model = await full_model()
    reader, writer = await refused_connection(model, timeout_ms=1000)  # the 512 ms line
    teach_way(model, app_worker(model), 0.05)  # ~100 ms there and back
    assert await model.release() == [200, 200]
    await asyncio.sleep(0.02)  # let go, with room kept for it for 100 ms
    writer.write(raw_predict(ROW, timeout_ms=20))
    assert await asyncio.wait_for(read_answer(reader), 5) == 503
    assert model.door.refused == 2
    assert model.door.on_the_way == {}  # the room kept for it given back
    writer.close()


def test_the_way_to_the_app_rises_fast_and_fades_in_time() -> None:
    way, now = door.WayToTheApp(), 100.0
    worker = cast(InferenceWorker, Worker())
    way.took(worker, 0.010, now)
    assert way.seconds(worker, now) == pytest.approx(2 * 0.002)  # a fifth of the way, and back
    way.took(worker, 0.0, now)  # a short way does not pull it down: time does
    assert way.seconds(worker, now) == pytest.approx(2 * 0.002)
    faded = way.seconds(worker, now + door.WAY_FADES_S)
    assert faded == pytest.approx(2 * 0.002 * math.exp(-1))  # nothing let through meanwhile
    way.took(worker, 0.0, now + door.WAY_FADES_S)
    assert way.seconds(worker, now + 2 * door.WAY_FADES_S) == pytest.approx(faded * math.exp(-1))


def test_the_requests_one_stall_held_up_raise_the_way_once() -> None:
    """They all reach the app in the turn after it: one rise, not one each."""
    way, now = door.WayToTheApp(), 100.0
    worker = cast(InferenceWorker, Worker())
    for _ in range(30):
        way.took(worker, 0.5, now)
    assert way.seconds(worker, now) == pytest.approx(2 * 0.1)
    later = now + 1.5 * door.WAY_RISES_EVERY_S
    way.took(worker, 0.5, later)  # a flood's next long turn
    assert way.seconds(worker, later) > 2 * 0.17


def test_a_retired_model_versions_worker_is_not_kept_alive_by_the_estimate() -> None:
    way, worker = door.WayToTheApp(), Worker()
    way.took(cast(InferenceWorker, worker), 0.01, 100.0)
    retired = weakref.ref(worker)
    del worker
    gc.collect()
    assert retired() is None and len(way._estimates) == 0


class Worker:
    """A stand-in worker for the estimate alone: anything hashable and weakly referable."""


async def test_a_connection_the_app_refused_is_not_read_again_until_retry_after(
    full_model: FullModelFactory,
) -> None:
    """A request the door cannot decide (here: an ``Idempotency-Key``) is refused by
    the app, after its body and the middlewares: its connection is held as well."""
    model = await full_model()
    reader, writer = await model.connect()
    writer.write(raw_predict(ROW, Idempotency_Key="storm-1"))
    assert await asyncio.wait_for(read_answer(reader), 5) == 503
    assert model.door.refused == 0  # the app's refusal, not the door's
    refused = asyncio.get_running_loop().time()
    writer.write(raw_predict(ROW, Idempotency_Key="storm-2"))  # a retry at once
    retry = asyncio.ensure_future(read_answer(reader))
    assert await model.release() == [200, 200]
    await asyncio.sleep(0.3)
    assert not retry.done()  # waits in the socket though the model has room
    assert await asyncio.wait_for(retry, 5) == 200
    assert asyncio.get_running_loop().time() - refused >= 0.9  # Retry-After: 1
    writer.close()


async def test_a_held_connection_is_not_closed_by_a_head_timeout_shorter_than_retry_after(
    full_model: FullModelFactory,
) -> None:
    model = await full_model(keepalive_timeout=0.3)  # as MLGATE_HEAD_TIMEOUT_S
    reader, writer = await refused_connection(model)
    writer.write(raw_predict(ROW))  # its retry, unread while held
    assert await asyncio.wait_for(read_answer(reader), 5) == 503  # after Retry-After: 1 s
    assert await model.release() == [200, 200]
    writer.close()


async def test_a_503_answered_before_the_body_arrived_does_not_hold_its_rest(
    make_settings: Callable[..., Settings], api_keys: KeyMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app refuses before reading the body (the key store down): aiohttp still
    reads the rest of it, within its lingering time, so the connection is not held."""
    app = create_app(make_settings(keys_file=str(api_keys.path), auth_disabled=False))

    async def key_store_down(presented: str) -> Any:
        raise KeyStoreUnavailable("redis down")

    runner = CappedAppRunner(
        app, max_connections=100, access_log=None, keepalive_timeout=0.5, lingering_time=0.5
    )
    await runner.setup()
    monkeypatch.setattr(app[KEY_STORE], "authenticate", key_store_down)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        size = 100 * 1024
        writer.write(
            b"POST /api/v2/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer mlg_unknown\r\n" + f"Content-Length: {size}\r\n\r\n".encode()
        )
        assert await asyncio.wait_for(read_answer(reader), 5) == 503
        writer.write(b" " * size)  # the body, after the answer
        sent = asyncio.get_running_loop().time()
        writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert await asyncio.wait_for(read_answer(reader), 5) == 200
        assert asyncio.get_running_loop().time() - sent < 0.4  # not after Retry-After
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_held_connection_closes_after_its_hold_and_head_timeout_if_never_let_go(
    full_model: FullModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the door's tick fail for good, the head timeout still closes the held
    connection: ``Retry-After`` and the head timeout after it was held."""
    model = await full_model(keepalive_timeout=0.3)

    def broken(self: Door, now: float) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Door, "_let_go", broken)
    reader, writer = await model.connect()
    writer.write(raw_predict(ROW))
    assert await asyncio.wait_for(read_answer(reader), 5) == 503
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after ~1.3 s
    monkeypatch.undo()
    await model.release()
    writer.close()


async def test_a_held_connection_stays_unread_after_pipelined_refusals_are_answered(
    full_model: FullModelFactory,
) -> None:
    """aiohttp resumes reading by itself as it works through pipelined requests:
    not while the door holds the connection."""
    model = await full_model()
    reader, writer = await model.connect()
    writer.write(
        raw_predict(ROW, Idempotency_Key="pipelined-1")
        + raw_predict(ROW, Idempotency_Key="pipelined-2")
    )
    assert [await read_answer(reader) for _ in range(2)] == [503, 503]
    writer.write(raw_predict(ROW, Idempotency_Key="next"))
    retry = asyncio.ensure_future(read_answer(reader))
    await asyncio.sleep(0.3)
    assert not retry.done()
    assert await asyncio.wait_for(retry, 5) in (200, 503)
    await model.release()
    writer.close()


async def test_an_http_1_0_request_is_left_to_the_app_which_answers_in_its_version(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    reader, writer = await model.connect()
    try:
        request = raw_predict(ROW, Connection="keep-alive").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.0 503")
        assert model.door.refused == 0
    finally:
        writer.close()
        await model.release()


async def test_a_json_body_naming_its_model_by_an_escape_is_left_to_the_app_whatever_its_type(
    full_model: FullModelFactory,
) -> None:
    model = await full_model()
    body = b'{"features": [0.5, 0.5, 0.5, 0.5], "\\u006dodel": "nope"}'
    head = (
        "POST /api/v2/predict HTTP/1.1\r\nHost: test\r\n"
        "Content-Type: application/json; profile=msgpack\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    reader, writer = await model.connect()
    try:
        writer.write(head.encode() + body)
        assert await asyncio.wait_for(read_answer(reader), 5) == 404  # the app's: no such model
        assert model.door.refused == 0
    finally:
        writer.close()
        await model.release()


@pytest.mark.parametrize("request_id", ["r-1", 'quote"and\\backslash', "caf\u00e9-\u2615", "x" * 128])
@pytest.mark.parametrize("path", ["/api/v2/predict", "/api/v1/predict", "/v2/models/demo/infer"])
def test_a_refusal_made_from_its_template_is_the_answer_made_in_full(
    request_id: str, path: str
) -> None:
    path_headers = {"/api/v1/predict": {"Deprecation": "true", "Sunset": "Wed, 01 Jul 2026 00:00:00 GMT"}}
    templates = RefusalTemplates(path_headers)
    error = as_api_error(MailboxFull("demo/1 cannot answer before the request's deadline"), 1)
    for _ in range(2):  # made, then from the template
        made = templates.answer(error, path, request_id)
        full = refusal_answer(error, path, request_id, Format.JSON, path_headers)
        assert _without_date(made) == _without_date(full)


def _without_date(answer: bytes) -> bytes:
    return b"\r\n".join(line for line in answer.split(b"\r\n") if not line.startswith(b"Date: "))


SECRET = "mlg_0123456789abcdef_not-to-be-seen-anywhere-0123456789"


@pytest.mark.parametrize(
    "header",
    [
        f"X-API-Key: {SECRET}\x01",  # a bad character: llhttp quotes the line
        f"X-API-Key: {SECRET}{'A' * 9000}",  # too long: aiohttp quotes its start
        f"Authorization: Bearer {SECRET}{'A' * 9000}",
    ],
)
async def test_an_unparsable_request_is_400_without_quoting_its_key_or_body(
    full_model: FullModelFactory, header: str
) -> None:
    """A review: aiohttp's parser message quotes the offending line, and the 400's
    detail and the log line carried it: a plaintext API key, or a body's features."""
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    secret = SECRET
    with capture_logs() as logs:
        writer.write(
            b"POST /api/v2/predict HTTP/1.1\r\nHost: mlgate\r\n"
            + f"{header}\r\n".encode()
            + b"Content-Length: 2\r\n\r\n{}"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0]
    assert b"Malformed HTTP request" in answer
    assert secret.encode() not in answer
    assert not any(secret in repr(entry) for entry in logs)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            "Transfer-Encoding can't be present with Content-Length:\n\n  b'Transfer-Encoding: chunked'",
            "Transfer-Encoding can't be present with Content-Length",
        ),
        ("Missing 'Host' header in request.", "the Host header is missing (HTTP/1.1 requires one)"),
        ("Data after `Connection: close`", "bytes sent after a request with Connection: close"),
        ("Bad chunk 'secret-key-123' here", "Bad chunk"),
        ("Invalid thing: b'Authorization: Bearer k'", "Invalid thing"),
    ],
)
def test_a_parser_refusal_is_explained_whole_and_without_the_request_it_quotes(
    message: str, reason: str
) -> None:
    """A review: "Transfer-Encoding can't ..." was cut at its apostrophe."""
    assert parser_reason(http_exceptions.BadHttpMessage(message), message) == reason


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9", "HTTP/3.0", "HTTP/9.9"])
async def test_a_request_in_an_http_version_other_than_1_is_505_and_the_connection_closes(
    full_model: FullModelFactory, version: str
) -> None:
    """aiohttp took any ``HTTP/d.d`` and answered in it: ``GET /health HTTP/2.0``
    got ``HTTP/2.0 200 OK`` over HTTP/1 framing, which no client can read."""
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    writer.write(f"GET /health {version}\r\nHost: mlgate\r\nX-Request-ID: asked-in-2\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # read() ends: the connection closed
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    assert status_line.startswith("HTTP/1.") and status_line.split(" ")[1] == "505"
    assert "Content-Type: application/problem+json" in header_lines
    assert "X-Request-ID: asked-in-2" in header_lines
    problem = json.loads(body)
    assert problem["type"] == "/problems/http-version-not-supported"
    assert problem["status"] == 505
    assert version in problem["detail"]


@pytest.mark.parametrize("host", ["a b", "a/b", "a@b", '"x"', "[::1"])
async def test_a_host_that_is_no_host_is_400_and_the_connection_closes(
    full_model: FullModelFactory, host: str
) -> None:
    """RFC 9112, 3.2: a server MUST answer 400 to an invalid Host; llhttp takes any (a
    review: ``Host: a b`` was answered 200)."""
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    writer.write(f"GET /health HTTP/1.1\r\nHost: {host}\r\nX-Request-ID: bad-host\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # read() ends: the connection closed
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    assert status_line.startswith("HTTP/1.1 400 ")
    assert "X-Request-ID: bad-host" in header_lines
    problem = json.loads(body)
    assert "Host" in problem["detail"] and problem["instance"] == "/health"


@pytest.mark.parametrize(
    "host", ["mlgate", "127.0.0.1:8080", "[::1]:8080", "", "a-b.example.com", "[fe80::1%eth0]:80", "[fe80::1%25eth0]"]
)
async def test_a_host_name_or_address_is_taken(full_model: FullModelFactory, host: str) -> None:
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    writer.write(f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_requests_pipelined_before_one_of_another_http_version_are_answered_first(
    full_model: FullModelFactory,
) -> None:
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    writer.write(
        b"GET /health HTTP/1.1\r\nHost: mlgate\r\n\r\n"
        b"GET /health HTTP/2.0\r\nHost: mlgate\r\nAccept: application/msgpack\r\n\r\n"
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    first, _, rest = answer.partition(b"HTTP/1.1 505 ")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    head, _, body = rest.partition(b"\r\n\r\n")
    assert b"Content-Type: application/msgpack" in head
    assert msgspec.msgpack.decode(body)["status"] == 505


async def test_a_request_head_past_its_limit_is_431_and_its_connection_closed(
    full_model: FullModelFactory,
) -> None:
    """A review: aiohttp bounds a head's lines, not the whole, so heads of a megabyte
    were taken, and a thousand unfinished ones from a keyless client held 1.6 GB."""
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    writer.write(b"GET /health HTTP/1.1\r\nHost: mlgate\r\n")
    for i in range(door.MAX_HEAD_BYTES // 4000 + 2):  # never finished
        writer.write(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4000))
        await writer.drain()
        await asyncio.sleep(0)
    answer = await asyncio.wait_for(reader.read(), 10)  # read() ends: closed
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b" 431 " in head.split(b"\r\n", 1)[0]
    assert json.loads(body)["status"] == 431


async def test_a_head_within_its_limit_in_many_reads_is_served(full_model: FullModelFactory) -> None:
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    writer.write(b"GET /health HTTP/1.1\r\nHost: mlgate\r\n")
    for i in range(door.MAX_HEAD_BYTES // 4000 - 2):
        writer.write(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4000))
        await writer.drain()
        await asyncio.sleep(0.01)
    writer.write(b"Connection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_a_head_whose_blank_line_comes_with_a_large_body_is_served(
    full_model: FullModelFactory,
) -> None:
    """A review: the limit counted reads, not heads: a small head whose last CRLF came
    in the read carrying 350 KB of body was refused 431."""
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    body = json.dumps({"source": "s", "records": [{"features": [0.5] * 4}] * 12_000}).encode()
    assert len(body) > 4 * door.MAX_HEAD_BYTES
    writer.write(
        b"POST /api/v2/ingest HTTP/1.1\r\nHost: mlgate\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n" % len(body)
    )
    await writer.drain()
    await asyncio.sleep(0.05)  # the head's own read, without its blank line
    writer.write(b"\r\n" + body)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert b" 431 " not in answer.split(b"\r\n", 1)[0], answer[:200]


async def test_heads_trickled_on_one_connection_never_add_up_to_the_limit(
    full_model: FullModelFactory,
) -> None:
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    head = b"GET /health HTTP/1.1\r\nHost: mlgate\r\nX-Pad: " + b"p" * 900 + b"\r\n\r\n"
    for _ in range(2 * door.MAX_HEAD_BYTES // len(head)):
        writer.write(head[:-1])
        await writer.drain()
        await asyncio.sleep(0.005)
        writer.write(head[-1:])
        assert await asyncio.wait_for(read_answer(reader), 5) == 200
    writer.close()


async def test_a_whole_head_past_the_limit_in_one_read_is_431(full_model: FullModelFactory) -> None:
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    pads = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4000) for i in range(door.MAX_HEAD_BYTES // 4000 + 2))
    writer.write(b"GET /health HTTP/1.1\r\nHost: mlgate\r\nX-Request-ID: whole-1\r\n" + pads + b"\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head = answer.partition(b"\r\n\r\n")[0]
    assert b" 431 " in head.split(b"\r\n", 1)[0]
    assert b"X-Request-ID: whole-1" in head


async def test_a_body_read_with_its_head_does_not_count_against_the_next_head(
    full_model: FullModelFactory,
) -> None:
    """A body that came whole with its head, then the next request's head in pieces:
    the body is no part of that head."""
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    body = json.dumps({"source": "s", "records": [{"features": [0.5] * 128}] * 60}).encode()
    assert len(body) > door.MAX_HEAD_BYTES
    writer.write(
        b"POST /api/v2/ingest HTTP/1.1\r\nHost: mlgate\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    assert await asyncio.wait_for(read_answer(reader), 10) == 202
    for piece in (b"GET /health HTTP/1.1\r\n", b"Host: mlgate\r\n", b"\r\n"):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.01)
    assert await asyncio.wait_for(read_answer(reader), 10) == 200
    writer.close()


async def test_an_unparsable_request_is_counted_in_the_requests_answered(
    full_model: FullModelFactory,
) -> None:
    """A review: answered 400 or 505 and logged, never counted: a client behind a
    broken proxy showed on no dashboard."""
    model = await full_model(fill=False)
    registry = model.door._app[METRICS].registry
    sample = {"route": "unmatched", "method": "UNKNOWN", "status": "400"}
    before = registry.get_sample_value("mlgate_http_requests_total", sample) or 0
    reader, writer = await model.connect()
    writer.write(b"GARBAGE\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert b" 400 " in answer.split(b"\r\n", 1)[0]
    assert registry.get_sample_value("mlgate_http_requests_total", sample) == before + 1


@pytest.mark.parametrize("codings", ["gzip, chunked", "identity, chunked", "deflate,chunked"])
async def test_a_chunked_body_in_another_transfer_coding_too_is_501_and_the_connection_closes(
    full_model: FullModelFactory, codings: str
) -> None:
    """RFC 9112, 6.1: a transfer coding the server does not understand is a 501. llhttp
    framed ``gzip, chunked`` by its ``chunked`` and dropped the ``gzip``, so the body
    reached the route still compressed."""
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    body = b'{"features": [0.5, 0.5]}'
    writer.write(
        b"POST /api/v2/predict HTTP/1.1\r\nHost: mlgate\r\nX-Request-ID: coded\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: " + codings.encode() + b"\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # read() ends: the connection closed
    writer.close()
    head, _, problem_body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    assert status_line.startswith("HTTP/1.1 501 ")
    assert "X-Request-ID: coded" in header_lines
    problem = json.loads(problem_body)
    assert problem["status"] == 501 and problem["instance"] == "/api/v2/predict"
    assert repr(codings.split(",")[0].strip()) in problem["detail"]


async def test_an_http_1_0_request_naming_keep_alive_and_close_is_answered_then_closed(
    full_model: FullModelFactory,
) -> None:
    """RFC 9112, 9.3: ``close`` ends the connection after the answer; llhttp kept an
    HTTP/1.0 connection that named ``keep-alive`` as well."""
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    writer.write(b"GET /health HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # read() ends: the connection closed
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200"
    assert b"keep-alive" not in head.lower()
    assert json.loads(body) == {"status": "ok"}


@pytest.mark.parametrize(
    "line", [b"GET /" + b"a" * 9000, b"\r\nGET /" + b"a" * 9000, b"GET http://mlgate/" + b"a" * 9000]
)
async def test_a_request_line_past_the_line_limit_is_414_and_its_instance_is_cut(
    full_model: FullModelFactory, line: bytes
) -> None:
    """aiohttp answered a 9 KB URI with a 400 whose ``instance`` repeated all of it
    (then, a review: so did one after an empty line, or in absolute form)."""
    model = await full_model(fill=False)
    reader, writer = await model.connect()
    writer.write(line + b" HTTP/1.1\r\nHost: mlgate\r\nX-Request-ID: long-uri\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # read() ends: the connection closed
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    assert status_line.startswith("HTTP/1.1 414 ")
    if line.startswith(b"GET /"):  # the others' heads are not read back (their own ids)
        assert "X-Request-ID: long-uri" in header_lines
    problem = json.loads(body)
    assert problem["status"] == 414
    assert len(problem["instance"]) <= MAX_INSTANCE_CHARS + 3
