"""Unique ids made without a system call: a random per-process prefix and a counter."""

from __future__ import annotations

import itertools
import os


class UniqueIds:
    """32 hex digits, unique across processes and restarts: a random prefix drawn once
    and a counter (``os.urandom`` per id is a ``getrandom`` system call)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"
