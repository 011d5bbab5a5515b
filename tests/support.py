"""Helpers the tests share: free ports, managed server processes, topic reading."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.processes import broker_command, free_port, redis_command, wait_for_port
from mlgate.service.protection.api_keys import ApiKey, KeyFile, key_id_of, new_key
from mlgate.workers.breaker import Breaker
from mlgate.workers.sinks.local_log_writer import LocalLogWriter
from mlgate.workers.sinks.spilling_sink import SpillingKafkaSink
from mlgate.workers.telemetry import NO_TELEMETRY, WorkerTelemetry


@dataclass
class ManagedProcess:
    """A server process a test may stop and start again on the same port."""

    argv: list[str]
    port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for_port(self.port, self.process, 15.0)
        except (TimeoutError, RuntimeError):
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@dataclass
class KafkaBroker(ManagedProcess):
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_tansu() -> KafkaBroker:
    port = free_port()
    broker = KafkaBroker(broker_command(port), port)
    broker.start()
    return broker


def start_redis() -> ManagedProcess:
    port = free_port()
    server = ManagedProcess(redis_command(port), port)
    server.start()
    return server


async def create_topic(bootstrap: str, partitions: int = 3, name: str | None = None) -> str:
    topic = name or f"test.{uuid.uuid4().hex[:12]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    return topic


async def restart_with_topic(broker: KafkaBroker, topic: str, breaker: Breaker) -> None:
    """Start a stopped ``broker`` again and create ``topic`` on it, with a live sink's
    Kafka ``breaker`` held open until the topic is back. Tansu on memory storage comes
    back without its topics, and acknowledges a produce to a topic it lacks while
    dropping the records (a real broker refuses it, and the sink spills them): a drain
    batch let through in between was lost to the test's broker."""
    held = breaker._breaker
    held.open()
    broker.start()
    creating = asyncio.create_task(create_topic(broker.bootstrap, name=topic))
    while not creating.done():
        held.open()  # again: its reset time must not let a trial call through meanwhile
        await asyncio.wait({creating}, timeout=0.05)
    await creating
    held.close()


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    expected: int,
    wait_s: float = 15.0,
    keys: set[bytes] | None = None,
) -> list[Any]:
    """Every message of ``topic`` from the start; returns once ``expected`` arrived
    (and, given ``keys``, a message of each of them) and a short quiet period shows
    nothing more is coming (so duplicates show). ``keys`` for a topic that other
    tests wrote to as well: their messages count towards ``expected``, so a quiet
    poll could end the read before this test's last ones arrived."""
    missing = set(keys) if keys else set()
    # Manual assignment, no consumer group: no rebalance to wait for.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    messages: list[Any] = []
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            got = [m for ms in batch.values() for m in ms]
            messages.extend(got)
            if missing:
                missing.difference_update(m.key for m in got)
            if len(messages) >= expected and not missing and not got:
                break
    finally:
        await consumer.stop()
    return messages


class KeyMaker:
    """Writes API keys into a keys file, as ``mlgate keys create`` does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def create(
        self,
        tenant: str = "acme",
        scopes: str = "ingest,predict",
        rate: float | None = None,
        burst: int | None = None,
    ) -> str:
        """A new key's plaintext."""
        plaintext, stored = new_key(
            tenant, frozenset(scopes.split(",")), rate=rate, burst=burst
        )
        KeyFile(self.path).update(lambda keys: keys.__setitem__(stored.key_id, stored))
        return plaintext

    def revoke(self, plaintext: str) -> None:
        key_id = key_id_of(plaintext)
        assert key_id is not None

        def revoke(keys: dict[str, ApiKey]) -> None:
            keys[key_id] = msgspec.structs.replace(keys[key_id], revoked_at="2026-01-01T00:00:00Z")

        KeyFile(self.path).update(revoke)


async def started_spilling_sink(
    make_settings: Any,
    broker: KafkaBroker,
    telemetry: WorkerTelemetry = NO_TELEMETRY,
    *,
    topic: str | None = None,
    partitions: int = 3,
    **overrides: Any,
) -> tuple[SpillingKafkaSink, str]:
    """A started ``SpillingKafkaSink`` writing to ``topic`` (a fresh one of
    ``partitions`` by default) on ``broker``, Kafka requests timing out after 500 ms."""
    topic = topic or await create_topic(broker.bootstrap, partitions=partitions)
    settings = make_settings(
        kafka_bootstrap_servers=broker.bootstrap, kafka_topic=topic,
        kafka_request_timeout_ms=500, **overrides,
    )
    sink = SpillingKafkaSink(settings, telemetry)
    await sink.start()
    return sink, topic


async def wait_until_drained(sink: SpillingKafkaSink, limit_s: float = 30.0) -> None:
    """Until the spill's backlog is forwarded, or fail the test."""
    for _ in range(int(limit_s / 0.05)):
        if sink.backlog == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"spill still holds {sink.backlog} records")


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """``condition`` holds within ``timeout_s``, asked every 10 ms: for a state no event
    announces (a worker restarted, a probe done)."""
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout_s:g} s")


def stop_process(pid: int, timeout_s: float = 5.0) -> None:
    """SIGSTOP ``pid`` and return once every thread of it is stopped: the signal is
    delivered after ``kill`` returns, and a broker thread still running then answered a
    produce meant to go unanswered (a CI run)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    tasks = Path(f"/proc/{pid}/task")
    while time.monotonic() < deadline:
        states = []
        for task in tasks.iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:  # a thread gone meanwhile
                continue
            states.append(stat.rpartition(")")[2].split()[0])
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} not stopped within {timeout_s:g} s")


def hang_appends(writer: LocalLogWriter) -> asyncio.Event:
    """The writer's appends wait, in its thread, until the event returned is set: a
    disk that hangs (a stalled fsync)."""
    log = writer._log
    assert log is not None
    append = log.append
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def hung_append(frames: list[bytes]) -> int:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        return append(frames)

    log.append = hung_append  # type: ignore[method-assign]
    return release
