"""``python -m bench.quality_ingest``: the ingest benchmark with a source profile on vs off.

``bench.ingest`` end to end (HTTP -> mlgate -> Kafka), alternating round by round:
**off** with an empty profiles directory, **on** with a ``reject`` profile for the
bench's source built from the same standard-normal distribution the load generator
sends (so every record is range-checked and counted into drift windows, and few are
rejected). Prints records/s for both and the ratio; target on >= 0.9x off.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.compare import compare
from bench.payload import SOURCE
from bench.report import BenchOptions
from mlgate.workers.quality.profile import build_profile
from mlgate.workers.quality.profile_store import ProfileStore

TARGET = 0.9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality_ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each configuration")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per round")
    parser.add_argument("--workers", type=int, default=2, help="mlgate processes")
    parser.add_argument(
        "--sample-every", type=int, default=1, help="MLGATE_DRIFT_SAMPLE_EVERY in the profile runs"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    with tempfile.TemporaryDirectory(prefix="mlgate-profiles-") as scratch:
        with_profile, without = Path(scratch) / "on", Path(scratch) / "off"
        without.mkdir()
        reference = np.random.default_rng(1).standard_normal((20_000, 128))
        ProfileStore(with_profile, Path(scratch) / "models").save(
            build_profile(reference, kind="source", name=SOURCE, on_violation="reject")
        )
        base = BenchOptions(duration_s=args.duration, workers=args.workers, rounds=1)
        off_options = dataclasses.replace(base, service_env={"MLGATE_PROFILES_DIR": str(without)})
        on_env = {"MLGATE_PROFILES_DIR": str(with_profile), "MLGATE_DRIFT_SAMPLE_EVERY": str(args.sample_every)}
        on_options = dataclasses.replace(base, service_env=on_env)
        return compare(("no profile", "profile"), (off_options, on_options), args.rounds, TARGET)


if __name__ == "__main__":
    sys.exit(main())
