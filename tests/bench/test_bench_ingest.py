"""The ingestion benchmark runs end to end and every record mlgate accepted landed."""

from __future__ import annotations

from bench.ingest import run_bench
from bench.report import BenchOptions


def test_bench_ingest_every_accepted_record_lands() -> None:
    report = run_bench(
        BenchOptions(
            connections=2, duration_s=1.0, warmup_s=0.0, records=50, batches=2, read_all=True
        )
    )
    assert report.statuses == {"202": report.requests}
    assert report.accepted > 0
    assert report.accepted == report.landed
    assert report.raw_acked > 0
    assert report.raw_acked == report.raw_landed
