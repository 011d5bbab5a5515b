"""Recovery on open: a torn tail is cut off (and kept aside); a damaged frame that
acknowledged frames follow costs that one record, never the ones after it."""

from __future__ import annotations

from functools import partialmethod
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mlgate.workers.sinks.local_log import (
    HEADER,
    LocalLog,
    LogCursor,
    frame,
    read_frames,
    read_log,
    segments,
)
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


def _carrying_a_forged_frame(key: str) -> OutboundRecord:
    """A record whose value holds a whole frame of its own (a client's msgpack value
    can: a review forged one in a metadata string)."""
    forged = frame(OutboundRecord(key=b"FORGED", value=b"x", headers=[]))
    return OutboundRecord(key=key.encode(), value=b"pad" + forged + b"pad", headers=[])


def test_a_cursor_reading_in_chunks_never_takes_a_frame_inside_a_record_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks that cut frames in two, as the 8 MiB chunk does: each cut frame is read
    whole next time, never searched for frames (a review: the search found the forged
    one, skipped acknowledged records and shifted the offsets after)."""
    keys = [f"k-{i}" for i in range(40)]
    log = LocalLog(tmp_path)
    try:
        log.append([frame(_carrying_a_forged_frame(key)) for key in keys])
    finally:
        log.close()
    monkeypatch.setattr(
        LogCursor, "_read_from_position", partialmethod(LogCursor._read_from_position, chunk=97)
    )
    cursor, read = LogCursor(tmp_path, 0), []
    while cursor.offset < len(keys):
        entries = cursor.read(7)
        assert entries, "the cursor stopped short"
        read += entries
    assert [(entry.offset, entry.record.key.decode()) for entry in read] == list(enumerate(keys))


def test_a_torn_tail_holding_a_forged_frame_is_cut_whole(tmp_path: Path) -> None:
    keys = ["a", "b", "c"]
    log = LocalLog(tmp_path)
    try:
        log.append([frame(_carrying_a_forged_frame(key)) for key in keys])
    finally:
        log.close()
    [segment] = segments(tmp_path)
    size = segment.stat().st_size
    with segment.open("r+b") as handle:
        handle.truncate(size - 2)  # the crash tore c's last bytes, past its forged frame
    reopened = LocalLog(tmp_path)
    try:
        assert reopened.next_offset == 2
    finally:
        reopened.close()
    assert _keys(tmp_path) == ["a", "b"]


def test_reading_stops_at_a_frame_cut_short_though_its_bytes_hold_a_frame() -> None:
    whole = frame(_carrying_a_forged_frame("a"))
    data = whole + whole[:-2]  # the second cut by the end of a chunk, or torn
    assert [(end, entry.key) for end, entry in read_frames(data) if entry] == [(len(whole), b"a")]


def test_a_torn_tail_that_cannot_be_kept_aside_on_a_full_disk_is_cut_all_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: after a crash on a full disk, the copy of the torn tail failed and
    the process could not start until room was made by hand."""
    _append(tmp_path, ["a", "b"])
    [segment] = segments(tmp_path)
    with segment.open("ab") as handle:
        handle.write(frame(_record("torn"))[:-3])
    opened = Path.open

    def full_disk(path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if ".dropped-at-" in path.name:
            raise OSError(28, "No space left on device", str(path))
        return opened(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk)
    log = LocalLog(tmp_path)
    try:
        assert log.next_offset == 2
        assert log.append([frame(_record("c"))]) == 2
    finally:
        log.close()
    assert _keys(tmp_path) == ["a", "b", "c"]


def test_a_second_cut_at_the_same_position_keeps_the_first_ones_copy(tmp_path: Path) -> None:
    _append(tmp_path, ["a", "b"])
    [segment] = segments(tmp_path)
    cut_at = segment.stat().st_size
    for torn in ("first", "second"):
        with segment.open("ab") as handle:
            handle.write(frame(_record(torn))[:-3])
        LocalLog(tmp_path).close()  # the crash's tail cut and kept aside
    kept = sorted(path.name for path in tmp_path.glob(f"*.dropped-at-{cut_at}*"))
    assert kept == [f"{segment.name}.dropped-at-{cut_at}", f"{segment.name}.dropped-at-{cut_at}.1"]
    assert b"first" in (tmp_path / kept[0]).read_bytes()
    assert b"second" in (tmp_path / kept[1]).read_bytes()


def test_damaged_frames_side_by_side_keep_their_offsets_and_the_frames_after(
    tmp_path: Path,
) -> None:
    """One bad sector spans several small frames: each bad one's length still leads to
    the next, and on to an intact frame (a review: the second cut every record after)."""
    _append(tmp_path, ["a", "b", "c", "d", "e"])
    [segment] = segments(tmp_path)
    _flip_payload_byte(segment, 1)
    _flip_payload_byte(segment, 2)
    log = LocalLog(tmp_path)
    try:
        assert log.next_offset == 5
    finally:
        log.close()
    assert [(entry.offset, entry.record.key) for entry in read_log(tmp_path)] == [
        (0, b"a"), (3, b"d"), (4, b"e")
    ]


def test_a_cursor_passes_damage_at_the_end_of_a_complete_segment(tmp_path: Path) -> None:
    """Nothing follows the damaged last frame of a segment to count it by, but the next
    segment says where the offsets go on (a review: the cursor, and the spill drainer
    reading with it, stopped there for good)."""
    log = LocalLog(tmp_path, segment_bytes=4 * len(frame(_record("a"))))
    try:
        for key in "abcdefgh":
            log.append([frame(_record(key))])
    finally:
        log.close()
    first, second, *_ = segments(tmp_path)
    last_frame = (int(second.stem) - int(first.stem)) - 1
    _flip_payload_byte(first, last_frame)
    cursor = LogCursor(tmp_path, 0)
    read = [(entry.offset, entry.record.key.decode()) for entry in cursor.read(100)]
    assert read == [(0, "a"), (1, "b"), (2, "c"), (4, "e"), (5, "f"), (6, "g"), (7, "h")]
    assert cursor.offset == 8


def test_a_damaged_length_in_the_last_segment_is_said_with_the_records_it_hides(tmp_path: Path) -> None:
    """A review: a frame length flipped in the last segment stopped every reader there
    as at a frame still being written: 107 acknowledged records after it, said
    nowhere. Intact frames after the stop are damage, logged as such."""
    _append(tmp_path, ["a", "b", "c", "d"])
    [segment] = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    length, _ = HEADER.unpack_from(data, 0)
    second = HEADER.size + length
    data[second] ^= 0x7F  # the high byte of b's length
    segment.write_bytes(bytes(data))
    with capture_logs() as logs:
        read = [entry.record.key for entry in read_log(tmp_path)]
    assert read == [b"a"]
    [damage] = [entry for entry in logs if entry["event"] == "local_log_damaged_segment_end"]
    assert damage["offsets_counted_to"] == 1 and damage["intact_frame_at_byte"] > second


def test_a_frame_still_being_written_at_the_end_is_no_damage(tmp_path: Path) -> None:
    _append(tmp_path, ["a", "b"])
    [segment] = segments(tmp_path)
    data = segment.read_bytes()
    segment.write_bytes(data[:-3])  # b's last bytes not there yet
    with capture_logs() as logs:
        assert [entry.record.key for entry in read_log(tmp_path)] == [b"a"]
    assert not [entry for entry in logs if entry["event"].startswith("local_log_damaged")]
