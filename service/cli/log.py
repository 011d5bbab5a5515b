"""``mlgate log tail|cat``: print local-log records as JSON lines (on stdout; damage met
on the way is logged on stderr, so the lines stay JSON)."""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import msgspec

from mlgate.service.http.logs import log_to_stderr
from mlgate.workers.sinks.local_log import LogEntry, read_log


def _as_json(entry: LogEntry) -> bytes:
    record = entry.record
    try:
        value: object = msgspec.json.decode(record.value)
    except msgspec.DecodeError:
        value = msgspec.msgpack.decode(record.value)
    return msgspec.json.encode(
        {
            "offset": entry.offset,
            "key": record.key.decode(errors="replace"),
            "headers": {name: data.decode(errors="replace") for name, data in record.headers},
            "value": value,
        }
    )




def print_log(data_dir: str, action: str, args: argparse.Namespace) -> int:
    log_to_stderr()
    directory = Path(data_dir) / "log"
    if not directory.is_dir():
        print(f"mlgate: no local log at {directory}", file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    try:
        if action == "tail":
            entries: collections.abc.Iterable[LogEntry] = collections.deque(read_log(directory), maxlen=args.n)
        else:
            entries = read_log(directory, args.from_offset)
        for entry in entries:
            out.write(_as_json(entry) + b"\n")
        out.flush()
    except BrokenPipeError:
        # The reader went away (``| head``): done, quietly, as cat is; stdout is
        # pointed at /dev/null so the interpreter's own flush at exit fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stopped, quietly, as cat is (a review: a traceback)
    except OSError as exc:
        # A segment that cannot be read (a directory in its place, its mode): one line
        # (a review: a traceback).
        print(f"mlgate: cannot read the local log: {exc}", file=sys.stderr)
        return 1
    return 0
