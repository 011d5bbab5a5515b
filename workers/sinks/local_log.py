"""The embedded sink's files: an append-only local log, written and read back.

Layout: ``<data_dir>/log/<first offset, 20 digits>.log`` segments. Each record is one
frame: ``u32 length | u32 crc32(payload) | payload``, the payload being the msgpack
of an ``OutboundRecord`` (key, value, headers). ``LocalLog.append`` writes frames and
fsyncs before it returns (the actor in ``workers.sinks.local_log_writer`` group-commits
through it). On open, the last segment is scanned and a torn tail (a crash mid-write:
a bad frame with nothing intact after it) is cut off, the cut bytes kept beside it in
``<segment>.dropped-at-<position>``. A damaged frame that intact frames follow is not
a torn write: it keeps its offset, readers skip it with an error logged, and the
acknowledged frames after it stay. Segments rotate past ``log_segment_bytes``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import msgspec
import structlog

from mlgate.workers.sinks.records import OutboundRecord

log = structlog.get_logger("mlgate.local_log")

HEADER = struct.Struct(">II")
SUFFIX = ".log"
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(OutboundRecord).decode


def frame(record: OutboundRecord) -> bytes:
    payload = _encode(record)
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _segment_name(first_offset: int) -> str:
    return f"{first_offset:020d}{SUFFIX}"


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SUFFIX}"))


def _frame_at(data: bytes, position: int) -> tuple[int, OutboundRecord | None]:
    """(end, record) of the frame at ``position``: record None if its payload is cut
    short, fails its checksum or does not decode; end -1 if even its header is cut."""
    if position + HEADER.size > len(data):
        return -1, None
    length, checksum = HEADER.unpack_from(data, position)
    start = position + HEADER.size
    payload = data[start : start + length]
    if len(payload) < length or zlib.crc32(payload) != checksum:
        return start + length, None
    try:
        return start + length, _decode(payload)
    except msgspec.MsgspecError:
        return start + length, None


def read_frames(data: bytes) -> Iterator[tuple[int, OutboundRecord | None]]:
    """(end position, record) for each frame, in order.

    A bad frame (checksum or decoding) whose length still leads to an intact frame was
    damaged after it was written, since frames are fsync'd before they are
    acknowledged: it keeps its offset, with record None, and reading goes on. A bad
    frame with nothing intact right after it is a torn tail (a crash mid-write): reading
    stops there.
    """
    position = 0
    while True:
        end, record = _frame_at(data, position)
        if end < 0:
            return
        if record is None and (end > len(data) or _frame_at(data, end)[1] is None):
            return
        position = end
        yield position, record


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
            # Kept beside the log (never read as part of it), in case what is cut off
            # was more than a torn write.
            kept = last.with_name(f"{last.name}.dropped-at-{good_end}")
            kept.write_bytes(data[good_end:])
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
        front of records a later append acknowledges.
        """
        first = self.next_offset
        mark = (Path(self._handle.name), self._size)
        try:
            for data in frames:
                if self._size >= self.segment_bytes:
                    self._handle.flush()
                    os.fsync(self._handle.fileno())
                    self._handle.close()
                    self._open_segment(self.next_offset)
                self._handle.write(data)
                self._size += len(data)
                self.next_offset += 1
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError:
            self._roll_back(*mark, first)
            raise
        self.durable_offset = self.next_offset
        return first

    def _roll_back(self, segment: Path, size: int, next_offset: int) -> None:
        with contextlib.suppress(OSError):
            self._handle.close()
        for path in segments(self.directory):
            if path.name > segment.name:
                path.unlink()
        # If this fails too the handle stays closed: the next append raises, the
        # writer stops, and nothing is ever acknowledged behind a torn frame.
        os.truncate(segment, size)
        self._size, self.next_offset = size, next_offset
        self._handle = segment.open("ab")
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
        self._lock.close()

    def read(self, from_offset: int = 0) -> Iterator[LogEntry]:
        yield from read_log(self.directory, from_offset)


def read_log(directory: str | Path, from_offset: int = 0) -> Iterator[LogEntry]:
    """Every intact record at or after ``from_offset``, in order."""
    paths = segments(Path(directory))
    for i, path in enumerate(paths):
        base = int(path.stem)
        following = int(paths[i + 1].stem) if i + 1 < len(paths) else None
        if following is not None and following <= from_offset:
            continue
        offset = base
        for _, record in read_frames(path.read_bytes()):
            if offset >= from_offset:
                if record is None:
                    log.error("local_log_corrupt_frame_skipped", segment=path.name, offset=offset)
                else:
                    yield LogEntry(offset, record)
            offset += 1


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
            if self.offset < limit and not self._advance():
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

    def _advance(self) -> bool:
        """Move to the next segment if the current one is complete and a later one exists."""
        assert self._segment is not None
        later = [p for p in segments(self._directory) if p.name > self._segment.name]
        if not later or int(later[0].stem) != self.offset:
            return False
        self._segment, self._position = later[0], 0
        return True


def delete_segments_before(directory: str | Path, offset: int) -> int:
    """Remove whole segments that hold only offsets below ``offset``; returns how many."""
    paths = segments(Path(directory))
    removed = 0
    for path, following in zip(paths, paths[1:], strict=False):
        if int(following.stem) <= offset:
            path.unlink()
            removed += 1
    return removed
