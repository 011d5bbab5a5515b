"""``python -m mlgate_client send`` and what it is given: bad arguments are usage errors
(exit 2, no traceback), and a line too large to send is a rejected line like any other."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.client.scripted import Scripted, accepted

LINE = '{"features": [0.1, 0.2, 0.3, 0.4]}\n'


def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mlgate_client", "send", "--source", "s", "--quiet", *args],
        capture_output=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "bad",
    [
        ["--max-records", "0"],
        ["--max-in-flight", "0"],
        ["--retry-timeout-s", "0"],
        ["--linger-ms", "nan"],
        ["--linger-ms", "-1"],
        ["--url", "127.0.0.1:18461"],
    ],
)
def test_a_bad_option_is_a_usage_error(bad: list[str], tmp_path: Path) -> None:
    """A review: these gave a traceback and exit 1, the status that says records were
    not delivered (or a run retried for the whole budget, for the URL)."""
    path = tmp_path / "records.ndjson"
    path.write_text(LINE)
    done = run_cli("--url", "http://127.0.0.1:9", *bad, str(path))
    assert done.returncode == 2, done.stderr.decode()
    assert b"usage:" in done.stderr and b"Traceback" not in done.stderr


@pytest.mark.parametrize("target", ["missing.ndjson", "."])
def test_a_file_that_cannot_be_read_is_a_usage_error(target: str, tmp_path: Path) -> None:
    done = run_cli("--url", "http://127.0.0.1:9", str(tmp_path / target))
    assert done.returncode == 2, done.stderr.decode()
    assert b"cannot read" in done.stderr and b"Traceback" not in done.stderr


async def test_a_line_too_large_to_send_is_rejected_with_its_line_number(
    scripted: Scripted, tmp_path: Path
) -> None:
    """A review: one record over 1 MiB encoded raised ValueError out of send and ended
    the run with a traceback, exit 1 and no summary."""
    scripted.script = [accepted]
    huge = json.dumps({"features": [0.1] * 200_000}) + "\n"
    path = tmp_path / "records.ndjson"
    path.write_text(LINE + huge + LINE)
    done = await asyncio.to_thread(run_cli, "--url", scripted.url, "--json", str(path))
    assert done.returncode == 2, done.stderr.decode()
    summary = json.loads(done.stdout)
    assert (summary["accepted"], summary["rejected"], summary["failed"]) == (2, 1, 0)
    assert [example["line"] for example in summary["rejected_examples"]] == [2]
