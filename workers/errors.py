"""Errors the actors raise to whoever submitted work; the HTTP layer maps them.

    WorkerError
    ├── MailboxFull        the bounded mailbox has no room: shed the load
    ├── WorkerClosed       the actor stopped (shutdown or crash) before finishing
    │   └── ShutDown       ... because the process is shutting down
    ├── DeadlineExpired    the item waited past its deadline and was not processed
    ├── InputRefused       the model could not compute this item's input (its own fault)
    └── SinkFailed         the sink did not acknowledge the write
"""

from __future__ import annotations


class WorkerError(Exception):
    retriable = True


class MailboxFull(WorkerError):
    pass


class WorkerClosed(WorkerError):
    pass


class ShutDown(WorkerClosed):
    """Refused because the process is shutting down (its wait for requests ending):
    the caller should retry on another process, not read it as overload."""


class DeadlineExpired(WorkerError):
    pass


class InputRefused(WorkerError):
    """The model refused the item's own input at run time (onnxruntime's
    ``INVALID_ARGUMENT``: an index out of a Gather's range, say): the same input will
    fail again, and says nothing of the model's health."""

    retriable = False


class SinkFailed(WorkerError):
    """The sink failed a write. ``nothing_written``: none of its records can land (a
    local-log append cut back to where it was); otherwise some may have."""

    def __init__(self, message: str, *, nothing_written: bool = False) -> None:
        super().__init__(message)
        self.nothing_written = nothing_written
