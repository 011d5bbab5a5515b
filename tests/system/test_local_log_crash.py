"""A crash after a 202 loses nothing: SIGKILL the real service in the middle of a
stream of acknowledged ingests, restart it on the same data directory, and find
every acknowledged record in the local log exactly once."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from mlgate.workers.sinks.local_log import frame, read_frames, read_log, segments
from mlgate.workers.sinks.records import OutboundRecord
from tests.conftest import ServiceFactory
from tests.service_process import REPO, ServiceProcess, service_environment

CLIENTS = 8
RECORDS_PER_BATCH = 20
KILL_AFTER_ACKNOWLEDGED = 3000
SERVICE_ENV = {
    "MLGATE_RATE_LIMITS_ENABLED": "false",
    "MLGATE_ACCESS_LOG": "false",
    "MLGATE_LOG_LEVEL": "warning",
    "MLGATE_LOG_SEGMENT_BYTES": str(64 * 1024),  # rotate a few times during the run
}


def _log_keys(service: ServiceProcess) -> list[str]:
    return [entry.record.key.decode() for entry in read_log(service.data_dir / "log")]


async def _ingest_until_killed(service: ServiceProcess) -> set[str]:
    """Post batches from several clients; SIGKILL the service once enough are
    acknowledged, with requests still in flight. Returns the acknowledged ids."""
    acknowledged: set[str] = set()
    killed = asyncio.Event()
    batches = itertools.count()

    async def client(session: aiohttp.ClientSession) -> None:
        while not killed.is_set():
            batch = next(batches)
            ids = [f"b{batch}-r{i}" for i in range(RECORDS_PER_BATCH)]
            body = {
                "source": "crash",
                "records": [{"record_id": i, "features": [1.0, 2.0, 3.0, 4.0]} for i in ids],
            }
            try:
                async with session.post(
                    f"{service.url}/api/v2/ingest",
                    data=msgspec.msgpack.encode(body),
                    headers={"Content-Type": "application/msgpack"},
                ) as response:
                    await response.read()
                    if response.status != 202:
                        raise AssertionError(f"{response.status}: {await response.text()}")
            except aiohttp.ClientError:
                if killed.is_set():
                    return
                raise
            acknowledged.update(ids)
            if len(acknowledged) >= KILL_AFTER_ACKNOWLEDGED and not killed.is_set():
                killed.set()
                service.send(signal.SIGKILL)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
    assert await asyncio.wait_for(service.exit_code(), 10) == -signal.SIGKILL
    return acknowledged


async def _assert_serves_and_writes(service: ServiceProcess, record_id: str) -> None:
    body = {"source": "crash", "records": [{"record_id": record_id, "features": [0.0] * 4}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{service.url}/api/v2/ingest", json=body) as response:
            assert response.status == 202, await response.text()
        async with session.get(f"{service.url}/ready") as response:
            assert response.status == 200
    assert _log_keys(service)[-1] == record_id


def _assert_each_acknowledged_once(keys: list[str], acknowledged: set[str]) -> None:
    counts = Counter(keys)
    missing = acknowledged - counts.keys()
    assert not missing, f"{len(missing)} acknowledged records lost, e.g. {sorted(missing)[:5]}"
    duplicated = [key for key, n in counts.items() if n > 1]
    assert not duplicated, f"written twice: {duplicated[:5]}"


def _log_cat(data_dir: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "mlgate", "log", "cat", "--data-dir", str(data_dir)],
        cwd=REPO,
        env=service_environment(8080, data_dir),  # a port is read, never bound
        capture_output=True,
        timeout=60,
        check=True,
    )
    return [msgspec.json.decode(line) for line in result.stdout.splitlines()]


async def test_every_acknowledged_record_survives_sigkill_and_restart(
    service_process: ServiceFactory,
) -> None:
    service = service_process(**SERVICE_ENV)
    acknowledged = await _ingest_until_killed(service)
    assert len(acknowledged) >= KILL_AFTER_ACKNOWLEDGED

    service.start()
    keys = _log_keys(service)
    _assert_each_acknowledged_once(keys, acknowledged)
    assert len(segments(service.data_dir / "log")) > 1
    # The CLI reads back the same log, in the same order.
    printed = _log_cat(service.data_dir)
    assert [line["key"] for line in printed] == keys
    assert [line["offset"] for line in printed] == list(range(len(keys)))
    assert {line["headers"]["source"] for line in printed} == {"crash"}
    await _assert_serves_and_writes(service, "after-restart")


async def test_torn_final_frame_is_dropped_on_restart_and_nothing_acknowledged_is_lost(
    service_process: ServiceFactory,
) -> None:
    service = service_process(**SERVICE_ENV)
    acknowledged = await _ingest_until_killed(service)
    last = segments(service.data_dir / "log")[-1]
    # The kill may itself have torn a frame; the intact part ends after the last good one.
    intact_size = max((end for end, _ in read_frames(last.read_bytes())), default=0)
    torn = frame(OutboundRecord(key=b"torn", value=b"x" * 100, headers=[]))
    with last.open("ab") as handle:  # a crash half way through a frame
        handle.write(torn[: len(torn) // 2])

    service.start()
    assert last.stat().st_size == intact_size
    keys = _log_keys(service)
    assert "torn" not in keys
    _assert_each_acknowledged_once(keys, acknowledged)
    # Records written after recovery follow the intact ones and read back.
    await _assert_serves_and_writes(service, "after-torn-restart")
