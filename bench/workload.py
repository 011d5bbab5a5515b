"""``python -m bench.workload``: mlgate per core on the traffic of workload.md, each
scenario side by side with its limit in the same run.

One mlgate process (``MLGATE_WORKERS=1``) pinned to core 1; the load generators and
the Tansu broker pinned to core 0; each limit pinned to core 1 like mlgate:

- ingest, 500 realistic records (timestamp, 128 features, label, 4 metadata items) a
  msgpack request, features as float64, ``--records`` records (2M: past the 1M-entry
  dedup table), first and last ``--edge`` seconds reported apart: against the raw
  aiokafka producer (``send_batch`` of the same records, pre-encoded) over as many
  records, the ratio taken on both runs' last ``--edge`` seconds (the broker slows as
  it fills, for both alike); RSS of the fresh process and after the run;
- the same with float32 msgpack features (also through a hand-written aiohttp +
  aiokafka app), JSON bodies and 100-record batches, for
  ``--duration`` seconds, against the raw producer run for as long; and float64
  msgpack batches with msgpack Kafka values (not a target: the choice of the default),
  against the raw producer writing those values;
- single-record ingest against a bare aiohttp app answering a constant, same
  connections;
- predict single rows of a small model (128 -> 256 -> 2) against that bare app, and of
  a heavy one (768 -> 2048 -> 2048 -> 2) against onnxruntime alone at its best batch.

Every ingest phase gets a fresh broker (Tansu's memory engine slows as it fills) and
a fresh mlgate; what landed is counted from the broker and compared with what was
acknowledged. mlgate runs with its default settings but for auth and rate limits
(the default per-key budget of 500 req/s is a policy, not a cost; ``bench.protection``
measures what protection costs). Prints one markdown table; exit status 0 when every
target is met, 1 when one is not, 2 when the run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec

from bench.child import MEASURING, WINDOW_END, emit, run_child
from bench.http_load import encode_request, run_load
from bench.kafka_topics import create_topics, wait_for_count
from bench.payload import RequestBodies
from bench.predict import HEAVY_DIR, HEAVY_SIZES, LoadOptions, LoadResult, OrtOptions, OrtResult
from bench.predict import run_child as run_role
from bench.processes import (
    cpu_seconds,
    free_port,
    guarded,
    machine_busy_seconds,
    main_thread_cpu_seconds,
    pinning,
    py_spy_record,
    rss_mb,
    runqueue_seconds,
    spawn,
    start_broker,
    start_service,
    stop,
    wait_for_port,
    wait_ready,
)
from bench.raw_producer import RawOptions, RawResult

# What ``--only`` picks: the 2M-record run, the short batch runs, single-record
# ingest, and the two predict models.
SCENARIOS = ("steady", "batches", "single", "predict")

SMALL_SIZES = (128, 256, 2)
ResultT = TypeVar("ResultT", bound=msgspec.Struct)
Usage = tuple[float, float]  # share of a core used, share waited for it while runnable
DIMS = 128
STARTUP_TIMEOUT_S = 60.0
LANDED_WAIT_S = 30.0
PARTITIONS = 3
ORT_BATCHES = [1, 8, 32, 64, 128, 256]


# -- the ingest load generator (child: python -m bench.workload load OPTIONS) ---------


class IngestLoad(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    connections: int
    warmup_s: float
    duration_s: float  # with total_records: the longest the run may take
    records: int
    shape: str = "realistic"
    body_format: str = "msgpack"
    single_float: bool = False
    total_records: int = 0  # > 0: stop once this many records were acknowledged
    batches: int = 32
    seed: int = 0


class IngestResult(msgspec.Struct, frozen=True, kw_only=True):
    window_s: float
    accepted_total: int  # every record a 202 acknowledged, in the window or not
    accepted_in_window: int
    duplicates: int
    statuses: dict[str, int]  # of the requests answered in the window
    latencies_ms: list[float]  # of the window's 202s, sorted
    accepted_per_s: list[int]  # records acknowledged in each second since the start
    body_bytes: int
    errors: list[str]


class _Answer(msgspec.Struct):
    records_accepted: int = 0
    records_duplicate: int = 0


async def ingest_load(options: IngestLoad) -> IngestResult:
    bodies = RequestBodies(
        options.batches,
        options.records,
        DIMS,
        options.seed,
        shape=options.shape,  # type: ignore[arg-type]
        body_format=options.body_format,  # type: ignore[arg-type]
        single_float=options.single_float,
    )
    url = urlsplit(options.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    headers = {"Content-Type": bodies.content_type, "Accept": "application/json"}

    def request(number: int) -> bytes:
        return encode_request(f"{host}:{port}", url.path, bytes(bodies.body(number)), headers)

    decode = msgspec.json.Decoder(_Answer).decode
    started = time.perf_counter()
    answers: list[tuple[float, int]] = []
    per_second: list[int] = []
    totals = {"accepted": 0, "duplicates": 0}
    errors: list[str] = []

    def on_body(status: str, body: bytes, now: float) -> None:
        if status != "202":
            if len(errors) < 5:
                errors.append(f"{status}: {body[:200]!r}")
            return
        answer = decode(body) if body[:1] == b"{" else _Answer(records_accepted=options.records)
        totals["accepted"] += answer.records_accepted
        totals["duplicates"] += answer.records_duplicate
        answers.append((now, answer.records_accepted))
        second = int(now - started)
        per_second.extend([0] * (second + 1 - len(per_second)))
        per_second[second] += answer.records_accepted

    tally = await run_load(
        host,
        port,
        request,
        connections=options.connections,
        warmup_s=options.warmup_s,
        duration_s=options.duration_s,
        on_window=lambda event: emit({"measuring": MEASURING, "window_end": WINDOW_END}[event]),
        on_body=on_body,
        stop_when=(lambda: totals["accepted"] >= options.total_records)
        if options.total_records
        else None,
    )
    start, end = tally.window
    return IngestResult(
        window_s=end - start,
        accepted_total=totals["accepted"],
        accepted_in_window=sum(n for at, n in answers if start <= at <= end),
        duplicates=totals["duplicates"],
        statuses=tally.statuses,
        latencies_ms=sorted(tally.latencies_ms.get("202", [])),
        accepted_per_s=per_second,
        body_bytes=bodies.body_bytes,
        errors=tally.errors + errors,
    )


# -- measurements ---------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else math.nan


def edge_rates(per_second: list[int], warmup_s: float, edge_s: float) -> tuple[float, float]:
    """Mean records/s of the first and the last ``edge_s`` whole seconds after the
    warm-up (the last, partial second left out)."""
    whole = per_second[int(math.ceil(warmup_s)) : -1] or per_second
    span = max(1, min(int(edge_s), len(whole)))
    return sum(whole[:span]) / span, sum(whole[-span:]) / span


@dataclass(kw_only=True)
class Row:
    """One line of the table: a scenario, its limit, the target and the evidence."""

    scenario: str
    mlgate: float  # its rate
    limit: float
    unit: str
    target_ratio: float | None = None
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    p99_target_ms: float | None = None
    p99_strict: bool = False  # "p99 < x" rather than "<= x"
    acked: int | None = None
    landed: int | None = None
    failed: int = 0
    usage: Usage = (math.nan, math.nan)  # mlgate's in the window
    limit_usage: Usage = (math.nan, math.nan)  # the limit's in its window
    extra: dict[str, str] = field(default_factory=dict)
    checks: list[tuple[str, bool]] = field(default_factory=list)

    @classmethod
    def ingest(cls, scenario: str, result: IngestResult, landed: int, **fields: object) -> Row:
        """A row of an ingest phase: latencies and landed vs acknowledged from ``result``."""
        return cls(
            scenario=scenario,
            p50_ms=quantile(result.latencies_ms, 0.5),
            p99_ms=quantile(result.latencies_ms, 0.99),
            acked=result.accepted_total,
            landed=landed,
            failed=sum(n for status, n in result.statuses.items() if status != "202"),
            **fields,  # type: ignore[arg-type]
        )

    @property
    def ratio(self) -> float:
        return self.mlgate / self.limit if self.limit else math.nan

    @property
    def ratio_per_core_used(self) -> float:
        """Where the limit did not use its core (it waited on the broker), the ratio of
        the rates per core-second each used: what the ratio would be were both
        CPU-bound. NaN where the limit used its core (the plain ratio says it)."""
        used, limit_used = self.usage[0], self.limit_usage[0]
        if math.isnan(used) or math.isnan(limit_used) or limit_used >= 0.9 or not self.limit:
            return math.nan
        return (self.mlgate / used) / (self.limit / limit_used)

    def verdict(self) -> tuple[bool | None, str]:
        results: list[tuple[str, bool]] = []
        if self.target_ratio is not None:
            results.append((f">= {self.target_ratio}x", self.ratio >= self.target_ratio))
            per_core = self.ratio_per_core_used
            if not math.isnan(per_core):
                results.append(
                    (f">= {self.target_ratio}x per core used", per_core >= self.target_ratio)
                )
        if self.p99_target_ms is not None:
            ok = (
                self.p99_ms < self.p99_target_ms
                if self.p99_strict
                else self.p99_ms <= self.p99_target_ms
            )
            results.append(
                (f"p99 {'<' if self.p99_strict else '<='} {self.p99_target_ms:g} ms", ok)
            )
        if self.acked is not None and self.landed is not None:
            results.append(("all acked landed", self.landed >= self.acked > 0))
        results += self.checks
        if not results:
            return None, "—"
        failed = [name for name, ok in results if not ok]
        return not failed, "met" if not failed else "NOT met: " + ", ".join(failed)

    def target(self) -> str:
        parts = [f">= {self.target_ratio}x"] if self.target_ratio is not None else []
        if self.target_ratio is not None and not math.isnan(self.ratio_per_core_used):
            parts.append("the same per core used")
        if self.p99_target_ms is not None:
            parts.append(f"p99 {'<' if self.p99_strict else '<='} {self.p99_target_ms:g} ms")
        if self.acked is not None:
            parts.append("all acked landed")
        parts += [name for name, _ in self.checks]
        return ", ".join(parts) or "(none)"


@dataclass(frozen=True, kw_only=True)
class Plan:
    records: int
    duration_s: float
    warmup_s: float
    edge_s: float
    batch_connections: int
    small_connections: int
    pin: tuple[set[int], set[int]] | None
    only: frozenset[str] = frozenset(SCENARIOS)
    py_spy_dir: Path | None = None
    # MLGATE_* settings every mlgate process of the run gets (experiments; the
    # targets are judged on the defaults)
    settings: tuple[tuple[str, str], ...] = ()
    metrics_dir: Path | None = None  # each mlgate process's /metrics, saved after its phase

    @property
    def core(self) -> set[int] | None:
        return self.pin[0] if self.pin else None

    @property
    def others(self) -> set[int] | None:
        return self.pin[1] if self.pin else None


class Run:
    """The processes of one invocation, stopped on the way out, and the CPU the rest of
    the machine used meanwhile."""

    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan, self.work = plan, work
        self.busy_start = (time.monotonic(), machine_busy_seconds(), sum(os.times()[:4]))
        # Of the process the last child measured, in its window: the share of a core it
        # used, and the share its event loop spent runnable waiting for the core.
        self.usage: Usage = (math.nan, math.nan)
        self.loop_share = math.nan  # of the core, the watched process's main thread's

    def log(self, message: str) -> None:
        print(f"  .. {message}", file=sys.stderr, flush=True)

    @contextmanager
    def broker(self) -> Iterator[tuple[str, str]]:
        """A fresh broker on the other core and a topic on it: (bootstrap, topic)."""
        port = free_port()
        process = start_broker(port, self.work / f"broker-{port}.log", self.plan.others)
        try:
            wait_for_port(port, process, STARTUP_TIMEOUT_S)
            bootstrap, topic = f"127.0.0.1:{port}", f"bench.{uuid.uuid4().hex[:8]}"
            asyncio.run(create_topics(bootstrap, [topic], PARTITIONS))
            yield bootstrap, topic
        finally:
            stop(process)

    @contextmanager
    def mlgate(self, **settings: str) -> Iterator[tuple[str, int]]:
        """One mlgate process on the measured core: (base url, pid)."""
        port = free_port()
        env = {
            "MLGATE_HOST": "127.0.0.1",
            "MLGATE_PORT": str(port),
            "MLGATE_WORKERS": "1",
            "MLGATE_DATA_DIR": str(self.work / f"data-{port}"),
            "MLGATE_AUTH_DISABLED": "true",
            "MLGATE_RATE_LIMITS_ENABLED": "false",
            "MLGATE_MODEL_REPOSITORY": str(self.work / "models"),
            "MLGATE_LOG_LEVEL": "warning",
            "MLGATE_ACCESS_LOG": "false",
            **dict(self.plan.settings),
            **settings,
        }
        log = self.work / f"mlgate-{port}.log"
        process = start_service(env, log, self.plan.core)
        profiler = self._profile(process.pid, port)
        try:
            try:
                wait_ready(f"http://127.0.0.1:{port}/ready", [process], STARTUP_TIMEOUT_S)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}\n{log.read_text(errors='replace')[-2000:]}") from None
            yield f"http://127.0.0.1:{port}", process.pid
            self._save_metrics(port, process.pid)
        finally:
            stop(process, 15.0)
            if profiler is not None:
                profiler.wait(30)

    def _save_metrics(self, port: int, pid: int) -> None:
        """``--metrics DIR``: the process's ``/metrics`` once its phase is over (Kafka
        produce times, batch sizes, queue times), one file per process."""
        if self.plan.metrics_dir is None:
            return
        self.plan.metrics_dir.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            (self.plan.metrics_dir / f"mlgate-{pid}.txt").write_bytes(answer.read())

    def _profile(self, pid: int, port: int) -> subprocess.Popen[bytes] | None:
        """``--py-spy DIR``: py-spy samples the mlgate process for its whole life into
        DIR (raw collapsed stacks, one file per process; the load generators' core runs
        the sampler)."""
        if self.plan.py_spy_dir is None:
            return None
        self.plan.py_spy_dir.mkdir(parents=True, exist_ok=True)
        output = self.plan.py_spy_dir / f"mlgate-{port}.txt"
        return spawn(py_spy_record(pid, output, "raw", 250), cpus=self.plan.others)

    @contextmanager
    def floor(self) -> Iterator[tuple[str, int]]:
        """The bare aiohttp app answering a constant, on the measured core."""
        port = free_port()
        process = spawn(
            [sys.executable, "-m", "bench.predict", "floor", str(port)], cpus=self.plan.core
        )
        try:
            wait_for_port(port, process, STARTUP_TIMEOUT_S)
            yield f"http://127.0.0.1:{port}/predict", process.pid
        finally:
            stop(process)

    @contextmanager
    def handwritten(self, *args: str) -> Iterator[tuple[str, int]]:
        """A hand-written aiohttp app doing the scenario's work (``bench.handwritten``),
        on the measured core: (url, pid)."""
        port = free_port()
        process = spawn(
            [sys.executable, "-m", "bench.handwritten", *args, str(port)], cpus=self.plan.core
        )
        try:
            wait_for_port(port, process, STARTUP_TIMEOUT_S)
            time.sleep(1.0)  # the model loaded / the producer connected
            yield f"http://127.0.0.1:{port}/{args[0]}", process.pid
        finally:
            stop(process)

    def others_cores(self) -> float:
        """Cores other processes kept busy over the run: the machine's busy time less ours
        and our (reaped) children's: broker, mlgate, load generators, limits."""
        started, busy, ours = self.busy_start
        now, busy_now = time.monotonic(), machine_busy_seconds()
        if busy is None or busy_now is None:
            return math.nan
        return max(0.0, (busy_now - busy - (sum(os.times()[:4]) - ours)) / (now - started))

    def child(
        self,
        role: str | None,
        options: msgspec.Struct,
        module: str,
        result_type: type[ResultT],
        timeout_s: float,
        pid: int | None = None,
        *,
        watch_child: bool = False,
    ) -> ResultT:
        """A measuring child's result: on the other core, but the raw producer and
        onnxruntime (limits) on the measured core. ``self.usage`` becomes the core use of
        ``pid`` (or of the child itself, ``watch_child``) in the child's window. A
        result that does not decode (seen once in a busy full run) gets the phase run
        once more."""
        watched = {"pid": pid}
        cpus = (
            self.plan.core if module == "bench.raw_producer" or role == "ort" else self.plan.others
        )
        marks: dict[str, tuple[float, float | None, float | None, float | None]] = {}

        def sample(event: str) -> None:
            target = watched["pid"]
            marks[event] = (
                time.monotonic(),
                cpu_seconds(target) if target is not None else None,
                runqueue_seconds(target) if target is not None else None,
                main_thread_cpu_seconds(target) if target is not None else None,
            )

        def spawned(child: int) -> None:
            if watch_child:
                watched["pid"] = child

        for attempt in (1, 2):
            marks.clear()
            line = run_role(
                role, options, timeout_s, sample, module=module, cpus=cpus, on_spawn=spawned
            )
            opened, before, queued_before, loop_before = marks.get(
                MEASURING, (0.0, None, None, None)
            )
            closed, after, queued_after, loop_after = marks.get(WINDOW_END, (0.0, None, None, None))
            span = closed - opened
            self.usage = (
                (after - before) / span
                if before is not None and after is not None and span > 0
                else math.nan,
                (queued_after - queued_before) / span
                if queued_before is not None and queued_after is not None and span > 0
                else math.nan,
            )
            self.loop_share = (
                (loop_after - loop_before) / span
                if loop_before is not None and loop_after is not None and span > 0
                else math.nan
            )
            try:
                return msgspec.json.decode(line, type=result_type)
            except msgspec.DecodeError as exc:
                problem = f"{module} {role or ''}: result did not decode ({exc}; {len(line)} bytes, ends {line[-60:]!r})"
                if attempt == 2:
                    raise RuntimeError(problem) from exc
                self.log(problem + "; once more")
        raise AssertionError("unreachable")


def _overlap(run_s: float, edge_s: float) -> str:
    return " (shorter than two edges: they overlap)" if run_s < 2 * edge_s else ""


def ingest_phase(
    run: Run, load: IngestLoad, *, keep_rss: bool = False, **settings: str
) -> tuple[IngestResult, int, tuple[float, float]]:
    """mlgate on a fresh broker under ``load``: its result, records landed, RSS (fresh,
    after the run). ``settings``: environment beyond the defaults."""
    with (
        run.broker() as (bootstrap, topic),
        run.mlgate(
            MLGATE_KAFKA_BOOTSTRAP_SERVERS=bootstrap,
            MLGATE_KAFKA_TOPIC=topic,
            MLGATE_MODEL_POLL_INTERVAL_S="0",
            **settings,
        ) as (base, pid),
    ):
        fresh = rss_mb(pid)
        options = msgspec.structs.replace(load, url=f"{base}/api/v2/ingest")
        timeout = load.warmup_s + load.duration_s + 120
        result = run.child("load", options, "bench.workload", IngestResult, timeout, pid)
        if keep_rss:
            time.sleep(2.0)  # what settles after the load (writers draining, gc)
        after = rss_mb(pid)
        landed = asyncio.run(wait_for_count(bootstrap, topic, result.accepted_total, LANDED_WAIT_S))
    return result, landed, (fresh, after)


def raw_phase(
    run: Run, *, records: int, duration_s: float, total_records: int = 0, value_format: str = "json"
) -> RawResult:
    with run.broker() as (bootstrap, topic):
        options = RawOptions(
            bootstrap=bootstrap,
            topic=topic,
            warmup_s=run.plan.warmup_s,
            duration_s=duration_s,
            batches=32,
            records=records,
            dims=DIMS,
            shape="realistic",
            total_records=total_records,
            value_format=value_format,
        )
        return run.child(
            None, options, "bench.raw_producer", RawResult, duration_s + 180, watch_child=True
        )


def http_phase(
    run: Run,
    url: str,
    dims: int,
    connections: int,
    pid: int | None = None,
    body_format: str = "json",
) -> LoadResult:
    options = LoadOptions(
        url=url,
        dims=dims,
        duration_s=run.plan.duration_s,
        warmup_s=run.plan.warmup_s,
        connections=connections,
        body_format=body_format,
    )
    return run.child(
        "load",
        options,
        "bench.predict",
        LoadResult,
        run.plan.warmup_s + run.plan.duration_s + 60,
        pid,
    )


def write_models(root: Path) -> None:
    """``small`` and ``heavy`` with default batching settings (``config.json``: kind only)."""
    from models.make_demo_model import build_mlp, write_model

    for name, sizes, seed in (("small", SMALL_SIZES, 128), ("heavy", HEAVY_SIZES, 768)):
        model_file = HEAVY_DIR / f"{name}.onnx"
        if not model_file.exists():
            write_model(build_mlp(sizes, seed=seed, name=name), model_file)
        version = root / name / "1"
        version.mkdir(parents=True)
        (version / "model.onnx").symlink_to(model_file)
        (root / name / "config.json").write_text(json.dumps({"kind": "classifier"}))


# -- the scenarios ----------------------------------------------------------------------


def measure(plan: Plan) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mlgate-workload-") as scratch:
        run = Run(plan, Path(scratch))
        write_models(run.work / "models")
        if "steady" in plan.only:
            steady_ingest(run, rows, notes)
        if "batches" in plan.only:
            short_ingest(run, rows, notes)
        if "single" in plan.only:
            single_record(run, rows, notes)
        if "predict" in plan.only:
            predict(run, rows, notes)
        notes += per_core_used(rows)
        others = run.others_cores()
        notes.append(
            f"other processes on this machine kept {others:.2f} cores busy on average during the run"
        )
    return rows, notes


def steady_ingest(run: Run, rows: list[Row], notes: list[str]) -> None:
    plan = run.plan
    run.log(f"raw producer, {plan.records:,} records")
    raw = raw_phase(run, records=500, duration_s=3600, total_records=plan.records)
    raw_usage = run.usage
    raw_first, raw_last = edge_rates(raw.acked_per_s, plan.warmup_s, plan.edge_s)
    run.log(f"mlgate, {plan.records:,} records in msgpack batches of 500")
    load = IngestLoad(
        url="",
        connections=plan.batch_connections,
        warmup_s=plan.warmup_s,
        duration_s=3600,
        records=500,
        total_records=plan.records,
    )
    result, landed, (fresh, after) = ingest_phase(run, load, keep_rss=True)
    first, last = edge_rates(result.accepted_per_s, plan.warmup_s, plan.edge_s)
    edge = f"{plan.edge_s:g} s"
    rows.append(
        Row.ingest(
            f"ingest msgpack 500 (float64), {plan.records / 1e6:g}M records, last {edge}",
            result,
            landed,
            mlgate=last,
            limit=raw_last,
            usage=run.usage,
            limit_usage=raw_usage,
            unit="rec/s",
            target_ratio=0.6,
            p99_target_ms=100.0,
            p99_strict=True,
            checks=[
                (f"last {edge} >= 0.9x first {edge}", last >= 0.9 * first),
                ("RSS after - fresh <= 300 MB", after - fresh <= 300),
                ("no failed request", all(s == "202" for s in result.statuses)),
            ],
        )
    )
    raw_s = len(raw.acked_per_s) - plan.warmup_s
    notes += [
        f"steady state: mlgate first {edge} {first:,.0f} rec/s, last {edge} {last:,.0f} rec/s "
        f"({last / first if first else math.nan:.2f}x); whole run "
        f"{result.accepted_in_window / result.window_s:,.0f} rec/s over {result.window_s:.0f} s"
        f"{_overlap(result.window_s, plan.edge_s)}. Raw producer on as many records: first "
        f"{raw_first:,.0f}, last {raw_last:,.0f} rec/s ({raw_last / raw_first if raw_first else math.nan:.2f}x, "
        f"the broker's own slowdown as it fills) over {raw_s:.0f} s{_overlap(raw_s, plan.edge_s)}",
        f"memory: mlgate RSS fresh {fresh:.0f} MB, after {plan.records:,} records {after:.0f} MB ({after - fresh:+.0f} MB)",
        f"landed vs acknowledged: mlgate {landed:,} of {result.accepted_total:,}; raw producer acked {raw.acked_total:,}",
    ]
    if result.errors:
        notes.append(f"first errors: {result.errors[:3]}")


def short_ingest(run: Run, rows: list[Row], notes: list[str]) -> None:
    plan = run.plan
    run.log(f"raw producer, {plan.duration_s:g} s")
    raw500 = raw_phase(run, records=500, duration_s=plan.duration_s)
    raw_usage = run.usage
    raw_rate = raw500.acked_in_window / raw500.window_s
    scenarios: list[tuple[str, dict[str, Any], float | None]] = [
        ("ingest msgpack 500 (float32)", dict(records=500, single_float=True), None),
        ("ingest JSON 500", dict(records=500, body_format="json"), 0.5),
        ("ingest msgpack 100 (float64)", dict(records=100), None),
    ]
    for label, shape, target in scenarios:
        rows.append(short_batches(run, label, shape, target, raw_rate, raw_usage))
    notes.append(handwritten_batches(run, rows[-len(scenarios)], raw_rate))
    msgpack_values(run, rows)


def handwritten_ingest(run: Run, load: IngestLoad, role: str = "ingest") -> IngestResult:
    """``load`` against ``bench.handwritten ROLE`` (``ingest`` or ``ingest-rdkafka``) on
    a fresh broker."""
    with (
        run.broker() as (bootstrap, topic),
        run.handwritten(role, bootstrap, topic) as (url, pid),
    ):
        return run.child(
            "load",
            msgspec.structs.replace(load, url=url),
            "bench.workload",
            IngestResult,
            load.duration_s + 120,
            pid,
        )


def handwritten_batches(run: Run, row: Row, raw_rate: float) -> str:
    """What a plain aiohttp + aiokafka app (``bench.handwritten ingest``: aiokafka's
    ``send`` per record, as the usual hand-rolled service writes it) makes of ``row``'s
    batches, beside mlgate and the raw producer."""
    plan = run.plan
    run.log("hand-written aiohttp + aiokafka app, msgpack 500 (float32)")
    load = IngestLoad(
        url="",
        connections=plan.batch_connections,
        warmup_s=plan.warmup_s,
        duration_s=plan.duration_s,
        records=500,
        single_float=True,
    )
    plain = handwritten_ingest(run, load)
    rate = plain.accepted_in_window / plain.window_s
    return (
        f"{row.scenario}: a hand-written aiohttp + aiokafka app doing the same work "
        f"(bench.handwritten, aiokafka's send per record) {rate:,.0f} rec/s, "
        f"{rate / raw_rate:.2f}x the raw producer; mlgate {row.mlgate / rate:.2f}x it"
    )


def short_batches(
    run: Run,
    label: str,
    shape: dict[str, Any],
    target: float | None,
    raw_rate: float,
    raw_usage: Usage,
    **settings: str,
) -> Row:
    """One ``--duration`` phase of batches shaped ``shape``, against ``raw_rate``."""
    plan = run.plan
    run.log(label)
    load = IngestLoad(
        url="",
        connections=plan.batch_connections,
        warmup_s=plan.warmup_s,
        duration_s=plan.duration_s,
        **shape,
    )
    result, landed, _ = ingest_phase(run, load, keep_rss=False, **settings)
    return Row.ingest(
        f"{label}, {plan.duration_s:g} s",
        result,
        landed,
        mlgate=result.accepted_in_window / result.window_s,
        limit=raw_rate,
        unit="rec/s",
        target_ratio=target,
        usage=run.usage,
        limit_usage=raw_usage,
    )


def msgpack_values(run: Run, rows: list[Row]) -> None:
    """Not a target (workload.md measures JSON Kafka values): what the other value
    format costs, for the choice of the default. A packed batch's features then go to
    the value as the bytes they came as, where a JSON value formats 128 floats again."""
    run.log(f"raw producer, msgpack values, {run.plan.duration_s:g} s")
    raw = raw_phase(run, records=500, duration_s=run.plan.duration_s, value_format="msgpack")
    label = "ingest msgpack 500 (float64), msgpack Kafka values"
    raw_rate = raw.acked_in_window / raw.window_s
    rows.append(
        short_batches(
            run, label, dict(records=500), None, raw_rate, run.usage, MLGATE_VALUE_FORMAT="msgpack"
        )
    )


def per_core_used(rows: list[Row]) -> list[str]:
    """A note per row whose limit did not use its core (``Row.ratio_per_core_used``)."""
    notes = []
    for row in rows:
        ratio = row.ratio_per_core_used
        if math.isnan(ratio):
            continue
        notes.append(
            f"{row.scenario}: the limit used {row.limit_usage[0]:.2f} of its core; per core "
            f"used, mlgate is {ratio:.2f}x it"
        )
    return notes


def threads_note(row: Row, loop_share: float, unit: str) -> str:
    """Where mlgate's core went in a predict phase: its event loop's thread, and the
    rest (the model's thread), in shares of the core and in µs per ``unit``."""
    used = row.usage[0]
    if math.isnan(loop_share) or math.isnan(used) or not row.mlgate:
        return f"{row.scenario}: per-thread CPU not measured"
    model = max(0.0, used - loop_share)
    return (
        f"{row.scenario}: mlgate's event-loop thread used {loop_share:.2f} of the core, its "
        f"other threads (the model's) {model:.2f}: {loop_share / row.mlgate * 1e6:.0f} µs of "
        f"loop and {model / row.mlgate * 1e6:.0f} µs of model per {unit}"
    )


def handwritten_note(
    scenario: str,
    mlgate: float,
    handwritten: float,
    floor: float,
    unit: str,
    handwritten_p99_ms: float | None = None,
) -> str:
    """``handwritten_p99_ms``: its p99, where the target bounds mlgate's (the same
    closed loop of connections: what a latency target asks of any server here)."""
    p99 = "" if handwritten_p99_ms is None else f", p99 {handwritten_p99_ms:.1f} ms"
    return (
        f"{scenario}: a hand-written aiohttp app doing the same work (bench.handwritten) "
        f"{handwritten:,.0f} {unit}{p99}, {handwritten / floor:.2f}x the bare app; mlgate "
        f"{mlgate / handwritten:.2f}x it"
    )


def single_record(run: Run, rows: list[Row], notes: list[str]) -> None:
    plan = run.plan
    load = IngestLoad(
        url="",
        connections=plan.small_connections,
        warmup_s=plan.warmup_s,
        duration_s=plan.duration_s,
        records=1,
        batches=256,
    )
    run.log("bare aiohttp app, single-record bodies")
    with run.floor() as (url, floor_pid):
        floor = run.child(
            "load",
            msgspec.structs.replace(load, url=url),
            "bench.workload",
            IngestResult,
            plan.duration_s + 120,
            floor_pid,
        )
    floor_usage = run.usage
    floor_rate = sum(floor.statuses.values()) / floor.window_s
    run.log("mlgate, single-record ingest")
    result, landed, _ = ingest_phase(run, load)
    rate = result.statuses.get("202", 0) / result.window_s
    scenario = f"ingest single record, {plan.small_connections} connections"
    rows.append(
        Row.ingest(
            scenario,
            result,
            landed,
            mlgate=rate,
            limit=floor_rate,
            unit="req/s",
            target_ratio=0.4,
            usage=run.usage,
            limit_usage=floor_usage,
        )
    )
    run.log("hand-written aiohttp + aiokafka app, single-record ingest")
    plain = handwritten_ingest(run, load)
    plain_rate = plain.statuses.get("202", 0) / plain.window_s
    notes.append(handwritten_note(scenario, rate, plain_rate, floor_rate, "req/s"))
    run.log("hand-written aiohttp + librdkafka app, single-record ingest")
    rd = handwritten_ingest(run, load, "ingest-rdkafka")
    rd_rate = rd.statuses.get("202", 0) / rd.window_s
    notes.append(
        f"{scenario}: the same hand-written app on librdkafka (bench.handwritten "
        f"ingest-rdkafka: produce requests pipelined) {rd_rate:,.0f} req/s, "
        f"{rd_rate / floor_rate:.2f}x the bare app, p99 {quantile(rd.latencies_ms, 0.99):.1f} ms; "
        f"mlgate {rate / rd_rate:.2f}x it"
    )


def predict(run: Run, rows: list[Row], notes: list[str]) -> None:
    plan = run.plan
    run.log("bare aiohttp app, predict bodies")
    with run.floor() as (url, floor_pid):
        floor = http_phase(run, url, SMALL_SIZES[0], plan.small_connections, floor_pid)
    floor_usage = run.usage
    floor_rate = floor.statuses.get("200", 0) / floor.window_s
    run.log("mlgate, small model")
    with run.mlgate(MLGATE_DEFAULT_MODEL="small", MLGATE_MODEL_POLL_INTERVAL_S="0") as (base, pid):
        small = http_phase(
            run, f"{base}/api/v2/predict", SMALL_SIZES[0], plan.small_connections, pid
        )
    label = f"predict small {'->'.join(map(str, SMALL_SIZES))}, 1 row"
    rows.append(_predict_row(label, small, floor_rate, "req/s", 10.0, run, floor_usage))
    notes.append(threads_note(rows[-1], run.loop_share, "request"))
    small_rate = rows[-1].mlgate
    run.log("hand-written aiohttp app, small model in the handler")
    with run.handwritten("predict", str(HEAVY_DIR / "small.onnx")) as (url, plain_pid):
        plain = http_phase(run, url, SMALL_SIZES[0], plan.small_connections, plain_pid)
    plain_rate = plain.statuses.get("200", 0) / plain.window_s
    plain_p99 = quantile(plain.latencies_ms.get("200", []), 0.99)
    notes.append(handwritten_note(label, small_rate, plain_rate, floor_rate, "req/s", plain_p99))
    run.log("onnxruntime alone, heavy model")
    ort_options = OrtOptions(
        model=str(HEAVY_DIR / "heavy.onnx"),
        dims=HEAVY_SIZES[0],
        threads=1,
        batches=ORT_BATCHES,
        seconds_each=max(1.0, plan.duration_s / 4),
    )
    ort = run.child("ort", ort_options, "bench.predict", OrtResult, 600)
    best_batch, best = max(ort.rows_per_s.items(), key=lambda item: item[1])
    run.log("mlgate, heavy model")
    with run.mlgate(MLGATE_DEFAULT_MODEL="heavy", MLGATE_MODEL_POLL_INTERVAL_S="0") as (base, pid):
        heavy = http_phase(
            run, f"{base}/api/v2/predict", HEAVY_SIZES[0], plan.small_connections, pid
        )
    label = f"predict heavy {'->'.join(map(str, HEAVY_SIZES))}, 1 row"
    row = _predict_row(label, heavy, best, "rows/s", 50.0, run, (math.nan, math.nan))
    notes.append(threads_note(row, run.loop_share, "row"))
    run.log("mlgate, heavy model, OIP binary tensors")
    with run.mlgate(MLGATE_DEFAULT_MODEL="heavy", MLGATE_MODEL_POLL_INTERVAL_S="0") as (base, pid):
        binary = http_phase(
            run,
            f"{base}/v2/models/heavy/infer",
            HEAVY_SIZES[0],
            plan.small_connections,
            pid,
            body_format="oip-binary",
        )
    binary_row = _predict_row(label, binary, best, "rows/s", 50.0, run, (math.nan, math.nan))
    notes.append(
        f"{label}, over the Open Inference Protocol with binary tensors (as tritonclient "
        f"sends them): {binary_row.mlgate:,.0f} rows/s, {binary_row.mlgate / best:.2f}x "
        f"onnxruntime's best batch, p99 {binary_row.p99_ms:.1f} ms; "
        + threads_note(binary_row, run.loop_share, "row").split(": ", 1)[1]
    )
    run.log("hand-written aiohttp app, heavy model in the handler")
    with run.handwritten("predict", str(HEAVY_DIR / "heavy.onnx")) as (url, plain_pid):
        plain = http_phase(run, url, HEAVY_SIZES[0], plan.small_connections, plain_pid)
    plain_rate = plain.statuses.get("200", 0) / plain.window_s
    notes.append(
        f"{label}: a hand-written aiohttp app running the model in the handler (batch 1) "
        f"{plain_rate:,.0f} rows/s, {plain_rate / best:.2f}x onnxruntime's best batch; "
        f"mlgate {row.mlgate / plain_rate:.2f}x it"
    )
    run.log("hand-written aiohttp app decoding the heavy body only")
    with run.handwritten("decode") as (url, decode_pid):
        decoded = http_phase(run, url, HEAVY_SIZES[0], plan.small_connections, decode_pid)
    notes.append(
        decode_bound_note(
            label, decoded, run.usage[0], ort.rows_per_s, best, plan.small_connections
        )
    )
    row.extra["limit"] = (
        f"onnxruntime best batch {best_batch}; batch 1: {ort.rows_per_s.get('1', math.nan):,.0f}"
    )
    rows.append(row)


def decode_bound_note(
    label: str,
    decoded: LoadResult,
    used: float,
    ort_rows_per_s: dict[str, float],
    best: float,
    connections: int,
) -> str:
    """The most rows a second any Python server on aiohttp could answer on one core with
    these bodies: a request's HTTP and decoding, as the bare decoding app spends them,
    plus onnxruntime's time a row at the largest batch the connections can form."""
    rate = decoded.statuses.get("200", 0) / decoded.window_s
    batch = str(max(b for b in ORT_BATCHES if b <= connections))
    if not rate or math.isnan(used) or batch not in ort_rows_per_s:
        return f"{label}: the decoding app's bound not measured"
    request_us = used / rate * 1e6
    model_us = 1e6 / ort_rows_per_s[batch]
    bound = 1e6 / (request_us + model_us)
    return (
        f"{label}: a bare aiohttp app that only decodes the body into a float32 row "
        f"(bench.handwritten decode) answers {rate:,.0f} req/s, {request_us:.0f} µs of core "
        f"a request; with onnxruntime's {model_us:.0f} µs a row at batch {batch} (the most "
        f"{connections} connections of single rows can form), one core answers at most "
        f"{bound:,.0f} rows/s: {bound / best:.2f}x onnxruntime's best batch"
    )


def _predict_row(
    label: str,
    result: LoadResult,
    limit: float,
    unit: str,
    p99_ms: float,
    run: Run,
    limit_usage: Usage,
) -> Row:
    ok = result.latencies_ms.get("200", [])
    failed = sum(n for status, n in result.statuses.items() if status != "200")
    return Row(
        scenario=label,
        mlgate=result.statuses.get("200", 0) / result.window_s,
        limit=limit,
        unit=unit,
        target_ratio=0.45,
        p50_ms=quantile(ok, 0.5),
        p99_ms=quantile(ok, 0.99),
        p99_target_ms=p99_ms,
        failed=failed,
        usage=run.usage,
        limit_usage=limit_usage,
        checks=[("no failed request", failed == 0)],
    )


# -- the report ---------------------------------------------------------------------------


def format_table(rows: list[Row]) -> str:
    lines = [
        "| scenario | mlgate | limit | ratio | p50 ms | p99 ms | landed / acked "
        "| core used / queued: mlgate; limit | target | verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        _, verdict = row.verdict()
        landed = (
            f"{row.landed:,} / {row.acked:,}"
            if row.acked is not None and row.landed is not None
            else ""
        )
        limit = f"{row.limit:,.0f} {row.unit}" + (
            f" ({row.extra['limit']})" if "limit" in row.extra else ""
        )
        lines.append(
            f"| {row.scenario} | {row.mlgate:,.0f} {row.unit} | {limit} | {row.ratio:.2f}x | "
            f"{row.p50_ms:.1f} | {row.p99_ms:.1f} | {landed} | {_usage(row.usage)}; {_usage(row.limit_usage)} | "
            f"{row.target()} | {verdict} |"
        )
    return "\n".join(lines)


def _usage(usage: Usage) -> str:
    return "–" if math.isnan(usage[0]) else f"{usage[0]:.2f} / {usage[1]:.2f}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.workload", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--records", type=int, default=2_000_000, help="records of the steady-state run"
    )
    parser.add_argument(
        "--duration", type=float, default=20.0, help="measured seconds of every other phase"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="unmeasured seconds before each window"
    )
    parser.add_argument(
        "--edge", type=float, default=30.0, help="first/last seconds of the steady-state run"
    )
    parser.add_argument(
        "--batch-connections", type=int, default=4, help="connections posting batches"
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="connections for single records and predicts"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 200k records, 5 s phases, 5 s edges (under 2 minutes)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        help="run only these scenarios (repeatable; default: all)",
    )
    parser.add_argument(
        "--py-spy", type=Path, metavar="DIR", help="profile every mlgate process into DIR"
    )
    parser.add_argument(
        "--metrics", type=Path, metavar="DIR", help="save each mlgate process's /metrics into DIR"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MLGATE_NAME=VALUE",
        help="a setting for every mlgate process (repeatable; experiments, not targets)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:
        run_child(IngestLoad, ingest_load, argv[1:])
        return 0
    args = _parser().parse_args(argv)
    if args.quick:
        args.records, args.duration, args.edge, args.warmup = (
            min(args.records, 200_000),
            5.0,
            5.0,
            1.0,
        )
    pin = None if args.no_pin else pinning()
    plan = Plan(
        records=args.records,
        duration_s=args.duration,
        warmup_s=args.warmup,
        edge_s=args.edge,
        batch_connections=args.batch_connections,
        small_connections=args.connections,
        pin=pin,
        only=frozenset(args.only or SCENARIOS),
        py_spy_dir=args.py_spy,
        settings=tuple(tuple(pair.split("=", 1)) for pair in args.set),  # type: ignore[misc]
        metrics_dir=args.metrics,
    )
    if pin is not None:
        os.sched_setaffinity(0, pin[1])  # the orchestrator stays off the measured core
    started = time.monotonic()
    measured = guarded(lambda: measure(plan))
    if measured is None:
        return 2
    rows, notes = measured
    where = (
        f"mlgate and each limit pinned to core {min(pin[0])} (taskset -c {min(pin[0])}), load generators "
        f"and broker to core {min(pin[1])}"
        if pin
        else "NOT pinned (fewer than 2 usable cores, or --no-pin): ratios share cores with the load generator"
    )
    print(
        f"mlgate per core on workload.md traffic ({'quick' if args.quick else 'full'} run, "
        f"{time.monotonic() - started:.0f} s): {where}; {args.batch_connections} connections for batches, "
        f"{args.connections} for single records and predicts; auth and rate limits off, "
        + (f"also set: {' '.join(args.set)}; " if args.set else "")
        + "other settings default\n"
    )
    print(format_table(rows))
    print()
    for note in notes:
        print(f"- {note}")
    verdicts = [row.verdict()[0] for row in rows]
    met = all(v is not False for v in verdicts)
    print(f"\nverdict: {'every target met' if met else 'targets NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
