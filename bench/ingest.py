"""``python -m bench.ingest``: mlgate's ingestion throughput against the raw Kafka producer.

One run, on one machine:

1. starts a private Tansu broker and creates two topics (``--partitions`` each);
2. starts mlgate (``mlgate serve``, ``MLGATE_WORKERS=--workers``) writing to
   the first topic, and waits for ``/ready``;
3. end to end: a load generator process posts msgpack batches (``--records`` records of
   ``--dims`` float32 features) over ``--connections`` keep-alive connections for
   ``--warmup`` + ``--duration`` seconds, and records per-request latency;
4. baseline: a raw aiokafka producer process writes the records mlgate would write (same
   keys, values and headers) to the second topic for as long;
5. counts what landed in each topic and compares it with what was acknowledged;
6. prints the table and the verdict against the target: end to end >= 0.6x the raw
   producer's records/s, p99 < 100 ms, every accepted record landed, no failed request.

``--rounds N`` repeats all of it N times, each on a fresh broker and service, and pools
the results: the raw producer's rate on Tansu varies by +-20 % from run to run. The
CPU each process used in each window is shown, and a warning when other processes
kept the machine busy (numbers from a shared machine are not worth much).

Exit status: 0 when the target is met, 1 when it is not, 2 when the run itself failed.
Everything started is stopped on the way out, Ctrl-C included. ``--py-spy DIR`` records
a profile of each service process during the end-to-end window.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import msgspec

from bench.child import MEASURING, WINDOW_END
from bench.kafka_topics import create_topics, delete_topics, wait_for_count
from bench.loadgen import LoadOptions, LoadResult
from bench.processes import (
    children,
    cpu_seconds,
    free_port,
    guarded,
    machine_busy_seconds,
    py_spy_record,
    spawn,
    start_broker,
    start_child,
    start_redis,
    start_service,
    stop,
    wait_for_port,
    wait_ready,
)
from bench.raw_producer import RawOptions, RawResult
from bench.report import OTHERS, BenchOptions, BenchReport, Round, format_report

STARTUP_TIMEOUT_S = 30.0
CHILD_SETUP_S = 60.0  # building the record pool, connecting, draining after the window
LANDED_WAIT_S = 15.0


# -- the run ------------------------------------------------------------------------------


def run_bench(options: BenchOptions) -> BenchReport:
    """Measure both paths ``options.rounds`` times, each round on a fresh broker and
    service; everything started is stopped before this returns or raises."""
    return BenchReport(options=options, rounds=[_run_round(options, i) for i in range(options.rounds)])


def _run_round(options: BenchOptions, number: int) -> Round:
    with tempfile.TemporaryDirectory(prefix="mlgate-bench-") as scratch, ExitStack() as stack:
        work = Path(scratch)
        broker_port = free_port()
        broker = start_broker(broker_port, work / "broker.log")
        stack.callback(stop, broker)
        wait_for_port(broker_port, broker, STARTUP_TIMEOUT_S)
        bootstrap = f"127.0.0.1:{broker_port}"
        run_id = uuid.uuid4().hex[:8]
        e2e_topic, raw_topic = f"bench.e2e.{run_id}", f"bench.raw.{run_id}"
        asyncio.run(create_topics(bootstrap, [e2e_topic, raw_topic], options.partitions))

        port = free_port()
        settings = _service_settings(options, port, bootstrap, e2e_topic, work)
        if options.redis:
            redis_port = free_port()
            redis = start_redis(redis_port, work / "redis.log")
            stack.callback(stop, redis)
            wait_for_port(redis_port, redis, STARTUP_TIMEOUT_S)
            settings["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        api_key = _api_key(Path(settings["MLGATE_KEYS_FILE"]))
        service = start_service(settings, work / "service.log")
        stack.callback(stop, service, 15.0)
        try:
            serving = _wait_serving(f"http://127.0.0.1:{port}/ready", service, options.workers)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n{_tail(work / 'service.log')}") from None

        watched = {f"service-{i}": pid for i, pid in enumerate(serving)} | {"broker": broker.pid}
        load = LoadOptions(
            url=f"http://127.0.0.1:{port}/api/v2/ingest",
            connections=options.load_connections,
            warmup_s=options.warmup_s,
            duration_s=options.duration_s,
            batches=options.batches,
            records=options.records,
            dims=options.dims,
            api_key=api_key,
            idempotency_keys=options.idempotency_keys,
        )
        profile = _profiler(options, serving, number) if options.py_spy_dir else None
        e2e_line, e2e_cpu, profiles = _run_child("bench.loadgen", load, watched, options, profile)
        e2e = msgspec.json.decode(e2e_line, type=LoadResult)
        service_log = _tail(work / "service.log") if set(e2e.statuses) - {"202"} else ""
        e2e_landed = asyncio.run(
            wait_for_count(bootstrap, e2e_topic, e2e.accepted_total, LANDED_WAIT_S, read_all=options.read_all)
        )
        # Tansu's memory engine slows down as it fills: the raw path starts on an empty broker too.
        asyncio.run(delete_topics(bootstrap, [e2e_topic]))

        raw_options = RawOptions(
            bootstrap=bootstrap,
            topic=raw_topic,
            warmup_s=options.warmup_s,
            duration_s=options.duration_s,
            batches=options.batches,
            records=options.records,
            dims=options.dims,
            value_format=options.value_format,
        )
        raw_line, raw_cpu, _ = _run_child("bench.raw_producer", raw_options, watched, options, None)
        raw = msgspec.json.decode(raw_line, type=RawResult)
        raw_landed = asyncio.run(
            wait_for_count(bootstrap, raw_topic, raw.acked_total, LANDED_WAIT_S, read_all=options.read_all)
        )
        return Round(
            e2e=e2e,
            raw=raw,
            e2e_landed=e2e_landed,
            raw_landed=raw_landed,
            e2e_cpu=e2e_cpu,
            raw_cpu=raw_cpu,
            profiles=profiles,
            service_log=service_log,
        )


def _service_settings(
    options: BenchOptions, port: int, bootstrap: str, topic: str, work: Path
) -> dict[str, str]:
    (work / "models").mkdir(exist_ok=True)
    settings = {
        "MLGATE_HOST": "127.0.0.1",
        "MLGATE_PORT": str(port),
        # With workers > 1 mlgate's supervisor runs that many processes on the port.
        "MLGATE_WORKERS": str(options.workers),
        "MLGATE_PER_PROCESS_STATE": "true",  # without Redis: its records carry unique ids
        "MLGATE_DATA_DIR": str(work / "data"),
        "MLGATE_KEYS_FILE": str(work / "keys.json"),
        "MLGATE_MODEL_REPOSITORY": str(work / "models"),
        "MLGATE_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "MLGATE_KAFKA_TOPIC": topic,
        "MLGATE_VALUE_FORMAT": options.value_format,
        "MLGATE_FEATURE_DIMS": str(options.dims),
        "MLGATE_LOG_LEVEL": "warning",
        "MLGATE_ACCESS_LOG": "false",
        "MLGATE_SHUTDOWN_TIMEOUT_S": "10",
    }
    settings.update(options.service_env)
    return settings


def _api_key(keys_file: Path) -> str:
    """A fresh ``ingest`` key in ``keys_file``: the benchmark goes through auth like a client.
    Empty when this mlgate has no API keys yet."""
    try:
        from mlgate.service.protection.api_keys import KeyFile, new_key
    except ImportError:
        return ""

    plaintext, stored = new_key("bench", frozenset({"ingest"}), name="bench")
    KeyFile(keys_file).update(lambda keys: keys.__setitem__(stored.key_id, stored))
    return plaintext


def _wait_serving(ready_url: str, service: subprocess.Popen[bytes], workers: int) -> list[int]:
    """Wait for ``/ready``; the pids of the serving processes (the supervisor's children
    when ``workers > 1``)."""
    wait_ready(ready_url, [service], STARTUP_TIMEOUT_S)
    if workers == 1:
        return [service.pid]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while len(serving := children(service.pid)) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(serving)} of {workers} mlgate processes started")
        time.sleep(0.1)
    for _ in range(5 * workers):  # every process binds the port before we load it
        wait_ready(ready_url, [service], STARTUP_TIMEOUT_S)
    time.sleep(1.0)
    return serving


Profiler = list[tuple[list[str], Path]]


def _profiler(options: BenchOptions, services: list[int], number: int) -> Profiler:
    assert options.py_spy_dir is not None
    options.py_spy_dir.mkdir(parents=True, exist_ok=True)
    suffix = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}[options.py_spy_format]
    runs = []
    for index, pid in enumerate(services):
        path = options.py_spy_dir / f"round-{number}-service-{index}.{suffix}"
        argv = py_spy_record(pid, path, options.py_spy_format, 200, options.duration_s)
        runs.append((argv, path))
    return runs


def _run_child(
    module: str,
    child_options: msgspec.Struct,
    watched: dict[str, int],
    options: BenchOptions,
    profile: Profiler | None,
) -> tuple[bytes, dict[str, float], list[Path]]:
    """Run one measuring child; its result line, the CPU used in its window, profiles."""
    child = start_child(module, msgspec.json.encode(child_options))
    profilers: list[subprocess.Popen[bytes]] = []
    try:
        lines: queue.Queue[bytes] = queue.Queue()
        assert child.stdout is not None
        threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + options.warmup_s + options.duration_s + CHILD_SETUP_S
        pids = watched | {"client": child.pid}
        before: dict[str, float | None] = {}
        cpu: dict[str, float] = {}
        opened = 0.0
        while True:
            try:
                received = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{module} did not finish in time") from None
            if not received:
                raise RuntimeError(f"{module} exited with {child.wait()} without a result")
            line = received.strip()
            if line == MEASURING.encode():
                opened = time.monotonic()
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                before[OTHERS] = machine_busy_seconds()
                for argv, _ in profile or []:
                    profilers.append(spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            elif line == WINDOW_END.encode():
                elapsed = time.monotonic() - opened
                after = {name: cpu_seconds(pid) for name, pid in pids.items()}
                after[OTHERS] = machine_busy_seconds()
                for name, end in after.items():
                    start = before.get(name)
                    if start is not None and end is not None and elapsed > 0:
                        cpu[name] = (end - start) / elapsed
                if OTHERS in cpu:  # the machine's busy time less our processes'
                    cpu[OTHERS] = max(0.0, cpu[OTHERS] - sum(v for k, v in cpu.items() if k != OTHERS))
            elif line.startswith(b"{"):
                child.wait(max(1.0, deadline - time.monotonic()))
                for profiler in profilers:
                    profiler.wait(options.duration_s + 30)
                return line, cpu, [path for _, path in profile or []]
    finally:
        for profiler in profilers:
            stop(profiler)
        stop(child)


def _pump(stream: object, lines: queue.Queue[bytes]) -> None:
    for line in iter(stream.readline, b""):  # type: ignore[attr-defined]
        lines.put(line)
    lines.put(b"")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- the command --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    defaults = BenchOptions()
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="End-to-end ingestion (HTTP -> mlgate -> Kafka) against the raw aiokafka producer.",
    )
    parser.add_argument("--connections", type=int, help="concurrent HTTP connections (default 4 per worker)")
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="measured seconds per path")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="fresh broker and service per round; results pooled")
    parser.add_argument("--warmup", type=float, default=defaults.warmup_s, help="unmeasured seconds before each window")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="mlgate processes (MLGATE_WORKERS)")
    parser.add_argument("--value-format", choices=("json", "msgpack"), default=defaults.value_format)
    parser.add_argument("--partitions", type=int, default=defaults.partitions)
    parser.add_argument("--records", type=int, default=defaults.records, help="records per request")
    parser.add_argument("--dims", type=int, default=defaults.dims, help="features per record")
    parser.add_argument("--batches", type=int, default=defaults.batches, help="distinct feature sets, reused round-robin (record ids stay unique)")
    parser.add_argument(
        "--service-env", action="append", default=[], metavar="NAME=VALUE",
        help="extra setting for mlgate, e.g. MLGATE_WRITER_MAX_BATCH_RECORDS=10000 (repeatable)",
    )
    parser.add_argument(
        "--read-all", action="store_true", help="count landed records by reading every one back (slower)"
    )
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="profile each mlgate process into DIR")
    parser.add_argument("--py-spy-format", choices=("flamegraph", "speedscope", "raw"), default="flamegraph")
    parser.add_argument("--json", action="store_true", help="print the report as JSON after the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = dict(item.split("=", 1) for item in args.service_env)
    options = BenchOptions(
        connections=args.connections,
        duration_s=args.duration,
        warmup_s=args.warmup,
        rounds=args.rounds,
        workers=args.workers,
        value_format=args.value_format,
        partitions=args.partitions,
        records=args.records,
        dims=args.dims,
        batches=args.batches,
        service_env=env,
        read_all=args.read_all,
        py_spy_dir=args.py_spy,
        py_spy_format=args.py_spy_format,
    )
    report = guarded(lambda: run_bench(options))
    if report is None:
        return 2
    print(format_report(report))
    if args.json:
        print(msgspec.json.encode(report.summary()).decode())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
