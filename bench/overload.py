"""``python -m bench.overload``: goodput of the heavy model when clients retry at once.

One mlgate process serving the heavy model (768 -> 2048 -> 2048 -> 2) pinned to one
core, the load generator pinned to the other (workload.md). Closed loop: every
connection sends its next request the moment an answer arrives, 503s included, as a
retry storm does. Phases, in one run:

1. ``--connections`` (32) connections: the model saturated; its answers/s are the
   reference;
2. 4x and 16x those connections: successful answers/s (goodput), the 503s' p99 and
   the server's RSS (before, peak, after). With the default deadline (1 s) the
   mailbox takes what can be answered in time, so these see few or no refusals;
3. 16x again with a short ``X-Request-Timeout`` (``--tight-ms``, 50 ms): only some
   of the connections can be answered in time, the rest must be refused, so this is
   the phase that measures refusals.

Targets (issue 11): goodput at 4x and 16x >= 0.8x the saturated rate, 503 p99 <= 5 ms,
RSS bounded (peak within 100 MB of the start). Exit status 0 when every target is
met, 1 when one is not.

``--flood`` adds a tenant flood, on a second server with API keys (rate limits off,
as for tenants whose limits are above their traffic): one tenant's ``--connections``
/ 8 connections (the victim, default deadline) alone, then again while another
tenant floods ``--flood-connections`` (256) connections with ``X-Request-Timeout``
``--flood-ms`` (10 ms, about the event loop's turn under that flood, so its requests
would expire on their way to the model), and again while the flood bypasses the door
(a fresh ``Idempotency-Key`` on every request), and again with the flood as Open
Inference Protocol infers with binary tensors (the express lane's other route).
Target: the victim keeps >= 0.5x its rate in each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from bench.predict import (
    HEAVY_SIZES,
    STARTUP_TIMEOUT_S,
    LoadOptions,
    LoadResult,
    RssSampler,
    Servers,
    mlgate_env,
    run_child,
    write_heavy_repository,
)
from bench.processes import free_port, pinning, rss_mb, start_service, wait_ready
from mlgate.service.predict.flow import TIMEOUT_HEADER
from mlgate.service.protection.api_keys import ApiKey, KeyFile, new_key

GOODPUT_TARGET = 0.8
VICTIM_TARGET = 0.5
REFUSAL_P99_MS = 5.0
RSS_GROWTH_MB = 100.0


@dataclass
class Phase:
    label: str
    connections: int
    result: LoadResult
    rss_mb: tuple[float, float, float]

    def rate(self, status: str = "200") -> float:
        return self.result.statuses.get(status, 0) / self.result.window_s

    def p99_ms(self, status: str) -> float:
        return p99_ms(self.result, status)


def p99_ms(result: LoadResult, status: str) -> float:
    values = result.latencies_ms.get(status, [])
    return values[min(len(values) - 1, int(0.99 * len(values)))] if values else float("nan")


def run(args: argparse.Namespace) -> int:
    cores = pinning()
    server_cpus, client_cpus = cores if cores else (None, None)
    if args.flood_only:
        return report_flood(flood(args, server_cpus, client_cpus), args)
    with tempfile.TemporaryDirectory(prefix="mlgate-bench-overload-") as tmp:
        workdir = Path(tmp)
        repository = workdir / "models"
        write_heavy_repository(repository, "heavy", max_batch_size=args.max_batch_size)
        servers = Servers(workdir)
        try:
            port = free_port()
            process = start_service(
                mlgate_env(port, workdir, repository, "heavy", **dict(args.setting)),
                workdir / "mlgate.log",
                cpus=server_cpus,
            )
            servers.processes.append(process)
            wait_ready(f"http://127.0.0.1:{port}/ready", [process], STARTUP_TIMEOUT_S)
            url = f"http://127.0.0.1:{port}/api/v2/predict"
            phases = []
            for factor, timeout_ms in ((1, None), (4, None), (16, None), (16, args.tight_ms)):
                connections = args.connections * factor
                label = "saturated" if factor == 1 else f"{factor}x connections"
                if timeout_ms is not None:
                    label += f", {TIMEOUT_HEADER} {timeout_ms:g} ms"
                print(f"  {label}: {connections} connections ...", flush=True)
                options = LoadOptions(
                    url=url,
                    dims=HEAVY_SIZES[0],
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    connections=connections,
                    body_format="json",
                    headers={} if timeout_ms is None else {TIMEOUT_HEADER: f"{timeout_ms:g}"},
                )
                before = rss_mb(process.pid)
                sampler = RssSampler(process.pid)
                out = run_child("load", options, args.warmup + args.duration + 60, cpus=client_cpus)
                peak = sampler.close()
                result = msgspec.json.decode(out, type=LoadResult)
                phases.append(
                    Phase(label, connections, result, (before, peak, rss_mb(process.pid)))
                )
        finally:
            servers.close()
    verdict = report(phases, pinned=cores is not None)
    if args.flood:
        verdict |= report_flood(flood(args, server_cpus, client_cpus), args)
    return verdict


@dataclass
class Flood:
    label: str
    alone: LoadResult
    victim: LoadResult
    flooder: LoadResult


def flood(
    args: argparse.Namespace, server_cpus: set[int] | None, client_cpus: set[int] | None
) -> list[Flood]:
    """The victim tenant alone, then beside a tenant flooding tight deadlines: through
    the door, then bypassing it (a fresh ``Idempotency-Key`` on every request, which
    the door leaves to the app)."""
    with tempfile.TemporaryDirectory(prefix="mlgate-bench-flood-") as tmp:
        workdir = Path(tmp)
        repository = workdir / "models"
        write_heavy_repository(repository, "heavy", max_batch_size=args.max_batch_size)
        keys_file = workdir / "keys.json"
        plaintexts: dict[str, str] = {}
        keys: dict[str, ApiKey] = {}
        for tenant in ("victim", "flooder"):
            plaintexts[tenant], key = new_key(tenant, frozenset({"predict"}))
            keys[key.key_id] = key
        KeyFile(keys_file).update(lambda stored: stored.update(keys))
        servers = Servers(workdir)
        try:
            port = free_port()
            env = mlgate_env(port, workdir, repository, "heavy", **dict(args.setting))
            env.update(MLGATE_AUTH_DISABLED="false", MLGATE_KEYS_FILE=str(keys_file))
            process = start_service(env, workdir / "mlgate.log", cpus=server_cpus)
            servers.processes.append(process)
            wait_ready(f"http://127.0.0.1:{port}/ready", [process], STARTUP_TIMEOUT_S)
            url = f"http://127.0.0.1:{port}/api/v2/predict"
            infer_url = f"http://127.0.0.1:{port}/v2/models/heavy/infer"

            def options(
                tenant: str,
                connections: int,
                seed: int,
                unique_header: str = "",
                infer: bool = False,
                **headers: str,
            ) -> LoadOptions:
                return LoadOptions(
                    unique_header=unique_header,
                    url=infer_url if infer else url,
                    dims=HEAVY_SIZES[0],
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    connections=connections,
                    seed=seed,
                    body_format="oip-binary" if infer else "json",
                    headers={"Authorization": f"Bearer {plaintexts[tenant]}", **headers},
                )

            victim = options("victim", max(1, args.connections // 8), 1)
            timeout_s = args.warmup + args.duration + 60
            print(f"  flood: the victim's {victim.connections} connections alone ...", flush=True)
            alone = run_child("load", victim, timeout_s, cpus=client_cpus)
            outs: dict[str, tuple[bytes, bytes]] = {}
            for label, unique, infer in (
                ("through the door", "", False),
                ("bypassing the door", "Idempotency-Key", False),
                ("through the door, OIP binary infers", "", True),
            ):
                flooder = options(
                    "flooder",
                    args.flood_connections,
                    2,
                    unique,
                    infer,
                    **{TIMEOUT_HEADER: f"{args.flood_ms:g}"},
                )
                print(f"  flood: beside {flooder.connections} connections {label} ...", flush=True)
                flooded: dict[str, bytes] = {}
                flooding = threading.Thread(
                    target=lambda flooder=flooder, flooded=flooded: flooded.__setitem__(
                        "out", run_child("load", flooder, timeout_s, cpus=client_cpus)
                    )
                )
                flooding.start()
                time.sleep(1.0)  # the flood under way before the victim's warm-up ends
                beside = run_child("load", victim, timeout_s, cpus=client_cpus)
                flooding.join()
                outs[label] = (beside, flooded["out"])
                time.sleep(args.warmup)  # the last flood's held connections let go
        finally:
            servers.close()
    decode = msgspec.json.Decoder(LoadResult).decode
    return [
        Flood(label, decode(alone), decode(beside), decode(flooder))
        for label, (beside, flooder) in outs.items()
    ]


def report_flood(results: list[Flood], args: argparse.Namespace) -> int:
    def per_s(load: LoadResult) -> str:
        return ", ".join(
            f"{status} {count / load.window_s:,.0f}/s"
            for status, count in sorted(load.statuses.items())
        )

    print(
        f"\ntenant flood ({args.flood_connections} connections, {TIMEOUT_HEADER} {args.flood_ms:g} ms):"
    )
    print(f"- victim alone: {per_s(results[0].alone)}")
    alone = results[0].alone.statuses.get("200", 0) / results[0].alone.window_s
    failures = []
    for result in results:
        beside = result.victim.statuses.get("200", 0) / result.victim.window_s
        ratio = beside / alone if alone else float("nan")
        print(
            f"- victim beside the flood {result.label}: {per_s(result.victim)} ({ratio:.2f}x alone)"
        )
        # Where the door refuses most: its refusals' latency, against the 5 ms line.
        refused = result.flooder.statuses.get("503", 0)
        latency = f", 503 p99 {p99_ms(result.flooder, '503'):.1f} ms" if refused else ""
        print(f"  flooder: {per_s(result.flooder)}{latency}")
        if not ratio >= VICTIM_TARGET:
            failures.append(f"{result.label}: the victim kept {ratio:.2f}x < {VICTIM_TARGET}x")
    for failure in failures:
        print(f"[FAIL] {failure}")
    if not failures:
        print(f"verdict: the victim kept >= {VICTIM_TARGET}x of its rate alone")
    return 1 if failures else 0


def report(phases: list[Phase], pinned: bool) -> int:
    saturated = phases[0].rate()
    print(
        "\n| phase | connections | 200/s | goodput ratio | 200 p99 ms | 503/s | 503 p99 ms "
        "| RSS before / peak / after MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    failures = []
    for phase in phases:
        ratio = phase.rate() / saturated if saturated else float("nan")
        before, peak, after = phase.rss_mb
        print(
            f"| {phase.label} | {phase.connections} | {phase.rate():,.0f} | {ratio:.2f}x "
            f"| {phase.p99_ms('200'):.1f} | {phase.rate('503'):,.0f} | {phase.p99_ms('503'):.1f} "
            f"| {before:.0f} / {peak:.0f} / {after:.0f} |"
        )
        if phase is phases[0]:
            continue
        if not ratio >= GOODPUT_TARGET:
            failures.append(f"{phase.label}: goodput {ratio:.2f}x < {GOODPUT_TARGET}x")
        refusal_p99 = phase.p99_ms("503")
        if phase.rate("503") and not refusal_p99 <= REFUSAL_P99_MS:
            failures.append(f"{phase.label}: 503 p99 {refusal_p99:.1f} ms > {REFUSAL_P99_MS} ms")
        if peak - phases[0].rss_mb[0] > RSS_GROWTH_MB:
            failures.append(f"{phase.label}: RSS grew {peak - phases[0].rss_mb[0]:.0f} MB")
    for phase in phases[1:]:
        print(refusal_spread(phase))
    print(f"\npinned: {'server core 1, load generator core 0' if pinned else 'no (one core)'}")
    for failure in failures:
        print(f"[FAIL] {failure}")
    print("verdict: " + ("targets met" if not failures else "targets not met"))
    return 1 if failures else 0


def refusal_spread(phase: Phase) -> str:
    """Where the 503s' latencies lie: a p99 alone hides whether a few held connections
    (answered after ``Retry-After``) or every refusal is slow."""
    values = phase.result.latencies_ms.get("503", [])
    if not values:
        return f"{phase.label}: no 503s"
    quantiles = (0.5, 0.9, 0.99, 0.995)
    spread = "/".join(
        f"{values[min(len(values) - 1, int(q * len(values)))]:.1f}" for q in quantiles
    )
    slow = sum(1 for value in values if value > 100)
    return (
        f"{phase.label}: 503 ms p50/p90/p99/p99.5 {spread}; "
        f"{slow} of {len(values):,} over 100 ms (a held connection let go after Retry-After)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overload", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--connections", type=int, default=32, help="connections that saturate")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument(
        "--tight-ms",
        type=float,
        default=50.0,
        help=f"the last phase's {TIMEOUT_HEADER}: a deadline too short for every request",
    )
    parser.add_argument("--flood", action="store_true", help="add the tenant flood")
    parser.add_argument("--flood-only", action="store_true", help="only the tenant flood")
    parser.add_argument("--flood-connections", type=int, default=256)
    parser.add_argument("--flood-ms", type=float, default=10.0)
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        type=lambda text: tuple(text.split("=", 1)),
        metavar="MLGATE_NAME=VALUE",
        help="a setting for the server (repeatable), to compare policies in one command",
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
