"""RFC 9457 problem documents, the shape of every error mlgate answers."""

from __future__ import annotations

import msgspec


class FieldError(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One validation failure: where it is (``records[3].features``) and what is wrong."""

    loc: str
    msg: str
    # A rejected record's (``RecordFieldError``): its index, id (null when it gave none)
    # and error, as a 202's ``errors`` give them.
    index: int | None = None
    record_id: str | None = None
    error: str | None = None


class RecordFieldError(FieldError, frozen=True, kw_only=True):
    """A rejected record's failure in a ``422`` that rejected every record: the shape of
    a ``202``'s ``errors`` (``index``, ``record_id``, ``null`` when it had none, and
    ``error``) besides ``loc`` and ``msg``."""

    index: int
    record_id: str | None
    error: str


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    request_id: str | None = None
    retry_after_s: int | None = None
    errors: list[FieldError] | None = None  # a RecordFieldError each, when every record was rejected
    # Open Inference Protocol clients read their error message from this member.
    error: str | None = None
