"""A batch past the configured record limit (``MLGATE_MAX_BATCH_RECORDS``) is refused
422 before its records are built: msgspec refuses a msgpack array past the schema's
widest bound as it reads its length, not past the configured one."""

from __future__ import annotations

import tracemalloc

import msgspec
import pytest

from mlgate.config import load_settings
from mlgate.service.http.codec import Format
from mlgate.service.http.errors import ValidationFailed
from mlgate.service.ingest.validation import MAX_BATCH_RECORD_BYTES, RecordValidator

METADATA = {key: "" for key in "abcdefghijklmnopqrstuvwxyzABCDEF"}  # 32 items


@pytest.mark.parametrize("fmt", [Format.MSGPACK, Format.JSON])
def test_a_batch_past_the_configured_limit_is_refused_before_its_records_are_built(fmt: Format) -> None:
    """A review: 64,000 msgpack records of 32 metadata items each were built, twice,
    before their 422 (1.3 s of the event loop, 450 MB). Measured in memory, not time:
    the records built would take ten times the body."""
    validator = RecordValidator(load_settings({}, feature_dims=(4,), max_batch_records=100))
    batch = {"source": "a", "records": [{"features": [0, 0, 0, 0], "metadata": METADATA}] * 20_000}
    body = msgspec.msgpack.encode(batch) if fmt is Format.MSGPACK else msgspec.json.encode(batch)
    assert len(body) > MAX_BATCH_RECORD_BYTES
    tracemalloc.start()
    try:
        with pytest.raises(ValidationFailed, match="at most 100 records, got 20000"):
            validator.decode_batch(body, fmt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(body), (peak, len(body))
