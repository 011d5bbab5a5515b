"""One readiness for the processes of a host: each publishes its own, and ``/ready``,
whichever process answers it, reads its siblings' too.

With ``MLGATE_WORKERS`` > 1 the kernel hands each new connection to one of the
processes (``SO_REUSEPORT``), so a balancer's health check reaches one at random. A
process that cannot serve (a model that failed to load when it restarted, its own
data directory full) while its siblings can made the host flap in and out of the
pool, and half of its requests fail. Each process writes its problems once a second
(the metrics sampler's turn) to ``<data_dir>/ready/worker-<n>.json``, with its
process id. A sibling's file not rewritten for ``STALE_S`` belongs to a process that
is gone (its socket closed with it, so it takes no requests), which is left out, or
to one still running that does not turn its event loop (stopped, hung): it keeps
taking its share of the connections and answers none, so it is named as not
answering (a review: /ready said ready while half the new connections hung, until
the supervisor killed the process). A process that cannot write its file (a full
disk) is left out too: its own /ready still says why.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
import structlog

log = structlog.get_logger("mlgate.readiness")
STALE_S = 3.0


class _Published(msgspec.Struct, frozen=True):
    problems: dict[str, str]
    pid: int = 0  # 0: written by a version that did not say


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is no zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return False


class HostReadiness:
    def __init__(self, data_dir: str, worker_index: int, workers: int) -> None:
        self._directory = Path(data_dir) / "ready"
        self._index = worker_index
        self._workers = workers
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(_Published)
        self._failing = False

    def _file(self, index: int) -> Path:
        return self._directory / f"worker-{index}.json"

    def publish(self, problems: dict[str, str]) -> None:
        """This process's problems (none: ready), for its siblings to read. A file it
        cannot write (a full disk) is logged when that starts and when it ends, not
        once a second."""
        path = self._file(self._index)
        temporary = path.with_suffix(".tmp")
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(self._encoder.encode(_Published(problems, os.getpid())))
            os.replace(temporary, path)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warning("readiness_not_published", path=str(path), error=repr(exc))
            return
        if self._failing:
            self._failing = False
            log.info("readiness_published_again", path=str(path))

    def siblings(self) -> dict[str, str]:
        """The problems of the other processes still running, one entry each:
        ``{"worker <n>": "<check>: <problem>; ..."}``."""
        found: dict[str, str] = {}
        now = time.time()
        for index in range(self._workers):
            if index == self._index:
                continue
            path = self._file(index)
            try:
                age = now - path.stat().st_mtime
                published = self._decoder.decode(path.read_bytes())
            except (OSError, msgspec.DecodeError):
                continue  # not started yet, or its file half written
            if age > STALE_S:
                if published.pid and _running(published.pid):
                    found[f"worker {index}"] = (
                        f"not answering: its readiness was last written {age:.0f} s ago "
                        "(stopped, or its event loop blocked)"
                    )
                continue  # gone: its socket closed with it, it takes no connections
            if published.problems:
                found[f"worker {index}"] = "; ".join(
                    f"{check}: {problem}" for check, problem in published.problems.items()
                )
        return found
