"""The audit line written straight to the configured stream reads as structlog's own."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
from datetime import UTC, datetime

import pytest
import structlog

from mlgate.service.http import logs
from mlgate.service.protection.audit import audit_admin


def test_audit_line_has_the_fields_and_order_of_structlogs_rendering(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure_logging("warning")
    try:
        structlog.contextvars.bind_contextvars(request_id="r-1")
        audit_admin("key_create", "created", key_id="k-1", tenant="acme")
        direct = capsys.readouterr().out
        # The same event through structlog's chain, configured the same way.
        structlog.get_logger().bind(channel="audit").warning(
            "key_create", outcome="created", key_id="k-1", tenant="acme"
        )
        rendered = capsys.readouterr().out
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
    line, expected = json.loads(direct), json.loads(rendered)
    expected["level"] = "info"
    assert list(line) == list(expected)
    assert {k: v for k, v in line.items() if k != "timestamp"} == {
        k: v for k, v in expected.items() if k != "timestamp"
    }
    assert line["timestamp"].endswith("Z")


def test_audit_events_reach_a_capture_of_structlog_after_configuration() -> None:
    logs.configure_logging("info")
    try:
        with structlog.testing.capture_logs() as events:
            audit_admin("key_revoke", "revoked", key_id="k-2")
    finally:
        structlog.reset_defaults()
    assert [e["event"] for e in events if e.get("channel") == "audit"] == ["key_revoke"]


def test_log_lines_hold_only_ascii_whatever_a_client_sent() -> None:
    line = logs.json_line({"event": "request", "request_id": "café-☕"})
    assert line.isascii()
    assert json.loads(line) == {"event": "request", "request_id": "café-☕"}


def test_log_values_json_cannot_hold_are_written_as_their_repr() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    assert json.loads(logs.json_line({"event": "x", "value": Opaque()})) == {
        "event": "x",
        "value": "<opaque>",
    }


def test_a_lone_surrogate_is_written_escaped_not_raised() -> None:
    root = os.fsdecode(b"/srv/models-\xff")  # a file name that was not UTF-8
    line = logs.json_line({"event": "models_started", "root": root})
    assert line.isascii() and json.loads(line)["root"] == root


def test_a_line_with_other_characters_renders_its_values_as_an_ascii_line_does() -> None:
    ascii_only = json.loads(logs.json_line({"value": math.nan, "id": "a"}))
    other = json.loads(logs.json_line({"value": math.nan, "id": "é"}))
    assert ascii_only["value"] is None and other["value"] is None


def test_a_standard_library_record_is_written_as_a_json_line_with_its_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure_logging("info")
    try:
        try:
            raise ValueError("broken body")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Unhandled exception")
        out = capsys.readouterr().out
    finally:
        structlog.reset_defaults()
    [line] = out.splitlines()
    record = json.loads(line)
    assert record["event"] == "Unhandled exception"
    assert record["logger"] == "aiohttp.server" and record["level"] == "error"
    assert "ValueError: broken body" in record["exception"]
    assert record["timestamp"].endswith("Z")


def test_a_kafka_client_line_repeated_through_an_outage_is_written_once_a_minute(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: with the broker down, aiokafka wrote about 30 lines a second."""
    logs.configure_logging("info")
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    kafka = logging.getLogger("aiokafka.conn")
    try:
        for node in range(100):
            kafka.error("Unable connect to node with id %s: %s", node, "refused")
        logging.getLogger("aiokafka.cluster").error("Unable to update metadata from %s", 1)
        first = capsys.readouterr().out.splitlines()
        clock[0] += 61
        kafka.error("Unable connect to node with id %s: %s", 7, "refused")
        later = capsys.readouterr().out.splitlines()
    finally:
        structlog.reset_defaults()
    assert [json.loads(line)["event"] for line in first] == [
        "Unable connect to node with id 0: refused",
        "Unable to update metadata from 1",
    ]
    [line] = later
    assert json.loads(line)["event"] == (
        "Unable connect to node with id 7: refused (99 more like it in the last 60 s left out)"
    )


def test_every_line_of_a_supervised_process_names_its_worker(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A review: with two processes, a failing one's lines could not be told apart."""
    import warnings

    logging.captureWarnings(False)  # an earlier test's capture, undone by pytest's own
    logs.configure_logging("info", worker=1)
    try:
        audit_admin("key_create", "created", key_id="k-1", tenant="acme")  # the direct path
        structlog.get_logger().error("local_log_write_failed")
        logging.getLogger("aiokafka").error("Unable connect to node")
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # pytest's own filter makes it an error
            warnings.warn("Removal of labels has not been implemented", UserWarning, stacklevel=1)
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    finally:
        logging.captureWarnings(False)
        structlog.reset_defaults()
    assert [line["worker"] for line in lines] == [1, 1, 1, 1]
    assert "Removal of labels" in lines[3]["event"]  # a warning is a JSON line too


@pytest.mark.parametrize(
    "now_ns", [1_796_000_000_123_456_789, 1_796_000_000_000_000_000, 1_796_000_000_000_000_999, 0]
)
def test_the_audit_timestamp_is_structlogs_iso_utc_text(now_ns: int) -> None:
    second, rest = divmod(now_ns, 1_000_000_000)
    moment = datetime.fromtimestamp(second, UTC).replace(microsecond=rest // 1000)
    assert logs.utc_stamp(now_ns) == moment.isoformat().replace("+00:00", "Z")


class CountedFlushes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


async def test_audit_lines_of_one_turn_are_flushed_together_by_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = CountedFlushes()
    monkeypatch.setattr("sys.stdout", stream)
    logs.configure_logging("info")
    try:
        for key in ("k-1", "k-2", "k-3"):
            audit_admin("key_create", "created", key_id=key)
        written_before_the_turn_ended = stream.flushes
        await asyncio.sleep(0)
    finally:
        structlog.reset_defaults()
    assert written_before_the_turn_ended == 0 and stream.flushes == 1
    assert [json.loads(line)["key_id"] for line in stream.getvalue().splitlines()] == ["k-1", "k-2", "k-3"]


def test_an_audit_line_outside_an_event_loop_is_flushed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = CountedFlushes()
    monkeypatch.setattr("sys.stdout", stream)
    logs.configure_logging("info")
    try:
        audit_admin("key_create", "created", key_id="k-1")
    finally:
        structlog.reset_defaults()
    assert stream.flushes == 1 and json.loads(stream.getvalue())["key_id"] == "k-1"
