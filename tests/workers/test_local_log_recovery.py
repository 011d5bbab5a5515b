"""Recovery on open: a torn tail is cut off (and kept aside); a damaged frame that
acknowledged frames follow costs that one record, never the ones after it."""

from __future__ import annotations

from pathlib import Path

from mlgate.workers.sinks.local_log import HEADER, LocalLog, LogCursor, frame, read_log, segments
from mlgate.workers.sinks.records import OutboundRecord


def _record(key: str) -> OutboundRecord:
    return OutboundRecord(key=key.encode(), value=b"value", headers=[("source", b"s")])


def _append(directory: Path, keys: list[str]) -> None:
    log = LocalLog(directory)
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
