"""The supervisor's wait for its processes to serve: only a process that died before
it served fails the start; one that served and then died is restarted as ever."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from mlgate.config import Settings
from mlgate.service.process.supervisor import Supervisor


@dataclass
class _Process:
    alive: bool

    def is_alive(self) -> bool:
        return self.alive


def _ready(is_set: bool) -> threading.Event:
    event = threading.Event()
    if is_set:
        event.set()
    return event


def _supervisor(children: dict[int, tuple[Any, threading.Event]]) -> Supervisor:
    supervisor = Supervisor(Settings(workers=2))
    supervisor._children = children  # type: ignore[assignment]
    return supervisor


def test_a_process_that_served_then_died_does_not_fail_the_start() -> None:
    children = {0: (_Process(alive=False), _ready(True)), 1: (_Process(alive=True), _ready(True))}
    assert _supervisor(children)._wait_until_ready() is True


def test_a_process_that_died_before_it_served_fails_the_start() -> None:
    children = {0: (_Process(alive=False), _ready(False)), 1: (_Process(alive=True), _ready(True))}
    assert _supervisor(children)._wait_until_ready() is False
