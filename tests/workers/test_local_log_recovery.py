"""Recovery on open: a torn tail is cut off (and kept aside); a damaged frame that
acknowledged frames follow costs that one record, never the ones after it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog.testing

from mlgate.workers.sinks.local_log import HEADER, LocalLog, LogCursor, frame, read_log, segments
from mlgate.workers.sinks.records import OutboundRecord


def _record(key: str) -> OutboundRecord:
    return OutboundRecord(key=key.encode(), value=b"value", headers=[("source", b"s")])


def _append(directory: Path, keys: list[str], **kwargs: Any) -> None:
    log = LocalLog(directory, **kwargs)
    try:
        log.append([frame(_record(key)) for key in keys])
    finally:
        log.close()


def _keys(directory: Path) -> list[str]:
    return [entry.record.key.decode() for entry in read_log(directory)]


def _flip_payload_byte(segment: Path, frame_index: int) -> None:
    data = bytearray(segment.read_bytes())
    data[frame_index * len(frame(_record("a"))) + HEADER.size + 2] ^= 0xFF
    segment.write_bytes(bytes(data))


def test_a_damaged_frame_mid_segment_does_not_drop_the_acknowledged_frames_after_it(
    tmp_path: Path,
) -> None:
    _append(tmp_path, ["a", "b", "c", "d"])
    [segment] = segments(tmp_path)
    size = segment.stat().st_size
    _flip_payload_byte(segment, 1)  # bit rot in b, after all four were acknowledged

    log = LocalLog(tmp_path)
    try:
        assert log.corrupt_frames == 1
        assert log.next_offset == 4  # b keeps its offset: c and d keep theirs
        assert segment.stat().st_size == size  # nothing cut off
        assert log.append([frame(_record("e"))]) == 4
    finally:
        log.close()
    assert [(e.offset, e.record.key) for e in read_log(tmp_path)] == [
        (0, b"a"), (2, b"c"), (3, b"d"), (4, b"e"),
    ]


def test_a_cursor_steps_over_a_damaged_frame_counting_its_offset(tmp_path: Path) -> None:
    _append(tmp_path, ["a", "b", "c", "d"])
    [segment] = segments(tmp_path)
    _flip_payload_byte(segment, 1)
    cursor = LogCursor(tmp_path, 0)
    assert [e.offset for e in cursor.read(2)] == [0]  # two offsets read: a, and b lost
    assert cursor.offset == 2
    assert [e.record.key for e in cursor.read(10)] == [b"c", b"d"]


def test_a_damaged_last_frame_is_a_torn_tail_cut_off_and_kept_aside(tmp_path: Path) -> None:
    _append(tmp_path, ["a", "b", "c"])
    [segment] = segments(tmp_path)
    size = segment.stat().st_size
    _flip_payload_byte(segment, 2)

    log = LocalLog(tmp_path)
    try:
        assert log.next_offset == 2
    finally:
        log.close()
    cut = size - len(frame(_record("c")))
    assert segment.stat().st_size == cut
    [kept] = tmp_path.glob(f"{segment.name}.dropped-at-*")
    assert kept.name == f"{segment.name}.dropped-at-{cut}"
    assert len(kept.read_bytes()) == size - cut  # the damaged c, for an operator to look at
    assert _keys(tmp_path) == ["a", "b"]


def _frame_start(segment: Path, frame_index: int) -> int:
    data = segment.read_bytes()
    position = 0
    for _ in range(frame_index):
        length, _checksum = HEADER.unpack_from(data, position)
        position += HEADER.size + length
    return position


def _flip_length_bit(segment: Path, frame_index: int, mask: int) -> None:
    data = bytearray(segment.read_bytes())
    data[_frame_start(segment, frame_index) + 3] ^= mask  # the length's low byte
    segment.write_bytes(bytes(data))


def test_a_damaged_length_is_not_a_torn_tail_and_the_frames_after_it_stay(tmp_path: Path) -> None:
    """A review: one flipped bit in a length moved every later acknowledged frame into
    ``dropped-at-N``, and the next appends were given their offsets."""
    _append(tmp_path, ["a", "b", "c", "d", "e"])
    [segment] = segments(tmp_path)
    size = segment.stat().st_size
    _flip_length_bit(segment, 1, 0x10)  # b's length now lands inside c

    log = LocalLog(tmp_path)
    try:
        assert log.next_offset == 5
        assert segment.stat().st_size == size
        assert log.append([frame(_record("f"))]) == 5
    finally:
        log.close()
    assert list(tmp_path.glob("*.dropped-at-*")) == []
    assert [(e.offset, e.record.key) for e in read_log(tmp_path)] == [
        (0, b"a"), (1, b"b"), (2, b"c"), (3, b"d"), (4, b"e"), (5, b"f"),
    ]  # b's checksum still matches its bytes: only its length was wrong


def test_two_neighbouring_damaged_frames_keep_their_offsets_and_the_frames_after(
    tmp_path: Path,
) -> None:
    """A review: two adjacent frames with damaged payloads cut the log from 100 records
    to 5."""
    _append(tmp_path, ["a", "b", "c", "d", "e", "f"])
    [segment] = segments(tmp_path)
    _flip_payload_byte(segment, 1)
    _flip_payload_byte(segment, 2)

    log = LocalLog(tmp_path)
    try:
        assert log.corrupt_frames == 2
        assert log.next_offset == 6
    finally:
        log.close()
    assert list(tmp_path.glob("*.dropped-at-*")) == []
    assert [(e.offset, e.record.key) for e in read_log(tmp_path)] == [
        (0, b"a"), (3, b"d"), (4, b"e"), (5, b"f"),
    ]


def test_a_frame_damaged_in_length_and_payload_costs_one_offset(tmp_path: Path) -> None:
    _append(tmp_path, ["a", "b", "c", "d"])
    [segment] = segments(tmp_path)
    _flip_payload_byte(segment, 1)
    _flip_length_bit(segment, 1, 0x40)

    log = LocalLog(tmp_path)
    try:
        assert log.next_offset == 4
    finally:
        log.close()
    assert [(e.offset, e.record.key) for e in read_log(tmp_path)] == [(0, b"a"), (2, b"c"), (3, b"d")]


def test_reading_steps_over_a_damaged_length_in_an_earlier_segment_keeping_offsets(
    tmp_path: Path,
) -> None:
    """A review: ``mlgate log cat`` dropped, unreported, every record of a segment after
    a damaged length (offsets jumped to the next segment's)."""
    keys = [f"k{i:03d}" for i in range(60)]
    _append(tmp_path, keys, segment_bytes=500)
    first = segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    data[_frame_start(first, 2)] ^= 0x01  # length now far past the segment's end
    first.write_bytes(bytes(data))

    entries = list(read_log(tmp_path))
    assert [e.record.key.decode() for e in entries] == keys
    assert [e.offset for e in entries] == list(range(60))
    cursor = LogCursor(tmp_path, 0)
    assert [e.offset for e in cursor.read(100)] == list(range(60))


def test_damage_at_the_end_of_an_earlier_segment_is_reported_not_skipped_in_silence(
    tmp_path: Path,
) -> None:
    _append(tmp_path, [f"k{i:03d}" for i in range(30)], segment_bytes=500)
    first, second = segments(tmp_path)[:2]
    data = first.read_bytes()
    first.write_bytes(data[:-3])  # the last frame of a complete segment, cut short

    with structlog.testing.capture_logs() as logs:
        offsets = [e.offset for e in read_log(tmp_path)]
    last = int(second.stem) - 1
    assert last not in offsets and offsets == [o for o in range(30) if o != last]
    [damage] = [entry for entry in logs if entry["event"] == "local_log_damaged_segment_end"]
    assert damage["segment"] == first.name
    assert damage["offsets_counted_to"] == last and damage["next_segment_from"] == last + 1


def test_recovery_of_a_large_damaged_segment_stays_quick(tmp_path: Path) -> None:
    _append(tmp_path, [f"k{i:06d}" for i in range(50_000)])
    [segment] = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    for index in (10, 20_000, 40_000):
        data[_frame_start(segment, index) + 1] ^= 0x7F  # lengths of megabytes
    segment.write_bytes(bytes(data))

    started = time.monotonic()
    log = LocalLog(tmp_path)
    try:
        assert log.next_offset == 50_000
    finally:
        log.close()
    assert time.monotonic() - started < 5.0
