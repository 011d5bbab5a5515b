"""Hiding secrets in settings before a command prints them (``check-config``, errors).

A setting whose name says it is a secret is shown as ``***`` whole. Any other text
setting may still carry one inside a URL - ``redis://user:pw@host``, a Redis Cluster
seed list ``redis://:a@h1,redis://:b@h2``, ``unix:///run/redis.sock?password=pw`` - so
every URL in it is redacted: its user-info password and its secret query parameters.
When in doubt more is hidden, never less: a check-config paste ends up in tickets.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import msgspec

from mlgate.config import Settings

# A setting whose name holds one of these is a secret as a whole.
SECRET_NAMES = ("password", "secret", "token", "credential")
# A query parameter whose (decoded) name holds one of these carries a secret
# (redis-py reads ?password=; others name it pass, pwd, auth, token, key).
SECRET_QUERY_WORDS = ("pass", "pwd", "secret", "token", "auth", "credential", "key")
REDACTED = "***"

# Where a seed list starts its next URL: a comma followed by ``scheme://``. Commas
# elsewhere (inside a password) do not split, so a password is never cut in two.
_NEXT_URL = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")
_SCHEME = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.-]*://")
# A query parameter's name, after ?, & or ; (parse_qs splits on &, a hand-written URL
# may use ;): its value runs to the next & or #.
_QUERY_NAME = re.compile(r"[?&;]([^=&;#?]*)=")


def redacted(settings: Settings) -> dict[str, object]:
    """The settings as check-config prints them: secrets as ``***``, and every URL's
    password (``redis://:***@host``, ``?password=***``) hidden."""
    shown: dict[str, object] = msgspec.to_builtins(settings)
    for name, value in shown.items():
        if any(word in name for word in SECRET_NAMES):
            shown[name] = REDACTED if value is not None else None
        elif isinstance(value, str):
            shown[name] = redact_url(value)
        elif isinstance(value, list):
            shown[name] = [redact_url(item) if isinstance(item, str) else item for item in value]
    return shown


def redact_url(value: str) -> str:
    """``value`` with the password of every URL in it replaced by ``***``; anything
    else as is. A comma-separated list of URLs (a Redis Cluster seed list) is redacted
    URL by URL."""
    return ",".join(_redact_one(part) for part in _NEXT_URL.split(value))


def _redact_one(url: str) -> str:
    try:
        urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: no telling where a password ends
        return REDACTED if "@" in url else url
    url = _redact_query(url)
    # The user-info ends at the last @, not at the first / ? or #: a password holding
    # one of those unescaped must not be half shown.
    head, at, host = url.rpartition("@")
    if not at:
        return url
    scheme = _SCHEME.match(head)
    prefix = scheme.group(0) if scheme else ""
    user, colon, _password = head[len(prefix) :].partition(":")
    return f"{prefix}{user}:{REDACTED}@{host}" if colon else f"{prefix}{REDACTED}@{host}"


def _redact_query(url: str) -> str:
    kept: list[str] = []
    position = 0
    for match in _QUERY_NAME.finditer(url):
        if match.start() < position:  # inside a value hidden already
            continue
        if not any(word in unquote(match.group(1)).lower() for word in SECRET_QUERY_WORDS):
            continue
        end = len(url)
        for stop in "&#":
            found = url.find(stop, match.end())
            if found != -1:
                end = min(end, found)
        kept += [url[position : match.end()], REDACTED]
        position = end
    kept.append(url[position:])
    return "".join(kept)
