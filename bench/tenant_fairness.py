"""``python -m bench.tenant_fairness``: one tenant's predicts while another floods the model.

mlgate (one process on one core, ``--model``: the demo model, or the workload's
``small`` or ``heavy``; keys on, no rate limits) serves two
tenants from a load generator on the other core:

- **quiet**: single-row ``POST /api/v2/predict`` on ``--quiet-connections``;
- **flood**: ``--flood-rows``-row ``instances`` predicts on ``--flood-connections``,
  each connection sending its next as soon as it is answered.

Two phases of ``--duration`` seconds each: the quiet tenant alone, then beside the
flood. Prints the quiet tenant's p50/p99 in each and the flood's rows answered a
second. ``--code DIR`` runs mlgate from another checkout (a ``git worktree`` of an
earlier commit), to compare in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec
import numpy as np

from bench.processes import (
    REPO_ROOT,
    free_port,
    pinning,
    service_env,
    spawn,
    stop,
    wait_ready,
)

DIMS = {"demo": 128, "small": 128, "heavy": 768}


def _create_key(code: Path, keys_file: Path, tenant: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mlgate", "keys", "create", "--tenant", tenant, "--scopes",
         "predict", "--keys-file", str(keys_file)],
        env={**service_env({}), "PYTHONPATH": str(code)}, cwd=code, capture_output=True,
        text=True, check=True,
    ).stdout
    return next(line for line in out.splitlines() if line.startswith("mlg_"))


async def _client(
    session: aiohttp.ClientSession,
    url: str,
    key: str,
    body: bytes,
    until: float,
    latencies: list[float],
    statuses: dict[int, int],
    inside: list[float],
) -> None:
    """``inside``: the server's own ``latency_ms`` of each 200 (from its reading the
    request to its answer)."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    while (now := time.perf_counter()) < until:
        async with session.post(url, data=body, headers=headers) as response:
            answer = await response.read()
        statuses[response.status] = statuses.get(response.status, 0) + 1
        if response.status == 200:
            latencies.append((time.perf_counter() - now) * 1000)
            inside.append(msgspec.json.decode(answer)["latency_ms"])
        elif response.status == 503:
            detail = msgspec.json.decode(answer).get("detail", "")
            statuses[detail] = statuses.get(detail, 0) + 1  # type: ignore[index]
            await asyncio.sleep(float(response.headers.get("Retry-After", "1")) / 10)


async def _sample_depth(session: aiohttp.ClientSession, metrics_url: str, until: float, depths: list[float]) -> None:
    """The model's mailbox depth (``mlgate_mailbox_depth``), every 0.2 s."""
    while time.perf_counter() < until:
        async with session.get(metrics_url) as response:
            text = await response.text()
        depths.append(sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith('mlgate_mailbox_depth{worker="inference:')
        ))
        await asyncio.sleep(0.2)


async def _phase(url: str, keys: dict[str, str], args: argparse.Namespace, flood: bool) -> dict[str, object]:
    rng = np.random.default_rng(1)
    dims = DIMS[args.model]
    single = msgspec.json.encode({"features": rng.standard_normal(dims).round(6).tolist()})
    many = msgspec.json.encode({"instances": rng.standard_normal((args.flood_rows, dims)).round(6).tolist()})
    quiet_ms: list[float] = []
    quiet_inside: list[float] = []
    flood_inside: list[float] = []
    flood_ms: list[float] = []
    quiet_statuses: dict[int, int] = {}
    flood_statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        until = time.perf_counter() + args.warmup + args.duration
        tasks = [
            _client(session, url, keys["quiet"], single, until, quiet_ms, quiet_statuses, quiet_inside)
            for _ in range(args.quiet_connections)
        ]
        if flood:
            tasks += [
                _client(session, url, keys["flood"], many, until, flood_ms, flood_statuses, flood_inside)
                for _ in range(args.flood_connections)
            ]
        gathered = asyncio.gather(*tasks)
        await asyncio.sleep(args.warmup)
        # Only what was answered after the warm-up counts.
        for kept in (quiet_ms, flood_ms, quiet_statuses, flood_statuses, quiet_inside, flood_inside):
            kept.clear()
        measured_from = time.perf_counter()
        depths: list[float] = []
        metrics_url = url.split("/api/", 1)[0] + "/metrics"
        await asyncio.gather(gathered, _sample_depth(session, metrics_url, until, depths))
        window = time.perf_counter() - measured_from
    return {
        "quiet_p50": statistics.median(quiet_ms) if quiet_ms else float("nan"),
        "quiet_p99": float(np.percentile(quiet_ms, 99)) if quiet_ms else float("nan"),
        "quiet_per_s": len(quiet_ms) / window,
        "quiet_inside_p50": statistics.median(quiet_inside) if quiet_inside else float("nan"),
        "quiet_statuses": dict(quiet_statuses),
        "flood_rows_per_s": len(flood_ms) * args.flood_rows / window,
        "flood_p50": statistics.median(flood_ms) if flood_ms else float("nan"),
        "flood_statuses": dict(flood_statuses),
        "depth": statistics.mean(depths) if depths else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tenant_fairness", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--quiet-connections", type=int, default=2)
    parser.add_argument("--flood-connections", type=int, default=16)
    parser.add_argument("--flood-rows", type=int, default=256)
    parser.add_argument("--model", choices=sorted(DIMS), default="demo")
    parser.add_argument(
        "--no-pin", action="store_true",
        help="mlgate and the load on every core (the model's thread beside the event loop)",
    )
    parser.add_argument("--code", type=Path, default=REPO_ROOT, help="the checkout mlgate runs from")
    args = parser.parse_args(argv)
    code = args.code.resolve()
    cores = None if args.no_pin else pinning()
    if cores is not None:
        os.sched_setaffinity(0, cores[1])
    with tempfile.TemporaryDirectory(prefix="mlgate-bench-fairness-") as tmp:
        workdir = Path(tmp)
        keys_file = workdir / "keys.json"
        keys = {tenant: _create_key(code, keys_file, tenant) for tenant in ("quiet", "flood")}
        models = REPO_ROOT / "models"
        if args.model != "demo":
            from bench.workload import write_models

            models = workdir / "models"
            write_models(models)
        port = free_port()
        env = service_env({
            "MLGATE_PORT": str(port),
            "MLGATE_AUTH_DISABLED": "false",
            "MLGATE_KEYS_FILE": str(keys_file),
            "MLGATE_MODEL_REPOSITORY": str(models),
            "MLGATE_DEFAULT_MODEL": args.model,
            "MLGATE_MODEL_POLL_INTERVAL_S": "0",
            "MLGATE_DATA_DIR": str(workdir / "data"),
            "MLGATE_ACCESS_LOG": "false",
            "MLGATE_RATE_LIMITS_ENABLED": "false",
        })
        env["PYTHONPATH"] = str(code)
        with (workdir / "mlgate.log").open("wb") as log:
            process = spawn(
                [sys.executable, "-m", "mlgate", "serve"], env=env,
                cpus=None if cores is None else cores[0], cwd=code, stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_ready(f"http://127.0.0.1:{port}/ready", [process], 60)
            url = f"http://127.0.0.1:{port}/api/v2/predict"
            results = {}
            for name, flood in (("quiet alone", False), ("beside the flood", True)):
                print(f"  {name} ...", flush=True)
                results[name] = asyncio.run(_phase(url, keys, args, flood))
        finally:
            stop(process)
    print(f"\nmlgate from {code}, model {args.model}; flood: {args.flood_rows}-row requests on "
          f"{args.flood_connections} connections; quiet: single rows on {args.quiet_connections}")
    print("| phase | quiet p50 ms | quiet p99 ms | quiet p50 in mlgate ms | quiet req/s | quiet statuses | flood rows/s | flood p50 ms | flood statuses | model's queue, mean |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['quiet_p50']:.1f} | {r['quiet_p99']:.1f} | {r['quiet_inside_p50']:.1f} | {r['quiet_per_s']:,.0f} | "
              f"{r['quiet_statuses']} | {r['flood_rows_per_s']:,.0f} | {r['flood_p50']:.1f} | {r['flood_statuses']} | {r['depth']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
