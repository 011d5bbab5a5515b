"""``python -m bench.quality``: what a source profile costs the ingest path, in process.

The CPU-bound part of ingestion - decode a msgpack batch, validate it, encode the
records for the sink - timed on the benchmark's batches (500 records x 128 float32 by
default) without a profile and with one (``on_violation=reject``, built from the same
distribution), the drift monitor counting every batch alongside. The two are
measured in alternating rounds so background load hits both alike; the best round of
each is compared by wall clock, by CPU of the event loop's thread (what bounds one
service process; the verdict) and by CPU of the whole process (the monitor's counting
thread included). HTTP and Kafka are left out, so the ratio is the worst case for the
end-to-end path (``python -m bench.ingest --service-env MLGATE_PROFILES_DIR=...``).
Target: with a profile >= 0.9x the records/s without.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.payload import SOURCE, RequestBodies
from mlgate.config import load_settings
from mlgate.service.http.codec import Format
from mlgate.service.ingest.quality_screen import QualityScreen
from mlgate.service.ingest.validation import RecordValidator
from mlgate.workers.quality.drift_monitor import DriftMonitor
from mlgate.workers.quality.profile import build_profile
from mlgate.workers.quality.profile_store import ProfileStore

TARGET = 0.9


@dataclass(frozen=True)
class Timing:
    wall_s: float
    loop_cpu_s: float  # the event loop's thread: what bounds one service process
    process_cpu_s: float  # every thread, the drift monitor's included


async def _round(validator: RecordValidator, monitor: DriftMonitor | None, bodies: list[bytes]) -> Timing:
    """Take every body through the ingest path once."""
    wall, loop_cpu, process_cpu = time.perf_counter(), time.thread_time(), time.process_time()
    for body in bodies:
        source, items = validator.decode_batch(body, Format.MSGPACK)
        batch = validator.validate(source, items)
        validator.outbound(batch, uuid.uuid4().hex)
        await asyncio.sleep(0)  # the monitor's turn, as between requests in the service
    if monitor is not None:
        await monitor.drained()
    return Timing(
        time.perf_counter() - wall, time.thread_time() - loop_cpu, time.process_time() - process_cpu
    )


async def measure(records: int, dims: int, batches: int, rounds: int) -> tuple[Timing, Timing, int]:
    """The best round without and with a profile, and the records the profile rejected."""
    templates = RequestBodies(batches, records, dims)
    bodies = [bytes(templates.body(n)) for n in range(batches)]
    settings = load_settings({}, feature_dims=(dims,))
    with tempfile.TemporaryDirectory(prefix="mlgate-bench-quality-") as scratch:
        store = ProfileStore(Path(scratch), Path(scratch) / "models")
        reference = np.random.default_rng(1).standard_normal((20_000, dims), dtype=np.float32)
        store.save(build_profile(reference.astype(np.float64), kind="source", name=SOURCE))
        store.refresh()
        monitor = DriftMonitor(store, window_records=5000, mailbox_rows=records * batches)
        await monitor.start()
        plain = RecordValidator(settings)
        profiled = RecordValidator(settings, QualityScreen(store, monitor))
        await _round(plain, None, bodies[:4])  # warm-up
        await _round(profiled, monitor, bodies[:4])
        off, on = [], []
        for _ in range(rounds):
            off.append(await _round(plain, None, bodies))
            on.append(await _round(profiled, monitor, bodies))
        report = monitor.report("source", SOURCE)
        await monitor.close()
    rejected = report.records_rejected if report is not None else 0
    return _best(off), _best(on), rejected


def _best(timings: list[Timing]) -> Timing:
    return Timing(
        min(t.wall_s for t in timings),
        min(t.loop_cpu_s for t in timings),
        min(t.process_cpu_s for t in timings),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500, help="records per batch")
    parser.add_argument("--dims", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    off, on, rejected = asyncio.run(measure(args.records, args.dims, args.batches, args.rounds))
    total = args.records * args.batches
    print(f"ingest path in process: {args.records} records x {args.dims} features per batch, "
          f"best of {args.rounds} rounds of {total:,} records ({rejected} rejected by the profile)")
    print(f"{'records/s by':24}{'without':>12}{'with profile':>14}{'ratio':>8}")
    ratios = {}
    for label, field in (("wall clock", "wall_s"), ("event-loop thread CPU", "loop_cpu_s"),
                         ("process CPU", "process_cpu_s")):
        plain, profiled = total / getattr(off, field), total / getattr(on, field)
        ratios[field] = profiled / plain
        print(f"{label:24}{plain:12,.0f}{profiled:14,.0f}{ratios[field]:7.2f}x")
    verdict = ratios["loop_cpu_s"] >= TARGET
    print(f"[{'PASS' if verdict else 'FAIL'}] event-loop throughput with a profile >= {TARGET}x without")
    return 0 if verdict else 1


if __name__ == "__main__":
    raise SystemExit(main())
