"""Reading a file an operator points mlgate at (a profile, a model's config.json) that
must be an ordinary file of bounded size.

Opened without waiting and looked at before it is read: a FIFO blocks its reader
until a writer comes (reviews: one as a profile blocked every reload for good; one as
a model's ``config.json`` stopped the whole event loop, /health included), and a link
to ``/dev/zero`` would be read without end.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def read_regular(path: Path, most: int, what: str) -> bytes:
    """The bytes of the regular file at ``path``, of at most ``most`` bytes; ValueError
    naming ``what`` it is for anything else (OSError where it cannot be opened)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        # Looked at before any read (a review: a directory said "Is a directory: 22",
        # the descriptor's number, from the file object's read).
        raise ValueError("not a regular file (a directory, a FIFO, a device or a socket is not read)")
    if info.st_size > most:  # not read at all (a review: 256 MB a poll)
        os.close(fd)
        raise ValueError(f"{info.st_size} bytes, more than {most}, the most {what} may hold")
    with open(fd, "rb", closefd=True) as file:
        data = file.read(most + 1)
    if len(data) > most:
        raise ValueError(f"more than {most} bytes, the most {what} may hold")
    return data
