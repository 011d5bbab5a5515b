"""Errors the client raises or fails delivery futures with.

    MlgateError                     base: ``retriable`` says whether a retry may succeed
    ├── TransportError              no HTTP answer: refused, reset, timed out (retriable)
    ├── ApiError                    an HTTP error answer; ``status`` and ``problem`` (RFC 9457)
    │   ├── BadRequest (400)
    │   ├── Unauthorized (401)
    │   ├── Forbidden (403)
    │   ├── NotFound (404)          unknown model or version
    │   ├── Conflict (409)          same Idempotency-Key or record_id in flight (retriable)
    │   ├── PayloadTooLarge (413)
    │   ├── UnsupportedMediaType (415)
    │   ├── ValidationFailed (422)  schema violation, or every record of a batch rejected
    │   ├── RateLimited (429)       retriable, honours Retry-After
    │   ├── ServerError (5xx)       500 and others not listed below
    │   ├── BadGateway (502)        a balancer without a healthy host (retriable)
    │   ├── Overloaded (503)        queue full, breaker open, a model not loaded there (retriable)
    │   └── DeadlineExceeded (504)  the request's deadline passed (retriable)
    ├── UnexpectedAnswer            a 2xx that is not mlgate's answer to the batch
    ├── BufferFull                  ``send`` on a full producer with ``block_on_full=False``
    ├── RecordTooLarge              ``send`` of a record no batch can carry (also a ValueError)
    └── ClientClosed                a call on a producer or predictor after its ``close``
        ├── ProducerClosed          ``send`` after ``close``; records ``close`` cut short
        └── PredictorClosed         ``predict`` after ``close``

``ApiError.from_response`` picks the subclass by status. A batch that exhausts its
retries fails each record's future with the last error: its ``problem`` is the last
problem document the server answered (``None`` for a ``TransportError``).
"""

from __future__ import annotations

from typing import Any, ClassVar


class MlgateError(Exception):
    """Base of every error of this package."""

    retriable: ClassVar[bool] = False


class TransportError(MlgateError):
    """The request got no HTTP answer: connection refused or reset, or a timeout."""

    retriable = True


class UnexpectedAnswer(MlgateError):
    """A success status whose body is not mlgate's answer to the batch sent (a captive
    portal's page, a proxy's): nothing says the records were written."""


class BufferFull(MlgateError):
    """The producer holds ``max_buffer_bytes`` already and was told not to wait."""


class RecordTooLarge(MlgateError, ValueError):
    """``send`` of a record whose encoding alone is past the producer's ``max_bytes``:
    no batch can carry it, so it is refused there (a ``ValueError`` too, as bad
    arguments are)."""


class ClientClosed(MlgateError):
    """The producer or predictor was closed; it takes no more calls."""


class ProducerClosed(ClientClosed):
    """The producer was closed; it takes no more records."""


class PredictorClosed(ClientClosed):
    """The predictor was closed; it asks no more predictions."""


class ApiError(MlgateError):
    """mlgate answered with an error status; ``problem`` is its problem document."""

    status: int = 0
    retriable = False

    def __init__(
        self,
        status: int,
        problem: dict[str, Any] | None = None,
        retry_after_s: float | None = None,
        request_id: str | None = None,
    ) -> None:
        self.status = status
        self.problem: dict[str, Any] = problem or {}
        self.retry_after_s = retry_after_s
        self.request_id = request_id
        super().__init__(f"{status} {self.title}: {self.detail}")

    @property
    def title(self) -> str:
        return str(self.problem.get("title") or "")

    @property
    def detail(self) -> str:
        """The problem's ``detail`` (or the OIP ``error`` message)."""
        return str(self.problem.get("detail") or self.problem.get("error") or "")

    @property
    def field_errors(self) -> list[dict[str, Any]]:
        """The problem's ``errors`` members (``loc``, ``msg``, ``index``, ``record_id``)."""
        errors = self.problem.get("errors")
        return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []

    @staticmethod
    def from_response(
        status: int,
        problem: dict[str, Any] | None,
        retry_after_s: float | None = None,
        request_id: str | None = None,
    ) -> ApiError:
        kind = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
        return kind(status, problem, retry_after_s, request_id)


class BadRequest(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    retriable = True


class PayloadTooLarge(ApiError):
    pass


class UnsupportedMediaType(ApiError):
    pass


class ValidationFailed(ApiError):
    pass


class RateLimited(ApiError):
    retriable = True


class ServerError(ApiError):
    pass


class BadGateway(ServerError):
    retriable = True


class Overloaded(ServerError):
    retriable = True


class DeadlineExceeded(ServerError):
    retriable = True


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationFailed,
    429: RateLimited,
    502: BadGateway,
    503: Overloaded,
    504: DeadlineExceeded,
}
