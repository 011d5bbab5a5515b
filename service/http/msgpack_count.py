"""How many objects a msgpack document holds, counted from its bytes without decoding it.

A JSON body's values are bounded before decoding by counting its commas; msgpack has
no separators, and one byte is a whole object (``0x90``, an empty array), so a 16 MB
body can decode into 16M Python lists (1.3 GB) wherever a schema says ``Any``. The
count walks the type bytes, skipping scalars by their encoded size, and stops as soon
as it passes the limit: a step per object up to the limit, plus the bytes skipped. The
run of float64s, float32s or one-byte objects (fixints, booleans, the empty arrays of
an attack) an array starts with, what tensors are made of, is skipped in C rather than
element by element (``_leading_run``); other encodings (numbers of mixed widths) are
walked one by one, about a microsecond each, up to the limit.
"""

from __future__ import annotations

from typing import NamedTuple

# Type byte -> encoded size, for the scalars of fixed size: nil, false, true, float 32
# and 64, (u)int 8 to 64, fixext 1 to 16.
_FIXED_SIZE = {
    0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9,
    0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9,
    0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18,
}  # fmt: skip
# Type byte -> (bytes of its length, bytes between the length and the data): bin, ext
# (its type byte) and str of 8, 16 and 32-bit lengths.
_SIZED = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),
}  # fmt: skip
# Type byte -> (bytes of its count, objects per counted entry): array and map 16 / 32.
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}
# The bytes that are a whole object alone: fixints, nil, false, true, and the empty
# array and map.
_ONE_BYTE_OBJECTS = bytes([*range(0x00, 0x80), 0x80, 0x90, 0xC0, 0xC2, 0xC3, *range(0xE0, 0x100)])


class ObjectCount(NamedTuple):
    """Scalars (map keys included) and containers (arrays and maps) counted."""

    scalars: int
    containers: int


def count_objects(data: bytes, limit: int) -> ObjectCount:
    """The objects of the msgpack document ``data``, counted until either count passes
    ``limit`` (then at least ``limit + 1``). Malformed or truncated bytes end the count
    where they start: the decoding that follows refuses them."""
    scalars = containers = 0
    pos, pending, end = 0, 1, len(data)
    while pending and pos < end and scalars <= limit and containers <= limit:
        kind = data[pos]
        pending -= 1
        if kind <= 0x7F or kind >= 0xE0 or kind in (0xC0, 0xC2, 0xC3):
            scalars += 1
            pos += 1
        elif 0xA0 <= kind <= 0xBF:  # fixstr
            scalars += 1
            pos += 1 + (kind & 0x1F)
        elif kind in _FIXED_SIZE:
            scalars += 1
            pos += _FIXED_SIZE[kind]
        elif kind in _SIZED:
            width, skip = _SIZED[kind]
            size = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
            scalars += 1
            pos += 1 + width + skip + size
        else:
            if 0x90 <= kind <= 0x9F:
                entries, per_entry, pos = kind & 0x0F, 1, pos + 1
            elif 0x80 <= kind <= 0x8F:
                entries, per_entry, pos = kind & 0x0F, 2, pos + 1
            elif kind in _CONTAINERS:
                width, per_entry = _CONTAINERS[kind]
                entries = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
                pos += 1 + width
            else:
                break  # 0xC1, never used: not msgpack
            containers += 1
            if per_entry == 1 and entries > 1:
                taken, span, empties = _leading_run(data, pos, entries)
                scalars += taken - empties
                containers += empties
                pos += span
                entries -= taken
            pending += entries * per_entry
    return ObjectCount(scalars, containers)


def _leading_run(data: bytes, pos: int, entries: int) -> tuple[int, int, int]:
    """(entries, bytes, empty containers) of the run an array's ``entries`` start with
    at ``pos``: float64s, float32s, or objects of one byte (fixints, nil, booleans,
    empty arrays and maps), read in C a byte a value. It is read in chunks that double
    while they match, so the bytes looked at are at most twice those consumed and a
    few more: an array claiming more entries than follow costs what does follow, and a
    body of such arrays costs its length, not its length times their claims."""
    end = len(data)
    if pos >= end:
        return 0, 0, 0
    first = data[pos]
    if first in (0xCB, 0xCA):
        size, mark = (9, b"\xcb") if first == 0xCB else (5, b"\xca")
        taken, chunk = 0, 16
        while taken < entries:
            want = min(chunk, entries - taken)
            start = pos + taken * size
            marks = data[start : start + want * size : size]
            run = min(len(marks) - len(marks.lstrip(mark)), (end - start) // size)  # whole ones
            taken += run
            if run < want:
                break
            chunk *= 2
        return taken, taken * size, 0
    taken, chunk, empties = 0, 64, 0
    while taken < entries:
        want = min(chunk, entries - taken)
        block = data[pos + taken : pos + taken + want]
        run = len(block) - len(block.lstrip(_ONE_BYTE_OBJECTS))
        if run:
            matched = block[:run]
            empties += matched.count(0x90) + matched.count(0x80)
        taken += run
        if run < want:
            break
        chunk *= 2
    return taken, taken, empties
