"""Produce requests in one join: the same bytes as aiokafka's own encoding, for every
version it speaks; only produce requests are made lean. (The Kafka writer's tests
send them to a real broker and read the records back.)"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.protocol.produce import ProduceRequest

from mlgate.workers.sinks.produce_request import LeanProduceRequest, lean_produce_requests

TOPICS: list[tuple[str, list[tuple[int, Any]]]] = [
    ("events", [(0, bytearray(b"\x01" * 70_000)), (3, b"batch-three"), (5, None)]),
    ("äudit", [(1, memoryview(b"\x00" * 17))]),
]


def _encoded(request: ProduceRequest, version: int) -> bytes:
    struct = request.prepare({ProduceRequest.API_KEY: (version, version)})
    assert struct.API_VERSION == version
    header = struct.build_request_header(correlation_id=7, client_id="mlgate").encode()
    return header + struct.encode()


VERSIONS = [cls.API_VERSION for cls in ProduceRequest._CLASSES]
# Transactional ids start at v3.
CASES = [(v, None) for v in VERSIONS] + [(v, "txn-1") for v in VERSIONS if v >= 3]


@pytest.mark.parametrize(("version", "transactional_id"), CASES)
def test_a_lean_produce_request_encodes_to_aiokafkas_bytes(
    version: int, transactional_id: str | None
) -> None:
    stock = ProduceRequest(transactional_id, -1, 30_000, TOPICS)
    lean = LeanProduceRequest(transactional_id, -1, 30_000, TOPICS)
    assert _encoded(lean, version) == _encoded(stock, version)
    assert type(lean.prepare({0: (version, version)})).RESPONSE_TYPE is type(
        stock.prepare({0: (version, version)})
    ).RESPONSE_TYPE


async def test_a_clients_produce_requests_are_sent_lean_and_others_as_they_were() -> None:
    sent: list[Any] = []

    async def send(node_id: int, request: Any, **kwargs: Any) -> str:
        sent.append((node_id, request, kwargs))
        return "answer"

    client = SimpleNamespace(send=send)
    lean_produce_requests(client)
    produce = ProduceRequest(None, -1, 30_000, TOPICS)
    metadata = MetadataRequest(["events"])
    assert await client.send(1, produce) == "answer"
    assert await client.send(2, metadata, group=3) == "answer"
    assert [(node, type(request), kwargs) for node, request, kwargs in sent] == [
        (1, LeanProduceRequest, {}),
        (2, MetadataRequest, {"group": 3}),
    ]
    assert sent[0][1].required_acks == -1


async def test_a_client_made_lean_twice_wraps_its_send_once() -> None:
    calls: list[Any] = []

    async def send(node_id: int, request: Any, **kwargs: Any) -> None:
        calls.append(request)

    client = SimpleNamespace(send=send)
    lean_produce_requests(client)
    wrapped = client.send
    lean_produce_requests(client)
    assert client.send is wrapped
