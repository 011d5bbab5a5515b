"""``count_objects``: a msgpack document's scalars and containers, counted from its bytes
as the decoding would build them, and no further than the limit."""

from __future__ import annotations

import random
import struct
from typing import Any

import msgspec
import numpy as np
import pytest

from mlgate.service.http.msgpack_count import ObjectCount, count_objects

UNLIMITED = 1 << 40


def decoded_count(value: Any) -> ObjectCount:
    """The objects of a decoded value, map keys counted as scalars."""
    if isinstance(value, list):
        parts = [decoded_count(item) for item in value]
        return ObjectCount(sum(p.scalars for p in parts), 1 + sum(p.containers for p in parts))
    if isinstance(value, dict):
        parts = [decoded_count(item) for pair in value.items() for item in pair]
        return ObjectCount(sum(p.scalars for p in parts), 1 + sum(p.containers for p in parts))
    return ObjectCount(1, 0)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 4 else 9)
    scalars: list[Any] = [
        None, True, rng.randrange(-32, 128), rng.randrange(-(2**63), 2**64),
        rng.random(), "x" * rng.randrange(0, 300), b"\x00" * rng.choice([0, 5, 300, 70_000]),
        -rng.randrange(2**31), msgspec.msgpack.Ext(1, b"e" * rng.choice([1, 2, 4, 8, 16, 3])),
    ]  # fmt: skip
    if kind < 9:
        return scalars[kind]
    if kind == 9:
        return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randrange(0, 20))}
    if depth == 0 and rng.random() < 0.3:  # one long array (array32) of scalars
        return [random_value(rng, 4) for _ in range(70_000)]
    return [random_value(rng, depth + 1) for _ in range(rng.choice([0, 1, 3, 15, 16, 40]))]


@pytest.mark.parametrize("seed", range(20))
def test_the_count_is_the_objects_the_decoding_builds(seed: int) -> None:
    value = random_value(random.Random(seed))
    data = msgspec.msgpack.encode(value)
    assert count_objects(data, UNLIMITED) == decoded_count(msgspec.msgpack.decode(data))


@pytest.mark.parametrize(
    "values",
    [
        [0.5] * 1000,  # float64
        np.full(1000, 0.5, dtype=np.float32).tolist(),
        list(range(-32, 100)) * 10,  # one-byte integers
        [[0.25] * 128] * 64,  # rows
        [1.5, 2, "a", None, [], {}, 3.5],
    ],
)
def test_uniform_arrays_count_as_their_elements(values: list[Any]) -> None:
    data = msgspec.msgpack.encode(values)
    assert count_objects(data, UNLIMITED) == decoded_count(values)


def test_float32_values_count_as_their_elements() -> None:
    data = b"\xdc" + struct.pack(">H", 500) + b"\xca\x3f\x80\x00\x00" * 500
    assert count_objects(data, UNLIMITED) == ObjectCount(500, 1)


def test_a_body_of_empty_arrays_stops_past_the_limit() -> None:
    entries = 16_000_000
    data = b"\xdd" + struct.pack(">I", entries) + b"\x90" * entries
    counted = count_objects(data, 1000)
    assert counted.containers > 1000 and counted.scalars == 0


def test_a_body_of_mixed_small_objects_stops_just_past_the_limit() -> None:
    """No run of one kind to skip whole: counted one by one, and no further."""
    entries = 1_000_000
    data = b"\xdd" + struct.pack(">I", entries) + b"\x90\xcc\x01" * (entries // 2)
    counted = count_objects(data, 1000)
    assert max(counted) == 1001


def test_a_body_of_nested_empty_maps_stops_past_the_limit() -> None:
    data = b"\x91" * 5000 + b"\x80"
    assert count_objects(data, 100).containers == 101


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\x9f", b"\xcb\x00", b"\x92\xcb"],
)
def test_malformed_or_truncated_bytes_end_the_count_without_error(data: bytes) -> None:
    counted = count_objects(data, 1000)
    assert counted.scalars <= 1 and counted.containers <= 1


class ReadCounting(bytes):
    """Bytes that count how many bytes slices of them copy: the counter's work."""

    copied = 0

    def __getitem__(self, key: Any) -> Any:
        item = super().__getitem__(key)
        if isinstance(key, slice):
            ReadCounting.copied += len(item)
        return item


@pytest.mark.parametrize(
    "attack",
    [
        b"\xdd\x00\xff\xff\xff" * 20_000,  # arrays claiming 16M entries, nested
        b"\xdc\xff\xff\x00" * 25_000,  # arrays claiming 65535, each starting a run
        (b"\xdd\x00\xff\xff\xff\xcb" + b"\x00" * 8) * 7_000,  # claiming 16M float64s, holding 1
    ],
)
def test_arrays_claiming_more_than_follows_cost_what_follows(attack: bytes) -> None:
    """Not what they claim, over and over: the bytes copied stay within a multiple of
    the body (twice what is consumed, and a first look of 64 bytes an array) whatever
    the claims; they were the body times the headers, gigabytes here."""
    ReadCounting.copied = 0
    count_objects(ReadCounting(attack), 1 << 30)
    assert ReadCounting.copied <= 32 * len(attack)
