"""Errors the HTTP layer answers, each one problem+json document.

    ApiError (500)
    ├── BadRequest (400)            body is not decodable
    ├── Unauthorized (401)          missing or unknown API key
    ├── Forbidden (403)             key lacks the scope
    ├── NotFound (404)              unknown route, model or version
    ├── MethodNotAllowed (405)
    ├── BodyTimeout (408)           body slower than body_min_rate_bytes after body_timeout_s
    ├── Conflict (409)              same Idempotency-Key still in flight
    ├── PayloadTooLarge (413)       body or decompressed body over the limit
    ├── UnsupportedMediaType (415)
    ├── ValidationFailed (422)      schema or semantic violations, with ``errors``
    ├── RateLimited (429)           retriable, with Retry-After
    ├── Overloaded (503)            retriable: mailbox full, breaker open, closing
    ├── Unavailable (503)           retriable: a model in the repository failed to load here
    └── DeadlineExceeded (504)      retriable: waited past its deadline
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mlgate.schemas.problem import FieldError


class ApiError(Exception):
    status = 500
    title = "Internal Server Error"
    slug = "internal"
    retriable = False

    def __init__(
        self,
        detail: str | None = None,
        *,
        errors: Sequence[FieldError] | None = None,
        retry_after_s: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.errors = list(errors) if errors is not None else None
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})

    @property
    def type_uri(self) -> str:
        return f"/problems/{self.slug}"


class BadRequest(ApiError):
    status, title, slug = 400, "Bad Request", "bad-request"


class Unauthorized(ApiError):
    status, title, slug = 401, "Unauthorized", "unauthorized"


class Forbidden(ApiError):
    status, title, slug = 403, "Forbidden", "forbidden"


class NotFound(ApiError):
    status, title, slug = 404, "Not Found", "not-found"


class MethodNotAllowed(ApiError):
    status, title, slug = 405, "Method Not Allowed", "method-not-allowed"


class BodyTimeout(ApiError):
    status, title, slug = 408, "Request Timeout", "body-timeout"


class Conflict(ApiError):
    status, title, slug = 409, "Conflict", "conflict"


class ExpectationFailed(ApiError):
    status, title, slug = 417, "Expectation Failed", "expectation-failed"


class PayloadTooLarge(ApiError):
    status, title, slug = 413, "Payload Too Large", "payload-too-large"


class UnsupportedMediaType(ApiError):
    status, title, slug = 415, "Unsupported Media Type", "unsupported-media-type"


class ValidationFailed(ApiError):
    status, title, slug = 422, "Validation Failed", "validation-failed"


class RateLimited(ApiError):
    status, title, slug, retriable = 429, "Too Many Requests", "rate-limited", True


class Overloaded(ApiError):
    status, title, slug, retriable = 503, "Service Unavailable", "overloaded", True


class Unavailable(ApiError):
    status, title, slug, retriable = 503, "Service Unavailable", "model-unavailable", True


class ShuttingDown(ApiError):
    status, title, slug, retriable = 503, "Service Unavailable", "shutting-down", True


class DeadlineExceeded(ApiError):
    status, title, slug, retriable = 504, "Deadline Exceeded", "deadline-exceeded", True


class VersionNotSupported(ApiError):
    status, title, slug = 505, "HTTP Version Not Supported", "http-version-not-supported"


def http_error(status: int, reason: str) -> ApiError:
    """An answer aiohttp gives of its own (a static file's 403, say) as a problem: of
    our type for its status where we have one, else a type named after the status."""
    known = _OURS_BY_STATUS.get(status)
    if known is not None:
        error = known(reason)
    else:
        error = ApiError(reason)
        error.status, error.slug = status, f"http-{status}"
    error.title = reason
    return error


# One class a status: the first of ``ApiError``'s subclasses (Overloaded, not
# Unavailable; RateLimited's retry semantics kept).
_OURS_BY_STATUS: dict[int, type[ApiError]] = {
    cls.status: cls for cls in reversed(ApiError.__subclasses__())
}
