"""The app's resources, one cleanup context each, in the order ``create_app`` appends them.

    shared_state       the Redis client and what uses it: API keys, rate limits,
                       idempotency records, record-id dedup (each falls back to
                       in-process state without Redis)
    record_sink        Kafka with its spill, or the embedded local log, and the ingest
                       pipeline that writes to it
    profiles           feature profiles: loaded before the first request, rescanned
                       every ``MLGATE_PROFILES_POLL_INTERVAL_S`` and on SIGHUP
    drift_monitor      the drift monitor actor
    model_repository   the ONNX models, their readiness check, SIGHUP hook and gauges
    metrics_sampler    the gauges sampled once a second
    host_readiness     with several processes, this one's readiness published once a
                       second for its siblings' /ready

aiohttp runs the cleanups in reverse, after in-flight handlers have finished. Every
background loop here is a ``SupervisedTask``: a crash is logged, counted and restarted.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import structlog
from aiohttp import web

from mlgate.config import Settings, orphaned_workers, worker_data_dir
from mlgate.service.http import metrics
from mlgate.service.http.metrics import (
    Metrics,
    PrometheusTelemetry,
    multiprocess_dir,
)
from mlgate.service.http.readiness import HostReadiness
from mlgate.service.ingest.dedup import RecordDeduplicator
from mlgate.service.ingest.pipeline import IngestPipeline
from mlgate.service.protection.api_keys import KeyStore, keys_path
from mlgate.service.protection.idempotency import IdempotencyStore
from mlgate.service.protection.rate_limits import RateLimiter
from mlgate.service.protection.shared_redis import RunMet, SharedRedis
from mlgate.service.routes.health import own_problems
from mlgate.service.state import (
    DEGRADED_CHECKS,
    DRIFT_MONITOR,
    HOST_READINESS,
    IDEMPOTENCY,
    INGEST_PIPELINE,
    KEY_STORE,
    METRICS,
    MODEL_REPOSITORY,
    PROFILE_STORE,
    RATE_LIMITER,
    READINESS_CHECKS,
    RECORD_DEDUP,
    RECORD_SINK,
    RECORD_VALIDATOR,
    RELOAD_HOOKS,
    SETTINGS,
)
from mlgate.workers.inference.repository import ModelRepository
from mlgate.workers.quality.drift_monitor import DriftMonitor
from mlgate.workers.quality.profile_store import ProfileStore
from mlgate.workers.sinks.local_log_writer import LocalLogWriter
from mlgate.workers.sinks.spilling_sink import SpillingKafkaSink
from mlgate.workers.supervision import SupervisedTask, background_context
from mlgate.workers.telemetry import QualityTelemetry

log = structlog.get_logger("mlgate.lifecycles")
REDIS_DOWN = (
    "Redis unreachable: rate limits and record dedup in this process, requests with an "
    "Idempotency-Key and keys not read before refused 503"
)


async def shared_state(app: web.Application) -> AsyncIterator[None]:
    """The Redis client (with REDIS_URL) and what uses it: API keys, rate limits,
    idempotency records, record-id dedup; each falls back to in-process state."""
    settings = app[SETTINGS]
    app_metrics = app[METRICS]
    redis: SharedRedis | None = None
    if settings.redis_url:
        redis = SharedRedis.from_settings(
            settings, on_fallback=lambda operation: app_metrics.redis_fallback.labels(operation).inc()
        )
        await redis.check_mode()
        run_watch = RedisRunWatch(app_metrics, redis)
        if not await redis.ping():
            log.warning("redis_unreachable_at_start", fallback="in-process state")
        else:
            await run_watch.check_config()
        sample_redis = app_metrics.samplers["redis_breaker"] = redis_sampler(app_metrics, redis)

        def redis_problem() -> str | None:
            if redis.available:
                return None
            sample_redis()  # a trial ping when due: a quiet host would say down for ever
            return REDIS_DOWN

        app[DEGRADED_CHECKS]["redis"] = redis_problem
    keys = KeyStore(
        keys_path(settings), redis, cache_s=settings.keys_cache_s, stale_s=settings.keys_stale_s
    )
    app[KEY_STORE] = keys

    async def reload_keys() -> None:
        keys.expire_cached()
        keys.reload(strict=True)  # a file that does not parse fails the reload

    app[RELOAD_HOOKS]["api_keys"] = reload_keys
    if settings.auth_disabled:
        log.warning("auth_disabled", detail="MLGATE_AUTH_DISABLED=true: every request is let in")
    elif keys.file_key_count == 0 and redis is None:
        log.warning("no_api_keys", keys_file=str(keys.path), hint="mlgate keys create")
    if settings.workers > 1 and redis is None:
        log.warning(
            "per_process_limits",
            detail="without REDIS_URL, rate limits, idempotency and dedup hold per process",
        )
    limiter = RateLimiter(settings, redis, app_metrics) if settings.rate_limits_enabled else None
    if limiter is not None:
        app[RATE_LIMITER] = limiter
    app[IDEMPOTENCY] = idempotency_store = IdempotencyStore(
        settings, redis, on_crash=lambda task: app_metrics.background_task_crashes.labels(task).inc()
    )
    app[RECORD_DEDUP] = dedup = RecordDeduplicator(settings, redis, app_metrics)
    yield
    await idempotency_store.drain(settings.shutdown_timeout_s / 4)
    await dedup.close(settings.shutdown_timeout_s / 4)
    if limiter is not None:
        await limiter.close()
    if redis is not None:
        await run_watch.close()
        await redis.close()


REDIS_STATE = "idempotency answers, the dedup window's record ids, keys stored in Redis"
EXPIRING_STATE = (
    "rate-limit buckets (an evicted bucket is full again: limits stop holding), "
    "idempotency answers and claims, the dedup window's record ids"
)


async def check_redis_config(redis: SharedRedis) -> None:
    """Warn of a Redis that would lose mlgate's state: one keeping nothing over a
    restart (a review: Redis restarted empty, and retries with an Idempotency-Key ran
    again and records were written twice, with nothing said anywhere), and one that
    evicts any key when full (a review: one tenant's flood of record ids evicted the
    keys stored in Redis, and every tenant was answered 401)."""
    if await redis.persistent() is False:
        log.warning(
            "redis_not_persistent", lost_at_restart=REDIS_STATE, fix="snapshots (save) or appendonly yes"
        )
    await warn_if_evicting(redis)


async def warn_if_evicting(redis: SharedRedis) -> None:
    """A Redis that evicts when full, named: ``redis_evicts_any_key`` for an
    ``allkeys-*`` policy, ``redis_evicts_expiring_keys`` for a ``volatile-*`` one. Every
    key mlgate writes but the stored API keys expires, so ``volatile-*`` spares only
    those: the rate-limit buckets, with the shortest times to live, go first (a
    review: under ``volatile-ttl`` a tenant's burst of 10 let 26 requests through while
    another tenant's records filled Redis, and our own warning had advised the policy)."""
    policy = await redis.eviction_policy()
    if policy is None or policy == "noeviction":
        return
    if policy.startswith("allkeys-"):
        event, lost = "redis_evicts_any_key", f"{REDIS_STATE}, rate-limit buckets"
    else:
        event, lost = "redis_evicts_expiring_keys", EXPIRING_STATE
    log.warning(
        event,
        maxmemory_policy=policy,
        lost_when_full=lost,
        fix="maxmemory-policy noeviction, and memory for every tenant's budgets",
    )


class RedisRunWatch:
    """What mlgate says of each run of Redis its connections meet (``SharedRedis``'s
    ``on_run``): its configuration checked once (``check_redis_config``; at start, or
    when Redis first answers if it did not then: a review saw neither warning for a
    Redis started after mlgate); a restart counted (``mlgate_redis_restarts_total``)
    and logged (``redis_restarted``, with what a Redis keeping nothing on disk lost,
    its configuration checked again: a review saw Redis restart empty while mlgate
    ran, and nothing said); a run carrying on the last one's history (a failover, a
    restart from its own files) logged, lost nothing."""

    def __init__(self, app_metrics: Metrics, redis: SharedRedis) -> None:
        self._metrics = app_metrics
        self._redis = redis
        self._config_checked = False
        self._tasks: set[asyncio.Task[None]] = set()
        redis.on_run.append(self._met)

    async def check_config(self) -> None:
        """``check_redis_config``, once."""
        if not self._config_checked:
            self._config_checked = True
            await check_redis_config(self._redis)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _met(self, change: RunMet) -> None:
        if change == "first":
            self._later(self.check_config())
        elif change == "continued":
            log.info("redis_run_changed", run_id=self._redis.run_id, kept="its replication history")
            # Another server, maybe configured otherwise (a review: a promoted replica
            # evicting any key was never named).
            self._later(check_redis_config(self._redis))
        else:
            self._metrics.redis_restarts.inc()
            # Read now: by the time the check has run, another master's run may be met.
            self._later(self._restarted(self._redis.run_id, self._redis.run_node))

    async def _restarted(self, run_id: str | None, master: str | None) -> None:
        """``master``: the cluster's master that restarted (None: the one Redis)."""
        persistent = await self._redis.persistent(master)
        named = {"master": master} if master else {}
        log.warning(
            "redis_restarted",
            run_id=run_id,
            **named,
            persistent=persistent,
            lost=REDIS_STATE if persistent is False else "what it had not saved yet",
        )
        self._config_checked = True
        await warn_if_evicting(self._redis)

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        # A context of its own: it is no part of the request whose connection met the run.
        task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("redis_run_check_crashed", error=repr(error))
            self._metrics.background_task_crashes.labels("redis-run-check").inc()


async def record_sink(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    sink: SpillingKafkaSink | LocalLogWriter
    adopted: list[SpillingKafkaSink] = []
    probes: set[asyncio.Task[None]] = set()
    if settings.kafka_bootstrap_servers:
        sink = spilling = SpillingKafkaSink(settings, telemetry=PrometheusTelemetry(app[METRICS]))
        probe_when_quiet = kafka_prober(app[METRICS], spilling, probes)

        def kafka_problem() -> str | None:
            probe_when_quiet()  # a quiet host's /ready would say nothing of Kafka gone
            return spilling.degraded

        app[DEGRADED_CHECKS]["kafka"] = kafka_problem
        adopted = await adopt_spills(app, settings)
    else:
        sink = LocalLogWriter(
            Path(worker_data_dir(settings)) / "log",
            mailbox_size=settings.writer_mailbox_size,
            segment_bytes=settings.log_segment_bytes,
            telemetry=PrometheusTelemetry(app[METRICS]),
        )
    await sink.start()
    app[RECORD_SINK] = sink
    app[INGEST_PIPELINE] = pipeline = IngestPipeline(
        app[RECORD_VALIDATOR], app[RECORD_DEDUP], sink, app[METRICS],
        max_turn_records=settings.writer_max_batch_records,
        max_held_values=settings.ingest_max_held_values,
        answer_within_s=sink.answer_within_s,
    )
    def sample() -> None:
        if isinstance(sink, SpillingKafkaSink):
            probe_when_quiet()
        sample_sink(app[METRICS], sink, sum(each.backlog for each in adopted))

    app[METRICS].samplers["record_sink"] = sample
    app[METRICS].samplers["ingest"] = lambda: app[METRICS].ingest_held_values.set(
        pipeline.held_values
    )
    yield
    # Together, each with the drain budget: an adopted spill's batch in flight cut off
    # is sent again at the next start (a review: 100 records twice in Kafka).
    budget = settings.shutdown_timeout_s / 2
    for probe in probes:
        probe.cancel()
    await asyncio.gather(*probes, return_exceptions=True)
    await asyncio.gather(sink.close(drain_s=budget), *(each.close(drain_s=budget) for each in adopted))


def kafka_prober(
    app_metrics: Metrics, sink: SpillingKafkaSink, probes: set[asyncio.Task[None]]
) -> Callable[[], None]:
    """Once Kafka has taken nothing for ``KAFKA_QUIET_PROBE_S``, a metadata request as
    a probe (one at a time, in ``probes``), whose failure /ready and the gauges show.
    Nothing else asks Kafka on a quiet host, and under traffic the breaker opens only
    after its failures: a review saw /ready and ``mlgate_dependency_unavailable``
    say nothing for a minute of a dead broker on a quiet host, ~10 s under traffic."""

    def probed(task: asyncio.Task[None]) -> None:
        probes.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("kafka_probe_crashed", error=repr(error))
            app_metrics.background_task_crashes.labels("kafka-probe").inc()

    def probe_when_quiet() -> None:
        if probes or not sink.quiet_for(KAFKA_QUIET_PROBE_S):
            return
        # A context of its own: it is no part of the request whose /ready started it.
        task = asyncio.get_running_loop().create_task(sink.probe_kafka(), context=contextvars.Context())
        probes.add(task)
        task.add_done_callback(probed)

    return probe_when_quiet


def _degraded(sink: SpillingKafkaSink) -> str | None:
    return sink.degraded


def _problem(sink: SpillingKafkaSink) -> str | None:
    return sink.problem


async def adopt_spills(app: web.Application, settings: Settings) -> list[SpillingKafkaSink]:
    """A sink for each spill a run with more processes left (``orphaned_workers``),
    which only drains it: nothing writes to it. Without it a restart with fewer
    processes left their acknowledged records on disk, out of every count (a review:
    22,733 records of ``worker-1``'s spill, /ready and the backlog gauge saying
    nothing). Their backlog counts in ``mlgate_spill_backlog_records`` and /ready's
    ``degraded``."""
    adopted = []
    for index in orphaned_workers(settings):
        if not (Path(settings.data_dir) / f"worker-{index}" / "spill").is_dir():
            continue
        orphan = SpillingKafkaSink(
            msgspec.structs.replace(settings, worker_index=index),
            telemetry=PrometheusTelemetry(app[METRICS]),
        )
        await orphan.start()
        log.warning("spill_adopted", worker=index, records=orphan.backlog)
        app[DEGRADED_CHECKS][f"kafka-worker-{index}"] = partial(_degraded, orphan)
        # Its drainer is supervised as the process's own: one that cannot run while
        # records wait makes the process unready, not only a line in the log.
        app[READINESS_CHECKS][f"spill-worker-{index}"] = partial(_problem, orphan)
        adopted.append(orphan)
    return adopted


REDIS_QUIET_PING_S = 1.0
# Kafka has taken nothing for this long: a metadata request tells whether it is there.
KAFKA_QUIET_PROBE_S = 2.0


def redis_sampler(app_metrics: Metrics, redis: SharedRedis) -> Callable[[], None]:
    """The Redis breaker's gauges; once its open time is up, a ping as its trial. Nothing
    else may call Redis on a quiet host, and the breaker (and the gauges) would stay
    open after Redis came back until a request needed it. So too a ping when no call
    answered for ``REDIS_QUIET_PING_S``: a quiet host's /ready and gauges said nothing
    of Redis frozen or gone until a request paid its timeout (a review)."""
    trial: set[asyncio.Task[bool]] = set()

    def sample() -> None:
        breaker = redis.breaker
        # Open and its time up, or closed with the last call failed (Redis down until a
        # call succeeds: /ready says so, ``degraded``), or quiet.
        if breaker.state == "open":
            due = breaker.retry_after_s == 0
        else:
            quiet = time.monotonic() - redis.answered_at > REDIS_QUIET_PING_S
            due = not redis.available or quiet
        if due and not trial:
            # Asked by /ready too: what the ping logs must not carry that request's id
            # (a review: redis_master_replaced under a /ready's request id).
            ping = asyncio.get_running_loop().create_task(redis.ping(), context=background_context())
            trial.add(ping)
            ping.add_done_callback(tried)
        app_metrics.record_breaker("redis", breaker)
        if not redis.available:  # also while it refuses writes and its breaker closes on reads
            app_metrics.dependency_unavailable.labels("redis").set(1)

    def tried(ping: asyncio.Task[bool]) -> None:
        trial.discard(ping)
        # ping() answers False for Redis's failures; anything else is a fault of ours.
        if not ping.cancelled() and (error := ping.exception()) is not None:
            log.error("redis_trial_crashed", error=repr(error))
            app_metrics.background_task_crashes.labels("redis-trial").inc()

    return sample


def sample_sink(
    app_metrics: Metrics, sink: SpillingKafkaSink | LocalLogWriter, adopted_backlog: int = 0
) -> None:
    """``adopted_backlog``: the records waiting in spills adopted from other workers."""
    app_metrics.mailbox_depth.labels(sink.name).set(sink.mailbox_depth)
    if isinstance(sink, SpillingKafkaSink):
        app_metrics.spill_backlog.set(sink.backlog + adopted_backlog)
        app_metrics.record_breaker("kafka", sink.breaker)
        if sink.kafka_unavailable:  # its writer never started: the breaker never heard
            app_metrics.dependency_unavailable.labels("kafka").set(1)


def drift_monitor_for(
    settings: Settings, profiles: ProfileStore, telemetry: QualityTelemetry
) -> DriftMonitor:
    return DriftMonitor(
        profiles,
        window_records=settings.drift_window_records,
        psi_threshold=settings.drift_psi_threshold,
        mailbox_rows=settings.drift_mailbox_size,
        telemetry=telemetry,
    )


async def profiles(app: web.Application) -> AsyncIterator[None]:
    store = app[PROFILE_STORE]
    interval = app[SETTINGS].profiles_poll_interval_s
    loop = asyncio.get_running_loop()
    lock = asyncio.Lock()  # a SIGHUP during a poll waits for it rather than racing it

    async def refresh() -> None:
        async with lock:
            await loop.run_in_executor(None, store.refresh)

    async def poll() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await refresh()
            except OSError as exc:
                log.error("profiles_scan_failed", error=str(exc))

    await refresh()
    app[RELOAD_HOOKS]["profiles"] = refresh
    poller = SupervisedTask("profiles-poll", poll, PrometheusTelemetry(app[METRICS]))
    if interval > 0:
        poller.start()
    yield
    await poller.stop()


async def drift_monitor(app: web.Application) -> AsyncIterator[None]:
    monitor = app[DRIFT_MONITOR]
    await monitor.start()
    app[METRICS].samplers["drift_monitor"] = lambda: app[METRICS].mailbox_depth.labels(
        monitor.name
    ).set(monitor.mailbox_depth)
    yield
    await monitor.close()


async def model_repository(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    repository = ModelRepository(settings, telemetry=PrometheusTelemetry(app[METRICS]))
    await repository.start()
    app[MODEL_REPOSITORY] = repository
    app[READINESS_CHECKS]["models"] = lambda: repository.problem
    # A model whose runs fail is the model's fault, not the host's: listed, not unready
    # (every host serving it would leave the balancer at once).
    app[DEGRADED_CHECKS]["models"] = lambda: repository.degraded
    app[RELOAD_HOOKS]["models"] = repository.poll
    sampled: set[str] = set()

    def sample() -> None:
        """Mailbox depth and breaker state per serving version; retired ones removed."""
        depth, breaker = app[METRICS].mailbox_depth, app[METRICS].breaker_state
        unavailable = app[METRICS].dependency_unavailable
        versions = {f"model:{v.model}/{v.version}": v for v in repository.serving()}
        for label in sampled - versions.keys():
            # Zeroed first: prometheus-client's multiprocess mode cannot remove a label
            # (it warns and keeps the last value), and a retired version's open breaker
            # or deep mailbox would otherwise stay on for the life of the process.
            worker = f"inference:{label.removeprefix('model:')}"
            depth.labels(worker).set(0)
            breaker.labels(label).set(0)
            unavailable.labels(label).set(0)
            if multiprocess_dir() is None:
                depth.remove(worker)
                breaker.remove(label)
                unavailable.remove(label)
        for label, version in versions.items():
            depth.labels(f"inference:{version.worker.name}").set(version.worker.mailbox_depth)
            app[METRICS].record_breaker(label, version.breaker)
        sampled.clear()
        sampled.update(versions)

    app[METRICS].samplers["models"] = sample
    yield
    app[METRICS].samplers.pop("models", None)
    app[READINESS_CHECKS].pop("models", None)
    await repository.close()


async def host_readiness(app: web.Application) -> AsyncIterator[None]:
    """With several processes, this one's readiness published once a second (the
    metrics sampler's turn) for its siblings' ``/ready``; the last of the contexts, so
    every check it reads exists."""
    settings = app[SETTINGS]
    if settings.workers < 2:
        yield
        return
    host = app[HOST_READINESS] = HostReadiness(
        settings.data_dir, settings.worker_index, settings.workers
    )

    def publish() -> None:
        host.publish({name: problem for name, problem in own_problems(app).items() if problem})

    app[METRICS].samplers["host_readiness"] = publish
    yield
    app[METRICS].samplers.pop("host_readiness", None)


async def metrics_sampler(app: web.Application) -> AsyncIterator[None]:
    sampler = metrics.sampler(app[METRICS])
    sampler.start()
    yield
    await sampler.stop()
