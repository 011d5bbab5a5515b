"""``LineReader``: the lines of a file descriptor, for the CLI, read off the event loop
by a daemon thread of its own, and given to the loop as they arrive."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading

READ_BYTES = 1 << 16


class LineReader:
    """The lines of a file descriptor, read by a daemon thread of its own.

    Not ``asyncio.to_thread``: a read blocked on a pipe that stays open (``send -`` fed
    by a live process) would hold up an interrupted run, whose ``asyncio.run`` joins
    the default executor's threads, until the pipe delivers. ``os.read`` on the raw
    descriptor, so the thread left blocked holds no lock of a Python file object at
    the interpreter's exit."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._eof = False
        self._asks: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[list[bytes]]]]
        self._asks = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="mlgate-cli-reader", daemon=True)

    async def next_lines(self) -> list[bytes]:
        """The complete lines read so far (at least one), or ``[]`` at the end."""
        future: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._asks.put((asyncio.get_running_loop(), future))
        if not self._thread.is_alive():
            self._thread.start()
        return await future

    def _serve(self) -> None:
        while True:
            loop, future = self._asks.get()
            try:
                lines = self._read_lines()
            except Exception as exc:  # to the caller: the thread never dies with it
                self._answer(loop, future, None, exc)
            else:
                self._answer(loop, future, lines, None)

    @staticmethod
    def _answer(
        loop: asyncio.AbstractEventLoop, future: asyncio.Future[list[bytes]],
        lines: list[bytes] | None, error: Exception | None,
    ) -> None:
        def settle() -> None:
            if future.done():  # the caller was cancelled meanwhile
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(lines or [])

        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(settle)

    def _read_lines(self) -> list[bytes]:
        while not self._eof:
            chunk = os.read(self._fd, READ_BYTES)
            if not chunk:
                self._eof = True
                break
            self._buffer += chunk
            if b"\n" in chunk:
                end = self._buffer.rfind(b"\n")
                lines = bytes(self._buffer[:end]).split(b"\n")
                del self._buffer[: end + 1]
                return lines
        rest = bytes(self._buffer)  # the last line, without its newline
        self._buffer.clear()
        return [rest] if rest else []
