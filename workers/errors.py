"""Errors the actors raise to whoever submitted work; the HTTP layer maps them.

    WorkerError
    ├── MailboxFull        the bounded mailbox has no room: shed the load
    ├── WorkerClosed       the actor stopped (shutdown or crash) before finishing
    ├── DeadlineExpired    the item waited past its deadline and was not processed
    └── SinkFailed         the sink did not acknowledge the write
"""

from __future__ import annotations


class WorkerError(Exception):
    retriable = True


class MailboxFull(WorkerError):
    pass


class WorkerClosed(WorkerError):
    pass


class DeadlineExpired(WorkerError):
    pass


class SinkFailed(WorkerError):
    pass
