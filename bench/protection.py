"""``python -m bench.protection``: what auth, Redis rate limits and idempotency cost.

The ingest benchmark (``bench.ingest``), run twice on the same machine, alternating
round by round so drifting background load hits both alike:

- **off**: ``MLGATE_AUTH_DISABLED``, rate limits off, record dedup off, no Redis, no
  ``Idempotency-Key``;
- **on**: API key auth, token buckets in a private ``redis-server`` (Lua calls shared
  by concurrent requests), a fresh ``Idempotency-Key`` on every request (stored in Redis): the set
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

from bench.compare import compare
from bench.report import BenchOptions

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
    return compare(("off", "on"), (off_options, on_options), args.rounds, TARGET)


if __name__ == "__main__":
    sys.exit(main())
