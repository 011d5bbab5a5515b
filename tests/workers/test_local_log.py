"""The embedded local log: frames on disk, recovery on open, and its writer actor."""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path
from typing import IO, Any

import pytest

from mlgate.workers.errors import MailboxFull, SinkFailed, WorkerClosed
from mlgate.workers.sinks import local_log_writer
from mlgate.workers.sinks.local_log import (
    HEADER,
    LocalLog,
    frame,
    read_log,
    segments,
)
from mlgate.workers.sinks.local_log_writer import LocalLogWriter
from mlgate.workers.sinks.records import OutboundRecord
from tests.support import until


def _record(key: str, value: bytes = b"v") -> OutboundRecord:
    return OutboundRecord(key=key.encode(), value=value, headers=[("source", b"s")])


def _keys(directory: Path, from_offset: int = 0) -> list[str]:
    return [entry.record.key.decode() for entry in read_log(directory, from_offset)]


def _append(directory: Path, keys: list[str], **kwargs: Any) -> None:
    log = LocalLog(directory, **kwargs)
    try:
        log.append([frame(_record(key)) for key in keys])
    finally:
        log.close()


# -- the files ------------------------------------------------------------------------


def test_appended_records_read_back_in_order_with_offsets(tmp_path: Path) -> None:
    log = LocalLog(tmp_path)
    try:
        records = [_record(f"k{i}", value=bytes([i]) * i) for i in range(10)]
        assert log.append([frame(r) for r in records[:4]]) == 0
        assert log.append([frame(r) for r in records[4:]]) == 4
        assert log.next_offset == 10
    finally:
        log.close()
    entries = list(read_log(tmp_path))
    assert [e.offset for e in entries] == list(range(10))
    assert [e.record for e in entries] == records
    assert _keys(tmp_path, from_offset=7) == ["k7", "k8", "k9"]


def test_reopened_log_continues_at_the_next_offset(tmp_path: Path) -> None:
    _append(tmp_path, ["a", "b"])
    log = LocalLog(tmp_path)
    try:
        assert log.next_offset == 2
        assert log.append([frame(_record("c"))]) == 2
    finally:
        log.close()
    assert _keys(tmp_path) == ["a", "b", "c"]


def test_segments_rotate_past_segment_bytes_and_read_as_one_log(tmp_path: Path) -> None:
    size = len(frame(_record("k00")))
    keys = [f"k{i:02d}" for i in range(20)]
    _append(tmp_path, keys[:7], segment_bytes=size * 3)
    _append(tmp_path, keys[7:], segment_bytes=size * 3)

    paths = segments(tmp_path)
    assert len(paths) == 7
    # Each segment is named after its first offset.
    assert [int(p.stem) for p in paths] == [0, 3, 6, 9, 12, 15, 18]
    assert all(p.stat().st_size <= size * 3 for p in paths)
    assert _keys(tmp_path) == keys
    assert _keys(tmp_path, from_offset=10) == keys[10:]


def test_torn_final_frame_is_dropped_on_reopen(tmp_path: Path) -> None:
    _append(tmp_path, ["a", "b", "c"])
    [segment] = segments(tmp_path)
    whole = segment.stat().st_size
    last = len(frame(_record("c")))
    with segment.open("r+b") as handle:  # a crash half way through writing "c"
        handle.truncate(whole - last // 2)

    assert _keys(tmp_path) == ["a", "b"]
    log = LocalLog(tmp_path)
    try:
        assert log.next_offset == 2
        assert segment.stat().st_size == whole - last  # the torn bytes are cut off
        log.append([frame(_record("d"))])
    finally:
        log.close()
    assert _keys(tmp_path) == ["a", "b", "d"]


def test_torn_frame_header_alone_is_dropped_on_reopen(tmp_path: Path) -> None:
    _append(tmp_path, ["a"])
    [segment] = segments(tmp_path)
    with segment.open("ab") as handle:
        handle.write(HEADER.pack(500, 0)[:5])
    _append(tmp_path, ["b"])
    assert _keys(tmp_path) == ["a", "b"]


def test_corrupted_checksum_mid_log_skips_that_frame_only(tmp_path: Path) -> None:
    _append(tmp_path, ["a", "b", "c"])
    [segment] = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    second = len(frame(_record("a")))
    data[second + HEADER.size + 2] ^= 0xFF  # one flipped bit in b's payload
    segment.write_bytes(bytes(data))
    assert _keys(tmp_path) == ["a", "c"]  # see test_local_log_recovery.py


class _FailingHandle:
    """A segment file whose next write stops half way with ENOSPC (a full disk)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle

    def write(self, data: bytes) -> int:
        self._handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def test_failed_append_leaves_no_torn_frame_before_later_records(tmp_path: Path) -> None:
    log = LocalLog(tmp_path)
    try:
        log.append([frame(_record("a"))])
        real = log._handle
        log._handle = _FailingHandle(real)  # type: ignore[assignment]
        with pytest.raises(OSError):
            log.append([frame(_record("lost-1")), frame(_record("lost-2"))])
        if isinstance(log._handle, _FailingHandle):  # not reopened by the failed append
            log._handle = real
        assert log.append([frame(_record("b"))]) == 1
    finally:
        log.close()
    assert _keys(tmp_path) == ["a", "b"]
    _append(tmp_path, ["c"])  # recovery must keep the acknowledged "b"
    assert _keys(tmp_path) == ["a", "b", "c"]


def test_durable_offset_counts_only_records_of_a_completed_append(tmp_path: Path) -> None:
    log = LocalLog(tmp_path)
    try:
        log.append([frame(_record("a"))])
        assert log.durable_offset == 1
        real = log._handle
        log._handle = _FailingHandle(real)  # type: ignore[assignment]
        with pytest.raises(OSError):
            log.append([frame(_record("lost-1")), frame(_record("lost-2"))])
        assert log.durable_offset == 1  # a reader must not forward what was rolled back
    finally:
        if isinstance(log._handle, _FailingHandle):
            log._handle = real
        log.close()
    reopened = LocalLog(tmp_path)
    reopened.close()
    assert reopened.durable_offset == 1


# -- the writer actor -----------------------------------------------------------------


async def _started_writer(directory: Path, **kwargs: Any) -> LocalLogWriter:
    writer = LocalLogWriter(directory, **kwargs)
    await writer.start()
    return writer


async def test_writer_resolves_after_the_records_are_on_disk(tmp_path: Path) -> None:
    writer = await _started_writer(tmp_path)
    try:
        await writer.write([_record("a"), _record("b")])
        assert _keys(tmp_path) == ["a", "b"]
    finally:
        await writer.close()


async def test_concurrent_submits_are_group_committed_in_order_per_submitter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    appends: list[int] = []
    original = LocalLog.append

    def counting_append(self: LocalLog, frames: list[bytes]) -> int:
        appends.append(len(frames))
        return original(self, frames)

    monkeypatch.setattr(LocalLog, "append", counting_append)
    writer = await _started_writer(tmp_path, mailbox_size=1000)
    try:

        async def submitter(name: str) -> None:
            for i in range(20):
                await writer.write([_record(f"{name}-{i}-{j}") for j in range(3)])

        await asyncio.gather(*(submitter(f"s{n}") for n in range(30)))
    finally:
        await writer.close()

    keys = _keys(tmp_path)
    assert len(keys) == len(set(keys)) == 30 * 20 * 3
    for n in range(30):
        mine = [k for k in keys if k.startswith(f"s{n}-")]
        assert mine == [f"s{n}-{i}-{j}" for i in range(20) for j in range(3)]
    # Group commit: far fewer fsyncs than requests.
    assert sum(appends) == len(keys)
    assert len(appends) < 30 * 20 / 2


async def test_many_submits_at_once_all_resolve(tmp_path: Path) -> None:
    writer = await _started_writer(tmp_path, mailbox_size=500)
    try:
        futures = [writer.submit([_record(f"k{i}")]) for i in range(500)]
        await asyncio.gather(*futures)
    finally:
        await writer.close()
    assert _keys(tmp_path) == [f"k{i}" for i in range(500)]


async def test_full_mailbox_raises_mailbox_full_at_once(tmp_path: Path) -> None:
    writer = await _started_writer(tmp_path, mailbox_size=2)
    try:
        accepted = [writer.submit([_record("a")]), writer.submit([_record("b")])]
        with pytest.raises(MailboxFull):
            writer.submit([_record("c")])
        await asyncio.gather(*accepted)
        await writer.write([_record("d")])  # room again once the writer caught up
    finally:
        await writer.close()
    assert _keys(tmp_path) == ["a", "b", "d"]


async def test_close_is_idempotent_and_completes_what_it_accepted(tmp_path: Path) -> None:
    writer = await _started_writer(tmp_path, mailbox_size=100)
    futures = [writer.submit([_record(f"k{i}")]) for i in range(100)]
    await writer.close()
    await writer.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert _keys(tmp_path) == [f"k{i}" for i in range(100)]
    assert not writer.healthy


async def test_submit_after_close_raises_worker_closed(tmp_path: Path) -> None:
    writer = await _started_writer(tmp_path)
    await writer.close()
    with pytest.raises(WorkerClosed):
        writer.submit([_record("a")])


async def test_close_past_its_drain_budget_fails_the_write_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writing, release = threading.Event(), threading.Event()
    original = LocalLog.append

    def stuck_append(self: LocalLog, frames: list[bytes]) -> int:
        writing.set()
        release.wait(10)
        return original(self, frames)

    monkeypatch.setattr(LocalLog, "append", stuck_append)
    writer = await _started_writer(tmp_path)
    in_progress = writer.submit([_record("slow")])
    await asyncio.to_thread(writing.wait, 5)
    queued = writer.submit([_record("queued")])
    closing = asyncio.create_task(writer.close(drain_s=0.05))
    await asyncio.wait([queued])  # the drain budget ran out
    release.set()
    await closing
    # Nobody waits forever: the write in progress is answered too, as a failure whose
    # records may have landed (its append went on), the queued one as a refusal.
    assert in_progress.done()
    assert isinstance(in_progress.exception(), SinkFailed)
    assert isinstance(queued.exception(), WorkerClosed)


async def test_write_error_fails_the_batch_and_the_writer_keeps_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = LocalLog.append
    calls = 0

    def flaky_append(self: LocalLog, frames: list[bytes]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(errno.EIO, "I/O error")
        return original(self, frames)

    monkeypatch.setattr(LocalLog, "append", flaky_append)
    writer = await _started_writer(tmp_path)
    try:
        with pytest.raises(SinkFailed):
            await writer.write([_record("a")])
        await writer.write([_record("b")])
        assert writer.healthy
    finally:
        await writer.close()
    assert _keys(tmp_path) == ["b"]


async def test_a_full_disk_makes_the_writer_unhealthy_until_there_is_room_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: with the disk full every ingest was 503 while /ready said the sink was
    fine, so a balancer kept sending traffic to the host."""
    full = True
    original = LocalLog.append

    def append_while_full(self: LocalLog, frames: list[bytes]) -> int:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, frames)

    monkeypatch.setattr(LocalLog, "append", append_while_full)
    monkeypatch.setattr(local_log_writer, "PROBE_INTERVAL_S", 0.0)
    writer = await _started_writer(tmp_path)
    try:
        assert writer.healthy
        with pytest.raises(SinkFailed):
            await writer.write([_record("a")])
        writer.min_free_bytes = 2**62  # as the file system now reports: not that much free
        for _ in range(5):  # probed, and probed again: still no room
            assert not writer.healthy
            await asyncio.sleep(0.02)
        full = False
        writer.min_free_bytes = 1  # room again
        await until(lambda: writer.healthy)
        await writer.write([_record("b")])
    finally:
        await writer.close()
    assert _keys(tmp_path) == ["b"]


async def test_a_write_error_the_file_system_does_not_show_keeps_the_writer_unhealthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a quota, an I/O error or a permission error left statvfs showing room,
    and health flapped every second while every write failed: the probe writes."""

    def always_fails(self: LocalLog, frames: list[bytes]) -> int:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    real_open = open

    def probe_fails_too(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith(".write-probe"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(LocalLog, "append", always_fails)
    monkeypatch.setattr(local_log_writer, "PROBE_INTERVAL_S", 0.0)
    monkeypatch.setattr("builtins.open", probe_fails_too)
    writer = await _started_writer(tmp_path)
    try:
        with pytest.raises(SinkFailed):
            await writer.write([_record("a")])
        for _ in range(10):
            assert not writer.healthy
            await asyncio.sleep(0.02)
    finally:
        await writer.close()



async def test_a_write_that_succeeds_makes_the_writer_healthy_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    original = LocalLog.append

    def fails_once(self: LocalLog, frames: list[bytes]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, frames)

    monkeypatch.setattr(LocalLog, "append", fails_once)
    writer = await _started_writer(tmp_path)
    try:
        with pytest.raises(SinkFailed):
            await writer.write([_record("a")])
        assert not writer.healthy
        await writer.write([_record("b")])
        assert writer.healthy
    finally:
        await writer.close()


def test_reading_an_empty_log_directory_yields_nothing(tmp_path: Path) -> None:
    assert list(read_log(tmp_path)) == []


async def test_a_full_disk_is_logged_once_counted_per_write_and_named_with_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: under load a full disk logged an error line per write, naming no
    directory, with no metric of its own."""
    import structlog.testing

    class Counted:
        failures = 0

        def local_log_write_failed(self) -> None:
            Counted.failures += 1

        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    def full(self: LocalLog, frames: list[bytes]) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalLog, "append", full)
    writer = await _started_writer(tmp_path, telemetry=Counted())
    writer.min_free_bytes = 2**62  # the disk full since start-up's look: no probe clears it
    try:
        with structlog.testing.capture_logs() as logs:
            for name in "abc":
                with pytest.raises(SinkFailed):
                    await writer.write([_record(name)])
        failed = [entry for entry in logs if entry["event"] == "local_log_write_failed"]
        assert len(failed) == 1 and failed[0]["directory"] == str(tmp_path)
        assert Counted.failures == 3
        assert writer.problem == f"writes to {tmp_path} fail: [Errno 28] No space left on device"
    finally:
        await writer.close()
