"""One audit event per ingest: who, what, counts and outcome; never the payload."""

from __future__ import annotations

import json

import structlog

from mlgate.service.http.logs import configure_logging
from mlgate.service.protection.audit import audit_admin


async def test_ingest_emits_one_audit_event_without_payload(app_client, make_settings) -> None:
    client = await app_client(make_settings(feature_dims=(4,)))
    body = {
        "source": "sensors",
        "records": [
            {"features": [1.5, 2.5, 3.5, 4.5], "metadata": {"secret": "do-not-log"}},
            {"features": [1.0]},
        ],
    }
    with structlog.testing.capture_logs() as events:
        response = await client.post("/api/v2/ingest", json=body)
    assert response.status == 202
    audit = [e for e in events if e.get("channel") == "audit"]
    assert len(audit) == 1
    [event] = audit
    assert event["event"] == "ingest"
    assert event["outcome"] == "accepted"
    assert event["records_accepted"] == 1 and event["records_rejected"] == 1
    assert event["route"] == "POST /api/v2/ingest"
    assert event["tracking_id"] == (await response.json())["tracking_id"]
    assert "do-not-log" not in repr(event) and "1.5" not in repr(event)


async def test_fully_rejected_ingest_is_audited_as_rejected(app_client, make_settings) -> None:
    client = await app_client(make_settings(feature_dims=(4,)))
    with structlog.testing.capture_logs() as events:
        response = await client.post("/api/v2/ingest", json={"source": "s", "records": [{"features": [1.0]}]})
    assert response.status == 422
    [event] = [e for e in events if e.get("channel") == "audit"]
    assert event["outcome"] == "rejected"


def test_audit_events_are_written_even_when_the_log_level_drops_info(capsys) -> None:
    configure_logging("warning")
    try:
        structlog.get_logger("mlgate.other").info("dropped")
        audit_admin("key_create", "created", key_id="k-1", tenant="acme")
        out = capsys.readouterr().out
    finally:
        structlog.reset_defaults()
    [line] = [json.loads(text) for text in out.splitlines()]
    assert line["event"] == "key_create" and line["channel"] == "audit"


async def test_an_ingest_refused_at_validation_is_audited_as_refused(
    app_client, make_settings, monkeypatch
) -> None:
    """A review: the 503 of a source whose quality profile cannot be read (raised while
    the batch is validated) wrote no audit event."""
    from mlgate.service.http.errors import Overloaded
    from mlgate.service.state import INGEST_PIPELINE

    client = await app_client(make_settings(feature_dims=(4,)))

    def refuse(source, items):
        raise Overloaded(f"Source {source}: its quality profile cannot be read", retry_after_s=5)

    monkeypatch.setattr(client.app[INGEST_PIPELINE], "validate", refuse)
    with structlog.testing.capture_logs() as events:
        response = await client.post(
            "/api/v2/ingest", json={"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}
        )
    assert response.status == 503
    [event] = [e for e in events if e.get("channel") == "audit"]
    assert event["outcome"] == "refused: Overloaded" and event["source"] == "s"
