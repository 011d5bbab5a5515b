"""``python -m bench.predict_protection``: what auth and Redis rate limits cost a predict.

The demo model, single-row ``POST /api/v2/predict`` at ``--connections`` (as in
``bench.predict`` (a)), alternating round by round between:

- **off**: ``MLGATE_AUTH_DISABLED``, rate limits off, no Redis;
- **auth**: an API key checked on every request, rate limits off;
- **auth + Redis limits**: the key, and its and its tenant's token buckets in a private
  ``redis-server`` (limits high enough never to refuse, so every request takes tokens).

Prints requests/s, p99 and CPU per request for each, and each one's ratio to off.
Single-row predicts are where a per-request Redis round trip shows most: ingest
batches spread it over hundreds of records.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.predict import Measured, Servers, load
from bench.processes import REPO_ROOT, free_port, service_env, start_redis, stop, wait_for_port

HIGH = "1000000"  # tokens a second and burst: checked on every request, never refusing


def create_key(keys_file: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mlgate", "keys", "create", "--tenant", "bench", "--scopes",
         "predict", "--keys-file", str(keys_file)],
        env=service_env({}), cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return next(line for line in out.splitlines() if line.startswith("mlg_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.predict_protection", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    args.body_format = "json"
    with tempfile.TemporaryDirectory(prefix="mlgate-bench-protection-") as tmp:
        workdir = Path(tmp)
        redis_port = free_port()
        redis = start_redis(redis_port, workdir / "redis.log")
        servers = Servers(workdir)
        try:
            wait_for_port(redis_port, redis, 10)
            keys_file = workdir / "keys.json"
            key = create_key(keys_file)
            auth = {"MLGATE_AUTH_DISABLED": "false", "MLGATE_KEYS_FILE": str(keys_file)}
            setups: dict[str, tuple[dict[str, str], dict[str, str]]] = {
                "off": ({}, {}),
                "auth": (auth, {"Authorization": f"Bearer {key}"}),
                "auth + Redis limits": (
                    {
                        **auth,
                        "MLGATE_RATE_LIMITS_ENABLED": "true",
                        "MLGATE_REDIS_URL": f"redis://127.0.0.1:{redis_port}",
                        **{f"MLGATE_RATE_LIMIT_{who}_{what}": HIGH for who in ("KEY", "TENANT") for what in ("RATE", "BURST")},
                    },
                    {"Authorization": f"Bearer {key}"},
                ),
            }
            runs: dict[str, list[Measured]] = {name: [] for name in setups}
            for round_ in range(1, args.rounds + 1):
                for name, (env, headers) in setups.items():
                    print(f"  round {round_}: {name} ...", flush=True)
                    url, process = servers.mlgate(REPO_ROOT / "models", "demo", **env)
                    runs[name].append(load(name, "", url, process.pid, 128, args, headers=headers))
                    servers.stop(process)
        finally:
            servers.close()
            stop(redis)
    return report(runs)


def report(runs: dict[str, list[Measured]]) -> int:
    line = "{:<22} {:>9} {:>8} {:>11} {:>9} {:>7}"
    print()
    print(line.format("setup", "200/s", "p99 ms", "cpu us/req", "vs off", "other"))
    off_rate = sum(m.rate() for m in runs["off"]) / len(runs["off"])
    failed = False
    for name, measured in runs.items():
        rate = sum(m.rate() for m in measured) / len(measured)
        p99 = max(m.quantile_ms(0.99) for m in measured)
        cpu = sum(m.cpu_us_per_request() for m in measured) / len(measured)
        other = sum(n for m in measured for status, n in m.result.statuses.items() if status != "200")
        failed |= other > 0
        print(line.format(name, f"{rate:.0f}", f"{p99:.2f}", f"{cpu:.0f}", f"{rate / off_rate:.2f}x", other))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
