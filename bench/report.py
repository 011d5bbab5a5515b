"""The ingestion benchmark's results: per round, pooled over rounds, checked, printed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import LoadResult
from bench.raw_producer import RawResult

RATIO_TARGET = 0.6
P99_TARGET_MS = 100.0
OTHERS = "others"  # CPU used by processes the benchmark did not start
BUSY_MACHINE_CORES = 0.2


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    # None: 4 per mlgate process. Four connections already keep one process busy (eight
    # give the same records/s); more only queue: latency ~ connections x records / rate.
    # With several processes the kernel spreads connections unevenly (SO_REUSEPORT
    # hashes them), so each needs some to spare.
    connections: int | None = None
    duration_s: float = 10.0
    warmup_s: float = 2.0
    rounds: int = 1
    workers: int = 1
    value_format: str = "json"
    partitions: int = 3
    records: int = 500
    dims: int = 128
    batches: int = 64
    service_env: dict[str, str] = field(default_factory=dict)
    read_all: bool = False
    py_spy_dir: Path | None = None
    py_spy_format: str = "flamegraph"
    # Shared state in a private redis-server (REDIS_URL) and Idempotency-Key on every request.
    redis: bool = False
    idempotency_keys: bool = False

    @property
    def load_connections(self) -> int:
        return self.connections or 4 * self.workers


@dataclass(frozen=True, kw_only=True)
class Round:
    """One fresh broker and service, both paths measured once."""

    e2e: LoadResult
    raw: RawResult
    e2e_landed: int
    raw_landed: int
    e2e_cpu: dict[str, float]  # cores busy during the window, per process
    raw_cpu: dict[str, float]
    profiles: list[Path] = field(default_factory=list)
    service_log: str = ""  # its tail, when some request failed

    @property
    def e2e_rate(self) -> float:
        return self.e2e.accepted_in_window / self.e2e.window_s

    @property
    def raw_rate(self) -> float:
        return self.raw.acked_in_window / self.raw.window_s


@dataclass(frozen=True, kw_only=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True, kw_only=True)
class BenchReport:
    options: BenchOptions
    rounds: list[Round]

    @property
    def e2e_rate(self) -> float:
        return sum(r.e2e.accepted_in_window for r in self.rounds) / sum(r.e2e.window_s for r in self.rounds)

    @property
    def raw_rate(self) -> float:
        return sum(r.raw.acked_in_window for r in self.rounds) / sum(r.raw.window_s for r in self.rounds)

    @property
    def ratio(self) -> float:
        return self.e2e_rate / self.raw_rate if self.raw_rate else math.nan

    def latency_ms(self, quantile: float) -> float:
        values = sorted(v for r in self.rounds for v in r.e2e.latencies_ms)
        if not values:
            return math.nan
        return values[min(len(values) - 1, max(0, math.ceil(quantile * len(values)) - 1))]

    @property
    def accepted(self) -> int:
        return sum(r.e2e.accepted_total for r in self.rounds)

    @property
    def landed(self) -> int:
        return sum(r.e2e_landed for r in self.rounds)

    @property
    def raw_acked(self) -> int:
        return sum(r.raw.acked_total for r in self.rounds)

    @property
    def raw_landed(self) -> int:
        return sum(r.raw_landed for r in self.rounds)

    @property
    def requests(self) -> int:
        return sum(r.e2e.requests for r in self.rounds)

    @property
    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rounds:
            for status, n in r.e2e.statuses.items():
                counts[status] = counts.get(status, 0) + n
        return counts

    @property
    def failed_requests(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "202")

    def cpu(self, path: str) -> dict[str, float]:
        """Cores busy per process during the ``e2e`` or ``raw`` windows, averaged."""
        totals: dict[str, float] = {}
        for r in self.rounds:
            for name, cores in (r.e2e_cpu if path == "e2e" else r.raw_cpu).items():
                totals[name] = totals.get(name, 0.0) + cores / len(self.rounds)
        return totals

    @property
    def checks(self) -> list[Check]:
        p99 = self.latency_ms(0.99)
        return [
            Check(
                name=f"end to end >= {RATIO_TARGET}x raw",
                passed=self.ratio >= RATIO_TARGET,
                detail=f"{self.ratio:.2f}x",
            ),
            Check(name=f"p99 < {P99_TARGET_MS:g} ms", passed=p99 < P99_TARGET_MS, detail=f"{p99:.1f} ms"),
            Check(
                name="every accepted record landed",
                passed=self.accepted == self.landed and self.landed > 0,
                detail=f"{self.accepted:,} accepted, {self.landed:,} landed",
            ),
            Check(
                name="no failed request",
                passed=self.failed_requests == 0,
                detail=f"{self.failed_requests} of {self.requests}",
            ),
        ]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def summary(self) -> dict[str, object]:
        return {
            "e2e_records_per_s": round(self.e2e_rate),
            "raw_records_per_s": round(self.raw_rate),
            "ratio": round(self.ratio, 3),
            "p50_ms": round(self.latency_ms(0.5), 2),
            "p99_ms": round(self.latency_ms(0.99), 2),
            "accepted": self.accepted,
            "landed": self.landed,
            "raw_acked": self.raw_acked,
            "raw_landed": self.raw_landed,
            "statuses": self.statuses,
            "cpu_e2e": self.cpu("e2e"),
            "cpu_raw": self.cpu("raw"),
            "rounds": [
                {"e2e_records_per_s": round(r.e2e_rate), "raw_records_per_s": round(r.raw_rate)}
                for r in self.rounds
            ],
            "passed": self.passed,
        }


def format_report(report: BenchReport) -> str:
    o = report.options
    body_bytes = report.rounds[0].e2e.body_bytes if report.rounds else 0
    rows = [
        ("records/s", f"{report.e2e_rate:,.0f}", f"{report.raw_rate:,.0f}"),
        ("MB/s of request bodies", f"{report.e2e_rate / o.records * body_bytes / 1e6:,.1f}", ""),
        ("ratio end to end / raw", f"{report.ratio:.2f}x", f"target >= {RATIO_TARGET}x"),
        (
            "request latency p50 / p90 / p99 / max",
            " / ".join(f"{report.latency_ms(q):.1f}" for q in (0.5, 0.9, 0.99, 1.0)) + " ms",
            "",
        ),
        (
            "requests",
            f"{report.requests:,}",
            f"{sum(r.raw.kafka_batches for r in report.rounds):,} Kafka batches",
        ),
        ("statuses", " ".join(f"{s}:{n}" for s, n in sorted(report.statuses.items())), ""),
        ("records accepted / acked", f"{report.accepted:,}", f"{report.raw_acked:,}"),
        ("records refused as duplicates", f"{sum(r.e2e.duplicate_total for r in report.rounds):,}", ""),
        ("records landed", f"{report.landed:,}", f"{report.raw_landed:,}"),
        ("cores busy in window", _cpu(report.cpu("e2e")), _cpu(report.cpu("raw"))),
        (
            "CPU per record: mlgate / raw client",
            _per_record(report.cpu("e2e"), "service", report.e2e_rate),
            _per_record(report.cpu("raw"), "client", report.raw_rate),
        ),
    ]
    if len(report.rounds) > 1:
        rows += [
            (f"round {i}: records/s", f"{r.e2e_rate:,.0f}", f"{r.raw_rate:,.0f}  ({r.e2e_rate / r.raw_rate:.2f}x)")
            for i, r in enumerate(report.rounds, 1)
        ]
    width = max(len(r[0]) for r in rows)
    left = max(len(r[1]) for r in rows)
    head = (
        f"mlgate ingest: {o.records} records x {o.dims} float32 per request, "
        f"{o.load_connections} connections, {o.warmup_s:g} s warm-up + {o.duration_s:g} s"
        f"{f' x {o.rounds} rounds' if o.rounds > 1 else ''}, "
        f"{o.workers} service process(es), values {o.value_format}, {o.partitions} partitions"
    )
    lines = [head, "", f"{'':{width}}  {'end to end (HTTP)':{left}}  raw aiokafka producer"]
    lines += [f"{name:{width}}  {a:{left}}  {b}" for name, a, b in rows]
    lines.append("")
    for check in report.checks:
        lines.append(f"[{'PASS' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
    lines.append(f"verdict: {'target met' if report.passed else 'target NOT met'}")
    others = max([r.e2e_cpu.get(OTHERS, 0.0) for r in report.rounds] + [r.raw_cpu.get(OTHERS, 0.0) for r in report.rounds])
    if others > BUSY_MACHINE_CORES:
        lines.append(
            f"warning: other processes kept {others:.2f} cores busy during a window; "
            "the numbers are not trustworthy"
        )
    errors = [e for r in report.rounds for e in r.e2e.errors + r.raw.errors][:5]
    if errors:
        lines += ["", "first errors:", *(f"  {error}" for error in errors)]
    for r in report.rounds:
        if r.service_log:
            lines += ["", "mlgate log (tail):", r.service_log]
            break
    profiles = [p for r in report.rounds for p in r.profiles]
    if profiles:
        lines += ["", "profiles:", *(f"  {path}" for path in profiles)]
    return "\n".join(lines)


def _per_record(cores: dict[str, float], prefix: str, rate: float) -> str:
    busy = sum(v for name, v in cores.items() if name.startswith(prefix))
    return f"{busy / rate * 1e6:.1f} us" if rate and busy else "n/a"


def _cpu(cores: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in sorted(cores.items()))
