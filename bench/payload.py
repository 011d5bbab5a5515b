"""The benchmark's records: msgpack ingest bodies, and the Kafka records mlgate makes of them.

Bodies are encoded once up front as templates; ``RequestBodies.body(n)`` stamps the
request number into every record id of a copy, so each request carries record ids
of its own (mlgate drops a record_id it has seen as a duplicate) without re-encoding.
The raw producer turns the same bodies into Kafka records with mlgate's own
``RecordValidator``, so it writes what the service writes: same keys, stored-record
values and headers.
"""

from __future__ import annotations

import uuid

import msgpack
import numpy as np

from mlgate.config import load_settings
from mlgate.service.http.codec import Format
from mlgate.service.ingest.validation import RecordValidator
from mlgate.workers.sinks.records import OutboundRecord

SOURCE = "bench"
_STAMP = b"X" * 10  # where the request number goes in each record id


class RequestBodies:
    """``batches`` templates of ``records`` records of ``dims`` float32 features each.

    Features go on the wire as msgpack float32, as a client holding float32 arrays
    sends them. Record ids read ``<request number, 10 digits>-<index, 5 digits>``.
    """

    def __init__(self, batches: int, records: int, dims: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self._templates: list[tuple[bytes, list[int]]] = []
        for _ in range(batches):
            features = rng.standard_normal((records, dims), dtype=np.float32).tolist()
            ids = [_STAMP + b"-%05d" % i for i in range(records)]
            body = msgpack.packb(
                {
                    "source": SOURCE,
                    "records": [
                        {"record_id": record_id.decode(), "features": values}
                        for record_id, values in zip(ids, features, strict=True)
                    ],
                },
                use_single_float=True,
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

    def body(self, number: int) -> bytearray:
        """The body of request ``number``: a template with ``number`` in its record ids."""
        template, offsets = self._templates[number % len(self._templates)]
        body = bytearray(template)
        stamp = b"%010d" % number
        for offset in offsets:
            body[offset : offset + 10] = stamp
        return body


def outbound_batches(bodies: RequestBodies, dims: int, value_format: str) -> list[list[OutboundRecord]]:
    """The Kafka records mlgate writes for each template (one tracking id per body)."""
    settings = load_settings({}, feature_dims=(dims,), value_format=value_format)
    validator = RecordValidator(settings)
    batches = []
    for number in range(len(bodies)):
        source, items = validator.decode_batch(bytes(bodies.body(number)), Format.MSGPACK)
        validated = validator.validate(source, items)
        if validated.errors:
            raise ValueError(f"benchmark records rejected: {validated.errors[:3]}")
        batches.append(validator.outbound(validated, uuid.uuid4().hex))
    return batches
