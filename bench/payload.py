"""The benchmark's records: msgpack ingest bodies, and the Kafka records mlgate makes of them.

Both the HTTP load generator and the raw producer build the same pool of batches from
one seed. The raw producer turns them into Kafka records with mlgate's own
``RecordValidator``, so it writes what the service writes: same key, same stored-record
value, same headers.
"""

from __future__ import annotations

import uuid

import msgpack
import numpy as np

from config import load_settings
from service.codec import Format
from service.record_validation import RecordValidator
from workers.records import OutboundRecord

SOURCE = "bench"


def make_bodies(batches: int, records: int, dims: int, seed: int = 0) -> list[bytes]:
    """``batches`` msgpack ingest bodies of ``records`` records of ``dims`` float32 each.

    Features go on the wire as msgpack float32, as a client holding float32 arrays sends
    them; record ids are distinct within the pool.
    """
    rng = np.random.default_rng(seed)
    bodies = []
    for batch in range(batches):
        features = rng.standard_normal((records, dims), dtype=np.float32).tolist()
        body = {
            "source": SOURCE,
            "records": [
                {"record_id": f"b{batch:05d}-{i:05d}", "features": values}
                for i, values in enumerate(features)
            ],
        }
        bodies.append(msgpack.packb(body, use_single_float=True))
    return bodies


def outbound_batches(
    bodies: list[bytes], dims: int, value_format: str
) -> list[list[OutboundRecord]]:
    """The Kafka records mlgate writes for each body (one tracking id per body)."""
    settings = load_settings({}, feature_dims=(dims,), value_format=value_format)
    validator = RecordValidator(settings)
    batches = []
    for body in bodies:
        source, items = validator.decode_batch(body, Format.MSGPACK)
        validated = validator.validate(source, items)
        if validated.errors:
            raise ValueError(f"benchmark records rejected: {validated.errors[:3]}")
        batches.append(validator.outbound(validated, uuid.uuid4().hex))
    return batches
