"""The local log under failures around it: its directory deleted, a cut-back that fails,
a crash of its writer, stray files; and what it reports to ``/metrics``."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing

from mlgate.service.cli.log import print_log
from mlgate.service.http.metrics import Metrics, PrometheusTelemetry
from mlgate.workers.errors import SinkFailed
from mlgate.workers.sinks import local_log, local_log_writer
from mlgate.workers.sinks.local_log import LocalLog, SegmentDeleted, frame, read_log, segments
from mlgate.workers.sinks.local_log_writer import LocalLogWriter
from mlgate.workers.sinks.records import OutboundRecord
from mlgate.workers.supervision import Restarts
from tests.support import hang_appends, until


def _record(key: str) -> OutboundRecord:
    return OutboundRecord(key=key.encode(), value=b"v", headers=[("source", b"s")])


def _entries(directory: Path) -> list[tuple[int, str]]:
    return [(entry.offset, entry.record.key.decode()) for entry in read_log(directory)]


async def _started_writer(directory: Path, **kwargs: Any) -> LocalLogWriter:
    writer = LocalLogWriter(directory, **kwargs)
    await writer.start()
    return writer



async def test_a_disk_without_room_at_start_up_is_unready_until_room_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: started on a full disk, /ready said ready until an ingest failed."""
    monkeypatch.setattr(local_log_writer, "PROBE_INTERVAL_S", 0.0)
    writer = await _started_writer(tmp_path / "log", min_free_bytes=1 << 62)
    try:
        assert not writer.healthy
        assert writer.problem is not None and "full or not writable" in writer.problem
        writer.min_free_bytes = 1  # room made
        await until(lambda: writer.healthy)
    finally:
        await writer.close()


async def test_room_made_is_seen_unasked_so_the_first_readiness_check_after_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: the probe ran only when /ready asked, and the request that started it
    got the old answer: one more health-check interval out of the balancer."""
    monkeypatch.setattr(local_log_writer, "PROBE_INTERVAL_S", 0.05)
    writer = await _started_writer(tmp_path / "log", min_free_bytes=1 << 62)
    try:
        with structlog.testing.capture_logs() as logs:
            writer.min_free_bytes = 1  # room made; nobody asks whether it is healthy
            await until(lambda: any(entry["event"] == "local_log_writable_again" for entry in logs))
        assert writer.healthy
    finally:
        await writer.close()


# -- the directory deleted under the log -----------------------------------------------


def test_an_append_into_a_deleted_segment_fails_and_the_next_recreates_the_log(
    tmp_path: Path,
) -> None:
    """A review: after ``rm -rf`` of the data directory, appends went on succeeding into
    the deleted files, and the records they acknowledged were gone after a restart."""
    directory = tmp_path / "log"
    log = LocalLog(directory)
    try:
        log.append([frame(_record("a"))])
        shutil.rmtree(directory)
        with pytest.raises(SegmentDeleted):
            log.append([frame(_record("lost"))])
        assert log.append([frame(_record("b"))]) == 1  # a's offset is never given again
    finally:
        log.close()
    assert _entries(directory) == [(1, "b")]
    reopened = LocalLog(directory)
    try:
        assert reopened.next_offset == 2
    finally:
        reopened.close()


def test_a_log_whose_directory_another_process_took_meanwhile_never_writes_into_it(
    tmp_path: Path,
) -> None:
    """A review: deleted under the first log, the directory was taken by a second; the
    first one's repair, seeing a LOCK file, cut and wrote the second one's segment."""
    directory = tmp_path / "log"
    first = LocalLog(directory)
    try:
        first.append([frame(_record(key)) for key in ("a", "b", "c")])
        shutil.rmtree(directory)
        second = LocalLog(directory)
        try:
            second.append([frame(_record("theirs"))])
            with pytest.raises(SegmentDeleted):
                first.append([frame(_record("lost"))])
            with pytest.raises(OSError) as refused:
                first.append([frame(_record("mine"))])
            assert refused.value.errno == errno.EBUSY
            assert _entries(directory) == [(0, "theirs")]
        finally:
            second.close()
    finally:
        first.close()


async def test_deleting_the_directory_under_the_writer_fails_the_write_then_it_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_log_writer, "PROBE_INTERVAL_S", 0.0)
    directory = tmp_path / "log"
    writer = await _started_writer(directory, min_free_bytes=1)
    try:
        await writer.write([_record("a")])
        shutil.rmtree(directory)
        with pytest.raises(SinkFailed):
            await writer.write([_record("lost")])
        assert not writer.healthy
        await until(lambda: writer.healthy)
        await writer.write([_record("b")])
    finally:
        await writer.close()
    assert _entries(directory) == [(1, "b")]


# -- a cut-back that fails -------------------------------------------------------------


def _fails_once(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> None:
    real = getattr(os, name)
    failed = False

    def once(*args: Any) -> Any:
        nonlocal failed
        if not failed:
            failed = True
            raise OSError(code, os.strerror(code))
        return real(*args)

    monkeypatch.setattr(local_log.os, name, once)


def test_a_failed_cut_back_leaves_the_log_able_to_append_once_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: when the cut-back of a failed append failed too (the disk full), the
    log's file stayed closed and every later append raised ``ValueError``."""
    log = LocalLog(tmp_path)
    try:
        log.append([frame(_record("a"))])
        _fails_once(monkeypatch, "fsync", errno.ENOSPC)
        _fails_once(monkeypatch, "truncate", errno.ENOSPC)
        with pytest.raises(OSError):
            log.append([frame(_record("lost"))])
        assert log.append([frame(_record("b"))]) == 1
    finally:
        log.close()
    assert _entries(tmp_path) == [(0, "a"), (1, "b")]


async def _torn_write(writer: LocalLogWriter, monkeypatch: pytest.MonkeyPatch, code: int) -> SinkFailed:
    """A write whose fsync fails and whose cut-back fails too (``code``): its failure."""
    _fails_once(monkeypatch, "fsync", code)
    _fails_once(monkeypatch, "truncate", code)
    with pytest.raises(SinkFailed) as failure:
        await writer.write([_record("torn")])
    return failure.value


async def test_the_writer_outlives_a_failed_cut_back_and_writes_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = await _started_writer(tmp_path)
    try:
        await writer.write([_record("a")])
        await _torn_write(writer, monkeypatch, errno.ENOSPC)
        await writer.write([_record("b")])
        assert writer.running
    finally:
        await writer.close()
    assert _entries(tmp_path) == [(0, "a"), (1, "b")]


async def test_a_write_stopped_by_an_earlier_writes_failed_repair_wrote_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: the write after a failed cut-back, refused because the log still
    could not be repaired, was reported as possibly written (its ids kept claimed),
    though none of its frames reached the file."""
    writer = await _started_writer(tmp_path)
    try:
        await writer.write([_record("a")])
        torn = await _torn_write(writer, monkeypatch, errno.EIO)
        assert not torn.nothing_written  # its frame may be on disk
        _fails_once(monkeypatch, "truncate", errno.EIO)  # the repair fails again
        with pytest.raises(SinkFailed) as stopped:
            await writer.write([_record("never")])
        assert stopped.value.nothing_written
        await writer.write([_record("b")])
    finally:
        await writer.close()
    assert _entries(tmp_path) == [(0, "a"), (1, "b")]


async def test_a_crash_of_the_writer_is_counted_as_a_background_task_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(self: LocalLog, frames: list[bytes]) -> int:
        raise ValueError("write to closed file")

    metrics = Metrics()
    monkeypatch.setattr(LocalLog, "append", crash)
    writer = await _started_writer(tmp_path, telemetry=PrometheusTelemetry(metrics))
    try:
        with pytest.raises(SinkFailed):
            await writer.write([_record("a")])

        def crashes() -> float | None:
            return metrics.registry.get_sample_value(
                "mlgate_background_task_crashes_total", {"task": "local_log"}
            )

        await until(lambda: crashes() is not None)
        assert crashes() == 1
        assert not writer.healthy
    finally:
        await writer.close()


async def test_a_crashed_writer_opens_its_log_again_and_cuts_what_the_crash_tore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    append = LocalLog.append

    def tear_once(self: LocalLog, frames: list[bytes]) -> int:
        monkeypatch.setattr(LocalLog, "append", append)
        self._handle.write(frames[0][:5])  # half a frame on disk, then a bug
        self._handle.flush()
        raise ValueError("a bug mid-append")

    writer = await _started_writer(tmp_path)
    try:
        await writer.write([_record("a")])
        monkeypatch.setattr(LocalLog, "append", tear_once)
        with pytest.raises(SinkFailed, match="may have landed"):
            await writer.write([_record("torn")])
        await until(lambda: writer.running)
        await writer.write([_record("b")])
        assert writer.durable_offset == 2
    finally:
        await writer.close()
    assert _entries(tmp_path) == [(0, "a"), (1, "b")]


class FailsOnceWritten(PrometheusTelemetry):
    """A bug after the append: the first ``local_log_batch_written`` raises."""

    def __init__(self) -> None:
        super().__init__(Metrics())
        self.failed = False

    def local_log_batch_written(self, records: int) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug after the append")


async def test_a_crash_after_the_append_fails_its_writes_as_may_have_landed(
    tmp_path: Path,
) -> None:
    writer = await _started_writer(tmp_path, telemetry=FailsOnceWritten())
    try:
        with pytest.raises(SinkFailed, match="may have landed"):
            await asyncio.wait_for(writer.write([_record("a")]), 5)
        await until(lambda: writer.running)
        await writer.write([_record("b")])
    finally:
        await asyncio.wait_for(writer.close(drain_s=3), 1)  # nothing left uncounted to wait for
    assert _entries(tmp_path) == [(0, "a"), (1, "b")]


async def test_a_restarted_writer_is_not_healthy_until_its_new_run_has_settled(
    tmp_path: Path,
) -> None:
    writer = await _started_writer(tmp_path, telemetry=FailsOnceWritten())
    writer._restarts = Restarts(settle_s=3600)
    try:
        with pytest.raises(SinkFailed):
            await writer.write([_record("a")])
        await until(lambda: writer.running)
        assert not writer.healthy
        assert writer.problem == f"the local log writer at {tmp_path} restarts after a crash"
    finally:
        await writer.close()


@pytest.fixture
def structlog_restored() -> Iterator[None]:
    """``mlgate log`` sends structlog to the stderr of its process: put it back after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


# -- files that are not segments -------------------------------------------------------


def test_a_stray_log_file_is_ignored_with_a_warning(tmp_path: Path) -> None:
    """A review: ``notes.log`` in the log directory stopped start-up with ``ValueError``."""
    log = LocalLog(tmp_path)
    try:
        log.append([frame(_record("a"))])
    finally:
        log.close()
    (tmp_path / "notes.log").write_bytes(b"not a segment")
    with structlog.testing.capture_logs() as logs:
        reopened = LocalLog(tmp_path)
    try:
        assert reopened.append([frame(_record("b"))]) == 1
    finally:
        reopened.close()
    assert [path.name for path in segments(tmp_path)] == [f"{0:020d}.log"]
    assert _entries(tmp_path) == [(0, "a"), (1, "b")]
    [warning] = [entry for entry in logs if entry["event"] == "local_log_stray_file_ignored"]
    assert warning["file"] == "notes.log"


@pytest.mark.usefixtures("structlog_restored")
def test_log_tail_reads_past_a_stray_log_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "log"
    log = LocalLog(directory)
    try:
        log.append([frame(_record("a"))])
    finally:
        log.close()
    (directory / "backup-old.log").write_bytes(b"")
    assert print_log(str(tmp_path), "tail", argparse.Namespace(n=10)) == 0
    assert '"key":"a"' in capsys.readouterr().out


# -- metrics ---------------------------------------------------------------------------


async def test_records_written_and_failed_count_in_the_records_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: ``mlgate_records{outcome}`` counted only Kafka's records."""
    metrics = Metrics()
    writer = await _started_writer(tmp_path, telemetry=PrometheusTelemetry(metrics))
    try:
        await writer.write([_record("a"), _record("b"), _record("c")])
        _fails_once(monkeypatch, "fsync", errno.EIO)
        with pytest.raises(SinkFailed):
            await writer.write([_record("d"), _record("e")])
    finally:
        await writer.close()

    def records(outcome: str) -> float | None:
        return metrics.registry.get_sample_value("mlgate_records_total", {"outcome": outcome})

    assert records("written") == 3
    assert records("failed") == 2


async def test_the_spill_counts_no_records_of_its_own(tmp_path: Path) -> None:
    """Its sink counts them (failed, spilled, then produced): counted again here they
    were "written" too (a review)."""
    metrics = Metrics()
    writer = await _started_writer(tmp_path, telemetry=PrometheusTelemetry(metrics), spill=True)
    try:
        await writer.write([_record("a"), _record("b")])
    finally:
        await writer.close()
    assert writer.name == "spill"
    assert metrics.registry.get_sample_value("mlgate_records_total", {"outcome": "written"}) is None


@pytest.mark.usefixtures("structlog_restored")
def test_log_cat_reports_damage_on_stderr_keeping_stdout_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "log"
    log = LocalLog(directory)
    try:
        log.append([frame(_record(key)) for key in "abc"])
    finally:
        log.close()
    [segment] = segments(directory)
    data = bytearray(segment.read_bytes())
    data[len(frame(_record("a"))) + 10] ^= 0xFF  # b's payload
    segment.write_bytes(bytes(data))

    assert print_log(str(tmp_path), "cat", argparse.Namespace(from_offset=0)) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["offset"] for line in out.splitlines()] == [0, 2]
    assert "local_log_corrupt_frame_skipped" in err


# -- a write that does not finish (a hung disk) ----------------------------------------


async def test_a_write_that_stalls_makes_the_writer_unhealthy_until_it_ends(
    tmp_path: Path,
) -> None:
    """A review: with the disk hung, ``/ready`` said 200 and nothing was logged. The
    write goes on: its outcome is its records' (the pipeline answers its callers)."""
    writer = await _started_writer(tmp_path / "log", stall_s=0.2)
    assert writer._log is not None and writer.answer_within_s == 0.2
    release = hang_appends(writer)
    try:
        with structlog.testing.capture_logs() as logs:
            writing = asyncio.create_task(writer.write([_record("slow")]))
            await until(lambda: not writer.healthy)
            assert "its disk stalls" in (writer.problem or "")
            assert not writing.done()
            release.set()
            await writing  # landed
            assert writer.healthy
        assert [line["event"] for line in logs] == ["local_log_write_stalled", "local_log_write_finished"]
        assert _entries(tmp_path / "log") == [(0, "slow")]
    finally:
        release.set()
        await writer.close()
