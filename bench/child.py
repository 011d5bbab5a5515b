"""How the benchmark's child processes talk to the orchestrator.

A child gets its options as one JSON argument, prints ``measuring`` when its
measurement window opens and ``window_end`` when it closes (so the orchestrator can
sample CPU over the same window), then its result as JSON: into the file
``$BENCH_RESULT_FILE`` names when set (results run to several MB, and full runs saw
them reach the orchestrator cut short through the pipe), else as one line. It ignores
SIGINT: the orchestrator owns Ctrl-C and stops its children itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import msgspec
import uvloop

OptionsT = TypeVar("OptionsT")

MEASURING = "measuring"
WINDOW_END = "window_end"


def emit(event: str) -> None:
    write_line(event)


RESULT_FILE_ENV = "BENCH_RESULT_FILE"


def write_result(result: bytes) -> None:
    path = os.environ.get(RESULT_FILE_ENV)
    if path:
        with open(path, "wb") as file:
            file.write(result)
    else:
        write_line(result.decode())


def write_line(text: str) -> None:
    """``text`` and a newline on stdout, whole. An event loop may have left stdout
    non-blocking, and a write to a full non-blocking pipe is cut short silently (the
    process still exits 0): a result of a few MB then reached the orchestrator
    truncated."""
    os.set_blocking(sys.stdout.fileno(), True)
    print(text, flush=True)


def run_child(
    options_type: type[OptionsT],
    body: Callable[[OptionsT], Coroutine[Any, Any, msgspec.Struct]],
    argv: list[str] | None = None,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    args = sys.argv[1:] if argv is None else argv
    options = msgspec.json.decode(args[0], type=options_type)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(body(options))
    write_result(msgspec.json.encode(result))
