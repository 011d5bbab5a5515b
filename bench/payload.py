"""The benchmark's records: ingest bodies, and the Kafka records mlgate makes of them.

Bodies are encoded once up front as templates; ``RequestBodies.body(n)`` stamps the
request number into every record id of a copy, so each request carries record ids
of its own (mlgate drops a record_id it has seen as a duplicate) without re-encoding.
The raw producer turns the same bodies into Kafka records with mlgate's own
``RecordValidator``, so it writes what the service writes: same keys, stored-record
values and headers.

Two shapes of record (``Shape``):

- ``bare``: ``record_id`` and float32 ``features`` only (what the first ingest
  benchmark sent);
- ``realistic``: what internal producers post (/work/shared/bench/workload.md): a
  ``record_id``, a ``timestamp`` (RFC 3339, milliseconds, ``Z``), 128 float32
  ``features``, a ``label`` (a float, or null one record in five) and ``metadata``
  with four items such as ``{"device": "sensor-17", "region": "eu-west-1", "fw": 3,
  "calibrated": true}``. In msgpack the features go as float64 (what a client gets by
  packing Python floats) unless ``single_float``; in JSON as the shortest repr of each
  float32 value.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Literal

import msgpack
import msgspec
import numpy as np

from mlgate.config import load_settings
from mlgate.service.http.codec import Format
from mlgate.service.ingest.validation import RecordValidator
from mlgate.workers.sinks.records import OutboundRecord

SOURCE = "bench"
_STAMP = b"X" * 10  # where the request number goes in each record id
REGIONS = ("eu-west-1", "eu-central-1", "us-east-1", "ap-southeast-2")
Shape = Literal["bare", "realistic"]
BodyFormat = Literal["msgpack", "json"]
_EPOCH = datetime(2026, 11, 1, tzinfo=UTC)


def realistic_record(
    record_id: str, features: object, rng: np.random.Generator, index: int
) -> dict[str, object]:
    """One record as workload.md describes it; ``features`` as the caller encodes them."""
    moment = _EPOCH + timedelta(milliseconds=int(rng.integers(0, 30 * 86_400_000)))
    return {
        "record_id": record_id,
        "timestamp": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
        "features": features,
        "label": None
        if index % 5 == 4
        else float(rng.integers(0, 2))
        if index % 2
        else round(float(rng.random()), 3),
        "metadata": {
            "device": f"sensor-{int(rng.integers(0, 500))}",
            "region": REGIONS[int(rng.integers(0, len(REGIONS)))],
            "fw": int(rng.integers(1, 6)),
            "calibrated": bool(rng.random() < 0.9),
        },
    }


def shortest_float32_json(row: np.ndarray) -> msgspec.Raw:
    """A JSON array of float32 values, each as its shortest round-tripping repr."""
    return msgspec.Raw(("[" + ",".join(map(str, row)) + "]").encode())


def encode_body(
    rows: np.ndarray,
    ids: list[str],
    *,
    shape: Shape,
    body_format: BodyFormat,
    single_float: bool,
    rng: np.random.Generator,
) -> bytes:
    """One ingest request body holding ``rows`` (float32) under ``ids``."""
    if body_format == "json":
        features: list[object] = [shortest_float32_json(row) for row in rows]
    else:
        features = rows.tolist()  # Python floats: exactly the float32 values
    if shape == "realistic":
        records = [
            realistic_record(i, f, rng, n)
            for n, (i, f) in enumerate(zip(ids, features, strict=True))
        ]
    else:
        records = [{"record_id": i, "features": f} for i, f in zip(ids, features, strict=True)]
    body = {"source": SOURCE, "records": records}
    if body_format == "json":
        return msgspec.json.encode(body)
    return msgpack.packb(body, use_single_float=single_float)


class RequestBodies:
    """``batches`` templates of ``records`` records of ``dims`` float32 features each.

    ``bare`` bodies (the default) pack features as msgpack float32, as a client holding
    float32 arrays sends them. Record ids read ``<request number, 10 digits>-<index, 5
    digits>``.
    """

    def __init__(
        self,
        batches: int,
        records: int,
        dims: int,
        seed: int = 0,
        *,
        shape: Shape = "bare",
        body_format: BodyFormat = "msgpack",
        single_float: bool | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        single = shape == "bare" if single_float is None else single_float
        self.body_format = body_format
        self._templates: list[tuple[bytes, list[int]]] = []
        for _ in range(batches):
            rows = rng.standard_normal((records, dims), dtype=np.float32)
            ids = [_STAMP + b"-%05d" % i for i in range(records)]
            body = encode_body(
                rows,
                [record_id.decode() for record_id in ids],
                shape=shape,
                body_format=body_format,
                single_float=single,
                rng=rng,
            )
            offsets, start = [], 0
            for record_id in ids:
                start = body.index(record_id, start)
                offsets.append(start)
                start += len(record_id)
            self._templates.append((body, offsets))

    def __len__(self) -> int:
        return len(self._templates)

    @property
    def body_bytes(self) -> int:
        return len(self._templates[0][0])

    @property
    def content_type(self) -> str:
        return f"application/{self.body_format}"

    def body(self, number: int) -> bytearray:
        """The body of request ``number``: a template with ``number`` in its record ids."""
        template, offsets = self._templates[number % len(self._templates)]
        body = bytearray(template)
        stamp = b"%010d" % number
        for offset in offsets:
            body[offset : offset + 10] = stamp
        return body


def outbound_batches(
    bodies: RequestBodies, dims: int, value_format: str
) -> list[list[OutboundRecord]]:
    """The Kafka records mlgate writes for each template (one tracking id per body)."""
    settings = load_settings({}, feature_dims=(dims,), value_format=value_format)
    validator = RecordValidator(settings)
    fmt = Format.JSON if bodies.body_format == "json" else Format.MSGPACK
    batches = []
    for number in range(len(bodies)):
        source, items = validator.decode_batch(bytes(bodies.body(number)), fmt)
        validated = validator.validate(source, items)
        if validated.errors:
            raise ValueError(f"benchmark records rejected: {validated.errors[:3]}")
        batches.append(validator.outbound(validated, uuid.uuid4().hex))
    return batches
