"""Prometheus metrics: one ``Metrics`` object per app, served at ``GET /metrics``.

Metrics live on the app's own registry (no global state; tests build many apps).
With several processes, ``PROMETHEUS_MULTIPROC_DIR`` switches prometheus-client to
its multiprocess mode: each process writes its values to files there and a scrape
of any process sums them (gauges by their ``multiprocess_mode``). Gauges that mirror
worker state (mailbox depth, spill backlog, breaker state) are sampled once a second
rather than on every change, so the hot paths stay free of them.
"""

from __future__ import annotations

import asyncio
import glob
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from mlgate.workers.breaker import Breaker
from mlgate.workers.supervision import SupervisedTask

log = structlog.get_logger("mlgate.metrics")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mlgate_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "mlgate_http_request_duration_seconds", "HTTP request latency",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.background_task_crashes = Counter(
            "mlgate_background_task_crashes", "Crashes of supervised background tasks (each restarted)",
            ["task"], registry=r,
        )
        self.mailbox_depth = Gauge(
            "mlgate_mailbox_depth", "Items waiting in a worker's mailbox", ["worker"],
            multiprocess_mode="livesum", registry=r,
        )
        self.batch_size = Histogram(
            "mlgate_inference_batch_size", "Rows per inference batch", ["model", "version"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_seconds = Histogram(
            "mlgate_inference_queue_seconds", "Time a predict request waited in the mailbox",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.compute_seconds = Histogram(
            "mlgate_inference_compute_seconds", "onnxruntime run time per batch",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.produce_seconds = Histogram(
            "mlgate_kafka_produce_seconds", "Time from a Kafka batch send to its ack",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.records = Counter(
            "mlgate_records",
            "Records by outcome: produced to Kafka, spilled (to the local spill, Kafka "
            "failing), written (to the local log), failed (neither: their ingest answered 503)",
            ["outcome"], registry=r,
        )
        self.kafka_failed_records = Counter(
            "mlgate_kafka_failed_records",
            "Records of produce attempts Kafka failed, each attempt (the spill's resends "
            "again): no loss, they spill or their ingest is answered 503",
            registry=r,
        )
        self.records_resent = Counter(
            "mlgate_records_resent",
            "Records sent to Kafka again after a produce whose outcome was unknown "
            "(a timeout): the upper bound of duplicates in the topic",
            registry=r,
        )
        self.connections_open = Gauge(
            "mlgate_connections_open", "Open client connections", multiprocess_mode="livesum",
            registry=r,
        )
        self.connections_refused = Counter(
            "mlgate_connections_refused",
            "Connections refused at once beyond MLGATE_MAX_CONNECTIONS", registry=r,
        )
        self.connections_evicted = Counter(
            "mlgate_connections_evicted",
            "Connections waiting for a request head closed at MLGATE_MAX_CONNECTIONS to let a new one in",
            registry=r,
        )
        self.door_refusals = Counter(
            "mlgate_door_refusals",
            "Predict requests for a model at capacity refused from their head, before the app "
            "(also counted in mlgate_requests_total)",
            registry=r,
        )
        self.spill_backlog = Gauge(
            "mlgate_spill_backlog_records", "Spilled records not yet forwarded to Kafka",
            multiprocess_mode="livesum", registry=r,
        )
        self.rate_limited = Counter(
            "mlgate_rate_limited", "Requests refused with 429", ["scope"], registry=r
        )
        self.rate_limit_fallback = Counter(
            "mlgate_rate_limit_local_fallback", "Rate-limit checks done locally because Redis failed",
            registry=r,
        )
        self.redis_fallback = Counter(
            "mlgate_redis_fallback",
            "Calls served from in-process state because Redis failed or its breaker was open",
            ["operation"], registry=r,
        )
        self.redis_restarts = Counter(
            "mlgate_redis_restarts",
            "Times Redis answered again as another run of itself (restarted, with only what it kept on disk)",
            registry=r,
        )
        self.model_load_failures = Counter(
            "mlgate_model_load_failures",
            "Loads of a model version that failed (its file, its config or its warm-up run); "
            "once per change of the files",
            ["model", "version"], registry=r,
        )
        self.local_log_write_errors = Counter(
            "mlgate_local_log_write_errors",
            "Writes of the local log or the spill that failed (a full or read-only disk, "
            "an I/O error): the records of each got 503",
            registry=r,
        )
        self.ingest_refused = Counter(
            "mlgate_ingest_refused",
            "Ingests refused with 503 for the held-values bound (MLGATE_INGEST_MAX_HELD_VALUES): "
            "reason held_values (no room) or tenant_share (the tenant at its share while "
            "others wait)",
            ["reason"], registry=r,
        )
        self.held_body_bytes = Gauge(
            "mlgate_held_body_bytes",
            "Bytes of request bodies over 64 KB read whole and held until their requests end",
            multiprocess_mode="livesum", registry=r,
        )
        self.ingest_held_values = Gauge(
            "mlgate_ingest_held_values",
            "Feature values ingests hold until their records are durable",
            multiprocess_mode="livesum", registry=r,
        )
        self.dedup_kept_in_process = Counter(
            "mlgate_dedup_kept_in_process",
            "record_ids kept in this process only, their tenant past its Redis dedup budget "
            "(MLGATE_DEDUP_REDIS_TENANT_MAX_IDS)",
            registry=r,
        )
        self.idempotent_replays = Counter(
            "mlgate_idempotent_replays", "Responses replayed for a repeated Idempotency-Key", registry=r
        )
        self.records_duplicate = Counter(
            "mlgate_records_duplicate", "Records dropped as duplicates by record_id", registry=r
        )
        self.breaker_state = Gauge(
            "mlgate_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            ["dependency"], multiprocess_mode="livemax", registry=r,
        )
        self.dependency_unavailable = Gauge(
            "mlgate_dependency_unavailable",
            "1 from the failures that open a dependency's circuit breaker until a call "
            "succeeds again (steady through its half-open trials), else 0",
            ["dependency"], multiprocess_mode="livemax", registry=r,
        )
        # Data quality (service.ingest.quality_screen, workers.quality.drift_monitor), per source or model.
        self.feature_psi = Gauge(
            "mlgate_feature_psi", "Population stability index of a feature over the last drift window",
            ["kind", "name", "feature"], multiprocess_mode="livemax", registry=r,
        )
        self.feature_out_of_range_share = Gauge(
            "mlgate_feature_out_of_range_share",
            "Share of a feature's values outside the profile's range over the last drift window",
            ["kind", "name", "feature"], multiprocess_mode="livemax", registry=r,
        )
        self.quality_violations = Counter(
            "mlgate_quality_violations", "Records outside their profile's range, by action",
            ["kind", "name", "action"], registry=r,
        )
        self.drift_dropped = Counter(
            "mlgate_drift_dropped_records", "Records the drift monitor did not observe (its mailbox full, or rows of another width than the profile)",
            ["kind", "name"], registry=r,
        )
        self.quality_profiles_unreadable = Gauge(
            "mlgate_quality_profiles_unreadable",
            "Profile files there that cannot be loaded (an earlier version kept in force or "
            "not: a source with none refuses its records with 503), plus one for a profiles "
            "directory there that cannot be listed (the profiles known in it kept)",
            ["kind"], multiprocess_mode="livemax", registry=r,
        )
        self.quality_profile_load_failures = Counter(
            "mlgate_quality_profile_load_failures",
            "Loads of a profile file that failed; once per change of the file, per process",
            ["kind", "name"], registry=r,
        )
        # (kind, name) -> the features whose drift gauges were set, so a retired
        # profile's can be removed (written by the drift monitor, read by refreshes).
        self.drift_features: dict[tuple[str, str], frozenset[str]] = {}
        self.drift_features_lock = threading.Lock()
        # name -> callable returning the current value; sampled once a second.
        self.samplers: dict[str, Callable[[], None]] = {}

    def tls_expiry(self) -> Gauge:
        """``mlgate_tls_certificate_expiry_seconds``, made once TLS is served: a server
        without TLS exports none, rather than a 0 that an expiry alert fires on (a
        review)."""
        gauge = getattr(self, "_tls_expiry", None)
        if gauge is None:
            gauge = self._tls_expiry = Gauge(
                "mlgate_tls_certificate_expiry_seconds", "Seconds until the TLS certificate expires",
                multiprocess_mode="livemin", registry=self.registry,
            )
        return gauge

    def record_breaker(self, dependency: str, breaker: Breaker) -> None:
        """``breaker``'s state and whether its dependency is down, under ``dependency``."""
        self.breaker_state.labels(dependency).set(BREAKER_STATES[breaker.reported_state])
        self.dependency_unavailable.labels(dependency).set(1 if breaker.unavailable else 0)

    def sample(self) -> None:
        # One failing sampler must neither stop the others nor the sampling task
        # (nor turn a scrape into a 500); it is logged and tried again next time.
        for name, sampler in self.samplers.items():
            try:
                sampler()
            except Exception as exc:
                log.warning("metrics_sampler_failed", sampler=name, error=repr(exc))

    def exposition(self) -> bytes:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        registry.register(SizedFilesCollector(directory))
        return generate_latest(registry)


class SizedFilesCollector:
    """``MultiProcessCollector`` over the processes' files that are already sized.

    prometheus-client creates a process's file empty and sizes it just after
    (prometheus/client_python#1199): a scrape landing in between failed as a whole,
    a 500, although that file holds nothing yet.
    """

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in glob.glob(os.path.join(self._directory, "*.db")):
            try:
                if os.path.getsize(path) > 0:
                    files.append(path)
            except FileNotFoundError:  # a dead process's file, just removed
                continue
        return MultiProcessCollector.merge(files, accumulate=True)


def route_of(request: web.Request) -> str:
    """The route template (``/v2/models/{model}/infer``), never the raw path."""
    match_info = request.match_info
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "unmatched"


class RequestCounter:
    """Counts and times answered requests by route, method and status.

    Labelled children are cached per matched route object, method and status:
    ``labels()`` costs ~4x the increment itself and the route template lookup as much
    again, and this runs on every request. Unmatched requests (404/405) share one entry.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._children: dict[tuple[object, str, int], tuple[Any, Any]] = {}

    def record(self, request: web.Request, status: int, seconds: float) -> None:
        match_info = request.match_info
        # Routes live as long as the app; an unmatched request gets a fresh route object.
        route: object = match_info.route if match_info.http_exception is None else None
        key = (route, request.method, status)
        children = self._children.get(key)
        if children is None:
            template = route_of(request)
            children = self._children[key] = (
                self._metrics.requests.labels(template, request.method, str(status)),
                self._metrics.request_seconds.labels(template, request.method),
            )
        counter, timer = children
        counter.inc()
        timer.observe(seconds)


def sampler(metrics: Metrics, interval_s: float = 1.0) -> SupervisedTask:
    """The gauges' sampling loop, once a second."""

    async def sample_forever() -> None:
        while True:
            metrics.sample()
            await asyncio.sleep(interval_s)

    return SupervisedTask("metrics-sampler", sample_forever, PrometheusTelemetry(metrics))


class PrometheusTelemetry:
    """The workers' telemetry protocol, recorded into ``Metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def background_task_crashed(self, task: str) -> None:
        self._m.background_task_crashes.labels(task).inc()

    def kafka_batch_acked(self, records: int, seconds: float) -> None:
        self._m.produce_seconds.observe(seconds)
        self._m.records.labels("produced").inc(records)

    def kafka_batch_failed(self, records: int) -> None:
        self._m.kafka_failed_records.inc(records)

    def records_failed(self, records: int) -> None:
        self._m.records.labels("failed").inc(records)

    def records_spilled(self, records: int) -> None:
        self._m.records.labels("spilled").inc(records)

    def records_resent(self, records: int) -> None:
        self._m.records_resent.inc(records)

    def inference_batch_ran(
        self, model: str, version: str, rows: int, queue_s: float, compute_s: float
    ) -> None:
        self._m.batch_size.labels(model, version).observe(rows)
        self._m.queue_seconds.labels(model, version).observe(queue_s)
        self._m.compute_seconds.labels(model, version).observe(compute_s)

    def model_load_failed(self, model: str, version: str) -> None:
        self._m.model_load_failures.labels(model, version).inc()

    def local_log_write_failed(self) -> None:
        self._m.local_log_write_errors.inc()

    def local_log_batch_written(self, records: int) -> None:
        self._m.records.labels("written").inc(records)

    def local_log_batch_failed(self, records: int) -> None:
        self._m.records.labels("failed").inc(records)

    def feature_drift_scored(
        self, kind: str, name: str, features: Sequence[str], psi: Sequence[float],
        out_of_range_share: Sequence[float],
    ) -> None:
        m = self._m
        with m.drift_features_lock:
            for feature, score, share in zip(features, psi, out_of_range_share, strict=True):
                m.feature_psi.labels(kind, name, feature).set(score)
                m.feature_out_of_range_share.labels(kind, name, feature).set(share)
            m.drift_features[(kind, name)] = m.drift_features.get((kind, name), frozenset()) | set(
                features
            )

    def feature_drift_retired(self, kind: str, name: str, keep: Sequence[str]) -> None:
        """Remove the drift gauges of ``kind``/``name`` but ``keep``'s. In multiprocess
        mode prometheus-client cannot remove a series: they are zeroed (no drift)."""
        m = self._m
        with m.drift_features_lock:
            published = m.drift_features.pop((kind, name), frozenset())
            kept = published & set(keep)
            if kept:
                m.drift_features[(kind, name)] = kept
            for feature in published - kept:
                for gauge in (m.feature_psi, m.feature_out_of_range_share):
                    if multiprocess_dir() is None:
                        gauge.remove(kind, name, feature)
                    else:
                        gauge.labels(kind, name, feature).set(0)

    def quality_profile_load_failed(self, kind: str, name: str) -> None:
        self._m.quality_profile_load_failures.labels(kind, name).inc()

    def quality_profiles_unreadable(self, kind: str, count: int) -> None:
        self._m.quality_profiles_unreadable.labels(kind).set(count)

    def quality_violations(self, kind: str, name: str, action: str, records: int) -> None:
        self._m.quality_violations.labels(kind, name, action).inc(records)

    def drift_observation_dropped(self, kind: str, name: str, records: int) -> None:
        self._m.drift_dropped.labels(kind, name).inc(records)
