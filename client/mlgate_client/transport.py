"""One HTTP exchange with mlgate: headers, auth, timeouts, and the answer or a typed error.

Owns the ``aiohttp.ClientSession`` (created on first use, inside the running loop).
An answer of 400 or more becomes an ``ApiError`` carrying the problem document and
``Retry-After``; no answer at all becomes a ``TransportError``. Retrying is the
caller's business (``retry.call_with_retries``). A base URL that is not ``http(s)://host``
is refused when the transport is made: it would otherwise fail every attempt as if
the server were down, and be retried for the whole budget.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack

from mlgate_client.errors import ApiError, ClientClosed, MlgateError, TransportError
from mlgate_client.retry import parse_retry_after
from mlgate_client.version import __version__

API_KEY_VARIABLE = "MLGATE_API_KEY"


def resolve_api_key(api_key: str | None) -> str | None:
    """The key given, else ``$MLGATE_API_KEY``, else none (a server without auth),
    without the blanks around it (a key read from a file keeps its newline), or
    ``ValueError`` for one no header can carry (a review: a control character failed
    every request with aiohttp's own ``ValueError``, outside ``MlgateError``)."""
    key = (api_key or os.environ.get(API_KEY_VARIABLE) or "").strip()
    if not key:
        return None
    if not key.isascii() or not key.isprintable():
        raise ValueError("an API key is printable ASCII (mlg_<key id>_<secret>)")
    return key


def base_url(url: str) -> str:
    """``url`` without its trailing ``/``, or ``ValueError`` unless it is http(s) with a host."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {url!r} (e.g. http://localhost:8080)")
    return url.rstrip("/")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    document: Any


def _decode(content_type: str, body: bytes) -> Any:
    if not body:
        return None
    try:
        if "msgpack" in content_type:
            return msgpack.unpackb(body)
        return json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return {"detail": body[:500].decode(errors="replace")}


class Transport:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        connections: int = 8,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.url = base_url(url)
        self._headers = {"User-Agent": f"mlgate-client/{__version__}", "Accept": "application/json"}
        key = resolve_api_key(api_key)
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._connections = connections
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _session_now(self) -> aiohttp.ClientSession:
        if self._closed:
            # Never a new session after close: nothing would close it.
            raise ClientClosed(f"closed: no more requests to {self.url}")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                headers=self._headers,
            )
        return self._session

    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Answer:
        """POST ``body``; the 2xx answer, or ``ApiError`` / ``TransportError``."""
        timeout = aiohttp.ClientTimeout(
            total=timeout_s, sock_connect=min(timeout_s, self._connect_timeout_s)
        )
        try:
            async with self._session_now().post(
                self.url + path, data=body, headers=headers, timeout=timeout
            ) as response:
                raw = await response.read()
                status, content_type = response.status, response.content_type
                answer_headers = response.headers
        except aiohttp.InvalidURL as exc:  # the same on every attempt: not worth a retry
            raise MlgateError(f"POST {path}: invalid URL: {exc}") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"POST {path}: {type(exc).__name__}: {exc}") from exc
        document = _decode(content_type, raw)
        if status >= 400:
            problem = document if isinstance(document, dict) else {"detail": str(document)}
            raise ApiError.from_response(
                status,
                problem,
                parse_retry_after(answer_headers.get("Retry-After")),
                answer_headers.get("X-Request-ID"),
            )
        return Answer(status, answer_headers, document)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
