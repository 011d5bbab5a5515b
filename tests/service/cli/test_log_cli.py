"""``mlgate log``: the local log printed as JSON lines; usage errors are one line and
exit 2, and a reader that goes away (``| head``) ends it quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlgate.workers.sinks.local_log import LocalLog
from mlgate.workers.sinks.local_log_frames import frame
from mlgate.workers.sinks.records import OutboundRecord
from tests.service_process import REPO


def _data_dir_with_records(tmp_path: Path, count: int) -> Path:
    log = LocalLog(tmp_path / "log")
    log.append([frame(OutboundRecord(f"k{i}".encode(), b'{"i": %d}' % i, [])) for i in range(count)])
    log.close()
    return tmp_path


def _command(data_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mlgate", "log", *args, "--data-dir", str(data_dir)]


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLGATE_")}


def _printing(data_dir: Path) -> subprocess.Popen[bytes]:
    """``log cat`` of ``data_dir``, once it has printed its first line."""
    process = subprocess.Popen(
        _command(data_dir, "cat"), cwd=REPO, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    assert process.stdout.readline().startswith(b"{")
    return process


def test_a_negative_count_is_a_usage_error(tmp_path: Path) -> None:
    """A review: ``tail -n -1`` was a traceback; ``--from-offset -5`` read as 0."""
    data_dir = _data_dir_with_records(tmp_path, 2)
    for args in (("tail", "-n", "-1"), ("cat", "--from-offset", "-5")):
        answer = subprocess.run(
            _command(data_dir, *args), cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=60
        )
        assert answer.returncode == 2, answer.stderr
        assert "must be at least 0" in answer.stderr and "Traceback" not in answer.stderr


def test_a_reader_that_goes_away_ends_it_quietly(tmp_path: Path) -> None:
    """A review: ``mlgate log cat | head -1`` printed a BrokenPipeError traceback."""
    process = _printing(_data_dir_with_records(tmp_path, 20_000))
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # as ``head -1`` does
    errors = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(timeout=60) == 0
    assert "Traceback" not in errors and "BrokenPipe" not in errors


def test_check_config_into_a_reader_gone_ends_quietly(tmp_path: Path) -> None:
    """A review: ``mlgate check-config | head`` was at times a traceback and status 1."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        answer = subprocess.run(
            [sys.executable, "-m", "mlgate", "check-config"],
            cwd=REPO,
            env={**_environment(), "MLGATE_DATA_DIR": str(tmp_path)},
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert answer.returncode == 0, answer.stderr
    assert "Traceback" not in answer.stderr and "BrokenPipe" not in answer.stderr


def _run(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(data_dir, *args), cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=60
    )


def test_a_count_past_what_can_be_held_is_a_usage_error(tmp_path: Path) -> None:
    """A review: ``tail -n 9223372036854775808`` was an OverflowError traceback."""
    answer = _run(_data_dir_with_records(tmp_path, 2), "tail", "-n", str(2**63))
    assert answer.returncode == 2, answer.stderr
    assert "must be at most" in answer.stderr and "Traceback" not in answer.stderr


def test_a_segment_that_cannot_be_read_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A review: a directory where a segment goes was an IsADirectoryError traceback."""
    data_dir = _data_dir_with_records(tmp_path, 2)
    (data_dir / "log" / "00000000000000000500.log").mkdir()
    answer = _run(data_dir, "cat")
    assert answer.returncode == 1
    assert "mlgate: cannot read the local log" in answer.stderr and "Traceback" not in answer.stderr


def test_ctrl_c_ends_it_quietly(tmp_path: Path) -> None:
    """A review: SIGINT during a long ``log cat`` printed a KeyboardInterrupt traceback."""
    import signal

    process = _printing(_data_dir_with_records(tmp_path, 200_000))
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 130
    assert b"Traceback" not in errors and b"KeyboardInterrupt" not in errors
