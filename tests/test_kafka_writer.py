"""The writer's vectorised partitioner picks what aiokafka's (the Java client's) picks."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner

from workers.kafka_writer import partitions_for


def test_partitions_match_aiokafkas_default_partitioner() -> None:
    chooser = DefaultPartitioner()
    rng = random.Random(7)
    keys = [rng.randbytes(rng.choice([0, 1, 3, 4, 7, 8, 13, 32, 36])) for _ in range(5000)]
    keys += [f"r-{i}".encode() for i in range(2000)]  # many keys of one length
    for partitions in ([0], [0, 1, 2], list(range(7)), [3, 5, 9, 11]):
        expected = [chooser(key, partitions, partitions) for key in keys]
        assert partitions_for(keys, partitions) == expected


def test_keys_of_the_same_record_id_always_share_a_partition() -> None:
    keys = [b"sensor-1", b"sensor-2"] * 50
    chosen = partitions_for(keys, [0, 1, 2])
    assert len({chosen[i] for i in range(0, 100, 2)}) == 1
    assert len({chosen[i] for i in range(1, 100, 2)}) == 1
