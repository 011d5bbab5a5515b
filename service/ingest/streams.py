"""Record streams: NDJSON lines or concatenated msgpack maps, decoded one record at a time.

Each yields, per record, the decoded ``Record`` or its ``RecordError`` (a bad record
costs only itself: so does a msgpack map keyed by an array or a map, valid msgpack that
no record can be); a record over ``max_stream_record_bytes`` is 413 and bytes that
are not msgpack at all are 400, as is a stream that ends inside a record. Memory
holds at most one unfinished record's bytes and the chunk after it, whatever the
stream's length: a msgpack record is decoded only once all of it is there, by msgspec
into a ``Record`` (a hostile value is refused at its first wrong element, never built
whole), and no decoded value outlives its record. The route counts
the records against the held-values bound as they come (``routes.ingest``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator

import msgpack
import msgspec
from aiohttp import web

from mlgate.schemas.ingest import (
    Record,
    RecordError,
)
from mlgate.schemas.problem import FieldError
from mlgate.service.http.body import CHUNK, iter_body
from mlgate.service.http.codec import Format
from mlgate.service.http.errors import BadRequest, PayloadTooLarge, ValidationFailed
from mlgate.service.ingest.validation import given_record_id, record_error


def _record_or_error(index: int, decoded: Record | Exception, line: bytes) -> Record | RecordError:
    """A rejected record's error names the id it gave, if valid."""
    if isinstance(decoded, Record):
        return decoded
    return record_error(index, decoded, given_record_id(line, Format.JSON), line, Format.JSON)


_ndjson_record = msgspec.json.Decoder(Record)


# Blank bytes (newlines, spaces, tabs, CRs) an NDJSON stream may send: this many, and
# BLANK_BYTES_PER_RECORD more for each record it sent. No producer pads a stream so,
# and each byte costs a scan (a review: 1 GiB of newlines, 1.6 KB compressed, held a
# core 108 s; another: a record every 15 MiB of blanks took a bound on blanks in a row).
MAX_BLANK_BYTES = 16 * 1024 * 1024
BLANK_BYTES_PER_RECORD = 4096


@functools.lru_cache(maxsize=4)
def _blank_runs(max_line: int) -> re.Pattern[bytes]:
    # Every byte ``bytes.strip`` takes for a blank (a review: lines of \x0c were blank
    # to the loop below and to no bound, a line each in Python).
    return re.compile(rb"\n(?:[ \t\r\x0b\x0c]{0,%d}\n)+" % max_line)


async def ndjson_records(
    request: web.Request, max_line: int, *, sent_as_json: bool = False
) -> AsyncIterator[Record | RecordError]:
    """The records of an NDJSON body, one a line. ``sent_as_json``: the body came as
    ``application/json``, its first line read by ``_first_line_of_json`` (a document
    spread over lines is refused whole)."""
    # Only each new chunk is searched for newlines; the unfinished line is kept as its
    # pieces and joined once, so a line sent in tiny chunks costs linear time.
    pending: list[bytes] = []
    pending_len = index = 0
    too_large = PayloadTooLarge(f"A stream record exceeds the limit of {max_line} bytes")
    blank_runs = _blank_runs(max_line)
    blank = 0  # blank bytes so far (those of runs of blank lines), against the budget
    async for chunk in iter_body(request):
        if not pending and not chunk.strip(b"\n"):
            # Newlines alone, between lines: counted, not scanned (bytes.strip reads a
            # chunk in microseconds, the pattern below in 1.4 ms).
            blank += len(chunk)
            if blank > MAX_BLANK_BYTES + BLANK_BYTES_PER_RECORD * index:
                raise _too_blank()
            continue
        size = len(chunk)
        # Runs of blank lines as one line end, not a line each to look at (a review's
        # 512 MB of newlines took 57 s so, and one record every 64 KB among them too):
        # 22 µs a 64 KB chunk of records, where no run is. A blank line longer than
        # ``max_line`` is left to be refused as any line is, wherever chunks break.
        chunk = blank_runs.sub(b"\n", chunk)
        blank += size - len(chunk)
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if lines and pending:
            lines[0] = b"".join((*pending, lines[0]))
            pending, pending_len = [], 0
        for line in lines:
            if len(line) - line.endswith(b"\r") > max_line:  # CRLF: the CR ends the line
                raise too_large
            if line.strip():
                if sent_as_json and not index:
                    line = _first_line_of_json(line)
                yield _record_or_error(index, _decode_line(line), line)
                index += 1
            else:
                blank += len(line) + 1  # one the pattern left (at a chunk's edge)
        if blank > MAX_BLANK_BYTES + BLANK_BYTES_PER_RECORD * index:
            raise _too_blank()
        if tail:
            pending.append(tail)
            pending_len += len(tail)
            if pending_len > max_line + 1:  # its CR may still come
                raise too_large
    line = b"".join(pending)
    if len(line) - line.endswith(b"\r") > max_line:
        raise too_large
    if line.strip():
        if sent_as_json and not index:
            line = _first_line_of_json(line)
        yield _record_or_error(index, _decode_line(line), line)


def _too_blank() -> BadRequest:
    return BadRequest(
        f"The stream sent more blank bytes (runs of blank lines) than {MAX_BLANK_BYTES} and "
        f"{BLANK_BYTES_PER_RECORD} a record: a stream of records holds a record every few lines"
    )


def _first_line_of_json(line: bytes) -> bytes:
    """The first line of a body sent as ``application/json`` (its byte-order mark
    left out): refused with the whole body (422, nothing written) when it begins an
    array, or opens an object it leaves open at the line's end (``{``, ``{"records": [``:
    a pretty-printed batch), a document spread over lines rather than one record a
    line; cut into lines, some of its lines were records, written (a review). A first
    record that is merely malformed is rejected alone, as in any NDJSON stream."""
    first = line.lstrip()
    if first.startswith(b"\xef\xbb\xbf"):
        first = first[3:].lstrip()
    left_open = first[:1] == b"{" and first.rstrip()[-1:] in (b"{", b"[", b",", b":")
    if first[:1] == b"[" or left_open:
        raise ValidationFailed(
            "The stream's body is a JSON document over several lines (an array, or a "
            "batch), not one record a line (NDJSON): send a batch to /api/v2/ingest",
            errors=[FieldError(loc="body", msg="a JSON document, not one record a line")],
        )
    return first


def _decode_line(line: bytes) -> Record | Exception:
    try:
        record: Record = _ndjson_record.decode(line)
        return record
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        return exc


# msgpack-python's decoding stack: a value nested this deep cannot be decoded.
MSGPACK_MAX_DEPTH = 1023
_msgpack_record = msgspec.msgpack.Decoder(Record)


async def msgpack_records(request: web.Request, max_record: int) -> AsyncIterator[Record | RecordError]:
    """Each record's bytes are found by msgpack-python's ``skip`` (which builds no
    object, so a record cut by a chunk's end holds only its bytes while the stream
    waits: a review saw a half-sent record of a million empty arrays hold 70 MB),
    then decoded by msgspec as the batch route decodes a record: the same errors, the
    timestamp extension alike, and a hostile record refused at its first wrong value
    rather than built whole."""
    scanner = msgpack.Unpacker(max_buffer_size=max_record + CHUNK)
    pending = bytearray()  # the bytes fed and not yet part of a whole record
    base = 0  # the stream position of pending[0]
    index = 0
    too_large = PayloadTooLarge(f"A stream record exceeds the limit of {max_record} bytes")
    try:
        async for chunk in iter_body(request):
            scanner.feed(chunk)
            pending += chunk
            used = 0
            while True:
                try:
                    scanner.skip()
                except msgpack.OutOfData:
                    break
                end = scanner.tell() - base  # right after a whole value: where it ends
                if end - used > max_record:
                    raise too_large
                yield _msgpack_record_or_error(index, bytes(pending[used:end]))
                used = end
                index += 1
            del pending[:used]
            base += used
            if len(pending) > max_record:
                raise too_large
    except msgpack.BufferFull:
        raise too_large from None
    except (msgpack.UnpackException, ValueError) as exc:
        # msgpack records have no boundary to resume from: the stream ends here.
        raise BadRequest(
            f"Stream is not valid msgpack at record {index}: {_unpack_problem(exc)}"
        ) from None
    if pending:
        raise BadRequest(
            f"Stream ends inside msgpack record {index}: the last "
            f"{len(pending)} bytes are not a whole record"
        )


def _msgpack_record_or_error(index: int, raw: bytes) -> Record | RecordError:
    """The record, or its rejection: a stream's framing holds past a record that does
    not decode (invalid UTF-8 in a string, say), as an NDJSON stream's lines do, so
    that costs only the record; a batch, one document, is 400 for it."""
    try:
        return _msgpack_record.decode(raw)
    except msgspec.DecodeError as exc:  # a ValidationError too
        return record_error(index, exc, given_record_id(raw, Format.MSGPACK), raw, Format.MSGPACK)


def _unpack_problem(exc: Exception) -> str:
    """What msgpack-python found wrong, in words: some of its errors have none."""
    if isinstance(exc, msgpack.StackError):
        return f"arrays or maps nested more than {MSGPACK_MAX_DEPTH} deep"
    if isinstance(exc, msgpack.FormatError):
        return "a byte that starts no msgpack value (0xc1)"
    problem = str(exc) or type(exc).__name__
    if "exceeds max_" in problem:
        # An array or map header claiming more entries than a whole record may hold.
        return f"{problem}: more than a stream record's bytes could hold"
    return problem
