"""Ctrl-C and ``python -m mlgate_client send``: one SIGINT cuts the run short, prints
the summary and exits 1, whether the run is reading a stdin that stays open or closing
against a server that keeps refusing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.client.scripted import Scripted, problem

LINE = b'{"features": [0.1, 0.2, 0.3, 0.4]}\n'


def _sigint_as_usual() -> None:
    # A test run in the background may ignore SIGINT, and its children inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def _start_cli(url: str, target: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlgate_client", "send", "--url", url, "--source", "s",
        "--quiet", "--json", "--retry-timeout-s", "60", target,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=_sigint_as_usual,
    )


async def _interrupt(process: asyncio.subprocess.Process, scripted: Scripted) -> tuple[bytes, bytes]:
    """SIGINT once batches are being retried; the output, or a failed assert after 10 s."""
    for _ in range(1000):
        if scripted.seen:
            break
        await asyncio.sleep(0.01)
    assert scripted.seen, "the CLI sent nothing"
    process.send_signal(signal.SIGINT)
    try:
        out, err = await asyncio.wait_for(_output(process), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return out, err


async def _output(process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    assert process.stdout is not None and process.stderr is not None
    out, err, _ = await asyncio.gather(process.stdout.read(), process.stderr.read(), process.wait())
    return out, err


async def test_ctrl_c_while_stdin_stays_open_prints_the_summary_and_exits_1(
    scripted: Scripted,
) -> None:
    """A review: the thread reading stdin could not be interrupted, so the CLI hung
    until the pipe closed (and closed first for the whole retry budget)."""
    scripted.script = [problem(503, "0")]
    process = await _start_cli(scripted.url, "-")
    assert process.stdin is not None
    process.stdin.write(LINE * 1000)  # and the pipe stays open
    await process.stdin.drain()
    out, err = await _interrupt(process, scripted)
    assert process.returncode == 1, err.decode()
    summary = json.loads(out)
    assert summary["interrupted"] and (summary["sent"], summary["failed"]) == (1000, 1000)


async def test_ctrl_c_during_the_close_prints_the_summary_and_exits_1(
    scripted: Scripted, tmp_path: Path
) -> None:
    """A review: Ctrl-C while the close flushed against a refusing server ended with a
    KeyboardInterrupt traceback and no summary."""
    scripted.script = [problem(503, "0")]
    path = tmp_path / "records.ndjson"
    path.write_bytes(LINE * 20)
    process = await _start_cli(scripted.url, str(path))
    out, err = await _interrupt(process, scripted)
    assert process.returncode == 1, err.decode()
    assert b"Traceback" not in err
    summary = json.loads(out)
    assert summary["interrupted"] and (summary["sent"], summary["failed"]) == (20, 20)


async def test_a_reader_failing_otherwise_than_by_os_error_answers_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its thread never dies with the error, leaving the caller waiting for good."""
    from mlgate_client.line_reader import LineReader

    read, write = os.pipe()
    try:
        reader = LineReader(read)

        def broken() -> list[bytes]:
            raise ValueError("not a line")

        monkeypatch.setattr(reader, "_read_lines", broken)
        with pytest.raises(ValueError, match="not a line"):
            await asyncio.wait_for(reader.next_lines(), 5)
    finally:
        os.close(read)
        os.close(write)
