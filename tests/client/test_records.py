"""Batch bodies joined from records encoded one at a time decode as the ingest request."""

from __future__ import annotations

import datetime as dt

import msgpack
import pytest
from mlgate_client.records import RecordEncoder, batch_body, batch_prefix, rfc3339


@pytest.mark.parametrize("count", [1, 15, 16, 65_535, 65_536])
def test_a_joined_body_decodes_as_the_batch(count: int) -> None:
    encoder = RecordEncoder()
    records = [encoder.encode(f"r{i}", [float(i)], None, None, 1.5) for i in range(count)]
    body = msgpack.unpackb(batch_body(batch_prefix("sensors"), records))
    assert body["source"] == "sensors" and len(body["records"]) == count
    assert body["records"][-1] == {"record_id": f"r{count - 1}", "timestamp": 1.5,
                                   "features": [float(count - 1)]}


def test_numpy_rows_and_single_floats_are_encoded() -> None:
    numpy = pytest.importorskip("numpy")
    row = numpy.array([0.1, 0.2], dtype=numpy.float32)
    double = msgpack.unpackb(RecordEncoder().encode("a", row, numpy.float32(1.0), None, 0))
    single = RecordEncoder(single_float=True).encode("a", row, None, None, 0)
    assert double["features"] == row.tolist() and double["label"] == 1.0
    assert len(single) < len(RecordEncoder().encode("a", row, None, None, 0))


def test_datetimes_go_out_as_rfc3339_utc() -> None:
    aware = dt.datetime(2026, 1, 2, 4, 5, 6, 789000, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert rfc3339(aware) == "2026-01-02T03:05:06.789Z"
    assert rfc3339(dt.datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05.000Z"


def test_generated_record_ids_are_unique_across_encoders() -> None:
    ids = {encoder.new_record_id() for encoder in (RecordEncoder(), RecordEncoder()) for _ in range(1000)}
    assert len(ids) == 2000


def test_the_errors_the_readme_names_are_importable_from_the_package() -> None:
    """A review: ``from mlgate_client import NotFound`` failed; only ``errors`` had them."""
    import mlgate_client
    from mlgate_client import errors

    for name in ("NotFound", "ValidationFailed", "Overloaded", "DeadlineExceeded", "RateLimited"):
        assert getattr(mlgate_client, name) is getattr(errors, name)
        assert name in mlgate_client.__all__


def test_record_ids_made_after_a_fork_are_not_the_parents() -> None:
    """A review: a module-level producer's encoder, forked, made the ids its parent
    made, and the child's records were dropped as duplicates."""
    import os

    encoder = RecordEncoder()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, to the parent
        os.write(write, encoder.new_record_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child_id = os.read(read, 100).decode()
    os.close(read)
    parent_id = encoder.new_record_id()
    assert child_id.rpartition("-")[0] != parent_id.rpartition("-")[0]
