"""Capacity model: cores, hosts, Kafka partitions, Redis operations and bandwidth for a
target load, from per-core figures (docs/capacity.md explains each formula).

    python -m bench.capacity --records-per-s 1000000 --batch 500 --predictions-per-s 100000

The per-core defaults are the README's benchmark numbers (2-core development machine,
one mlgate process per core); ``--figures FILE`` takes them from a JSON object instead
(any of the keys of ``Figures``), e.g. written from your own ``make bench`` run.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class Figures:
    """What one core (one mlgate process) does, measured."""

    # README, "ingest, 1 process": one process tops out near 49k records/s (batches of
    # 500 x 128 float32, JSON values); the three test hosts measured 50.7k per core-second.
    ingest_records_per_core_s: float = 49_000.0
    # README "protection": with record-id dedup in Redis, 0.76x of unprotected ingest;
    # auth + Redis rate limits + Idempotency-Key cost nothing measurable (0.89-1.06x).
    dedup_factor: float = 0.76
    # README "predict protection": demo model single-row with key + Redis token buckets,
    # 8,519-9,196 req/s on one process.
    predictions_per_core_s: float = 8_500.0
    # JSON bytes of one record of 128 features (~9 bytes a float, ids, timestamp, source).
    record_bytes: float = 1_400.0
    predict_request_bytes: float = 1_300.0
    predict_response_bytes: float = 150.0


def plan(
    figures: Figures,
    *,
    records_per_s: float,
    batch: int,
    predictions_per_s: float,
    dedup: bool,
    idempotency: bool,
    utilisation: float,
    cores_per_host: int,
    partition_mb_s: float,
    replication: int,
    compression: float,
    masters: int,
) -> list[tuple[str, str, str]]:
    """(quantity, value, formula) rows."""
    per_core = figures.ingest_records_per_core_s * (figures.dedup_factor if dedup else 1.0)
    ingest_cores = records_per_s / per_core
    predict_cores = predictions_per_s / figures.predictions_per_core_s
    cores = math.ceil((ingest_cores + predict_cores) / utilisation)
    hosts = max(2, math.ceil(cores / cores_per_host))  # two at least: one may die
    requests = records_per_s / batch
    produce_mb_s = records_per_s * figures.record_bytes / compression / 1e6
    partitions = max(hosts, math.ceil(produce_mb_s / partition_mb_s))
    redis_ops = requests * (1 + (2 if idempotency else 0) + (2 * min(batch, masters) if dedup else 0))
    redis_ops += predictions_per_s
    ingress_gbit = (records_per_s * figures.record_bytes + predictions_per_s * figures.predict_request_bytes) * 8 / 1e9
    egress_gbit = produce_mb_s * 8 / 1e3 + predictions_per_s * figures.predict_response_bytes * 8 / 1e9
    return [
        ("ingest cores", f"{ingest_cores:,.1f}", f"records/s / (records per core-s{' x dedup factor' if dedup else ''}) = {records_per_s:,.0f} / {per_core:,.0f}"),
        ("predict cores", f"{predict_cores:,.1f}", f"predictions/s / predictions per core-s = {predictions_per_s:,.0f} / {figures.predictions_per_core_s:,.0f}"),
        ("cores (processes)", f"{cores:,}", f"ceil((ingest + predict cores) / utilisation {utilisation:g})"),
        ("hosts", f"{hosts:,}", f"max(2, ceil(cores / {cores_per_host} cores per host)); add one for N+1"),
        ("ingest requests/s", f"{requests:,.0f}", f"records/s / batch {batch}"),
        ("Kafka produce MB/s", f"{produce_mb_s:,.1f}", f"records/s x {figures.record_bytes:g} B / compression {compression:g}"),
        ("Kafka partitions", f"{partitions:,}", f"max(hosts, ceil(produce MB/s / {partition_mb_s:g} MB/s per partition))"),
        ("Kafka broker write MB/s", f"{produce_mb_s * replication:,.1f}", f"produce MB/s x replication {replication}"),
        ("Redis ops/s", f"{redis_ops:,.0f}", "requests/s x (1 limit" + (" + 2 idempotency" if idempotency else "") + (f" + 2 x min(batch, {masters} masters) dedup" if dedup else "") + ") + predictions/s x 1 limit (upper bound: concurrent takes are coalesced)"),
        ("network in, Gbit/s", f"{ingress_gbit:,.2f}", f"(records/s x {figures.record_bytes:g} B + predictions/s x {figures.predict_request_bytes:g} B) x 8"),
        ("network out, Gbit/s", f"{egress_gbit:,.2f}", f"Kafka produce + predictions/s x {figures.predict_response_bytes:g} B, x 8"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records-per-s", type=float, default=1_000_000)
    parser.add_argument("--batch", type=int, default=500, help="records per ingest request")
    parser.add_argument("--predictions-per-s", type=float, default=100_000)
    parser.add_argument("--figures", type=Path, help="JSON object of per-core figures")
    parser.add_argument("--no-dedup", dest="dedup", action="store_false", help="record_id dedup off")
    parser.add_argument("--no-idempotency", dest="idempotency", action="store_false",
                        help="producers send no Idempotency-Key")
    parser.add_argument("--utilisation", type=float, default=0.6,
                        help="share of each core to plan for (headroom for bursts and a lost host)")
    parser.add_argument("--cores-per-host", type=int, default=8)
    parser.add_argument("--partition-mb-s", type=float, default=10.0,
                        help="produce MB/s one partition takes (measure your brokers)")
    parser.add_argument("--replication", type=int, default=3)
    parser.add_argument("--compression", type=float, default=1.0, help="value compression ratio")
    parser.add_argument("--masters", type=int, default=3, help="Redis Cluster masters")
    for spec in fields(Figures):
        parser.add_argument(f"--{spec.name.replace('_', '-')}", type=float, default=None,
                            help=f"per-core figure (default {spec.default})")
    args = parser.parse_args(argv)
    figures = Figures(**json.loads(args.figures.read_text())) if args.figures else Figures()
    for spec in fields(Figures):
        if (value := getattr(args, spec.name)) is not None:
            setattr(figures, spec.name, value)
    rows = plan(
        figures, records_per_s=args.records_per_s, batch=args.batch,
        predictions_per_s=args.predictions_per_s, dedup=args.dedup, idempotency=args.idempotency,
        utilisation=args.utilisation, cores_per_host=args.cores_per_host,
        partition_mb_s=args.partition_mb_s, replication=args.replication,
        compression=args.compression, masters=args.masters,
    )
    print(f"target: {args.records_per_s:,.0f} records/s in batches of {args.batch}, "
          f"{args.predictions_per_s:,.0f} predictions/s")
    print("per-core figures: " + ", ".join(f"{k}={v:g}" for k, v in asdict(figures).items()))
    print("\n| quantity | value | formula |\n| --- | --- | --- |")
    for quantity, value, formula in rows:
        print(f"| {quantity} | {value} | {formula} |")


if __name__ == "__main__":
    main()
