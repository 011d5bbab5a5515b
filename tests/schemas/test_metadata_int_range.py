"""A metadata integer is a signed 64-bit integer, in every format and value format: one
beyond it rejects its record (with its index), as any bad field does, rather than
failing the msgpack value encoder and the whole batch with a 500."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import msgspec
import pytest

from mlgate.config import Settings
from tests.conftest import AppClientFactory

OPEN: dict[str, Any] = {"auth_disabled": True, "rate_limits_enabled": False}
FEATURES = [1.0, 2.0, 3.0, 4.0]
# JSON carries any integer; msgpack at most an unsigned 64-bit one.
BEYOND = {"json": [2**70, 2**63, -(2**63) - 1], "msgpack": [2**63, 2**64 - 1]}
WITHIN = [2**63 - 1, -(2**63)]


def _encode(fmt: str, value: object) -> bytes:
    return msgspec.json.encode(value) if fmt == "json" else msgpack.packb(value)


async def _post(client: Any, route: str, fmt: str, records: list[dict[str, Any]]) -> Any:
    if route == "batch":
        body = _encode(fmt, {"source": "s", "records": records})
        content_type = f"application/{fmt}"
        path = "/api/v2/ingest"
    else:
        body = (b"\n" if fmt == "json" else b"").join(_encode(fmt, r) for r in records)
        content_type = "application/x-ndjson" if fmt == "json" else "application/msgpack"
        path = "/api/v2/ingest/stream?source=s"
    return await client.post(path, data=body, headers={"Content-Type": content_type})


@pytest.mark.parametrize("value_format", ["json", "msgpack"])
@pytest.mark.parametrize("route", ["batch", "stream"])
@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_a_metadata_integer_beyond_64_bits_rejects_its_record(
    app_client: AppClientFactory,
    make_settings: Callable[..., Settings],
    value_format: str,
    route: str,
    fmt: str,
) -> None:
    client = await app_client(make_settings(feature_dims=(4,), value_format=value_format, **OPEN))
    beyond = BEYOND[fmt]
    records = [{"record_id": f"in-{i}", "features": FEATURES, "metadata": {"n": v}} for i, v in enumerate(WITHIN)]
    records += [{"record_id": f"out-{i}", "features": FEATURES, "metadata": {"n": v}} for i, v in enumerate(beyond)]
    response = await _post(client, route, fmt, records)
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert answer["records_accepted"] == len(WITHIN)
    assert [e["index"] for e in answer["errors"]] == list(range(len(WITHIN), len(records)))
    assert all("metadata" in e["error"] for e in answer["errors"])
    assert [e["record_id"] for e in answer["errors"]] == [f"out-{i}" for i in range(len(beyond))]


@pytest.mark.parametrize("value_format", ["json", "msgpack"])
async def test_a_packed_msgpack_batch_rejects_a_metadata_integer_beyond_64_bits(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], value_format: str
) -> None:
    """A batch large enough for the packed path (its features read as one matrix)."""
    client = await app_client(make_settings(feature_dims=(4,), value_format=value_format, **OPEN))
    records: list[dict[str, Any]] = [{"features": FEATURES, "metadata": {"n": 1}} for _ in range(600)]
    records[7] = {"features": FEATURES, "metadata": {"n": 2**63}}
    response = await _post(client, "batch", "msgpack", records)
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert answer["records_accepted"] == 599 and [e["index"] for e in answer["errors"]] == [7]
