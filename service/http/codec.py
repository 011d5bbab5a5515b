"""Content negotiation: JSON or msgpack bodies in, JSON or msgpack answers out.

Decoding maps msgspec's errors onto the contract: undecodable bytes are 400,
schema violations 422 with the failing location, unknown media types 415.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from mlgate.schemas.problem import FieldError
from mlgate.service.http.errors import BadRequest, UnsupportedMediaType, ValidationFailed

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

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_LOCATION = re.compile(r" - at `\$\.?(.*)`$")
_MISSING_FIELD = re.compile(r"missing required field `(\w+)`")


def request_format(request: web.Request, default: Format | None = Format.JSON) -> Format:
    """The format of the request body, from its Content-Type; 415 if unsupported."""
    media_type = request.content_type if request.headers.get("Content-Type") else ""
    if not media_type:
        if default is None:
            raise UnsupportedMediaType("Content-Type is required")
        return default
    fmt = MEDIA_TYPES.get(media_type)
    if fmt is None:
        raise UnsupportedMediaType(
            f"Content-Type {media_type!r} is not supported; use application/json or application/msgpack"
        )
    return fmt


def response_format(request: web.Request) -> Format:
    """JSON unless the Accept header prefers msgpack."""
    accept = request.headers.get("Accept")
    if not accept or "msgpack" not in accept:
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


def location(error: msgspec.ValidationError) -> tuple[str, str]:
    """Split msgspec's message into (location, message), e.g. ("records[3].features", ...).

    A missing field is located at the field itself (``source``, not the object holding it).
    """
    text = str(error)
    match = _LOCATION.search(text)
    loc, msg = ("", text) if match is None else (match.group(1), text[: match.start()])
    missing = _MISSING_FIELD.search(msg)
    if missing is not None:
        loc = f"{loc}.{missing.group(1)}" if loc else missing.group(1)
    return loc, msg


def decode(body: bytes, type_: type[T], fmt: Format) -> T:
    try:
        if fmt is Format.MSGPACK:
            return msgspec.msgpack.decode(body, type=type_)
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        loc, msg = location(exc)
        raise ValidationFailed(str(exc), errors=[FieldError(loc=loc or "body", msg=msg)]) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Body is not valid {fmt.name.lower()}: {exc}") from None
    except RecursionError:
        raise BadRequest("Body is nested too deeply") from None


def encode(obj: Any, fmt: Format) -> bytes:
    if fmt is Format.MSGPACK:
        return _msgpack_encoder.encode(obj)
    return _json_encoder.encode(obj)


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
