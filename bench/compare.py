"""A/B runs of the ingest benchmark: two service configurations, rounds alternated so
drifting background load hits both alike, one table and a verdict on their ratio."""

from __future__ import annotations

from bench.ingest import run_bench
from bench.processes import guarded
from bench.report import BenchOptions, BenchReport, Round


def _p99(report: BenchReport) -> float:
    latencies = sorted(x for r in report.rounds for x in r.e2e.latencies_ms)
    return latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")


def compare(
    labels: tuple[str, str],
    options: tuple[BenchOptions, BenchOptions],
    rounds: int,
    target: float,
) -> int:
    """Run both, print records/s, p99 and the ratio second/first; the exit status:
    0 target met, 1 not met, 2 the run failed."""
    first_rounds: list[Round] = []
    second_rounds: list[Round] = []

    def alternate() -> bool:
        for _ in range(rounds):
            first_rounds.extend(run_bench(options[0]).rounds)
            second_rounds.extend(run_bench(options[1]).rounds)
        return True

    if guarded(alternate) is None:
        return 2
    first = BenchReport(options=options[0], rounds=first_rounds)
    second = BenchReport(options=options[1], rounds=second_rounds)
    ratio = second.e2e_rate / first.e2e_rate
    print(f"{'':32}{labels[0]:>14}{labels[1]:>14}")
    print(f"{'records/s end to end':32}{first.e2e_rate:>14,.0f}{second.e2e_rate:>14,.0f}")
    print(f"{'p99 request latency ms':32}{_p99(first):>14.1f}{_p99(second):>14.1f}")
    for name, report in ((labels[0], first), (labels[1], second)):
        statuses = {k: v for r in report.rounds for k, v in r.e2e.statuses.items()}
        print(f"{name:32}accepted {report.accepted:,} landed {report.landed:,} statuses {statuses}")
    print(f"ratio {labels[1]} / {labels[0]}: {ratio:.2f}x (target >= {target}x)")
    met = ratio >= target and first.accepted == first.landed and second.accepted == second.landed
    print("verdict:", "target met" if met else "target NOT met")
    return 0 if met else 1
