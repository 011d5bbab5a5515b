"""``python -m mlgate_client send``: stream an NDJSON file of records through a Producer.

Each line is one record as the ingest API takes it (``features``, and optionally
``record_id``, ``timestamp``, ``label``, ``metadata``); ``-`` reads stdin. Progress goes
to stderr, the summary to stdout (``--json`` for a JSON one). Exit status: 0 when every
record was delivered, 2 when some were rejected (bad lines included) but none failed,
1 when some could not be delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from typing import IO, Any

from mlgate_client.delivery import Delivery, Outcome
from mlgate_client.producer import Producer
from mlgate_client.retry import RetryPolicy

READ_LINES = 1000
MAX_EXAMPLES = 20
RECORD_FIELDS = ("record_id", "timestamp", "label", "metadata")


@dataclass
class Summary:
    lines: int = 0
    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    failed: int = 0
    retries: int = 0
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
        else:
            self.accepted += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines, "sent": self.sent, "accepted": self.accepted,
            "duplicates": self.duplicates, "rejected": self.rejected, "failed": self.failed,
            "retries": self.retries, "retries_by_cause": dict(self.retries_by_cause),
            "rejected_reasons": dict(self.reasons.most_common()),
            "failures": dict(self.failures.most_common()), "rejected_examples": self.examples,
        }

    def text(self) -> str:
        causes = ", ".join(f"{cause}: {n}" for cause, n in self.retries_by_cause.most_common())
        out = [
            f"sent:       {self.sent}",
            f"accepted:   {self.accepted}",
            f"duplicates: {self.duplicates}",
            f"rejected:   {self.rejected}",
        ]
        out += [f"  {n} x {reason}" for reason, n in self.reasons.most_common(10)]
        out += [f"  line {e['line']}: {e['reason']}" for e in self.examples[:5]]
        out.append(f"failed:     {self.failed}")
        out += [f"  {n} x {reason}" for reason, n in self.failures.most_common(5)]
        out.append(f"retries:    {self.retries}" + (f" ({causes})" if causes else ""))
        return "\n".join(out)


def _read_lines(stream: IO[bytes]) -> list[bytes]:
    return list(islice(stream, READ_LINES))


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
            while lines := await asyncio.to_thread(_read_lines, stream):
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
                    future = await producer.send(record["features"], **options)
                    future.add_done_callback(functools.partial(summary.on_result, summary.lines))
                    summary.sent += 1
    finally:
        if progress is not None:
            progress.cancel()
            # Cancelled as it should be, or its crash surfaces here rather than nowhere.
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        summary.retries = producer.stats.retries
        summary.retries_by_cause = producer.stats.retries_by_cause
        if not args.quiet:
            _progress(summary, started, final=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlgate_client")
    commands = parser.add_subparsers(dest="command", required=True)
    send = commands.add_parser("send", help="send an NDJSON file of records to mlgate")
    send.add_argument("file", metavar="FILE", help="NDJSON records, one per line; - for stdin")
    send.add_argument("--url", required=True, help="mlgate base URL, e.g. http://localhost:8080")
    send.add_argument("--source", required=True, help="the batches' source name")
    send.add_argument("--api-key", default=None, help="API key (default: $MLGATE_API_KEY)")
    send.add_argument("--max-records", type=int, default=500, help="records per batch")
    send.add_argument("--linger-ms", type=float, default=5.0, help="longest wait to fill a batch")
    send.add_argument("--max-in-flight", type=int, default=4, help="batches in flight at once")
    send.add_argument("--retry-timeout-s", type=float, default=120.0,
                      help="how long one batch is retried before its records fail")
    send.add_argument("--json", action="store_true", help="print the summary as JSON")
    send.add_argument("--quiet", action="store_true", help="no progress on stderr")
    send.add_argument("--verbose", action="store_true", help="log retries on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if args.file == "-":
        summary = asyncio.run(send_file(sys.stdin.buffer, args))
    else:
        with open(args.file, "rb") as stream:
            summary = asyncio.run(send_file(stream, args))
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(summary.text())
    if summary.failed:
        return 1
    return 2 if summary.rejected else 0
