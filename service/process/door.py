"""The door: a predict request for a model at capacity is refused from its parsed head,
before aiohttp builds a ``Request`` or starts a task for it.

Under a retry storm most requests are refusals. Through the app each one costs a
``Request``, a task, the middlewares, the body read, a problem document and a log line,
on the core the model computes on: the storm then sheds the model's capacity instead
of the excess. Here a refusal costs the parse aiohttp already did and one write.

``Door.refusal`` refuses only what the app would refuse the same way:
- ``POST`` to ``/api/v2/predict`` or ``/api/v1/predict`` whose body names no model
  (the default model's request), or to ``/v2/models/{model}[/versions/{version}]/infer``;
- a body the app would not refuse for its own sake: a ``Content-Type`` the route takes,
  no ``Content-Encoding``, no ``Expect`` but ``100-continue`` (else 415, 413, 417);
- the whole body has arrived, no ``Idempotency-Key``, the connection is idle (no
  earlier request on it still answering: answers keep their order) and not closing;
- a key this process knows now (keys file, Redis keys still trusted) with the
  ``predict`` scope; anything else goes through the app, which answers 401/403;
- the model's worker has no room for a row by the request's deadline
  (``InferenceWorker.check_room``: mailbox full, or the queue ahead too long).

An ingest (``POST /api/v2/ingest``, whole body, a key known now with the ``ingest``
scope) is never refused here, only let through with its body for the express lane.

What it does not do: rate limiting (a model at capacity answers 503 before a key's
429), and the access log line (a storm would flood the log); each refusal is counted in
``mlgate_requests_total`` like any answer. Everything else takes the normal path,
which sheds a full model too, only later.

A connection refused here is held (not read) until the model has room for it, in
a line by model and deadline; one whose predict the express lane just answered joins
the back of its line while connections wait in it (``Door.hold_behind_line``), so it
does not take their room and get refused.

``DoorRequestHandler`` is aiohttp's ``RequestHandler`` with its parser wrapped, so
refused messages never reach the handler's queue.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import msgspec
import structlog
from aiohttp import http_exceptions, web
from aiohttp.helpers import set_exception
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import _ErrInfo
from multidict import CIMultiDict

from mlgate.service.http.body import SUPPORTED_ENCODINGS, check_compressed_ends
from mlgate.service.http.codec import Format, media_format, preferred_format
from mlgate.service.http.errors import (
    ApiError,
    BadRequest,
    UnsupportedMediaType,
    VersionNotSupported,
    http_error,
)
from mlgate.service.http.front_door import (
    REQUEST_ID_HEADER,
    RequestIds,
    as_api_error,
    problem_document,
    problem_headers,
)
from mlgate.service.predict.flow import TIMEOUT_HEADER, sharing_tenant, timeout_ms_in
from mlgate.service.process.express import (
    ExpressLane,
    answer_head,
    answer_on,
    answer_tail,
    request_body_format,
)
from mlgate.service.protection.api_keys import ANONYMOUS, ApiKey
from mlgate.service.protection.middleware import presented_key_in
from mlgate.service.routes.ingest import PATH as INGEST_PATH
from mlgate.service.routes.oip import INFER_PATHS
from mlgate.service.state import DRAINING, KEY_STORE, METRICS, MODEL_REPOSITORY, SETTINGS
from mlgate.workers.errors import DeadlineExpired, MailboxFull
from mlgate.workers.inference.batching import InferenceWorker
from mlgate.workers.inference.repository import ModelNotFound

# Routes whose body may name the model (absent: the default model).
_BODY_NAMES_MODEL = {"/api/v2/predict", "/api/v1/predict"}
_INFER, _VERSION_INFER = INFER_PATHS
# How often held connections are looked at, and how long room kept for one that was
# let go on waits for its next request.
HOLD_TICK_S = 0.002
# How far a connection's keep-alive close time moves while the lane answers it: past
# any answer (``DoorRequestHandler._take_express``).
_LANE_KEEPALIVE_HOLD_S = 86_400.0
RESERVATION_S = 0.1
# A worker's way-to-the-app estimate (``WayToTheApp``): the weight of a longer way than
# the estimate, how often it may rise, and the time constant in which it fades.
_WAY_RISES = 0.2
WAY_RISES_EVERY_S = 0.002
WAY_FADES_S = 0.3
log = structlog.get_logger("mlgate.door")


def _line_of(timeout_ms: float) -> float:
    """The held line, in seconds, for a request given ``timeout_ms``: the power of two
    of milliseconds at or below it. Lines stay few (about 20) whatever timeouts clients
    send, and a line's room is reckoned for a deadline no looser than its members'."""
    return 2 ** math.floor(math.log2(max(1.0, timeout_ms))) / 1000


@dataclass(frozen=True, slots=True)
class Admission:
    """A request let through (for a worker, when it is a predict): what the express
    lane needs to serve it."""

    worker: InferenceWorker | None
    key: ApiKey
    deadline: float
    body: bytes | None  # the body, when the door read it
    admitted_at: float | None = None  # ``time.monotonic()`` when the door let it through
    # An OIP infer's (route template, model, version): what the lane serves it with.
    target: tuple[str, str, str | None] | None = None


class WayToTheApp:
    """How long a request the door lets through takes to reach the app (a handler, or
    the express lane's task), by worker: a running estimate of recent ones.

    It is the event loop's turn: under a flood of connections the loop reads and
    answers hundreds of them between letting a request through and starting on it,
    and as many again before the answer is written. A deadline shorter than that
    expires on the way, after the door, the body's decoding and the app have spent
    the core on it: a tenant flooding 10 ms deadlines on 256 connections got ~1,000
    504s and ~4,000 503s a second that way, and took another tenant's four
    connections to 0.21x of their rate alone (``bench.overload --flood``). So the door
    counts the way there and back as part of the wait (``seconds``): such requests
    are refused at the door and their connections held.

    The estimate rises fast, a fifth of the way to a longer sample, at most once
    every ``WAY_RISES_EVERY_S``: the requests one stall of the loop held up (a GC
    pause, a large body decoded) all reach the app in the turn after it, and a rise
    for each would make the estimate that one stall's length, refusing even loose
    deadlines for a while. A flood's long turns keep coming, and raise it turn
    after turn. It fades in time (``WAY_FADES_S``), not with shorter samples. The
    way is short in the turns after the door held a flood's connections: an
    estimate that fell as fast as it rose let them all go on again at once, and the
    other tenant kept 0.24x of its rate rather than ~0.8x. Fading in time, it needs
    nothing let through to come down: a lone slow request on a quiet server is
    forgotten within a second, and a line of tight deadlines held on a long way gets
    room back little by little as it fades, rather than all at once."""

    def __init__(self) -> None:
        # By worker, weakly: a retired model version's worker (and its session) goes.
        self._estimates: weakref.WeakKeyDictionary[InferenceWorker, tuple[float, float, float]]
        self._estimates = weakref.WeakKeyDictionary()  # (seconds, measured at, risen at)

    def seconds(self, worker: InferenceWorker, now: float) -> float:
        """The way to the app and back, for a request let through now for ``worker``."""
        estimate, measured_at, _ = self._estimates.get(worker, (0.0, now, -math.inf))
        return 2 * _faded(estimate, now - measured_at)

    def took(self, worker: InferenceWorker, seconds: float, now: float) -> None:
        """A request let through for ``worker`` took ``seconds`` to reach the app."""
        estimate, measured_at, risen_at = self._estimates.get(worker, (0.0, now, -math.inf))
        estimate = _faded(estimate, now - measured_at)
        if seconds > estimate and now - risen_at >= WAY_RISES_EVERY_S:
            estimate += _WAY_RISES * (seconds - estimate)
            risen_at = now
        self._estimates[worker] = (estimate, now, risen_at)


def _faded(estimate: float, elapsed_s: float) -> float:
    return estimate * math.exp(-max(0.0, elapsed_s) / WAY_FADES_S)


class Door:
    """Decides, from a parsed head and its complete body, whether to refuse at once."""

    def __init__(
        self, app: web.Application, path_headers: Mapping[str, Mapping[str, str]] | None = None
    ) -> None:
        self._app = app
        self._settings = app[SETTINGS]
        check_compressed_ends()  # a cut gzip/zstd body is 400, not its part taken whole
        self._draining = app[DRAINING]
        self.request_ids = RequestIds()
        self._path_headers = dict(path_headers or {})
        self._refusals = RefusalTemplates(self._path_headers)
        self._counted: dict[tuple[str, int], tuple[Any, Any]] = {}
        self.refused = 0
        self.on_the_way: dict[InferenceWorker, int] = {}
        self.way = WayToTheApp()
        # Refused connections not read until their turn, in line by worker and by the
        # time their refused request gave the model (the likely time of their next):
        # (let go at, connection). A tight deadline's line does not block a loose one's.
        # A line's worker is None for connections the app refused (``hold_refused``).
        self._held: dict[
            tuple[InferenceWorker | None, float], deque[tuple[float, DoorRequestHandler]]
        ] = {}
        # Held connections still open, by line; each held connection's line.
        self._line_sizes: dict[tuple[InferenceWorker | None, float], int] = {}
        self._holding: dict[DoorRequestHandler, tuple[InferenceWorker | None, float]] = {}
        # Connections let go on with room kept for their next request, within the line
        # they were held in: (worker, line, since).
        self._reservations: dict[DoorRequestHandler, tuple[InferenceWorker, float, float]] = {}
        self._tick_handle: asyncio.TimerHandle | None = None
        self.express = (
            ExpressLane(app, self.request_ids, self._path_headers, self._count, self.reached_app)
            if self._settings.express_lane
            else None
        )

    def refusal(
        self, message: RawRequestMessage, payload: StreamReader, connection: DoorRequestHandler
    ) -> tuple[bytes | None, Admission | None]:
        """(the whole answer to send for ``message``, or None to let it through; the
        worker it was let through for, with what the door learnt of it, if any).

        A request let through for a worker counts as on its way to that worker's
        mailbox (``on_the_way``) until the app starts on it (``reached_app``): a read of
        many sockets at once then lets through only as many as there is room for,
        rather than all of them to be refused one by one by the app. A connection
        refused here is held (``_hold``) until there is room for its next request."""
        reservation = self._reservations.pop(connection, None)
        reserved = reservation[0] if reservation is not None else None
        if reservation is not None and self.line_of(message.headers) < reservation[1]:
            # Room was kept for a looser deadline than this request's: it is decided
            # like any other (its way there and back may not fit this one).
            self.reached_app(reservation[0])
            reserved = None
        answer, worker, admission = self._decide(message, payload, reserved)
        if reserved is not None and not (admission is not None and worker is reserved):
            self.reached_app(reserved)  # the room kept for this connection goes unused
        if answer is not None and worker is not None:
            self._hold(connection, worker, self.line_of(message.headers))
        return answer, admission

    def _decide(
        self, message: RawRequestMessage, payload: StreamReader, reserved: InferenceWorker | None
    ) -> tuple[bytes | None, InferenceWorker | None, Admission | None]:
        """(refusal or None, the worker asked or None, the admission if let through)."""
        if (
            message.method != "POST"
            or message.should_close
            or message.version != HttpVersion11  # the app answers in the request's version
            or self._draining.is_set()
        ):
            return None, None, None
        if payload is not EMPTY_PAYLOAD and not payload.is_eof():
            return None, None, None  # the rest of the body would have to be read and dropped
        headers = message.headers
        expect = headers.get("Expect")
        if "Content-Encoding" in headers or (expect is not None and expect.lower() != "100-continue"):
            # The app may answer these otherwise than 503 whatever the model's room: 415
            # (an encoding it does not take), 413 (decompressed past the limit), 417.
            return None, None, None
        path = message.path
        if path == INGEST_PATH:
            return None, None, self._ingest_admission(message, payload)
        target = self._target(path, message, payload)
        if target is None:
            return None, None, None
        route, model, version, body = target
        inferred = (route, model, version) if route in INFER_PATHS else None
        if inferred is None and request_body_format(headers.get("Content-Type")) is None:
            return None, None, None  # the app's 415 (the infer routes read any as JSON)
        key = None if "Idempotency-Key" in headers else self._authorized(headers, "predict")
        if key is None:
            return None, None, None
        timeout_ms = timeout_ms_in(headers, self._settings.request_timeout_ms)
        if timeout_ms is None:  # the app answers it 400
            return None, None, None
        now = time.monotonic()
        deadline = now + timeout_ms / 1000
        if (
            inferred is not None
            and TIMEOUT_HEADER not in headers
            and (body is None or b"timeout" in body)
        ):
            # Its body may set its deadline (``parameters.timeout``), looser than the
            # default: the route decides that once it is decoded.
            deadline = math.inf
        try:
            worker = self._app[MODEL_REPOSITORY].resolve(model, version).worker
        except ModelNotFound:
            return None, None, None
        if worker is reserved:  # its room was kept when it was let go on
            return None, worker, Admission(worker, key, deadline, body, now, inferred)
        started = time.perf_counter()
        try:
            ahead = self.on_the_way.get(worker, 0)
            if self._line_sizes:
                ahead += self._held_ahead(worker, _line_of(timeout_ms))
            # A REST body's length is at most the bytes the request would hold decoded
            # (its numbers count); an infer holds its tensors only, known once decoded.
            worker.check_room(
                1,
                deadline,
                ahead=ahead,
                nbytes=0 if inferred is not None or body is None else len(body),
                way_s=self.way.seconds(worker, now),
                tenant=sharing_tenant(self._settings, key.tenant),
            )
        except (MailboxFull, DeadlineExpired) as exc:
            self.refused += 1
            answer = self._answer(as_api_error(exc, self._settings.retry_after_s), path, headers)
            status = 503 if isinstance(exc, MailboxFull) else 504
            self._count(route, status, time.perf_counter() - started)
            return answer, worker, None
        self._on_its_way(worker)
        return None, worker, Admission(worker, key, deadline, body, now, inferred)

    def _held_ahead(self, worker: InferenceWorker, line: float) -> int:
        """Held connections that come back before a request of ``line``: those, still
        open, of the lines at least as loose. A tighter line gets room only after
        (room for a tight deadline is room for a loose one), and one that never can
        (a deadline shorter than a batch) must not keep looser requests out."""
        return sum(
            size
            for (held_for, held_line), size in self._line_sizes.items()
            if held_for is worker and held_line >= line
        )

    def holds(self, connection: DoorRequestHandler) -> bool:
        return connection in self._holding

    def line_of(self, headers: Mapping[str, str]) -> float:
        timeout_ms = timeout_ms_in(headers, self._settings.request_timeout_ms)
        return _line_of(timeout_ms or self._settings.request_timeout_ms)

    def _on_its_way(self, worker: InferenceWorker) -> None:
        self.on_the_way[worker] = self.on_the_way.get(worker, 0) + 1

    def reached_app(self, worker: InferenceWorker, admitted_at: float | None = None) -> None:
        """A request let through for ``worker`` reached the app (or never will);
        ``admitted_at``: when the door let it through, if it was timed."""
        if admitted_at is not None:
            now = time.monotonic()
            self.way.took(worker, now - admitted_at, now)
        left = self.on_the_way[worker] - 1
        if left:
            self.on_the_way[worker] = left
        else:
            del self.on_the_way[worker]

    @property
    def hold_s(self) -> float:
        """The longest a connection is held: ``Retry-After``."""
        return float(self._settings.retry_after_s)

    def hold_behind_line(
        self, connection: DoorRequestHandler, worker: InferenceWorker, line: float
    ) -> bool:
        """Hold a connection just answered for ``worker`` at the back of its ``line``
        when connections held for that worker would come back before a request of
        that line (``_held_ahead``): its next request is read in its turn, with room
        kept for it, rather than read at once and refused.

        Under a retry storm every answered connection sends its next request at once:
        read then, it found no room (those held ahead of it have it) and was refused,
        then held. Each answer cost a refusal (bench.overload's tight phase: exactly
        as many 503s a second as 200s), on the core the model computes on.

        Only a connection the door held within the last ``Retry-After`` (refused, or
        held this way) is held: its client has been told the model is at capacity. A
        held connection's next request waits for this model's line whatever it is
        for (a ``GET /health`` on a pooled connection, another model), so one that was
        never refused is read at once, as before."""
        if not self._line_sizes or self._held_ahead(worker, line) == 0:
            return False
        if connection.event_loop.time() - connection.held_since > self.hold_s:
            return False
        self._hold(connection, worker, line)
        return True

    def hold_refused(self, connection: DoorRequestHandler) -> None:
        """Hold a connection whose request the app answered 503 until ``Retry-After``
        has passed: the requests the door cannot decide (an ``Idempotency-Key``, a body
        naming the model, ...) are refused only after their body is read, decoded and
        taken through the middlewares. A client resending those at once on 256
        connections took another tenant's four connections to 0.03x of their rate:
        held, each of its connections costs one such refusal a ``Retry-After``."""
        self._hold(connection, None, 0.0)

    def _hold(
        self, connection: DoorRequestHandler, worker: InferenceWorker | None, timeout_s: float
    ) -> None:
        """Stop reading a refused connection until ``worker`` has room for its next
        request, answered within ``timeout_s`` (in the order connections were held;
        a request from another connection counts them as ahead of it: ``_held_ahead``),
        or until ``Retry-After`` has passed.

        A client that retries at once (a retry storm) then waits in the kernel's
        socket buffer for its turn, instead of being read, refused and answered again
        and again on the core the model computes on."""
        transport = connection.transport
        if transport is None or connection in self._holding:
            return  # several pipelined refusals: held once, or its room would be kept twice
        reservation = self._reservations.pop(connection, None)
        if reservation is not None:
            # Held again before it used the room kept for it (a pipelined refusal and
            # the lane's answer behind it, say): that room goes back, or it is lost.
            self.reached_app(reservation[0])
        line = (worker, timeout_s)
        self._holding[connection] = line
        self._line_sizes[line] = self._line_sizes.get(line, 0) + 1
        transport.pause_reading()
        loop = connection.event_loop
        connection.held_since = now = loop.time()
        self._held.setdefault(line, deque()).append((now + self.hold_s, connection))
        self._schedule_tick(loop)

    def release(self, connection: DoorRequestHandler) -> None:
        """A closed connection: give back the room kept for it; if it was held, it no
        longer counts in its line (its entry is dropped when the line reaches it)."""
        reservation = self._reservations.pop(connection, None)
        if reservation is not None:
            self.reached_app(reservation[0])
        self._unhold(connection)

    def _unhold(self, connection: DoorRequestHandler) -> None:
        line = self._holding.pop(connection, None)
        if line is None:
            return
        left = self._line_sizes[line] - 1
        if left:
            self._line_sizes[line] = left
        else:
            del self._line_sizes[line]

    def _schedule_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._tick_handle is None:
            self._tick_handle = loop.call_later(HOLD_TICK_S, self._tick)

    def _tick(self) -> None:
        """Let held connections go on: as many as each worker has room for, each with
        that room kept for it for ``RESERVATION_S``; and every one held past its time."""
        self._tick_handle = None
        loop = asyncio.get_running_loop()
        try:
            self._let_go(loop.time())
        except Exception as exc:  # a bug here must not leave connections held for good
            log.error("door_tick_failed", error=repr(exc))
            self._app[METRICS].background_task_crashes.labels("door-tick").inc()
        if self._held or self._reservations:
            self._schedule_tick(loop)

    def _let_go(self, now: float) -> None:
        # Reservations are made in time order, so the expired ones come first.
        for connection, (reserved, _, since) in list(self._reservations.items()):
            if since + RESERVATION_S > now:
                break
            del self._reservations[connection]
            self.reached_app(reserved)
        for (worker, timeout_s), held in list(self._held.items()):
            if worker is not None:
                within_s = timeout_s - self.way.seconds(worker, time.monotonic())
            while held:
                let_go_at, connection = held[0]
                if connection not in self._holding:  # closed while held
                    held.popleft()
                    continue
                room = 0  # held by the app: let go after ``Retry-After`` only
                if worker is not None:
                    room = worker.room_within(within_s) - self.on_the_way.get(worker, 0)
                if room <= 0 and let_go_at > now:
                    break
                held.popleft()
                self._unhold(connection)
                transport = connection.transport
                if transport is None or transport.is_closing():
                    continue
                if worker is not None and room > 0:
                    self._on_its_way(worker)
                    self._reservations[connection] = (worker, timeout_s, now)
                connection.read_on()
            if not held:
                del self._held[worker, timeout_s]

    def _target(
        self, path: str, message: RawRequestMessage, payload: StreamReader
    ) -> tuple[str, str, str | None, bytes | None] | None:
        """(route template, model, version, the body if read) the request is for, when
        that is certain."""
        if path in _BODY_NAMES_MODEL:
            body = _body_naming_no_model(message, payload)
            if body is None:
                return None
            return path, self._settings.default_model, None, body
        if not path.startswith("/v2/models/") or "%" in path or "?" in path:
            return None
        parts = path.split("/")  # "", "v2", "models", model, ["versions", version,] "infer"
        if len(parts) == 5 and parts[4] == "infer" and parts[3]:
            return _INFER, parts[3], None, self._lane_body(message, payload)
        if (
            len(parts) == 7
            and parts[4] == "versions"
            and parts[6] == "infer"
            and parts[3]
            and parts[5]
        ):
            return _VERSION_INFER, parts[3], parts[5], self._lane_body(message, payload)
        return None

    def _lane_body(self, message: RawRequestMessage, payload: StreamReader) -> bytes | None:
        """An infer's body, for the express lane, if it may take it."""
        if self.express is None or not _plain_body(message.headers):
            return None
        return _whole_body(payload)

    def _ingest_admission(
        self, message: RawRequestMessage, payload: StreamReader
    ) -> Admission | None:
        """An ingest for the express lane, with its whole body, when a key known now
        has the ``ingest`` scope. Never refused here: a sink has no room to check
        before the records are validated."""
        if self.express is None or not _plain_body(message.headers):
            return None  # the lane would not take it: no body to join, no key to look up
        key = self._authorized(message.headers, "ingest")
        chunks = getattr(payload, "_buffer", None)  # aiohttp's StreamReader keeps its chunks here
        if key is None or chunks is None:
            return None
        return Admission(None, key, math.inf, b"".join(chunks))

    def _authorized(self, headers: Mapping[str, str], scope: str) -> ApiKey | None:
        """The request's key when this process knows it now with ``scope``."""
        if self._settings.auth_disabled:
            return ANONYMOUS
        presented = presented_key_in(headers)
        if presented is None:
            return None
        key = self._app[KEY_STORE].known_now(presented)
        return key if key is not None and scope in key.scopes else None

    def _answer(self, error: ApiError, path: str, headers: Mapping[str, str]) -> bytes:
        request_id = self.request_ids.from_headers(headers)
        fmt = preferred_format(headers.get("Accept"))
        if fmt is Format.JSON:
            return self._refusals.answer(error, path, request_id)
        return refusal_answer(error, path, request_id, fmt, self._path_headers)

    def count_unparsed(self, status: int) -> None:
        """An answer to a request that could not be parsed (no route, no method read)."""
        self._app[METRICS].requests.labels("unmatched", "UNKNOWN", str(status)).inc()

    def _count(self, route: str, status: int, seconds: float) -> None:
        children = self._counted.get((route, status))
        if children is None:
            metrics = self._app[METRICS]
            children = self._counted[(route, status)] = (
                metrics.requests.labels(route, "POST", str(status)),
                metrics.request_seconds.labels(route, "POST"),
            )
        counter, timer = children
        counter.inc()
        timer.observe(seconds)


def refusal_answer(
    error: ApiError,
    path: str,
    request_id: str,
    fmt: Format,
    path_headers: Mapping[str, Mapping[str, str]],
) -> bytes:
    """The whole answer refusing a request on ``path`` with ``error``: the app's
    problem document and headers."""
    body, content_type = problem_document(error, path, request_id, fmt)
    return answer_on(
        path, path_headers, error.status, content_type, problem_headers(error), request_id, body
    )


_SENTINEL = "\x00request-id\x00"
_MAX_REFUSAL_TEMPLATES = 256


class RefusalTemplates:
    """JSON refusals as bytes made once per (error, path), the request id put in
    twice (head and body): under a retry storm most requests are refused, and making
    the problem document and its head each time cost ~9 µs of the model's core."""

    def __init__(self, path_headers: Mapping[str, Mapping[str, str]]) -> None:
        self._path_headers = path_headers
        # (error's class, detail, Retry-After, headers, path): (head before the id, head
        # after it up to Content-Length, body before the id, body after it)
        self._made: dict[tuple[Any, ...], tuple[bytes, bytes, bytes, bytes]] = {}

    def answer(self, error: ApiError, path: str, request_id: str) -> bytes:
        key = (type(error), error.detail, error.retry_after_s, tuple(error.headers.items()), path)
        parts = self._made.get(key)
        if parts is None:
            if len(self._made) >= _MAX_REFUSAL_TEMPLATES:  # details naming many models
                self._made.clear()
            parts = self._made[key] = self._template(error, path)
        head, middle, before, after = parts
        body = before + msgspec.json.encode(request_id) + after
        return (
            head
            + request_id.encode("utf-8", "surrogateescape")
            + middle
            + answer_tail(len(body)).encode()
            + body
        )

    def _template(self, error: ApiError, path: str) -> tuple[bytes, bytes, bytes, bytes]:
        body, content_type = problem_document(error, path, _SENTINEL, Format.JSON)
        before, after = body.split(msgspec.json.encode(_SENTINEL))
        fields = {"Content-Type": content_type, **problem_headers(error), REQUEST_ID_HEADER: _SENTINEL}
        fields.update(self._path_headers.get(path, {}))
        head, middle = answer_head(error.status, fields).split(_SENTINEL)
        return head.encode("utf-8", "surrogateescape"), middle.encode(), before, after


def _plain_body(headers: Mapping[str, str]) -> bool:
    """No ``Idempotency-Key`` (the app keeps its answer), ``Expect`` (the app answers
    ``100 Continue``) or ``Content-Encoding`` (the app decompresses)."""
    return not (
        "Idempotency-Key" in headers or "Expect" in headers or "Content-Encoding" in headers
    )


def _whole_body(payload: StreamReader) -> bytes | None:
    """The body, read in full (the door decides only then), or None where it cannot
    be seen."""
    chunks = getattr(payload, "_buffer", None)  # aiohttp's StreamReader keeps its chunks here
    if chunks is None:
        return b"" if payload is EMPTY_PAYLOAD else None
    return b"".join(chunks)


def _body_naming_no_model(message: RawRequestMessage, payload: StreamReader) -> bytes | None:
    """The body, when it certainly has no ``model`` member: its bytes do not hold the
    word (a JSON key could only spell it with an escape, so JSON bodies holding a
    backslash are not certain either); None otherwise."""
    body = _whole_body(payload)
    # A single byte is looked for with memchr: 0.25 µs in a heavy model's 15 KB body of
    # numbers, where the word is looked for at 6.9 µs (on every predict, refusals too).
    if body is None or (b"m" in body and b"model" in body):
        return None
    if b"\\" not in body:  # memchr first: the media type is parsed only when it matters
        return body
    is_msgpack = media_format(message.headers.get("Content-Type")) is Format.MSGPACK
    return body if is_msgpack else None


# A Host field's value (RFC 3986's host and port): an IP literal, or a name of
# unreserved characters, sub-delims and %-escapes (empty too: RFC 9112, 3.2). A zone
# of an IPv6 literal as RFC 6874 writes it (``%25eth0``) or as Python's http.client
# sends it (``%eth0``, a review).
_HOST = re.compile(
    r"(?:\[(?:[0-9A-Fa-f:.]+(?:%(?:25)?[0-9A-Za-z._~-]+)?|v[0-9A-Fa-f]+\.[0-9A-Za-z._~!$&'()*+,;=:-]+)\]"
    r"|[0-9A-Za-z._~!$&'()*+,;=%-]*)(?::[0-9]*)?"
)
# The first bytes of a packet the parser refused that ``refused_head`` reads: a head
# is at most 8190 bytes to aiohttp.
_REFUSED_HEAD_BYTES = 16384
# A request line's start, after the empty lines a server ignores (RFC 9112, 2.2): its
# method and the first byte of its target, in any of its forms.
_REQUEST_LINE_START = re.compile(rb"(?:\r?\n){0,8}[A-Z]{1,20} [^ \r\n]")
# A path longer than this is cut in a problem's ``instance`` (with "...").
MAX_INSTANCE_CHARS = 1024
_REQUEST_LINE = re.compile(rb"[A-Z]{1,20} (/[!-~]{0,16384}) (HTTP/[0-9]\.[0-9])")
_TOKEN = re.compile(rb"[!#-'*+.0-9A-Z^-z|~-]{1,256}")


def refused_head(
    data: bytes, path: str, headers: Mapping[str, str]
) -> tuple[str, Mapping[str, str]]:
    """The path and the ``Accept`` and ``X-Request-ID`` of a request the parser refused
    as it read the packet its head came in (a bad chunk size after the head, a bad
    header line): aiohttp then answers with a stand-in request of no headers, and its
    400 ignored the client's ``Accept`` and id. Read from the head ``data`` starts with
    (the packet's first request: never from a body, where any text may stand; a line
    the parser refused is skipped), line by line without a pattern that backtracks (a
    review: a header line of 3,000 spaces held the loop 5 s). ``path`` and ``headers``
    as given when aiohttp has them, or ``data`` starts with no request line."""
    if headers or not data:
        return path, headers
    lines = data.partition(b"\r\n\r\n")[0].split(b"\r\n")
    request = _REQUEST_LINE.fullmatch(lines[0])
    if request is None:
        return path, headers
    found: dict[str, str | None] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            continue
        lowered = name.lower().decode()
        if lowered in ("accept", "x-request-id") and lowered not in found:
            # The first field of the name, as the app reads one (``headers.get``): an
            # ``Accept`` as it is, an id not visible ASCII as absent (``RequestIds``;
            # a review: the last was read, and a bad first one skipped for the next).
            text = value.strip(b" \t").decode("latin-1")
            usable = lowered == "accept" or text.isascii() and text.isprintable()
            found[lowered] = text if usable else None
    given = {name: text for name, text in found.items() if text is not None}
    return request.group(1).decode().split("?", 1)[0], CIMultiDict(given)


def refused_version(exc: BaseException | None, data: bytes) -> str | None:
    """The HTTP version of a request line the parser refused for its version alone
    (llhttp takes 0.9, 1.0, 1.1 and 2.0 only, and refuses ``HTTP/3.0`` as a bad
    line): its answer is 505, not 400."""
    if not isinstance(exc, http_exceptions.BadStatusLine):
        return None
    request = _REQUEST_LINE.fullmatch(data.partition(b"\r\n")[0])
    if request is None or request.group(2).startswith(b"HTTP/1."):
        return None  # 505 is for another major version; llhttp's 400 for HTTP/1.2
    return request.group(2).decode()


def _transfer_coding_refused(headers: Mapping[str, str]) -> str | None:
    """A transfer coding of a chunked request other than ``chunked`` itself, if any:
    llhttp frames such a body by its final ``chunked`` and drops the rest, so a body
    sent ``gzip, chunked`` reached the app still gzipped. RFC 9112, 6.1: a server that
    does not understand a transfer coding answers 501."""
    return next((coding for coding in _tokens(headers, "Transfer-Encoding") if coding != "chunked"), None)


def _asks_close(headers: Mapping[str, str]) -> bool:
    return "close" in _tokens(headers, "Connection")


def _tokens(headers: Mapping[str, str], name: str) -> list[str]:
    """The comma-separated tokens of every ``name`` field, lower-cased, blanks left out."""
    return [
        token
        for value in headers.getall(name, ())  # type: ignore[attr-defined]
        for token in (part.strip().lower() for part in value.split(","))
        if token
    ]


def _request_line_too_long(exc: BaseException | None, data: bytes, limit: int) -> bool:
    """Whether the parser refused a request line for its length (its URI): then 414,
    not 400. Known when the read it failed in begins with that line."""
    start = _REQUEST_LINE_START.match(data)
    return (
        isinstance(exc, http_exceptions.LineTooLong)
        and start is not None
        and b"\n" not in data[start.end() : start.end() + limit]
    )


def _version_message(version: str) -> str:
    return f"{version} is not supported: this server speaks HTTP/1.1 (and 1.0)"


# The most bytes a request head may take. aiohttp bounds its lines (8190 bytes each)
# and their number (128), not the whole: a head of a megabyte was taken, and a thousand
# unfinished ones from a client without a key held 1.6 GB (a review). nginx's default
# is four buffers of 8 KB.
MAX_HEAD_BYTES = 32 * 1024


class HeadTooLarge(http_exceptions.BadHttpMessage):
    """A request head past ``MAX_HEAD_BYTES``: answered 431, the connection closed."""


class _DoorParser:
    """aiohttp's request parser, with the messages the door refuses taken out."""

    def __init__(self, parser: Any, handler: DoorRequestHandler) -> None:
        self._parser = parser
        self._handler = handler

    def feed_data(self, data: bytes) -> tuple[list[tuple[Any, Any]], bool, bytes]:
        """As the parser's, with the door's refusals taken out and request heads held to
        ``MAX_HEAD_BYTES``: the bytes fed since the last head ended (none while a body
        is read) bound every head this feed ends, which are measured only when that
        bound is past the limit, and an unfinished one (a review: a head counted read
        by read, not head by head, refused valid requests whose blank line came in a
        read of its own, and took heads that came whole)."""
        handler = self._handler
        counted = handler.head_open
        span = handler.head_bytes + len(data) if counted else 0
        try:
            messages, upgraded, tail = self._parser.feed_data(data)
        except http_exceptions.HttpProcessingError as exc:
            self._handler.parse_failed(exc, data)
            raise  # aiohttp queues its 400 (``handle_error``)
        if messages and span > MAX_HEAD_BYTES:
            messages = handler.heads_measured(messages)
        if not handler.head_open:
            handler.head_bytes = 0  # a body is read: not a head
        elif messages:
            # A head ended. What follows the last one in this read may begin the next
            # (or end its body: no telling which without the parser's offsets, and a
            # body counted as a head refused the next request): counted from the next.
            handler.head_bytes = 0
        elif counted:
            handler.head_bytes = span
            if span > MAX_HEAD_BYTES:  # unfinished, and already past the limit
                too_large = HeadTooLarge(f"a request head of more than {MAX_HEAD_BYTES} bytes")
                handler.head_refused(too_large, data)
                raise too_large
        kept: list[tuple[Any, Any]] = []
        while messages and not upgraded:
            messages = self._handler.versions_checked(messages)
            left = self._handler.refuse_at_door(messages)
            kept.extend(left)
            if len(left) == len(messages) or self._handler.waiting:
                break
            # The parser stops at a limit of messages not yet consumed and keeps the
            # rest of the bytes: those the door consumed make room for more of them.
            messages, upgraded, tail = self._parser.feed_data(b"")
        else:
            kept.extend(messages)
        return kept, upgraded, tail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


def _compressed_body_unread(request: web.BaseRequest) -> bool:
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    return encoding not in ("", "identity") and not request.content.is_eof()


class DoorRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol, answering what ``Door`` refuses before the app."""

    def __init__(self, manager: web.Server, *, door: Door, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._door = door
        self._inner_parser = self._parser
        self._parser = cast(Any, _DoorParser(self._parser, self))
        # Messages handed to the app and answers it finished: equal when no request of
        # this connection is waiting or being answered, so a refusal keeps the order.
        self._handed = 0
        self._answered = 0
        self._refused_data = b""
        self._refused_message: RawRequestMessage | None = None  # its 505 or 431 is due
        self.head_bytes = 0  # of the request head arriving, so far (``_DoorParser``)
        self._head_too_large = False
        # For each message handed to the app, in order: the door's admission of it, if any.
        self._bound_for: deque[Admission | None] = deque()
        self._express_task: asyncio.Task[None] | None = None
        # The worker and held line of the predict in the express lane, if one is there.
        self._express_line: tuple[InferenceWorker, float] | None = None
        self._read_once_drained = False
        self._last_payload: StreamReader = EMPTY_PAYLOAD  # of the last request parsed
        self._last_chunked = False  # whether that request's body is chunked
        self._last_message: Any = None  # that request's head
        # Bytes of that chunked body fed to the parser (framing and data): against the
        # data its reader got (``_framing_bounded``).
        self._chunked_fed = 0
        self._framing_refused = False  # past its bound: closed after the answer
        # Bytes read and not yet given to the parser: a chunked body's read is fed a
        # slice a turn of the event loop (``_feed_slices``), reading paused meanwhile.
        self._unfed = b""
        # The rest of a read, from a chunked request's head on, held behind a request of
        # that read the lane or the door took: fed once they let go (``read_on``).
        self._behind = b""
        self._fed_last = b""  # the bytes last given to the parser
        # The peer half-closed behind requests still queued: close once they are answered.
        self._close_once_answered = False
        self.held_since = 0.0  # ``loop.time()`` when the door last held it
        # The rest of a compressed body the app answered unread: dropped as it arrives,
        # never parsed, until the client closes or ``_lingering_time`` passes.
        self._discarding = False
        self._discard_timer: asyncio.TimerHandle | None = None
        self.evicted = False  # closed to let a new connection in (``CappedServer``)
        self.refused_at_cap = False  # made past the cap: answered 503, never counted

    def read_on(self) -> None:
        """Resume reading the connection after the door or the lane stopped, unless
        its peer is not reading our answers (writing paused: the transport's write
        buffer is past its high-water mark). Then reading resumes once the buffer
        drains (``resume_writing``): a client that pipelines requests and never reads
        cannot grow the answers waiting in memory without bound."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._behind and not (self._express_task or self._unfed or self._door.holds(self)):
            if self.writing_paused:
                self._read_once_drained = True
                return
            behind, self._behind = self._behind, b""
            self.data_received(behind)
        if self.waiting:
            return
        if self.writing_paused:
            self._read_once_drained = True
            return
        # First what the parser kept past its limit of messages not yet consumed.
        self.data_received(b"")
        if not (self.waiting or self._buffer_paused or transport.is_closing()):
            transport.resume_reading()  # aiohttp's own hold (its message queue) stays

    @property
    def waiting_for_head(self) -> bool:
        """Nothing of it in progress: idle between requests, or a head still arriving
        (aiohttp's loop waits for a message, no request is being answered or held)."""
        waiter = self._waiter
        return (
            waiter is not None
            and not waiter.done()
            and self._handed == self._answered
            and not self._messages
            and not self.waiting
            and not (self._close or self._force_close or self._discarding)
        )

    @property
    def lingering(self) -> bool:
        """Every request it sent is answered, and it is read on only so that its client
        sees the answer (the rest of a body after an early 401 or 413, or bytes dropped
        unread before the close): closing it keeps no answer from anybody."""
        return (
            self._handed == self._answered
            and not self._messages
            and not self.waiting
            and self._express_task is None
            and (self._close or self._force_close or self._discarding or not self._last_payload.is_eof())
        )

    @property
    def waiting_since(self) -> float:
        """When it began waiting for this head: its head timer's start (loop time)."""
        return self._next_keepalive_close_time - self._keepalive_timeout

    @property
    def requests_read(self) -> int:
        """Whole requests read from it so far."""
        return self._handed

    def evict(self) -> None:
        """Close it now, for a new connection: it waits for a head (``waiting_for_head``)."""
        self.evicted = True
        self.force_close()

    @property
    def event_loop(self) -> asyncio.AbstractEventLoop:
        """Its loop, without ``asyncio.get_running_loop()``'s system call (Python 3.11
        asks the process id each time)."""
        return self._loop

    @property
    def waiting(self) -> bool:
        """Not to be read: held by the door, a request in the express lane, or bytes
        read and not yet fed to the parser."""
        return (
            self._express_task is not None
            or bool(self._unfed or self._behind)
            or self._door.holds(self)
        )

    def _resume_transport_reading(self) -> None:
        """aiohttp resumes reading by itself too (a request body drained, its message
        queue emptied): not while the door holds the connection or the lane answers
        on it. ``read_on`` resumes it then."""
        if not self.waiting:
            super()._resume_transport_reading()

    def data_received(self, data: bytes) -> None:
        """As aiohttp's, but a body still arriving when the connection is set to close
        (a shutdown began) is read on: aiohttp drops every byte from then, so a stream
        sending steadily lost what it sent after the signal and a batch whose body was
        half sent got nothing at the end of the wait (a review). Its request can then
        finish within the shutdown's wait for in-flight requests; what follows it on
        the connection is not served (parsed, counted as handed by ``refuse_at_door``,
        and dropped: the connection closes after this answer)."""
        if self._discarding or self._head_too_large:
            return
        if self._behind:  # after what waits behind the lane or the door, in order
            self._behind += data
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if self._unfed:  # after what is waiting to be fed, in order
            self._unfed += data
            if self.transport is not None:
                # aiohttp resumed reading (its body drained) while slices wait: paused
                # again, so what waits is a read at most, not all the client sends.
                self.transport.pause_reading()
            return
        if len(data) > CHUNKED_SLICE_BYTES and self.transport is not None:
            self._feed_slices(data)
            return
        self._feed(data)

    def _feed_slices(self, data: bytes) -> None:
        """Feed ``data``, a chunked body's bytes a slice at a time, one a turn of the
        event loop, so that a body of one-byte chunks (each a call of the parser into
        the body's reader, ~4 µs) cannot hold the loop for a whole read: 256 KB of them
        held it 220 ms, and two such clients starved every tenant (a review). A read
        holding the head of a chunked request is fed up to the end of the head first:
        its message then says the body is chunked. Other reads are fed whole (a body
        that came with its head stays whole for the express lane), up to a chunked
        request's head behind the requests they begin with (a review: a 120 KB chunk
        extension behind a ``GET /health`` in one read was fed whole and served)."""
        while data:
            if self._last_payload.is_eof():
                end = data.find(b"\r\n\r\n", 0, _HEAD_SEARCH_BYTES)
                if end < 0:
                    self._feed(data)
                    return
                head = data[:end].lower()
                if b"transfer-encoding" not in head and not self._head_continues_chunked():
                    chunked_at = _chunked_head_behind(data, end, head)
                    if chunked_at < 0:
                        self._feed(data)
                        return
                    self._feed(data[:chunked_at])
                    rest = self._rest_after_split(data[chunked_at:])
                    if rest is None:
                        return
                    data = rest
                    continue
                head, data = data[: end + 4], data[end + 4 :]
                self._feed(head)
                continue
            if not self._last_chunked:
                # A body of a known length ending in this read: what follows it is looked
                # at as a read that begins between requests (a review: a chunked request
                # behind the end of another's body was fed whole, its framing uncounted).
                left = self._body_left()
                if left is None or left >= len(data):
                    self._feed(data)
                    return
                self._feed(data[:left])
                rest = self._rest_after_split(data[left:], body_ended=True)
                if rest is None:
                    return
                data = rest
                continue
            if len(data) <= CHUNKED_SLICE_BYTES:
                self._feed(data)
                return
            self._feed(data[:CHUNKED_SLICE_BYTES])
            transport = self.transport
            if transport is None or transport.is_closing() or self._discarding:
                return
            self._unfed = data[CHUNKED_SLICE_BYTES:]
            transport.pause_reading()
            self._loop.call_soon(self._feed_unfed)
            return

    def _rest_after_split(self, rest: bytes, body_ended: bool = False) -> bytes | None:
        """What of a read split in two is fed next, now; None: nothing now, the
        connection closing, or ``rest`` waiting behind a request of the read's first
        part that the lane or the door took (fed by ``read_on`` once they let go).
        ``body_ended``: split where a body should end; if it did not (the parser keeps
        bytes its reader has no room for yet, past its high-water mark), the rest is
        fed whole, as it would have been: piece by piece would copy the parser's tail
        each time."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._discarding:
            return None
        if body_ended and not self._last_payload.is_eof():
            self._feed(rest)
            return None
        if self.waiting:
            self._behind = rest
            transport.pause_reading()
            return None
        return rest

    def _body_left(self) -> int | None:
        """Bytes of the body being read still to come, when its length is known and the
        parser feeds it as sent (no chunks, no Content-Encoding); else None."""
        length = None if self._last_chunked else _identity_length(self._last_message)
        if length is None:
            return None
        left = length - self._last_payload.total_bytes
        return left if left > 0 else None

    def _head_continues_chunked(self) -> bool:
        """Whether the head this read ends may have begun in an earlier read naming a
        transfer coding (a review: a head split after its ``Transfer-Encoding`` line
        had its body fed whole, unsliced and its framing uncounted). Either no request
        ended since that head began (``head_bytes``: it may span several reads), or it
        began in the last read after the request that ended there, within that read's
        last ``MAX_HEAD_BYTES`` after its last blank line (a head holds none, and is no
        longer). Body bytes that read the same only split the read needlessly."""
        if self.head_bytes:
            return True
        last = self._fed_last  # at most MAX_HEAD_BYTES (``_feed``)
        tail = last[last.rfind(b"\r\n\r\n") + 4 :] if b"\r\n\r\n" in last else last
        return b"transfer-encoding" in tail.lower()

    def _feed_unfed(self) -> None:
        data, self._unfed = self._unfed, b""
        transport = self.transport
        if transport is None or transport.is_closing() or self._discarding:
            return
        self._feed_slices(data)
        if not self._unfed and not self._reading_paused:
            # Not while aiohttp holds reading for a body its reader has not taken (its
            # high-water mark, a review: without this check a chunked stream's reads
            # went on, 40 MB more held): it resumes reading itself once that drains.
            self.read_on()

    def _feed(self, data: bytes) -> None:
        if data:  # not ``read_on``'s empty feed, which would hide the last read's tail
            # For ``_head_continues_chunked``, which looks no further back: an idle
            # connection keeps at most a head's worth, not its last read (256 KB).
            self._fed_last = data if len(data) <= MAX_HEAD_BYTES else data[-MAX_HEAD_BYTES:]
        if self._last_chunked and not self._last_payload.is_eof() and not self._framing_bounded(data):
            return
        parser = self._parser
        if (self._close or self._force_close) and not self._last_payload.is_eof() and parser:
            try:
                parser.feed_data(data)
            except http_exceptions.HttpProcessingError:
                pass  # ``parse_failed`` failed the body: its reader answers the 400
            return
        super().data_received(data)

    def _framing_bounded(self, data: bytes) -> bool:
        """Whether a chunked body's framing stays within bounds with ``data`` to come:
        chunk extensions and chunk-size padding are parsed and dropped by aiohttp's
        parser without limit and count as no body byte, so a client sent gigabytes
        that neither the body limit nor its pace saw, seconds of the loop each (a
        review; Node.js CVE-2024-22019). Past ``CHUNK_FRAMING_BYTES`` and 16 bytes a
        byte of data (one-byte chunks take 5), the body fails (its 400) and the
        connection reads no more. Asked of what was fed before ``data``: a read that
        ends the body may carry the next requests, which are no framing."""
        payload = self._last_payload
        framing = self._chunked_fed - payload.total_bytes
        if framing <= CHUNK_FRAMING_BYTES + CHUNK_FRAMING_PER_DATA_BYTE * payload.total_bytes:
            self._chunked_fed += len(data)
            return True
        log.info("chunk_framing_refused", framing_bytes=framing, data_bytes=payload.total_bytes)
        set_exception(
            payload,
            web.RequestPayloadError(
                f"chunked body of {framing} bytes of framing (chunk extensions, size padding) "
                f"for {payload.total_bytes} bytes of data"
            ),
        )
        self._discarding = True  # nothing more of this connection is parsed
        self._framing_refused = True
        if self._handed == self._answered:  # answered already (a 401): closed now
            self._discard_rest()
        return False

    @property
    def head_open(self) -> bool:
        """What arrives now is a request head (no body being read), unless refused."""
        return not self._head_too_large and self._last_payload.is_eof()

    def head_refused(self, exc: HeadTooLarge, data: bytes) -> None:
        """A head past the limit: its 431 is due (``handle_error``), and nothing it
        sends from now on is parsed or kept."""
        self._head_too_large = True
        self.head_bytes = 0
        self.parse_failed(exc, data)

    def parse_failed(self, exc: http_exceptions.HttpProcessingError, data: bytes) -> None:
        """aiohttp's parser refused what it was given: it queues a 400 for it, due
        like an answer (a half-close waits for it: ``eof_received``). A body it was
        in (a bad chunk size, say) never ends: it fails, so the app's reader answers
        that request at once (in its ``Accept``), rather than at the body timeout.
        ``data``: what it was given, for ``handle_error`` to read the refused head in."""
        self._refused_data = data[:_REFUSED_HEAD_BYTES]
        self._handed += 1
        payload = self._last_payload
        if payload.is_eof() or payload.exception() is not None:
            return
        reason = parser_reason(exc, exc.message)
        set_exception(payload, web.RequestPayloadError(reason))

    def eof_received(self) -> bool | None:  # type: ignore[override]
        """The client has sent all it will (a half-close, as ``nc -N`` or a request
        piped in makes): the request it is waiting on is still answered, then the
        connection closed. aiohttp closes at once, dropping the answer of a request the
        app is serving (its access line said 202 while the client got nothing). Not
        over TLS, which cannot half-close. A body still awaited never comes: it fails,
        so its request is answered at once (its 413 when its head decided one, else a
        400), after those before it (a review: a valid request, then a head declaring a
        body past the limit, then the half-close, got no answer at all)."""
        transport = self.transport
        busy = self._handed != self._answered  # a request handed on and not yet answered
        if not busy or transport is None or transport.get_extra_info("sslcontext") is not None:
            return None  # closed now, as aiohttp does
        payload = self._last_payload  # the last request parsed: only its body can be open
        if not payload.is_eof() and payload.exception() is None:
            set_exception(
                payload, web.RequestPayloadError("the client closed its side before sending the whole body")
            )
        if self._messages or self._buffer_paused:
            # Requests pipelined before the half-close are answered in turn first
            # (``_closing_after_answers``): closing after this answer would drop them.
            self._close_once_answered = True
        else:
            self._close = True  # no next request: the connection closes after this answer
        return True

    def _closing_after_answers(self) -> bool:
        """The peer half-closed and the last request it sent is answered: set to close."""
        if self._close_once_answered and not self._messages and not self._buffer_paused:
            self._close = True
        return self._close

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._read_once_drained:
            self._read_once_drained = False
            self.read_on()

    async def _handle_request(
        self, request: web.BaseRequest, *args: Any, **kwargs: Any
    ) -> tuple[web.StreamResponse, bool]:
        if self._bound_for:
            admission = self._bound_for.popleft()
            if admission is not None and admission.worker is not None:
                self._door.reached_app(admission.worker, admission.admitted_at)
        try:
            response, reset = await super()._handle_request(request, *args, **kwargs)
        finally:
            self._answered += 1
        # A refused framing closes the connection once its own request is answered too
        # (a review: after the request before it, and it got no 400).
        if _compressed_body_unread(request) or (
            self._framing_refused and self._handed == self._answered
        ):
            self._discard_rest()
        self._closing_after_answers()  # aiohttp's loop reads ``_close`` next
        # Not a 503 of /ready; and only once the whole body is in: aiohttp still reads
        # the rest of one the app did not read (lingering), which a hold would stall.
        if response.status == 503 and request.method == "POST" and request.content.is_eof():
            self._door.hold_refused(self)
        return response, reset

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if _compressed_body_unread(request) and not resp.prepared:
            resp.force_close()  # ``Connection: close``: ``_discard_rest`` follows the answer
        return await super().finish_response(request, resp, start_time)

    def _discard_rest(self) -> None:
        """Close after an answer given before a compressed body was read (a 401, a 413,
        an open route that ignores bodies). aiohttp would read the rest of the body
        through its decompressor for ``lingering_time`` without a turn of the loop
        between reads: one keyless 2 MB gzip of 2 GiB of zeros held the loop seconds
        at a time (a review). Its bytes are dropped unread instead, our side of the
        connection is shut once the answer is sent (the client reads it, then the
        end), and the connection closes when the client closes its side, or after
        ``lingering_time``: closing at once on unread bytes would reset the connection,
        and the client could lose the answer."""
        self._discarding = True
        self._force_close = True  # aiohttp's loop then neither lingers nor closes
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
        self._discard_timer = self._loop.call_later(self._lingering_time, transport.close)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._discard_timer is not None:  # the client closed first: nothing to wait for
            self._discard_timer.cancel()
            self._discard_timer = None
        self._door.release(self)
        while self._bound_for:
            admission = self._bound_for.popleft()
            if admission is not None and admission.worker is not None:
                self._door.reached_app(admission.worker)  # it never will
        super().connection_lost(exc)

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        """As aiohttp's, once the request in the express lane, if any, is answered."""
        task = self._express_task
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)
        await super().shutdown(timeout)

    def heads_measured(self, messages: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """``messages`` up to the first whose head is past ``MAX_HEAD_BYTES``, which is
        answered 431 and closes the connection."""
        for index, (message, _payload) in enumerate(messages):
            if not isinstance(message, RawRequestMessage):
                continue
            size = len(message.method) + len(message.path) + 13 + sum(
                len(name) + len(value) + 4 for name, value in message.raw_headers
            )
            if size > MAX_HEAD_BYTES:
                self._refused_message = message
                self._head_too_large = True
                too_large = HeadTooLarge(f"a request head of {size} bytes")
                refused = _ErrInfo(status=431, exc=too_large, message=str(too_large))
                return [*messages[:index], (refused, EMPTY_PAYLOAD)]
        return messages

    def versions_checked(self, messages: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """``messages`` up to the first of an HTTP version other than 1.x, which is
        answered 505, or with a ``Host`` that is no host (RFC 9112, 3.2: 400; llhttp
        takes any, a review sent ``a b`` and ``a/b``); either closes the connection.
        aiohttp's parser takes any ``HTTP/d.d`` and answers in the version asked, so
        ``GET / HTTP/2.0`` over HTTP/1 framing got ``HTTP/2.0 200 OK``, which no client
        of either version can read."""
        for index, (message, _payload) in enumerate(messages):
            if not isinstance(message, RawRequestMessage):
                continue
            refused: _ErrInfo | None = None
            if message.version.major != 1:
                version = f"HTTP/{message.version.major}.{message.version.minor}"
                refused = _ErrInfo(
                    status=505,
                    exc=http_exceptions.BadStatusLine(version),
                    message=_version_message(version),
                )
            elif (host := message.headers.get("Host")) is not None and _HOST.fullmatch(host) is None:
                reason = f"the Host field {host[:64]!r} is no host name or address"
                refused = _ErrInfo(status=400, exc=http_exceptions.BadHttpMessage(reason), message=reason)
            elif message.chunked and (coding := _transfer_coding_refused(message.headers)) is not None:
                reason = (
                    f"the transfer coding {coding[:64]!r} is not implemented: send the body "
                    "chunked (Transfer-Encoding: chunked) or with a Content-Length, and compress "
                    "it with Content-Encoding"
                )
                refused = _ErrInfo(status=501, exc=http_exceptions.BadHttpMessage(reason), message=reason)
            elif message.version.minor == 0 and not message.should_close and _asks_close(message.headers):
                # llhttp keeps an HTTP/1.0 connection that names both keep-alive and
                # close; ``close`` wins (RFC 9112, 9.3).
                messages = list(messages)
                messages[index] = (message._replace(should_close=True), _payload)
            if refused is not None:
                self._refused_message = message
                return [*messages[:index], (refused, EMPTY_PAYLOAD)]
        return messages

    def refuse_at_door(self, messages: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """The messages the app still has to answer, in order, after the door wrote its
        refusals for those at the front of the line (and the express lane took the
        last one, if it could)."""
        at_front = self._handed == self._answered and not self._close and not self._force_close
        kept = []
        last = len(messages) - 1
        for index, (message, payload) in enumerate(messages):
            self._last_payload = payload
            self._last_chunked = bool(getattr(message, "chunked", False))
            self._last_message = message  # its length asked only when needed (``_body_left``)
            self._chunked_fed = 0
            if not (at_front and self.transport and isinstance(message, RawRequestMessage)):
                kept.append((message, payload))
                self._bound_for.append(None)
                continue
            answer, admission = self._door.refusal(message, payload, self)
            if answer is None:
                if (
                    admission is not None
                    and index == last
                    and self._take_express(message, admission)
                ):
                    continue
                at_front = False
                kept.append((message, payload))
                self._bound_for.append(admission)
                continue
            self.transport.write(answer)
            if self._inner_parser is not None:
                self._inner_parser.message_consumed()
            self._restart_head_timer()
        self._handed += len(kept)
        return kept

    def _take_express(self, message: RawRequestMessage, admission: Admission) -> bool:
        """Hand ``message`` to the express lane, if it takes it: until its answer the
        connection is not read and its keep-alive timer is stopped."""
        lane = self._door.express
        if (
            lane is None
            or admission.body is None
            or self.transport is None
            or not _plain_body(message.headers)
        ):
            return False
        task = lane.take(
            message,
            admission.body,
            admission.key,
            admission.deadline,
            admission.worker,
            self,
            admission.admitted_at,
            admission.target,
        )
        if task is None:
            return False
        self._express_task = task
        if admission.worker is not None:
            self._express_line = (admission.worker, self._door.line_of(message.headers))
        self._handed += 1
        if self._inner_parser is not None:
            self._inner_parser.message_consumed()
        self.transport.pause_reading()
        # The keep-alive timer must not close the connection while the lane answers.
        # Rather than cancel it and make it again (1.8 µs a request), its close time
        # moves past any answer: if it fires meanwhile, it re-arms itself for then,
        # and the answer brings it back (``_restart_head_timer``).
        self._next_keepalive_close_time = self._loop.time() + _LANE_KEEPALIVE_HOLD_S
        return True

    def express_answered(self, answer: bytes | None, close: bool, refused: bool = False) -> bool:
        """The express lane's answer (None: none, the connection is closed); ``refused``:
        it is a 503, and the connection is held as after the app's (``hold_refused``).
        False: the client is gone, its connection closed or reset.

        A connection the lane serves is not read meanwhile, so a reset shows only when
        the answer is written: the write fails and closes the transport at once (a
        review: counted 202 where the app path counted the same reset 499). Asking the
        socket's pending error before writing cost a request 4 µs (uvloop makes a
        socket object for each ``getsockopt``)."""
        self._express_task = None
        served_for, self._express_line = self._express_line, None
        self._answered += 1
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if answer is not None:
            transport.write(answer)
            if transport.is_closing():
                return False
            if close:
                # Shutting down. What the client sent behind this request lies unread
                # (the lane holds reading): closing now would reset the connection, and
                # the kernel drop what of the answer it has not sent (a review: 3.7 KB
                # of a 130 KB 202 arrived). Our side is shut once the answer is sent,
                # and the rest is read and dropped until the client closes.
                self._discard_rest()
                transport.resume_reading()
                return True
        if close or self._closing_after_answers():  # shutting down, or no next request
            self.force_close()
            return True
        self._restart_head_timer()
        if refused:
            self._door.hold_refused(self)
        elif served_for is not None:
            self._door.hold_behind_line(self, *served_for)
        self.read_on()
        return True

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to what never reached the app: a request it could not parse
        (a bad ``Content-Length`` or chunk size, a head over its limits, an unknown
        method, a body in an encoding it cannot decode), as a problem document like
        every other error, with a line in our log rather than aiohttp's traceback.
        The connection is closed after it, as aiohttp does."""
        if request.writer.output_size > 0:  # an answer began: it cannot be replaced
            return super().handle_error(request, status, exc, message)
        # aiohttp answers on a stand-in request of HTTP/1.0, and an answer takes its
        # request's version: an HTTP/1.1 server answers in 1.1 (RFC 9110, 6.2; a review).
        request._version = HttpVersion11
        request._cache.pop("version", None)
        error: ApiError
        if isinstance(exc, ContentEncodingError):
            error = UnsupportedMediaType(
                message or "Content-Encoding not supported",
                headers={"Accept-Encoding": ", ".join(sorted(SUPPORTED_ENCODINGS - {"identity"}))},
            )
        elif status == 505:
            error = VersionNotSupported(message)
        elif status == 501:
            error = http_error(501, "Not Implemented")
            error.detail = message
        elif _request_line_too_long(exc, self._refused_data, self.max_line_size):
            error = http_error(414, "URI Too Long")
            error.detail = f"the request line is longer than {self.max_line_size} bytes"
        elif isinstance(exc, HeadTooLarge):
            error = http_error(431, "Request Header Fields Too Large")
            error.detail = f"the request head is longer than {MAX_HEAD_BYTES} bytes"
        elif status == 400 and (version := refused_version(exc, self._refused_data)) is not None:
            error = VersionNotSupported(_version_message(version))
        elif status == 400:
            error = BadRequest(f"Malformed HTTP request: {parser_reason(exc, message)}")
        else:
            error = as_api_error(exc if isinstance(exc, Exception) else Exception())
        refused = self._refused_message
        headers: Mapping[str, str]
        if refused is not None:  # refused by the door (a version, a head's size, a Host)
            path, headers = refused.path.split("?", 1)[0], refused.headers
        else:
            path, headers = refused_head(self._refused_data, request.path, request.headers)
        if len(path) > MAX_INSTANCE_CHARS:  # a review: a 9 KB path answered in the 400
            path = path[:MAX_INSTANCE_CHARS] + "..."
        request_id = self._door.request_ids.from_headers(headers)
        # Counted as every answer is (a review: a client behind a broken proxy getting
        # nothing but 400s showed on no dashboard); no route or method was read.
        self._door.count_unparsed(error.status)
        log.info(
            "bad_http_request",
            status=error.status,
            error=parser_reason(exc, message),
            request_id=request_id,
        )
        fmt = preferred_format(headers.get("Accept"))
        body, content_type = problem_document(error, path, request_id, fmt)
        response = web.Response(
            status=error.status,
            body=body,
            headers={"Content-Type": content_type, REQUEST_ID_HEADER: request_id, **problem_headers(error)},
        )
        response.force_close()
        return response

    def _process_keepalive(self) -> None:
        """aiohttp's keep-alive (head) timeout, not enforced while the door holds the
        connection: its next head is not late, it waits unread by our choice (and
        ``Retry-After`` may be longer than a short head timeout). It is enforced again
        from the hold's longest end, ``hold_s`` after it began."""
        if self._door.holds(self) and self._keepalive_timeout > 0:
            # Bounded even if the door never let it go (its tick failing for good).
            close_time = self.held_since + self._door.hold_s + self._keepalive_timeout
            if self._loop.time() < close_time:
                self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)
                return
        super()._process_keepalive()

    def _restart_head_timer(self) -> None:
        """As after any answer: the next head is due within the keep-alive timeout."""
        if self._keepalive_timeout <= 0:
            return
        close_time = self._loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        handle = cast("asyncio.TimerHandle | None", self._keepalive_handle)
        if handle is not None and handle.when() > close_time:  # re-armed during the lane
            handle.cancel()
            handle = None
        if handle is None:
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)


def parser_reason(exc: BaseException | None, message: str | None) -> str:
    """Why aiohttp's parser refused a request, without the excerpt of the request its
    messages quote (after ``":\n"``, or in the message itself for an over-long line or
    a bad header): it can hold an API key or a body's features, which neither the
    answer nor the log may carry. Known refusals by their type; others by the words
    before any quoting, at most 80 characters."""
    for kind, reason in _PARSER_REASONS:
        if isinstance(exc, kind):
            return reason
    text = message or ""
    for start, reason in _PARSER_MESSAGES:
        if text.startswith(start):
            return reason
    # An apostrophe within a word ("can't") quotes nothing.
    words = re.split(r"[:\"\n]|\bb'|(?<![A-Za-z])'|'(?![A-Za-z])", text, maxsplit=1)[0].strip()
    return words[:80] or "unparsable"


# A chunked body's bytes go to the parser at most this many a turn of the event loop.
CHUNKED_SLICE_BYTES = 16 * 1024
# A chunked body's framing (sizes, extensions, CRLFs) may be this much beyond
# ``CHUNK_FRAMING_PER_DATA_BYTE`` bytes a byte of its data (``_framing_bounded``).
CHUNK_FRAMING_BYTES = 64 * 1024
CHUNK_FRAMING_PER_DATA_BYTE = 16
# A request head is searched for its end this far into a read (aiohttp's limit is 8190).
_HEAD_SEARCH_BYTES = 65536
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d{1,18})[ \t]*(?:\r|$)")


def _identity_length(message: Any) -> int | None:
    """A request's ``Content-Length``, if its body is fed to its reader byte for byte
    (no ``Content-Encoding`` decoding it on the way); None otherwise."""
    headers = getattr(message, "headers", None)
    if headers is None or headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return None
    length = headers.get("Content-Length")
    return int(length) if length is not None and length.isascii() and length.isdigit() else None


def _chunked_head_behind(data: bytes, end: int, head: bytes) -> int:
    """Where in ``data`` a chunked request's head begins behind the request whose head
    (lower-cased, ``head``) ends at ``end``, walking the requests between by their
    ``Content-Length``; -1: none seen. A misreading only splits a read the parser is
    then fed in two (the parser's own reading of the framing decides)."""
    while True:
        length = _CONTENT_LENGTH.search(head)
        start = end + 4 + (int(length.group(1)) if length else 0)
        if start >= len(data):
            return -1
        end = data.find(b"\r\n\r\n", start, start + _HEAD_SEARCH_BYTES)
        if end < 0:
            return -1
        head = data[start:end].lower()
        if b"transfer-encoding" in head:
            return start
_PARSER_MESSAGES: tuple[tuple[str, str], ...] = (
    ("Missing 'Host' header", "the Host header is missing (HTTP/1.1 requires one)"),
    ("Data after `Connection: close`", "bytes sent after a request with Connection: close"),
)
_PARSER_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (http_exceptions.LineTooLong, "the request line or a header is too long"),
    (http_exceptions.InvalidHeader, "a header is invalid"),
    (http_exceptions.BadHttpMethod, "the method is invalid"),
    (http_exceptions.BadStatusLine, "the request line is invalid"),
    (http_exceptions.InvalidURLError, "the URL is invalid"),
    (http_exceptions.ContentLengthError, "the Content-Length is invalid"),
    (http_exceptions.TransferEncodingError, "the Transfer-Encoding is invalid"),
)
