"""The embedded sink's files: an append-only local log, written and read back.

Layout: ``<data_dir>/log/<first offset, 20 digits>.log`` segments. Each record is one
frame: ``u32 length | u32 crc32(payload) | payload``, the payload being the msgpack
of an ``OutboundRecord`` (key, value, headers). ``LocalLog.append`` writes frames and
fsyncs before it returns (the actor in ``workers.sinks.local_log_writer`` group-commits
through it). On open, the last segment is scanned and a torn tail (a crash mid-write:
a bad frame with nothing intact after it, ``local_log_frames``) is cut off, the cut
bytes kept beside it in ``<segment>.dropped-at-<position>``. A damaged frame that
intact frames follow is not a torn write: it keeps its offset, readers skip it with an
error logged, and the acknowledged frames after it stay. Segments rotate past
``log_segment_bytes``.

A failed append is cut back; if even that fails, or the segment was deleted under the
log (its directory removed), the log is broken: the next append first repairs it (the
cut redone, the directory and a segment made again at the same next offset), and
fails if it cannot, so nothing is acknowledged behind a torn frame or into a deleted
file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import structlog

from mlgate.workers.sinks.local_log_frames import HEADER as HEADER
from mlgate.workers.sinks.local_log_frames import frame as frame
from mlgate.workers.sinks.local_log_frames import intact_frame_after
from mlgate.workers.sinks.local_log_frames import read_frames as read_frames
from mlgate.workers.sinks.records import OutboundRecord

log = structlog.get_logger("mlgate.local_log")

SUFFIX = ".log"
# A segment's name: its first offset, 20 digits, then SUFFIX.
_SEGMENT_NAME = re.compile(r"[0-9]{20}\.log")


def _segment_name(first_offset: int) -> str:
    return f"{first_offset:020d}{SUFFIX}"


def segments(directory: Path) -> list[Path]:
    """The segments, in offset order; other files (``*.log`` or not) are not read."""
    return sorted(path for path in directory.glob(f"*{SUFFIX}") if _SEGMENT_NAME.fullmatch(path.name))


def _warn_of_stray_files(directory: Path) -> None:
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        if not _SEGMENT_NAME.fullmatch(path.name):
            log.warning("local_log_stray_file_ignored", directory=str(directory), file=path.name)


def _unused(path: Path) -> Path:
    """``path``, or ``path.<n>`` for the first n free: a second cut at the same
    position (a crash mid-write at the same spot) keeps the first one's copy."""
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}.{n}"), n + 1
    return candidate


class LogInUse(RuntimeError):
    """Another process writes this log; two writers would corrupt it."""


def _lock_directory(directory: Path) -> IO[bytes]:
    handle = (directory / "LOCK").open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise LogInUse(f"{directory} is in use by another mlgate process") from None
    return handle


@dataclass(frozen=True, slots=True)
class LogEntry:
    offset: int
    record: OutboundRecord


class RepairFailed(OSError):
    """An append found the log broken by an earlier one and could not repair it: none
    of its own frames were written."""


class SegmentDeleted(OSError):
    """The segment written to was unlinked (its directory removed): what was written
    to it is gone with it, though every write and fsync succeeded."""


class LocalLog:
    """The files: appending with fsync, recovery on open, reading back. Not thread-safe."""

    def __init__(self, directory: str | Path, segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_directory(self.directory)
        self.next_offset = 0
        # Damaged frames found on open (their records lost, their offsets kept).
        self.corrupt_frames = 0
        # Where an append that failed must be cut back to, while that cut is not done.
        self._broken: tuple[Path, int] | None = None
        _warn_of_stray_files(self.directory)
        self._recover()
        # Records below it are fsync'd; readers that forward records stop there, since
        # frames past it may still be rolled back (or lost in a crash).
        self.durable_offset = self.next_offset

    def _recover(self) -> None:
        existing = segments(self.directory)
        if not existing:
            self._open_segment(0)
            return
        last = existing[-1]
        base = int(last.stem)
        data = last.read_bytes()
        good_end, count = 0, 0
        for end, record in read_frames(data):
            if record is None:
                self.corrupt_frames += 1
                log.error("local_log_corrupt_frame_skipped", segment=last.name, offset=base + count)
            good_end, count = end, count + 1
        if good_end < len(data):
            # Nothing intact follows: the end of what was being written when the
            # process died. Kept beside the log (never read as part of it), in case.
            kept = _unused(last.with_name(f"{last.name}.dropped-at-{good_end}"))
            try:
                with kept.open("xb") as copy:  # never over an earlier cut's copy
                    copy.write(data[good_end:])
            except OSError as exc:
                # A full disk (the crash may have come of it): the cut needs no room
                # and frees some, and without it the process cannot start at all.
                log.error(
                    "local_log_torn_tail_not_kept",
                    segment=last.name, bytes=len(data) - good_end, error=repr(exc),
                )
                with contextlib.suppress(OSError):
                    kept.unlink()
            else:
                log.warning(
                    "local_log_torn_tail_dropped",
                    segment=last.name, bytes=len(data) - good_end, kept_in=kept.name,
                )
            with last.open("r+b") as handle:
                handle.truncate(good_end)
                handle.flush()
                os.fsync(handle.fileno())
        self.next_offset = base + count
        self._handle = last.open("ab")
        self._size = good_end

    def _open_segment(self, first_offset: int) -> None:
        self._handle = (self.directory / _segment_name(first_offset)).open("ab")
        self._size = 0
        self._fsync_directory()

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, frames: list[bytes]) -> int:
        """Write frames and fsync; returns the offset of the first. Blocking.

        On failure the log is cut back to where it was, so no torn frame ends up in
        front of records a later append acknowledges. Raises ``SegmentDeleted`` (an
        ``OSError``) if the segment was deleted under it.
        """
        if self._broken is not None:
            try:
                self.repair()
            except OSError as exc:
                raise RepairFailed(exc.errno, f"the log could not be repaired: {exc}") from exc
        first = self.next_offset
        mark = (Path(self._handle.name), self._size)
        try:
            for data in frames:
                if self._size >= self.segment_bytes:
                    self._sync_written()
                    self._handle.close()
                    self._open_segment(self.next_offset)
                self._handle.write(data)
                self._size += len(data)
                self.next_offset += 1
            self._sync_written()
        except OSError:
            self._roll_back(*mark, first)
            raise
        self.durable_offset = self.next_offset
        return first

    def roll_at(self, offset: int) -> bool:
        """Start a new segment if the log ends at ``offset`` and the current segment
        holds records: all of them are then below ``offset``, and the segment can be
        deleted (``delete_segments_before``) once they are forwarded. The spill's
        drainer asks for it once everything is forwarded: the current segment was never
        deleted, so a spill that had filled its disk kept it full for good, its offset
        file unwritten, and every restart sent the whole spill again (a review). Its
        one new file is opened before the old one is let go, so a failure changes
        nothing. Blocking; in the writer's thread."""
        if self.next_offset != offset or self._size == 0 or self._broken is not None:
            return False
        handle = (self.directory / _segment_name(offset)).open("ab")
        self._handle, previous = handle, self._handle
        self._size = 0
        previous.close()
        self._fsync_directory()
        return True

    @property
    def broken(self) -> bool:
        """A failed append could not be cut back yet: its frames may be on disk."""
        return self._broken is not None

    def _sync_written(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        if os.fstat(self._handle.fileno()).st_nlink == 0:
            raise SegmentDeleted(errno.ENOENT, f"{self._handle.name} was deleted while written to")

    def _roll_back(self, segment: Path, size: int, next_offset: int) -> None:
        with contextlib.suppress(OSError):
            self._handle.close()
        self.next_offset = next_offset
        self._broken = (segment, size)
        # If this fails too the log stays broken: the next append (or ``repair``)
        # tries again, and nothing is acknowledged behind a torn frame meanwhile.
        with contextlib.suppress(OSError):
            self.repair()

    def repair(self) -> None:
        """Redo the cut of a failed append, making the directory and a segment again if
        they were deleted. Blocking; raises ``OSError`` if it cannot (yet)."""
        if self._broken is None:
            return
        segment, size = self._broken
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            log.error("local_log_directory_recreated", directory=str(self.directory))
        if not self._holds_lock():
            # The directory was made again, by this repair or by another process that
            # took it meanwhile: never cut or write what may be that process's.
            try:
                lock = _lock_directory(self.directory)
            except LogInUse as exc:
                raise OSError(errno.EBUSY, str(exc)) from None
            self._lock.close()
            self._lock = lock
        for path in segments(self.directory):
            if path.name > segment.name:
                path.unlink()
        if segment.exists():
            os.truncate(segment, size)
            handle = segment.open("ab")
            self._size = size
        else:
            # Deleted with what it held: the log goes on at the same offset, never
            # giving a lost record's offset to another.
            handle = (self.directory / _segment_name(self.next_offset)).open("ab")
            self._size = 0
        self._handle = handle
        os.fsync(handle.fileno())
        self._fsync_directory()
        self._broken = None

    def _holds_lock(self) -> bool:
        """Whether the ``LOCK`` file in the directory is the one this log locked."""
        try:
            on_disk = os.stat(self.directory / "LOCK")
        except FileNotFoundError:
            return False
        mine = os.fstat(self._lock.fileno())
        return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        try:
            if not self._handle.closed:
                with self._handle:
                    self._handle.flush()
                    os.fsync(self._handle.fileno())
        finally:
            self._lock.close()  # even when the fsync fails: the log may be opened again

    def read(self, from_offset: int = 0) -> Iterator[LogEntry]:
        yield from read_log(self.directory, from_offset)


def read_log(directory: str | Path, from_offset: int = 0) -> Iterator[LogEntry]:
    """Every intact record at or after ``from_offset``, in order; damage is logged as
    an error where it is met, never stepped over in silence."""
    paths = segments(Path(directory))
    for i, path in enumerate(paths):
        base = int(path.stem)
        following = int(paths[i + 1].stem) if i + 1 < len(paths) else None
        if following is not None and following <= from_offset:
            continue
        data = path.read_bytes()
        offset, read_to = base, 0
        for end, record in read_frames(data):
            read_to = end
            if offset >= from_offset:
                if record is None:
                    log.error("local_log_corrupt_frame_skipped", segment=path.name, offset=offset)
                else:
                    yield LogEntry(offset, record)
            offset += 1
        # The last segment may end in a frame still being written; an earlier one was
        # complete when the next began.
        if following is not None and (read_to < len(data) or offset != following):
            log.error(
                "local_log_damaged_segment_end",
                segment=path.name, unreadable_bytes=len(data) - read_to,
                offsets_counted_to=offset, next_segment_from=following,
            )
        elif following is None and read_to < len(data):
            # Nothing but a frame being written (or torn by a crash) ends it: intact
            # frames after the bytes that stopped the reading are damage, their records
            # unreadable from here (a review: a flipped length hid 107 records, said
            # nowhere).
            intact_at = intact_frame_after(data, read_to)
            if intact_at is not None:
                log.error(
                    "local_log_damaged_segment_end",
                    segment=path.name, unreadable_bytes=len(data) - read_to,
                    offsets_counted_to=offset, intact_frame_at_byte=intact_at,
                )


class LogCursor:
    """Reads a log forward from an offset, keeping its place between reads. Blocking.

    Its segment may be deleted under it once everything in it is forwarded
    (``delete_segments_before``): a read that ended exactly at a segment's end leaves
    the cursor there, and the next read finds ``self.offset`` afresh in the next one.
    """

    def __init__(self, directory: str | Path, offset: int) -> None:
        self._directory = Path(directory)
        self.offset = offset
        self._segment: Path | None = None
        self._position = 0

    def read(self, max_records: int) -> list[LogEntry]:
        entries: list[LogEntry] = []
        # Counted in offsets, damaged frames included: a reader that stops at the
        # durable offset must never read past it.
        limit = self.offset + max_records
        while self.offset < limit:
            if self._segment is None and not self._seek():
                break
            assert self._segment is not None
            try:
                data = self._read_from_position()
            except FileNotFoundError:
                # Every record of it was forwarded and the segment deleted: the
                # records from self.offset on are in a later one.
                self._segment = None
                continue
            consumed = 0
            for end, record in read_frames(data):
                if record is None:
                    log.error(
                        "local_log_corrupt_frame_skipped",
                        segment=self._segment.name, offset=self.offset,
                    )
                else:
                    entries.append(LogEntry(self.offset, record))
                self.offset += 1
                consumed = end
                if self.offset >= limit:
                    break
            self._position += consumed
            if self.offset < limit and not self._advance(limit):
                break
        return entries

    def _read_from_position(self, chunk: int = 8 * 1024 * 1024) -> bytes:
        assert self._segment is not None
        with self._segment.open("rb") as handle:
            handle.seek(self._position)
            data = handle.read(chunk)
            if data and next(read_frames(data), None) is None:
                data += handle.read()  # one frame larger than the chunk
        return data

    def _seek(self) -> bool:
        """Place the cursor on the frame holding ``self.offset``."""
        candidates = [p for p in segments(self._directory) if int(p.stem) <= self.offset]
        if not candidates:
            return False
        segment = candidates[-1]
        offset, position = int(segment.stem), 0
        for end, _ in read_frames(segment.read_bytes()):
            if offset == self.offset:
                break
            offset, position = offset + 1, end
        if offset != self.offset:
            # Not written yet: seek again next time rather than read later frames
            # under the wrong offsets.
            self._segment = None
            return False
        self._segment, self._position = segment, position
        return True

    def _advance(self, limit: int) -> bool:
        """Move to the next segment if the current one is complete and a later one
        exists. A complete segment whose rest cannot be read (damage at its end, which
        nothing follows to count its frames by) ends where the next one begins: those
        offsets are skipped, logged, up to ``limit`` (a review: the cursor stopped
        there for good, and the spill drainer with it, restart after restart)."""
        assert self._segment is not None
        later = [p for p in segments(self._directory) if p.name > self._segment.name]
        if not later:
            return False
        first = int(later[0].stem)
        if first != self.offset:
            if not self.offset < first <= limit or not self._rest_unreadable():
                return False
            log.error(
                "local_log_damaged_segment_end",
                segment=self._segment.name, offsets_skipped=f"{self.offset}-{first - 1}",
            )
            self.offset = first
        self._segment, self._position = later[0], 0
        return True

    def _rest_unreadable(self) -> bool:
        assert self._segment is not None
        with self._segment.open("rb") as handle:
            handle.seek(self._position)
            rest = handle.read()
        return bool(rest) and next(read_frames(rest), None) is None


def delete_segments_before(directory: str | Path, offset: int) -> int:
    """Remove whole segments that hold only offsets below ``offset``; returns how many."""
    paths = segments(Path(directory))
    removed = 0
    for path, following in zip(paths, paths[1:], strict=False):
        if int(following.stem) <= offset:
            path.unlink()
            removed += 1
    return removed
