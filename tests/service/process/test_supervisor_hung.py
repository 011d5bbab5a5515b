"""The supervisor's watch for hung processes: a loop silent past its timeout is
killed, serving or still starting, and so is a process whose first heartbeat never
came (stuck in its imports)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from multiprocessing import Value

from mlgate.config import Settings
from mlgate.service.process.supervisor import Supervisor


@dataclass
class _Process:
    pid: int = 4242
    killed: list[bool] = field(default_factory=list)

    def is_alive(self) -> bool:
        return not self.killed

    def kill(self) -> None:
        self.killed.append(True)


def _watched(beat_age_s: float | None, started_s_ago: float, serving: bool) -> _Process:
    """A supervisor watching one child, started ``started_s_ago``, whose last beat was
    ``beat_age_s`` ago (None: none yet); the child after one look for hung ones."""
    supervisor = Supervisor(Settings(workers=2, worker_timeout_s=2.0))
    process = _Process()
    ready = threading.Event()
    if serving:
        ready.set()
    now = time.monotonic()
    supervisor._children = {0: (process, ready)}  # type: ignore[dict-item]
    supervisor._beats = {0: Value("d", 0.0 if beat_age_s is None else now - beat_age_s, lock=False)}
    supervisor._spawned_at = {0: now - started_s_ago}
    supervisor._kill_hung()
    return process


def test_a_serving_process_silent_past_its_timeout_is_killed() -> None:
    assert _watched(beat_age_s=5, started_s_ago=60, serving=True).killed


def test_a_starting_process_silent_past_its_timeout_is_killed() -> None:
    assert _watched(beat_age_s=5, started_s_ago=60, serving=False).killed


def test_a_process_whose_first_beat_never_came_is_killed_once_it_was_long_due() -> None:
    """A review: one stopped in its imports, before its loop ran, was never killed."""
    late = Supervisor.FIRST_BEAT_WITHIN_S + 2.0 + 1
    assert _watched(beat_age_s=None, started_s_ago=late, serving=False).killed


def test_a_process_still_in_its_imports_is_given_time_for_its_first_beat() -> None:
    assert not _watched(beat_age_s=None, started_s_ago=10, serving=False).killed


def test_a_process_beating_within_its_timeout_is_left_alone() -> None:
    assert not _watched(beat_age_s=1, started_s_ago=60, serving=True).killed
