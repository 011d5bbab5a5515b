"""Content negotiation: JSON or msgpack bodies in, JSON or msgpack answers out.

Decoding maps msgspec's errors onto the contract: undecodable bytes are 400,
schema violations of a well-formed body 422 with the failing location, unknown media
types 415. msgspec stops at the first problem it meets, so a schema error can come
before a syntax error further on (``{"source": "x", "records": [ not json`` against a
type without ``source``); only then, once the typed decoding has failed, is the body
checked for well-formedness (``syntax_error``), so valid bodies pay nothing for it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any, TypeVar

import msgspec
import numpy as np
import simdjson
from aiohttp import web

from mlgate.schemas.problem import FieldError
from mlgate.service.http.errors import ApiError, BadRequest, UnsupportedMediaType, ValidationFailed

T = TypeVar("T")


class Format(Enum):
    JSON = "application/json"
    MSGPACK = "application/msgpack"


MEDIA_TYPES: dict[str, Format] = {
    "application/json": Format.JSON,
    "application/msgpack": Format.MSGPACK,
    "application/x-msgpack": Format.MSGPACK,
    "application/vnd.msgpack": Format.MSGPACK,
}
PROBLEM_JSON = "application/problem+json"



class NonFinite:
    """A NaN or infinite number in an answer, written as Triton writes it: JSON's
    ``NaN``, ``Infinity``, ``-Infinity`` (rapidjson's ``kWriteNanAndInfFlag``, read by
    Python's ``json`` and so by tritonclient), a float in msgpack. msgspec alone
    writes ``null``, which a client reads as a missing value."""

    __slots__ = ("value",)

    def __init__(self, value: float) -> None:
        self.value = value


_NON_FINITE_JSON = {
    "nan": msgspec.Raw(b"NaN"),
    "inf": msgspec.Raw(b"Infinity"),
    "-inf": msgspec.Raw(b"-Infinity"),
}


def marked_non_finite(obj: Any) -> Any:
    """``obj`` (decoded msgpack: lists, maps, scalars) with each NaN or infinite float
    as ``NonFinite``, so that it is written as JSON the way it first was."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else NonFinite(obj)
    if isinstance(obj, list):
        return [marked_non_finite(item) for item in obj]
    if isinstance(obj, dict):
        return {key: marked_non_finite(item) for key, item in obj.items()}
    return obj


def _json_hook(obj: Any) -> Any:
    if isinstance(obj, NonFinite):
        return _NON_FINITE_JSON[str(obj.value)]
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _msgpack_hook(obj: Any) -> Any:
    if isinstance(obj, NonFinite):
        return obj.value
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


json_encoder = msgspec.json.Encoder(enc_hook=_json_hook)
_msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=_msgpack_hook)
_LOCATION = re.compile(r" - at `\$\.?(.*)`$")
# msgspec's word for a mapping's key that fails: "... - at `key` in `$.metadata`".
_KEY_LOCATION = re.compile(r" - at `key` in `\$\.?(.*)`$")
_MISSING_FIELD = re.compile(r"missing required field `(\w+)`")


def media_type(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` header value, its parameters dropped
    unread: aiohttp's ``request.content_type`` parses every parameter, 0.1 s for a
    header of 1,600 of them, each new one parsed again (a review)."""
    return (content_type or "").partition(";")[0].strip().lower()


def media_format(content_type: str | None) -> Format | None:
    """The format a ``Content-Type`` header value names (its media type, parameters
    dropped), or None for another one or none."""
    return MEDIA_TYPES.get(media_type(content_type))


def request_format(request: web.Request, default: Format | None = Format.JSON) -> Format:
    """The format of the request body, from its Content-Type; 415 if unsupported."""
    named = media_type(request.headers.get("Content-Type"))
    if not named:
        if default is None:
            raise UnsupportedMediaType("Content-Type is required")
        return default
    fmt = MEDIA_TYPES.get(named)
    if fmt is None:
        raise UnsupportedMediaType(
            f"Content-Type {named[:100]!r} is not supported; use application/json or application/msgpack"
        )
    return fmt


def response_format(request: web.Request) -> Format:
    """JSON unless the Accept header prefers msgpack."""
    return preferred_format(request.headers.get("Accept"))


def preferred_format(accept: str | None) -> Format:
    """JSON unless this Accept header value prefers msgpack."""
    if not accept:
        return Format.JSON
    accept = accept.lower()  # media types and parameter names are case-insensitive
    if "msgpack" not in accept:
        return Format.JSON
    best_json, best_msgpack = 0.0, 0.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        fmt = MEDIA_TYPES.get(media)
        if fmt is Format.MSGPACK:
            best_msgpack = max(best_msgpack, q)
        elif fmt is Format.JSON or media in ("*/*", "application/*", PROBLEM_JSON):
            best_json = max(best_json, q * (0.99 if media.endswith("*") else 1.0))
    return Format.MSGPACK if best_msgpack > best_json else Format.JSON


# The most of a schema error's text an answer repeats: msgspec's messages quote what the
# client sent (an unknown field's name, in full), and a stream's thousand errors of 1 MiB
# names made a 1.2 GB answer (a review).
MAX_MESSAGE_CHARS = 512


def schema_message(error: msgspec.ValidationError) -> str:
    """msgspec's message, at most ``MAX_MESSAGE_CHARS``: a longer one keeps its start
    and its end (the location) around a mark of what was left out."""
    return bounded(str(error))


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    if len(text) <= limit:
        return text
    mark = f"…[{len(text) - limit} characters left out]…"
    keep = (limit - len(mark)) // 2
    return f"{text[:keep]}{mark}{text[len(text) - keep:]}"


def location(error: msgspec.ValidationError) -> tuple[str, str]:
    """Split msgspec's message into (location, message), e.g. ("records[3].features", ...).

    A missing field is located at the field itself (``source``, not the object holding it).
    """
    text = schema_message(error)
    key = _KEY_LOCATION.search(text)
    if key is not None:
        return key.group(1), f"a key: {text[: key.start()]}"
    match = _LOCATION.search(text)
    loc, msg = ("", text) if match is None else (match.group(1), text[: match.start()])
    missing = _MISSING_FIELD.search(msg)
    if missing is not None:
        loc = f"{loc}.{missing.group(1)}" if loc else missing.group(1)
    return loc, msg


def decode(body: bytes, type_: type[T], fmt: Format) -> T:
    """``body`` as ``type_``: 400 when it is not JSON / msgpack at all, else 422 when it
    does not fit the schema."""
    try:
        if fmt is Format.MSGPACK:
            return msgspec.msgpack.decode(body, type=type_)
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise schema_error(exc, body, fmt) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise undecodable(exc, fmt) from None


# The literals Triton's JSON parser (rapidjson's ``kParseNanAndInfFlag``) reads as numbers.
_NON_FINITE_LITERAL = re.compile(rb"-?(?:NaN|Infinity)")


def decode_json_non_finite(body: bytes, type_: type[T]) -> T:
    """``decode`` of a JSON body that reads ``NaN``, ``Infinity`` and ``-Infinity`` as
    numbers, as Triton does in the Open Inference Protocol's tensors (tritonclient writes
    them so). msgspec refuses them: only a body it refuses that holds one is read again,
    by the standard library's parser, which takes them; but first msgspec checks it
    with each literal read as ``0``, so that what it refuses otherwise (a number out of
    range, a lone surrogate) is refused as in any body (a review: beside a NaN, ``1e400``
    was read as infinity and a lone surrogate reached the model)."""
    try:
        return decode(body, type_, Format.JSON)
    except BadRequest as refused:
        if _NON_FINITE_LITERAL.search(body) is None:
            raise
        decode(_NON_FINITE_LITERAL.sub(b"0", body), type_, Format.JSON)
        try:
            tree = json.loads(body)
        except (ValueError, RecursionError):
            raise refused from None
    try:
        return msgspec.convert(tree, type_)
    except msgspec.ValidationError as exc:
        loc, msg = location(exc)
        raise ValidationFailed(
            schema_message(exc), errors=[FieldError(loc=loc or "body", msg=msg)]
        ) from None


def schema_error(exc: msgspec.ValidationError, body: bytes, fmt: Format) -> ApiError:
    """The answer to a typed decoding's ``ValidationError``: 422 with its location when
    the body is well-formed, 400 when it is not (the schema error came first)."""
    syntax = syntax_error(body, fmt)
    if syntax is not None:
        return undecodable(syntax, fmt)
    loc, msg = location(exc)
    return ValidationFailed(schema_message(exc), errors=[FieldError(loc=loc or "body", msg=msg)])


def undecodable(exc: Exception, fmt: Format) -> BadRequest:
    if isinstance(exc, RecursionError):
        return BadRequest("Body is nested too deeply")
    return BadRequest(f"Body is not valid {fmt.name.lower()}: {exc}")


def syntax_error(body: bytes, fmt: Format) -> Exception | None:
    """Why ``body`` is not JSON / msgpack at all, or None when it is well-formed.

    Decoded as ``msgspec.Raw``, which walks the whole document (and rejects trailing
    bytes) without building any object: a few ms for 16 MB where an untyped decoding
    would allocate every value. The walk skips strings without checking their UTF-8,
    which JSON requires throughout, so that is checked on the bytes. Well-formed by
    this test but refused by a typed decoding, and so 422: a JSON number out of any
    float's range or a malformed msgpack timestamp. A msgpack str that is not UTF-8
    passes this walk, but msgspec's typed decoding refuses it as malformed (not as a
    schema error), so such a body is 400 too."""
    try:
        if fmt is Format.MSGPACK:
            msgspec.msgpack.decode(body, type=msgspec.Raw)
        else:
            msgspec.json.decode(body, type=msgspec.Raw)
            if not body.isascii():
                body.decode()
    except (msgspec.DecodeError, RecursionError) as exc:
        return exc
    except UnicodeDecodeError as exc:
        return msgspec.DecodeError(f"JSON is malformed: invalid UTF-8 (byte {exc.start})")
    return None


def encode(obj: Any, fmt: Format) -> bytes:
    if fmt is Format.MSGPACK:
        return _msgpack_encoder.encode(obj)
    return json_encoder.encode(obj)


def respond(
    request: web.Request,
    obj: Any,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    fmt = response_format(request)
    return web.Response(
        body=encode(obj, fmt), status=status, headers=headers, content_type=fmt.value
    )


# What simdjson raises for numbers it does not take where msgspec may: a string, null,
# true, 1e400 (ValueError, TypeError), an integer below -2**63 (RuntimeError:
# BIGINT_ERROR; msgspec takes it as a float). Its callers then decode with msgspec.
SIMDJSON_REFUSALS = (ValueError, TypeError, RuntimeError)


def json_outline(
    body: bytes,
    read: Callable[[Any], T],
    refused: Callable[[bytes], T | None],
    *,
    non_finite: bool = False,
) -> T | None:
    """``read`` of the JSON document ``body``, as simdjson parses it: its arrays' and
    objects' lengths read before msgspec builds them, which it does whole before
    checking a schema's ``max_length`` (a review: 5M empty records in 15 MB held the
    loop a second and took 250 MB before their 422). The parse is C++, about 5 ms a
    MB whatever the body holds, with a parser of its own (whose buffers go with it).

    400 for a body that is no JSON at all. What simdjson refuses and msgspec takes (a
    number past 64 bits or a float's range; with ``non_finite``, the OIP's ``NaN`` and
    ``Infinity``) is outlined by ``refused`` from its bytes instead (a review: one such
    number let 5M records through to msgspec). None for a body that starts with a
    byte-order mark, which simdjson takes and msgspec refuses at its first byte (its
    400 comes at once)."""
    if body[:3] == _BOM:
        return None
    parser = simdjson.Parser()
    try:
        document = parser.parse(body)
    except SIMDJSON_REFUSALS as exc:
        raise_parser_misuse(exc)
        if not non_finite:
            error = syntax_error(body, Format.JSON)
            if error is not None:
                raise undecodable(error, Format.JSON) from None
        return refused(body)
    try:
        return read(document)
    finally:
        del document


_BOM = b"\xef\xbb\xbf"
# No object of our requests has more members than this (a batch has 2, an infer
# request 4, a tensor 5): ``outline_refusal`` reads no further into one that has.
MAX_OUTLINED_MEMBERS = 64


def outline_refusal(obj: simdjson.Object) -> str | None:
    """Why the simdjson object ``obj`` cannot be outlined by its keys: more members
    than ``MAX_OUTLINED_MEMBERS``, or a key given twice. simdjson reads the first of
    two, msgspec builds both and keeps the last (a review: the outline read an empty
    first ``records`` and 5M records came after it)."""
    if len(obj) > MAX_OUTLINED_MEMBERS:
        return f"an object of {len(obj)} members, more than any of this request's may hold"
    keys = list(obj)
    twice = sorted({key for key in keys if keys.count(key) > 1})
    return f"the key {twice[0]!r} given twice: which one was meant?" if twice else None


_SCAN_CHUNK = 1 << 20


def outside_strings(text: bytes) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """JSON ``text`` read from its bytes, chunk by chunk (memory a few times a chunk,
    whatever its length): each chunk's bytes, which of them lie outside strings, and
    the nesting depth at each (``[`` and ``{`` count from 1). Escaped backslashes and
    quotes are taken out first, so every quote left opens or closes a string."""
    plain = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    data = np.frombuffer(plain, dtype=np.uint8)
    in_string, depth = 0, 0
    for start in range(0, len(data), _SCAN_CHUNK):
        chunk = data[start : start + _SCAN_CHUNK]
        quotes = chunk == _QUOTE
        # A uint8 sum wraps at 256: its parity still says inside or out.
        parity = (np.cumsum(quotes, dtype=np.uint8) + in_string) & 1
        outside = (parity == 0) & ~quotes
        steps = np.zeros(len(chunk), dtype=np.int32)
        steps[outside & ((chunk == _OPEN_ARRAY) | (chunk == _OPEN_OBJECT))] = 1
        steps[outside & ((chunk == _CLOSE_ARRAY) | (chunk == _CLOSE_OBJECT))] = -1
        depths = np.cumsum(steps, dtype=np.int32) + depth
        yield chunk, outside, depths
        in_string, depth = int(parity[-1]), int(depths[-1])


_QUOTE, _OPEN_ARRAY, _CLOSE_ARRAY, _OPEN_OBJECT, _CLOSE_OBJECT, _COMMA, _COLON = b'"[]{},:'


def top_level_length(text: bytes) -> int:
    """How many elements (or members) the JSON array (or object) ``text`` holds, from
    its bytes (``outside_strings``): its commas at depth 1, and one."""
    if not text[1:-1].strip():
        return 0
    return 1 + sum(
        int(np.count_nonzero((chunk == _COMMA) & outside & (depths == 1)))
        for chunk, outside, depths in outside_strings(text)
    )


def structure_counts(text: bytes) -> tuple[int, int]:
    """(objects, members) of the JSON ``text``, from its bytes (``outside_strings``):
    its ``{`` and its ``:`` outside strings."""
    objects = members = 0
    for chunk, outside, _ in outside_strings(text):
        objects += int(np.count_nonzero((chunk == _OPEN_OBJECT) & outside))
        members += int(np.count_nonzero((chunk == _COLON) & outside))
    return objects, members


def raise_parser_misuse(exc: Exception) -> None:
    """Raise ``exc`` if it is no refusal of the document but a parser still referenced
    (simdjson refuses to parse again while any of its objects lives): a bug of ours."""
    if isinstance(exc, RuntimeError) and "re-use a parser" in str(exc):
        raise exc
