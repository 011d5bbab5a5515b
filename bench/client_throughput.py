"""What the client costs: records/s through ``mlgate_client.Producer`` against the same
batches posted by a bare aiohttp loop, side by side in one run.

    python -m bench.client_throughput [--seconds 3] [--rounds 8] [--single-float] [--dedup]

One mlgate process (embedded local log, fsync'd; auth and rate limits off) pinned to
the last core, this process to the first. Record dedup is off unless ``--dedup``: with
it on, mlgate's own throughput decays as its in-process dedup table fills (from ~40k to
a few thousand records/s within a million records on a 2-core machine), which would
swamp the difference measured here. Short phases, interleaved and paired per round,
keep what drift remains out of the ratio (the median of the rounds' ratios). The records follow bench/workload.md: 500 per
batch, a unique ``record_id`` each, an RFC 3339 ``timestamp`` with milliseconds, 128
float32 features (sent as msgpack float64 unless ``--single-float``), a float or null
``label`` and 4 metadata items. Three ways to post them, interleaved round by round:

- ``client``: ``await producer.send(...)`` per record (500-record batches, linger 5 ms,
  4 in flight): encoding, ids, batching, Idempotency-Key, delivery reports.
- ``bare``: what a producer writes by hand: 4 tasks each stamp the record ids into a
  batch of dicts, ``msgpack.packb`` it and POST it with an Idempotency-Key.
- ``bare-preencoded``: the HTTP limit: bodies encoded up front, only ids stamped in.

Reported: records/s acknowledged (202 ``records_accepted``) and this process's CPU
seconds per million records, per variant; the ratio client / bare is the result.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
from mlgate_client import Producer

from bench.processes import free_port, start_service, stop, wait_ready

SOURCE = "sensors"
RECORDS_PER_BATCH = 500
DIMS = 128
IN_FLIGHT = 4
TEMPLATES = 16
INGEST = "/api/v2/ingest"
SUFFIXES = [f"-{i:05d}" for i in range(RECORDS_PER_BATCH)]
STAMP = b"X" * 10


@dataclass
class Phase:
    records: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def make_templates(seed: int = 0) -> list[list[dict[str, Any]]]:
    """Batches of realistic records; ids are stamped in per request."""
    rng = np.random.default_rng(seed)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    templates = []
    for batch in range(TEMPLATES):
        features = rng.standard_normal((RECORDS_PER_BATCH, DIMS), dtype=np.float32).tolist()
        records = []
        for i, row in enumerate(features):
            stamp = now + dt.timedelta(milliseconds=batch * RECORDS_PER_BATCH + i)
            records.append({
                "record_id": "",
                "timestamp": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "features": row,
                "label": float(i % 2) if i % 5 else None,
                "metadata": {"device": f"sensor-{i % 32}", "region": "eu-west-1", "fw": 3,
                             "calibrated": bool(i % 2)},
            })
        templates.append(records)
    return templates


class PreEncoded:
    """Template bodies encoded once; a request's number is stamped into its ids."""

    def __init__(self, templates: list[list[dict[str, Any]]], packer: msgpack.Packer) -> None:
        self._bodies: list[tuple[bytes, list[int]]] = []
        for records in templates:
            placeholder = [{**r, "record_id": STAMP.decode() + SUFFIXES[i]} for i, r in enumerate(records)]
            body = packer.pack({"source": SOURCE, "records": placeholder})
            offsets, start = [], 0
            for _ in records:
                start = body.index(STAMP, start)
                offsets.append(start)
                start += len(STAMP)
            self._bodies.append((body, offsets))

    def body(self, number: int) -> bytes:
        template, offsets = self._bodies[number % len(self._bodies)]
        body = bytearray(template)
        stamp = b"%010d" % number
        for offset in offsets:
            body[offset : offset + 10] = stamp
        return bytes(body)


async def run_client(url: str, templates: list[list[dict[str, Any]]], numbers: itertools.count[int],
                     seconds: float, single_float: bool) -> Phase:
    producer = Producer(url, SOURCE, max_records=RECORDS_PER_BATCH, max_bytes=4 * 1024 * 1024,
                        linger_ms=5, max_in_flight=IN_FLIGHT, single_float=single_float)
    started, cpu = time.monotonic(), time.process_time()
    end = started + seconds
    while time.monotonic() < end:
        number = next(numbers)
        prefix = f"{number:010d}"
        for suffix, record in zip(SUFFIXES, templates[number % TEMPLATES], strict=True):
            await producer.send(record["features"], label=record["label"],
                                metadata=record["metadata"], timestamp=record["timestamp"],
                                record_id=prefix + suffix)
    await producer.close()
    if producer.stats.failed or producer.stats.rejected:
        raise RuntimeError(f"client phase lost records: {producer.stats}")
    return Phase(producer.stats.accepted, time.monotonic() - started, time.process_time() - cpu)


async def run_bare(url: str, body_of: Callable[[int], bytes], numbers: itertools.count[int],
                   seconds: float) -> Phase:
    phase = Phase()
    started, cpu = time.monotonic(), time.process_time()
    end = started + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT)) as session:

        async def poster() -> None:
            while time.monotonic() < end:
                body = body_of(next(numbers))
                headers = {"Content-Type": "application/msgpack", "Idempotency-Key": uuid.uuid4().hex}
                async with session.post(url + INGEST, data=body, headers=headers) as response:
                    answer = await response.json()
                    if response.status != 202:
                        raise RuntimeError(f"bare loop got {response.status}: {answer}")
                    phase.records += answer["records_accepted"]

        await asyncio.gather(*(poster() for _ in range(IN_FLIGHT)))
    phase.seconds, phase.cpu_seconds = time.monotonic() - started, time.process_time() - cpu
    return phase


def encoding_loop(templates: list[list[dict[str, Any]]], packer: msgpack.Packer) -> Callable[[int], bytes]:
    def body(number: int) -> bytes:
        prefix = f"{number:010d}"
        records = [{**record, "record_id": prefix + suffix}
                   for suffix, record in zip(SUFFIXES, templates[number % TEMPLATES], strict=True)]
        return packer.pack({"source": SOURCE, "records": records})

    return body


def pin(pid: int, core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {core})


async def measure(url: str, options: argparse.Namespace) -> tuple[dict[str, Phase], list[float]]:
    templates = make_templates()
    packer = msgpack.Packer(use_single_float=options.single_float)
    pre = PreEncoded(templates, packer)
    numbers = itertools.count()
    variants: dict[str, Callable[[], Awaitable[Phase]]] = {
        "client": lambda: run_client(url, templates, numbers, options.seconds, options.single_float),
        "bare": lambda: run_bare(url, encoding_loop(templates, packer), numbers, options.seconds),
        "bare-preencoded": lambda: run_bare(url, pre.body, numbers, options.seconds),
    }
    await run_bare(url, pre.body, numbers, 2.0)  # warm-up: connections, dedup table, page cache
    totals = {name: Phase() for name in variants}
    ratios: list[float] = []
    for round_number in range(options.rounds):
        order = list(variants) if round_number % 2 == 0 else list(reversed(variants))
        rates: dict[str, float] = {}
        for name in order:
            phase = await variants[name]()
            total = totals[name]
            total.records += phase.records
            total.seconds += phase.seconds
            total.cpu_seconds += phase.cpu_seconds
            rates[name] = phase.records / phase.seconds
        ratios.append(rates["client"] / rates["bare"])
        print(f"  round {round_number + 1}: " + "  ".join(f"{n} {r:,.0f}/s" for n, r in rates.items())
              + f"  client/bare {ratios[-1]:.3f}", flush=True)
    return totals, ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of the three variants")
    parser.add_argument("--set", action="append", default=[], metavar="MLGATE_NAME=VALUE",
                        help="extra mlgate setting, e.g. MLGATE_DEDUP_WINDOW_S=0 (repeatable)")
    parser.add_argument("--dedup", action="store_true", help="keep mlgate's record dedup on")
    parser.add_argument("--single-float", action="store_true", help="features as msgpack float32")
    options = parser.parse_args(argv)

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mlgate-client-bench-") as work:
        settings = {
            "MLGATE_HOST": "127.0.0.1",
            "MLGATE_PORT": str(port),
            "MLGATE_DATA_DIR": str(Path(work) / "data"),
            "MLGATE_FEATURE_DIMS": str(DIMS),
            "MLGATE_AUTH_DISABLED": "true",
            "MLGATE_RATE_LIMITS_ENABLED": "false",
            "MLGATE_MODEL_POLL_INTERVAL_S": "0",
            "MLGATE_LOG_LEVEL": "warning",
            "MLGATE_ACCESS_LOG": "false",
        }
        if not options.dedup:
            settings["MLGATE_DEDUP_WINDOW_S"] = "0"
        settings.update(item.split("=", 1) for item in options.set)
        service = start_service(settings, Path(work) / "mlgate.log")
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url + "/ready", [service], 30.0)
            cores = os.cpu_count() or 1
            pin(service.pid, cores - 1)
            pin(0, 0)
            print(f"mlgate pid {service.pid} on core {cores - 1}, load on core 0; "
                  f"{RECORDS_PER_BATCH}-record batches, {DIMS} features, "
                  f"{'float32' if options.single_float else 'float64'} on the wire, "
                  f"record dedup {'on' if options.dedup else 'off'}")
            totals, ratios = asyncio.run(measure(url, options))
        finally:
            stop(service)
    print()
    print(f"{'variant':16s} {'records/s':>12s} {'cpu s / M records':>18s}")
    for name, total in totals.items():
        rate = total.records / total.seconds
        cpu = total.cpu_seconds / max(total.records, 1) * 1e6
        print(f"{name:16s} {rate:12,.0f} {cpu:18.1f}")
    client = totals["client"].records / totals["client"].seconds
    bare = totals["bare"].records / totals["bare"].seconds
    pre = totals["bare-preencoded"].records / totals["bare-preencoded"].seconds
    print(f"\nclient / bare: {client / bare:.3f} pooled, {statistics.median(ratios):.3f} median of "
          f"rounds (each round runs the three back to back)")
    print(f"client / bare-preencoded: {client / pre:.3f} pooled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
