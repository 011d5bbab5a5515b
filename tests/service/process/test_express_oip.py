"""The express lane serves Open Inference Protocol infers (JSON, msgpack and binary
tensors) as the app answers them: the same status, headers, body and errors, on the
server ``mlgate serve`` runs, over real sockets, with the real demo model."""
# ruff: noqa: F811

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np
import pytest

from mlgate.service.process import express
from tests.service.process import test_express
from tests.service.process.test_express import (
    ROW,
    Served,
    ServeFactory,
    header_names,
    in_the_lane,
)

# The lane's server fixture, under the name the tests ask for it by (hence F811 below).
served = test_express.served

HEADER_LENGTH = "Inference-Header-Content-Length"
INFER = "/v2/models/demo/infer"


def json_infer(**parameters: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "id": "req-1",
        "inputs": [{"name": "input", "shape": [1, 128], "datatype": "FP32", "data": ROW}],
    }
    if parameters:
        request["parameters"] = parameters
    return request


def binary_infer(binary_outputs: bool = True, rows: int = 1) -> tuple[bytes, dict[str, str]]:
    """Binary input tensors, and binary outputs if asked: what tritonclient sends."""
    tensor = {"binary_data_size": rows * 128 * 4}
    request: dict[str, Any] = {
        "inputs": [{"name": "input", "shape": [rows, 128], "datatype": "FP32", "parameters": tensor}]
    }
    if binary_outputs:
        request["parameters"] = {"binary_data_output": True}
    header = msgspec.json.encode(request)
    body = header + np.asarray(ROW * rows, dtype="<f4").tobytes()
    return body, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


async def lane_and_app(served: ServeFactory, tmp_path: Path) -> tuple[Served, Served]:
    """A server with the lane, and one without (its own data directory)."""
    return await served(), await served(express_lane=False, data_dir=str(tmp_path / "app"))


async def both(
    servers: tuple[Served, Served], path: str, body: bytes, **headers: str
) -> tuple[aiohttp.ClientResponse, aiohttp.ClientResponse]:
    lane, app = servers
    by_lane = await lane.post_bytes(path, body, **headers)
    by_app = await app.post_bytes(path, body, **headers)
    return by_lane, by_app


async def test_a_json_infer_is_answered_in_the_lane_as_the_app_answers_it(
    served: ServeFactory, tmp_path: Path
) -> None:
    servers = await lane_and_app(served, tmp_path)
    body = msgspec.json.encode(json_infer())
    by_lane, by_app = await both(servers, INFER, body, **{"Content-Type": "application/json"})
    assert servers[0].taken == 1
    assert by_lane.status == by_app.status == 200
    assert header_names(by_lane) == header_names(by_app)
    assert await by_lane.read() == await by_app.read()


async def test_binary_tensors_in_and_out_are_answered_in_the_lane_byte_for_byte(
    served: ServeFactory, tmp_path: Path
) -> None:
    servers = await lane_and_app(served, tmp_path)
    body, headers = binary_infer()
    by_lane, by_app = await both(servers, INFER, body, **headers)
    assert servers[0].taken == 1
    assert by_lane.status == by_app.status == 200
    assert by_lane.headers["Content-Type"] == "application/octet-stream"
    assert by_lane.headers[HEADER_LENGTH] == by_app.headers[HEADER_LENGTH]
    assert sorted(header_names(by_lane)) == sorted(header_names(by_app))  # in another order
    assert await by_lane.read() == await by_app.read()


async def test_a_versioned_infer_answered_msgpack_takes_the_lane(
    served: ServeFactory, tmp_path: Path
) -> None:
    servers = await lane_and_app(served, tmp_path)
    body = msgspec.msgpack.encode(json_infer())
    headers = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
    by_lane, by_app = await both(servers, "/v2/models/demo/versions/1/infer", body, **headers)
    assert servers[0].taken == 1
    assert by_lane.status == 200 and by_lane.headers["Content-Type"] == "application/msgpack"
    assert await by_lane.read() == await by_app.read()


async def test_an_input_the_model_does_not_take_is_the_apps_error_document_from_the_lane(
    served: ServeFactory, tmp_path: Path
) -> None:
    servers = await lane_and_app(served, tmp_path)
    request = json_infer()
    request["inputs"][0]["name"] = "pixels"
    body = msgspec.json.encode(request)
    by_lane, by_app = await both(servers, INFER, body, **{"Content-Type": "application/json"})
    assert servers[0].taken == 1
    assert by_lane.status == by_app.status == 422
    lane_error = msgspec.json.decode(await by_lane.read())
    app_error = msgspec.json.decode(await by_app.read())
    assert lane_error["error"] == app_error["error"]
    assert lane_error["instance"] == app_error["instance"] == INFER
    assert sorted(header_names(by_lane)) == sorted(header_names(by_app))  # in another order


async def test_a_deadline_in_the_requests_parameters_holds_in_the_lane(
    served: ServeFactory, tmp_path: Path
) -> None:
    servers = await lane_and_app(served, tmp_path)
    body = msgspec.json.encode(json_infer(timeout=1))  # 1 µs: expired before the model
    by_lane, by_app = await both(servers, INFER, body, **{"Content-Type": "application/json"})
    assert servers[0].taken == 1
    assert by_lane.status == by_app.status == 504


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b'{"inputs": [', {"Content-Type": "application/json"}, 400),
        (b'{"inputs": "many"}', {"Content-Type": "application/json"}, 422),
        (binary_infer()[0], {HEADER_LENGTH: "99999999"}, 400),
    ],
    ids=["truncated", "wrong-type", "header-length-past-the-body"],
)
async def test_an_infer_body_that_does_not_decode_gets_the_apps_error_from_the_lane(
    served: ServeFactory, tmp_path: Path, body: bytes, headers: dict[str, str], status: int
) -> None:
    servers = await lane_and_app(served, tmp_path)
    by_lane, by_app = await both(servers, INFER, body, **headers)
    assert servers[0].taken == 1
    assert by_lane.status == by_app.status == status
    assert _but_the_request_id(await by_lane.read()) == _but_the_request_id(await by_app.read())


def _but_the_request_id(error: bytes) -> dict[str, Any]:
    document: dict[str, Any] = msgspec.json.decode(error)
    document.pop("request_id")
    return document


async def test_an_infer_over_the_rate_limit_is_refused_before_its_body_is_decoded(
    served: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await served(rate_limit_key_rate=0.1, rate_limit_key_burst=1)
    decoded: list[int] = []
    decode = express.decode_infer_body

    def counted(*args: Any) -> Any:
        decoded.append(1)
        return decode(*args)

    monkeypatch.setattr(express, "decode_infer_body", counted)
    body = msgspec.json.encode(json_infer())
    statuses = [
        (await server.post_bytes(INFER, body, **{"Content-Type": "application/json"})).status
        for _ in range(3)
    ]
    assert statuses == [200, 429, 429]
    assert server.taken == 3 and len(decoded) == 1


async def test_an_infers_body_text_does_not_count_against_the_mailbox_bytes(
    served: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model's byte bound counts an infer's tensors (512 bytes here), not its JSON
    text (~2.5 KB): the door does not refuse what the model would take (the tenant's
    share of the bound, 2,100 bytes, holds both rows; their text would not fit in it)."""
    server = await served(inference_mailbox_bytes=2_800)
    gated, reader, writer = await in_the_lane(server, monkeypatch, "held")
    try:
        assert server.worker._held_bytes == 1_536  # its float32 row, and the float64 row read
        infer = asyncio.ensure_future(
            server.post_bytes(
                INFER, msgspec.json.encode(json_infer()), **{"Content-Type": "application/json"}
            )
        )
        for _ in range(500):  # until the infer waits in the mailbox behind the held one
            if server.worker._held_bytes > 1_536 or infer.done():
                break
            await asyncio.sleep(0.01)
        assert server.worker._held_bytes == 1_536 + 512
    finally:
        gated.gate.set()
        writer.close()
        await writer.wait_closed()
    answer = await asyncio.wait_for(infer, 5)
    assert answer.status == 200
    assert server.door.refused == 0


async def test_a_deadline_in_an_infers_parameters_counts_at_the_door_too(
    served: ServeFactory,
) -> None:
    """tritonclient's ``infer(timeout=...)`` sends ``parameters.timeout`` (µs), not
    ``X-Request-Timeout``: the door must not refuse by the default deadline what that
    looser one lets the model answer."""
    server = await served()
    headers = {"Content-Type": "application/json"}
    assert (await server.post_bytes(INFER, msgspec.json.encode(json_infer()), **headers)).status == 200
    server.worker._run_time_s = 2.0  # the model now looks a 2 s batch away: past the 1 s default
    loose = await server.post_bytes(INFER, msgspec.json.encode(json_infer(timeout=5_000_000)), **headers)
    assert loose.status == 200
    assert server.door.refused == 0
    default = await server.post_bytes(INFER, msgspec.json.encode(json_infer()), **headers)
    assert default.status == 503 and server.door.refused == 1


async def test_an_infer_for_an_unknown_model_is_left_to_the_apps_404(served: ServeFactory) -> None:
    server = await served()
    response = await server.post_bytes(
        "/v2/models/nope/infer", msgspec.json.encode(json_infer()), **{"Content-Type": "application/json"}
    )
    assert response.status == 404
    assert server.taken == 0


async def test_lane_infers_are_counted_under_their_route(served: ServeFactory) -> None:
    server = await served()
    body, headers = binary_infer()
    assert (await server.post_bytes(INFER, body, **headers)).status == 200
    metrics = await (await server.session.get(f"{server.url}/metrics")).text()
    assert 'route="/v2/models/{model}/infer"' in metrics
    assert server.taken == 1


async def test_a_workers_504_carries_the_ratelimit_fields_in_the_lane_and_through_the_app(
    served: ServeFactory,
) -> None:
    server = await served(rate_limits_enabled=True)
    body = msgspec.json.encode(json_infer(timeout=1))  # 1 µs: passed before the model is asked
    in_lane = await server.post_bytes(INFER, body, **{"Content-Type": "application/json"})
    by_app = await server.post_bytes(
        INFER, body, **{"Content-Type": "application/json", "Idempotency-Key": "k-504"}
    )
    assert server.taken == 1
    assert in_lane.status == by_app.status == 504
    for answer in (in_lane, by_app):
        assert answer.headers["RateLimit-Policy"].startswith('"key";')
        assert answer.headers["RateLimit"].startswith('"key";')
        assert answer.headers["Retry-After"] == "1"


async def test_a_boolean_timeout_parameter_is_no_deadline(served: ServeFactory) -> None:
    server = await served()
    infer = json_infer(timeout=True)
    response = await server.post_bytes(
        INFER, msgspec.json.encode(infer), **{"Content-Type": "application/json"}
    )
    assert response.status == 200  # not a 1 µs deadline: True is not a number of µs


@pytest.mark.parametrize(
    ("accept_encoding", "coding"),
    [
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("gzip;q=0.5, deflate", "deflate"),
        ("x-gzip", "gzip"),
        ("*", "gzip"),
        ("gzip;q=0", None),
        ("br", None),
    ],
)
async def test_an_infer_answer_is_compressed_as_accept_encoding_asks_in_the_lane_as_by_the_app(
    served: ServeFactory, tmp_path: Path, accept_encoding: str, coding: str | None
) -> None:
    """A review: tritonclient's ``response_compression_algorithm`` asks for a gzip or
    deflate answer, which Triton sends; every answer came uncompressed."""
    servers = await lane_and_app(served, tmp_path)
    rows = [{"name": "input", "shape": [32, 128], "datatype": "FP32", "data": ROW * 32}]
    body = msgspec.json.encode({"inputs": rows})  # an answer of 64 numbers: over 1 KB
    headers = {"Content-Type": "application/json", "Accept-Encoding": accept_encoding}
    by_lane, by_app = await both(servers, INFER, body, **headers)
    assert servers[0].taken == 1
    assert by_lane.status == by_app.status == 200
    assert by_lane.headers.get("Content-Encoding") == by_app.headers.get("Content-Encoding") == coding
    # A review: no Vary, so a shared cache could give a gzip answer to any client.
    vary = "Accept-Encoding" if coding else None
    assert by_lane.headers.get("Vary") == by_app.headers.get("Vary") == vary
    assert await by_lane.read() == await by_app.read()  # as the client decompresses it
    assert msgspec.json.decode(await by_lane.read())["outputs"][0]["name"] == "probabilities"


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_a_binary_infer_answer_is_compressed_whole_its_header_length_uncompressed(
    served: ServeFactory, tmp_path: Path, coding: str
) -> None:
    servers = await lane_and_app(served, tmp_path)
    body, headers = binary_infer(rows=200)  # an answer of 1.6 KB of outputs
    by_lane, by_app = await both(servers, INFER, body, **headers, **{"Accept-Encoding": coding})
    assert servers[0].taken == 1
    for answer in (by_lane, by_app):
        assert answer.status == 200 and answer.headers["Content-Encoding"] == coding
        plain = await answer.read()
        header = msgspec.json.decode(plain[: int(answer.headers[HEADER_LENGTH])])
        assert header["outputs"][0]["parameters"]["binary_data_size"] == len(plain) - int(
            answer.headers[HEADER_LENGTH]
        )
    assert await by_lane.read() == await by_app.read()


@pytest.mark.parametrize("retry_takes", ["gzip", "identity"])
async def test_a_compressed_infer_answer_is_replayed_readable_whatever_the_retry_accepts(
    served: ServeFactory, retry_takes: str
) -> None:
    """A review: the answer was kept compressed and replayed without its
    Content-Encoding: gzip bytes a client could not read."""
    server = await served()
    rows = [{"name": "input", "shape": [32, 128], "datatype": "FP32", "data": ROW * 32}]
    body = msgspec.json.encode({"inputs": rows})
    first = await server.post_bytes(
        INFER, body, **{"Content-Type": "application/json", "Accept-Encoding": "gzip", "Idempotency-Key": "z-1"}
    )
    assert first.status == 200 and first.headers["Content-Encoding"] == "gzip"
    again = await server.post_bytes(
        INFER, body,
        **{"Content-Type": "application/json", "Accept-Encoding": retry_takes, "Idempotency-Key": "z-1"},
    )
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert "Content-Encoding" not in again.headers
    assert msgspec.json.decode(await again.read()) == msgspec.json.decode(await first.read())


async def test_a_version_written_with_leading_zeros_is_served_in_the_lane_as_by_the_app(
    served: ServeFactory, tmp_path: Path
) -> None:
    servers = await lane_and_app(served, tmp_path)
    body = msgspec.json.encode(json_infer())
    by_lane, by_app = await both(
        servers, "/v2/models/demo/versions/01/infer", body, **{"Content-Type": "application/json"}
    )
    assert by_lane.status == by_app.status == 200
    assert await by_lane.read() == await by_app.read()
