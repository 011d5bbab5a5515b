"""``python -m bench.protection``: what auth, Redis rate limits and idempotency cost.

The ingest benchmark (``bench.ingest``), run twice on the same machine, alternating
round by round so drifting background load hits both alike:

- **off**: ``MLGATE_AUTH_DISABLED``, rate limits off, record dedup off, no Redis, no
  ``Idempotency-Key``;
- **on**: API key auth, token buckets in a private ``redis-server`` (one Lua call per
  request), a fresh ``Idempotency-Key`` on every request (stored in Redis): the set
  the protection issue names. ``--dedup`` adds record-id dedup in Redis (one more Lua
  call and one ``SET NX`` per record), which costs Redis CPU on the same two cores.

Prints records/s and p99 for both and the ratio; the target is on >= 0.8x off.
Exit status 0 when met, 1 when not, 2 when the run failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys

from bench.ingest import run_bench
from bench.report import BenchOptions, BenchReport

TARGET = 0.8
OFF = {
    "MLGATE_AUTH_DISABLED": "true",
    "MLGATE_RATE_LIMITS_ENABLED": "false",
    "MLGATE_DEDUP_WINDOW_S": "0",
}
# High enough that the limiter is checked on every request but never refuses one.
ON = {
    "MLGATE_RATE_LIMIT_KEY_RATE": "100000",
    "MLGATE_RATE_LIMIT_KEY_BURST": "100000",
    "MLGATE_RATE_LIMIT_TENANT_RATE": "100000",
    "MLGATE_RATE_LIMIT_TENANT_BURST": "100000",
}


def _p99(report: BenchReport) -> float:
    latencies = sorted(x for r in report.rounds for x in r.e2e.latencies_ms)
    return latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.protection", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each configuration")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per round")
    parser.add_argument("--workers", type=int, default=2, help="mlgate processes")
    parser.add_argument("--dedup", action="store_true", help="record-id dedup on in the 'on' runs")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    base = BenchOptions(duration_s=args.duration, workers=args.workers, rounds=1)
    off_options = dataclasses.replace(base, service_env=OFF)
    on_env = ON if args.dedup else {**ON, "MLGATE_DEDUP_WINDOW_S": "0"}
    on_options = dataclasses.replace(base, service_env=on_env, redis=True, idempotency_keys=True)
    off_rounds, on_rounds = [], []
    try:
        for _ in range(args.rounds):
            off_rounds += run_bench(off_options).rounds
            on_rounds += run_bench(on_options).rounds
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    off = BenchReport(options=off_options, rounds=off_rounds)
    on = BenchReport(options=on_options, rounds=on_rounds)
    ratio = on.e2e_rate / off.e2e_rate
    print(f"{'':32}{'off':>14}{'on':>14}")
    print(f"{'records/s end to end':32}{off.e2e_rate:>14,.0f}{on.e2e_rate:>14,.0f}")
    print(f"{'p99 request latency ms':32}{_p99(off):>14.1f}{_p99(on):>14.1f}")
    print(f"{'accepted = landed':32}{str(off.accepted == off.landed):>14}{str(on.accepted == on.landed):>14}")
    statuses_on = {k: v for r in on.rounds for k, v in r.e2e.statuses.items()}
    print(f"{'statuses (on)':32}{statuses_on}")
    print(f"ratio on / off: {ratio:.2f}x (target >= {TARGET}x)")
    met = ratio >= TARGET and on.accepted == on.landed
    print("verdict:", "target met" if met else "target NOT met")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
