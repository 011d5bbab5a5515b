"""Tracking ids and dedup claim tokens: unique without a system call per id."""

from mlgate.service.ingest.ids import UniqueIds


def test_ids_are_32_hex_digits_and_never_repeat_within_a_process() -> None:
    new_id = UniqueIds()
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_two_makers_draw_different_prefixes_so_processes_do_not_collide() -> None:
    first, second = UniqueIds(), UniqueIds()
    assert first()[:16] != second()[:16]
