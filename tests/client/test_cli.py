"""``python -m mlgate_client send``: an NDJSON file (or stdin) through the producer, a
summary of what became of it, and an exit status that says so."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from tests.client.landing import FEATURES, StartKafkaService


def run_cli(url: str, target: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mlgate_client", "send", "--url", url, "--source", "cli-test",
         "--max-records", "50", "--json", target],
        input=stdin, capture_output=True, timeout=60, check=False,
    )


async def test_a_file_is_sent_and_summarised_with_each_rejection(
    kafka_service: StartKafkaService, tmp_path: Path
) -> None:
    mlgate = kafka_service()
    lines = [json.dumps({"record_id": f"cli-{i}", "features": FEATURES, "label": 1.0,
                         "metadata": {"n": i}, "timestamp": "2026-01-01T00:00:00.000Z"})
             for i in range(120)]
    lines += ["not json", json.dumps({"record_id": "short", "features": [1.0]}), ""]
    path = tmp_path / "records.ndjson"
    path.write_text("\n".join(lines) + "\n")

    done = await asyncio.to_thread(run_cli, mlgate.url, str(path))
    summary = json.loads(done.stdout)
    assert done.returncode == 2, done.stderr.decode()
    assert (summary["sent"], summary["accepted"], summary["rejected"]) == (121, 120, 2)
    assert summary["failed"] == 0 and summary["duplicates"] == 0
    assert {e["line"] for e in summary["rejected_examples"]} == {121, 122}
    assert b"records/s" in done.stderr  # the progress line
    landed = await mlgate.landed(expected=120)
    assert landed == {f"cli-{i}": 1 for i in range(120)}


async def test_stdin_is_read_with_a_dash(kafka_service: StartKafkaService) -> None:
    mlgate = kafka_service()
    stdin = b"".join(json.dumps({"features": FEATURES}).encode() + b"\n" for _ in range(10))
    done = await asyncio.to_thread(run_cli, mlgate.url, "-", stdin)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["accepted"] == 10


async def test_records_of_a_batch_holding_new_ones_and_repeats_are_summarised_as_either(
    kafka_service: StartKafkaService, tmp_path: Path
) -> None:
    """A review: the summary counted them accepted, and none duplicate, where mlgate
    answered one accepted and one duplicate."""
    mlgate = kafka_service()
    first, again = tmp_path / "first.ndjson", tmp_path / "again.ndjson"
    first.write_text(json.dumps({"record_id": "seen", "features": FEATURES}) + "\n")
    again.write_text(
        "".join(json.dumps({"record_id": i, "features": FEATURES}) + "\n" for i in ("seen", "new"))
    )
    assert (await asyncio.to_thread(run_cli, mlgate.url, str(first))).returncode == 0

    done = await asyncio.to_thread(run_cli, mlgate.url, str(again))
    summary = json.loads(done.stdout)
    assert done.returncode == 0, done.stderr.decode()
    assert (summary["accepted"], summary["duplicates"], summary["accepted_or_duplicate"]) == (0, 0, 2)
