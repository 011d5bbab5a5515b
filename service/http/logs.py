"""structlog set up once by the entrypoint: JSON lines to stdout, context first; the
standard library's records (aiohttp, aiokafka) rendered as the same JSON lines.

``write_info_line`` writes an event as that configuration would render it at info
level, without structlog's chain (bound logger, processors): for a line written on
every request (the audit trail) regardless of the level. Under any other
configuration (a test's ``capture_logs``) it declines and the caller logs through
structlog.

Lines are encoded by msgspec (``json_line``): 3 µs a line where ``json.dumps`` takes 6,
on every request that logs (the audit trail, the access log). On such a line the
timestamp (``utc_stamp``: 0.5 µs, ``datetime.now().isoformat()`` 2.7) and the flush
(1.3 µs, a system call) were as much again: ``write_info_line`` flushes once per turn of
the event loop, after every line of that turn (a crash loses at most that turn's lines,
whose answers are still in the same send buffer).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec
import structlog
from aiohttp.web_protocol import RequestPayloadError

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Stateless: values it cannot encode become their repr, as structlog's own fallback.
_ENCODER = msgspec.json.Encoder(enc_hook=repr)


def json_line(event: dict[str, Any], **_: Any) -> str:
    """``event`` as compact JSON text. ASCII, as ``json.dumps`` writes it, so it can be
    written to a stdout in a C locale: a line holding other characters (a client's
    request id, say) is escaped by ``json.dumps``, values rendered as msgspec renders
    them. A string msgspec cannot encode (a lone surrogate: a file name or environment
    value that was not UTF-8) is written by ``json.dumps`` alone, never raised to the
    caller. structlog passes ``default``: unused, the ``enc_hook`` does its job."""
    try:
        line = _ENCODER.encode(event)
    except UnicodeEncodeError:
        return json.dumps(event, default=repr, separators=(",", ":"))
    if line.isascii():
        return line.decode("ascii")
    return json.dumps(json.loads(line), separators=(",", ":"))


@functools.lru_cache(maxsize=2)
def _second_text(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def utc_stamp(now_ns: int | None = None) -> str:
    """The time as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it
    (``datetime.isoformat`` with ``Z``: microseconds, left out when 0), the text of
    the second made once a second."""
    second, rest = divmod(time.time_ns() if now_ns is None else now_ns, 1_000_000_000)
    micro = rest // 1000
    return f"{_second_text(second)}.{micro:06d}Z" if micro else f"{_second_text(second)}Z"


class _TurnFlushedStream:
    """Writes lines to ``stream`` and flushes it once at the end of the event loop's
    turn (at once outside a running loop)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._flush_due = False

    def write_line(self, line: str) -> None:
        self.stream.write(line)
        if self._flush_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.stream.flush()
            return
        self._flush_due = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        try:
            self.stream.flush()
        except (OSError, ValueError):  # stdout gone or closed: structlog's own lines raise
            pass


# The processors and stream of our configuration, once made. Compared item by item:
# structlog's capture_logs edits the configured list in place.
_configured: tuple[tuple[Any, ...], _TurnFlushedStream, dict[str, Any]] | None = None


class _Stdout(logging.StreamHandler):
    """Writes to ``sys.stdout`` as it is when a record comes (a test's capture, say);
    configuring again replaces it rather than adding a second."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass


class _ClientBodyErrors(logging.Filter):
    """aiohttp reads on through the body of a request answered before reading it (to
    keep the connection), and a body its decoder cannot read (a gzip that is not)
    then ends as "Unhandled exception" with a traceback: the client's fault, not the
    server's. It is logged as a warning line, the error named, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RequestPayloadError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "client_body_unreadable: %r", (error,)
            record.exc_info = record.exc_text = None
        return True


class RepeatedLibraryLines(logging.Filter):
    """aiokafka logs every failed connect, metadata refresh and produce attempt of an
    outage: about 30 lines a second for as long as the broker is down (a review: 3M a
    day a process, where our own lines say the outage once each way). Each of its
    messages (logger and template) is let through once in ``every_s``; the next one
    that is says how many like it were left out."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        # (logger, template) -> [when last let through, how many left out since]; the
        # templates are the library's own strings, a bounded set.
        self._seen: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka"):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.every_s:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} ({int(seen[1])} more like it in the last {self.every_s:g} s left out)"
        self._seen[key] = [now, 0]
        return True


def quiet_client_body_errors() -> None:
    """Install ``_ClientBodyErrors`` on aiohttp's server logger, once."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientBodyErrors) for f in server_log.filters):
        server_log.addFilter(_ClientBodyErrors())


def configure_logging(level: str = "info", worker: int | None = None) -> None:
    """JSON lines on stdout at ``level``; ``worker``: the index of this process among
    the supervisor's, on every line (which of several processes wrote it)."""
    global _configured
    quiet_client_body_errors()
    # Python's warnings (a library's, such as prometheus-client's) as log lines too.
    logging.captureWarnings(True)
    numeric = LEVELS[level]
    static: dict[str, Any] = {} if worker is None else {"worker": worker}

    def add_static(
        logger: Any, name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in static.items():
            event_dict.setdefault(key, value)
        return event_dict

    # The standard library's records (aiohttp's, aiokafka's) as JSON lines too, with the
    # logger's name and the traceback as a field: one line each a log pipeline can parse.
    handler = _Stdout()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                add_static,
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=json_line),
            ],
        )
    )
    handler.addFilter(RepeatedLibraryLines())
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _Stdout)] + [handler]
    root.setLevel(numeric)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_static,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(serializer=json_line),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    _configured = (tuple(processors), _TurnFlushedStream(sys.stdout), static)


def log_to_stderr() -> None:
    """For a command whose stdout carries only what it prints: its log lines, JSON, on
    stderr."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
    )


def write_info_line(event: dict[str, Any]) -> bool:
    """Write ``event`` (``"event"`` included) as the configured chain renders an info
    line: bound context variables it lacks, ``level``, ``timestamp``, one JSON line,
    flushed by the end of the event loop's turn. False, writing nothing, when structlog is configured otherwise."""
    configured = _configured
    if configured is None or tuple(structlog.get_config()["processors"]) != configured[0]:
        return False
    for name, value in structlog.contextvars.get_contextvars().items():
        event.setdefault(name, value)
    for name, value in configured[2].items():
        event.setdefault(name, value)
    event["level"] = "info"
    event["timestamp"] = utc_stamp()
    configured[1].write_line(json_line(event) + "\n")
    return True
