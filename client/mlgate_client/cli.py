"""``python -m mlgate_client send``: stream an NDJSON file of records through a Producer.

Each line is one record as the ingest API takes it (``features``, and optionally
``record_id``, ``timestamp``, ``label``, ``metadata``); ``-`` reads stdin. Progress goes
to stderr, the summary to stdout (``--json`` for a JSON one). Exit status: 0 when every
record was delivered, 2 when some were rejected (bad lines included, and lines too
large to send) but none failed, 1 when some could not be delivered (a run cut short
by Ctrl-C included). Bad arguments are usage errors (exit 2, from argparse).

Ctrl-C: ``asyncio.run`` cancels the run on the first SIGINT; leaving the producer's
``async with`` on that cancellation closes it cut short (every record without a report
fails at once), and the summary is still printed. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any

from mlgate_client.delivery import Delivery, Outcome
from mlgate_client.line_reader import LineReader
from mlgate_client.producer import Producer
from mlgate_client.retry import RetryPolicy
from mlgate_client.transport import base_url, resolve_api_key

MAX_EXAMPLES = 20
RECORD_FIELDS = ("record_id", "timestamp", "label", "metadata")


@dataclass
class Summary:
    lines: int = 0
    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    # Written, new or repeats: their batch held both, and mlgate counts a batch's
    # duplicates, not which records they were (``Outcome.ACCEPTED_OR_DUPLICATE``).
    accepted_or_duplicate: int = 0
    rejected: int = 0
    failed: int = 0
    retries: int = 0
    interrupted: bool = False
    retries_by_cause: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, line: int, record_id: str | None, reason: str) -> None:
        self.rejected += 1
        self.reasons[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"line": line, "record_id": record_id, "reason": reason})

    def on_result(self, line: int, future: asyncio.Future[Delivery]) -> None:
        if future.cancelled():
            self.failed += 1
            self.failures["cancelled"] += 1
            return
        error = future.exception()
        if error is not None:
            self.failed += 1
            self.failures[str(error)] += 1
            return
        report = future.result()
        if report.outcome is Outcome.REJECTED:
            self.reject(line, report.record_id, report.reason or "rejected")
        elif report.outcome is Outcome.DUPLICATE:
            self.duplicates += 1
        elif report.outcome is Outcome.ACCEPTED_OR_DUPLICATE:
            self.accepted_or_duplicate += 1
        else:
            self.accepted += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines, "sent": self.sent, "accepted": self.accepted,
            "duplicates": self.duplicates, "accepted_or_duplicate": self.accepted_or_duplicate,
            "rejected": self.rejected, "failed": self.failed,
            "retries": self.retries, "retries_by_cause": dict(self.retries_by_cause),
            "interrupted": self.interrupted,
            "rejected_reasons": dict(self.reasons.most_common()),
            "failures": dict(self.failures.most_common()), "rejected_examples": self.examples,
        }

    def text(self) -> str:
        causes = ", ".join(f"{cause}: {n}" for cause, n in self.retries_by_cause.most_common())
        out = [
            f"sent:       {self.sent}",
            f"accepted:   {self.accepted}",
            f"duplicates: {self.duplicates}",
        ]
        if self.accepted_or_duplicate:
            out.append(
                f"accepted or duplicate: {self.accepted_or_duplicate} (written; each of their "
                "batches held new records and repeats, and mlgate counts repeats, not names them)"
            )
        out.append(f"rejected:   {self.rejected}")
        out += [f"  {n} x {reason}" for reason, n in self.reasons.most_common(10)]
        out += [f"  line {e['line']}: {e['reason']}" for e in self.examples[:5]]
        out.append(f"failed:     {self.failed}")
        out += [f"  {n} x {reason}" for reason, n in self.failures.most_common(5)]
        out.append(f"retries:    {self.retries}" + (f" ({causes})" if causes else ""))
        if self.interrupted:
            out.append("interrupted: the run was cut short (Ctrl-C)")
        return "\n".join(out)

    @property
    def exit_status(self) -> int:
        if self.failed or self.interrupted:
            return 1
        return 2 if self.rejected else 0


def _parse(line: bytes) -> dict[str, Any]:
    record = json.loads(line)
    if not isinstance(record, dict) or "features" not in record:
        raise ValueError("a line must be a JSON object with features")
    return record


def _progress(summary: Summary, started: float, final: bool = False) -> None:
    elapsed = max(time.monotonic() - started, 1e-9)
    text = (
        f"sent {summary.sent}  accepted {summary.accepted}  duplicates {summary.duplicates}  "
        f"rejected {summary.rejected}  failed {summary.failed}  retries {summary.retries}  "
        f"{summary.sent / elapsed:,.0f} records/s"
    )
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text + ("\n" if final else ""))
    else:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


async def _report_progress(summary: Summary, producer: Producer, started: float, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        summary.retries = producer.stats.retries
        _progress(summary, started)


async def send_file(stream: IO[bytes], args: argparse.Namespace) -> Summary:
    summary = Summary()
    producer = Producer(
        args.url, args.source, api_key=args.api_key, max_records=args.max_records,
        linger_ms=args.linger_ms, max_in_flight=args.max_in_flight,
        retry=RetryPolicy(timeout_s=args.retry_timeout_s),
    )
    started = time.monotonic()
    every_s = 0.5 if sys.stderr.isatty() else 5.0
    progress = None if args.quiet else asyncio.create_task(_report_progress(summary, producer, started, every_s))
    try:
        async with producer:
            await _send_lines(LineReader(stream.fileno()), producer, summary)
    except asyncio.CancelledError:
        # The first Ctrl-C: asyncio.run cancels this task. Leaving ``async with`` on it
        # closed the producer cut short; the summary says what became of the records.
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        summary.interrupted = True
    finally:
        if progress is not None:
            progress.cancel()
            # Cancelled as it should be, or its crash surfaces here rather than nowhere.
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        summary.retries = producer.stats.retries
        summary.retries_by_cause = producer.stats.retries_by_cause
        await asyncio.sleep(0)  # the futures' done-callbacks (summary.on_result) run first
        if not args.quiet:
            _progress(summary, started, final=True)
    return summary


async def _send_lines(reader: LineReader, producer: Producer, summary: Summary) -> None:
    while lines := await reader.next_lines():
        for line in lines:
            summary.lines += 1
            if not line.strip():
                continue
            try:
                record = _parse(line)
            except ValueError as exc:
                summary.reject(summary.lines, None, f"not a record: {exc}")
                continue
            options = {name: record[name] for name in RECORD_FIELDS if name in record}
            try:
                future = await producer.send(record["features"], **options)
            except (ValueError, TypeError, OverflowError) as exc:
                # RecordTooLarge (a ValueError), or a value msgpack cannot encode (an
                # integer past 64 bits): this line's problem, not the run's.
                record_id = record.get("record_id")
                summary.reject(
                    summary.lines, record_id if isinstance(record_id, str) else None,
                    f"not sendable: {exc}",
                )
                continue
            future.add_done_callback(functools.partial(summary.on_result, summary.lines))
            summary.sent += 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _seconds(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if zero else '>'} 0: {text!r}")
    return value


def _url(text: str) -> str:
    try:
        return base_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlgate_client")
    commands = parser.add_subparsers(dest="command", required=True)
    send = commands.add_parser("send", help="send an NDJSON file of records to mlgate")
    send.add_argument("file", metavar="FILE", help="NDJSON records, one per line; - for stdin")
    send.add_argument("--url", required=True, type=_url,
                      help="mlgate base URL, e.g. http://localhost:8080")
    send.add_argument("--source", required=True, help="the batches' source name")
    send.add_argument("--api-key", default=None, help="API key (default: $MLGATE_API_KEY)")
    send.add_argument("--max-records", type=_positive_int, default=500, help="records per batch")
    send.add_argument("--linger-ms", type=functools.partial(_seconds, zero=True), default=5.0,
                      help="longest wait to fill a batch")
    send.add_argument("--max-in-flight", type=_positive_int, default=4, help="batches in flight at once")
    send.add_argument("--retry-timeout-s", type=functools.partial(_seconds, zero=False), default=120.0,
                      help="how long one batch is retried before its records fail")
    send.add_argument("--json", action="store_true", help="print the summary as JSON")
    send.add_argument("--quiet", action="store_true", help="no progress on stderr")
    send.add_argument("--verbose", action="store_true", help="log retries on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # The key (given, or $MLGATE_API_KEY) is checked before anything is sent, as
        # the URL is: a bad one is a usage error (a review: a traceback, exit 1).
        args.api_key = resolve_api_key(args.api_key)
    except ValueError as exc:
        parser.error(str(exc))
    if args.verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if args.file == "-":
        summary = asyncio.run(send_file(sys.stdin.buffer, args))
    else:
        try:
            stream = open(args.file, "rb")  # noqa: SIM115 - closed below, after the run
        except OSError as exc:  # missing, a directory, not readable: a usage error
            parser.error(f"cannot read {args.file}: {exc.strerror or exc}")
        with stream:
            summary = asyncio.run(send_file(stream, args))
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(summary.text())
    return summary.exit_status
