"""What each setting means, and the two documents rendered from it.

``DESCRIPTIONS`` holds one line per Settings field; ``env_example()`` renders
``.env.example`` and ``markdown_table()`` the README's configuration table, both with
the defaults read from the Settings struct itself. A test keeps all three in step.
"""

from __future__ import annotations

import msgspec

from mlgate.config.settings import ALIASES, Settings, env_name

DESCRIPTIONS: dict[str, str] = {
    # Serving
    "host": "Address to bind.",
    "port": "Port to bind.",
    "workers": "Serving processes on one port with SO_REUSEPORT; more than one needs REDIS_URL, or per_process_state.",
    "per_process_state": "Let several processes start without REDIS_URL, each keeping its own idempotency keys, record dedup and rate limits (a repeat that reaches another process runs again).",
    "worker_timeout_s": "With several processes: one whose event loop has not turned for this long is hung; the supervisor kills and restarts it.",
    "log_level": "debug, info, warning or error; logs are JSON lines on stdout.",
    "access_log": "Write the one canonical log line per request.",
    "shutdown_timeout_s": "Budget from SIGTERM to exit: in-flight requests, mailbox drain, flush and fsync (at most a day).",
    "drain_grace_s": "After SIGTERM, seconds /ready answers 503 before the socket closes (capped at half the budget).",
    "worker_index": "Internal: set by the supervisor for each process; picks its data directory.",
    "tls_cert_file": "PEM certificate (chain) for HTTPS without a proxy; reloaded on SIGHUP.",
    "tls_key_file": "PEM private key matching tls_cert_file.",
    # HTTP limits
    "max_body_bytes": "Largest request body, after decompression; larger is 413 before it is read.",
    "max_held_body_bytes": "Request bodies over 64 KB read whole (decompressed) and held until their requests end, all requests of the process together; counted as their bytes arrive (not as declared); a body that would take them past it is refused 503 with Retry-After and the connection closed. At least MLGATE_MAX_BODY_BYTES.",
    "max_stream_record_bytes": "Largest single record (NDJSON line or msgpack map) in a stream.",
    # Connections
    "head_timeout_s": "Seconds a connection may take to send a complete request head, from when it opens or from the previous response (so also the idle keep-alive limit); then it is closed.",
    "body_timeout_s": "Seconds a request body may take before it must keep up body_min_rate_bytes, and the longest it may pause between bytes; a slower body is 408 and the connection closes.",
    "body_min_rate_bytes": "Bytes per second a request body must average after its first body_timeout_s.",
    "max_connections": "Open connections per process (capped by the open-files limit); at it a new connection takes the place of one waiting for a request head, or gets 503 when all are busy.",
    # Ingestion
    "max_batch_records": "Most records in one ingest batch.",
    "feature_dims": "Allowed feature vector lengths, comma-separated.",
    "feature_min": "Smallest allowed feature value (unset: no bound).",
    "feature_max": "Largest allowed feature value (unset: no bound).",
    "value_format": "Kafka message value encoding: json or msgpack.",
    "schema_version": "Value of the schema_version Kafka header.",
    # Kafka
    "kafka_bootstrap_servers": "Kafka bootstrap servers (host:port,...); unset: the embedded local log is the sink.",
    "kafka_topic": "Topic records are written to (Kafka's rule: 1 to 249 of a-z, A-Z, 0-9, '.', '_', '-').",
    "kafka_enable_idempotence": "Idempotent producer (needs InitProducerId; Tansu lacks it).",
    "kafka_linger_ms": "While Kafka batches are in flight, how long the writer waits for more records to join the next batch (until they are all answered, at most this); an idle writer sends at once.",
    "kafka_max_batch_bytes": "Largest Kafka record batch.",
    "kafka_request_timeout_ms": "Produce timeout; a produce that fails or times out spills.",
    "kafka_compression": "none, gzip, lz4, zstd or snappy; lz4, zstd and snappy need their library installed (lz4, zstandard, python-snappy), checked at start.",
    "kafka_breaker_fail_max": "Consecutive Kafka failures that open its circuit breaker.",
    "kafka_breaker_reset_s": "Seconds the Kafka breaker stays open before a trial write.",
    "spill_max_records": "Records the spill may hold while Kafka is down; beyond it ingest answers 503.",
    "spill_tenant_share": (
        "Past this part of the spill, a tenant adds to it only while under its fair share "
        "(the bound over the tenants in it, one more counted): a tenant alone stops here; "
        "1 turns sharing off."
    ),
    "spill_drain_batch_records": "Records forwarded from the spill to Kafka per batch.",
    # Writers
    "writer_mailbox_size": "Ingest writes that may wait for a writer (the requests of one event-loop turn make one write of at most MLGATE_WRITER_MAX_BATCH_RECORDS records, a larger request one of its own; a tenant with that many records on their way writes in a lane of its own, and those lanes hold at most three quarters of the mailbox together); full: 503 at once.",
    "writer_max_batch_records": "Most records a writer takes from its mailbox per round.",
    "ingest_max_held_values": "Feature values that ingest requests, decoded, may hold at once until their records are durable (about 32 bytes each as Python numbers); past it a new ingest gets 503 with Retry-After at once (one request always fits). Shared fairly: while other tenants wait for room (refused within 5 s), a tenant past its share takes only room none of them asked for.",
    "writer_max_in_flight": "Kafka batches awaiting acks at once.",
    "data_dir": "Directory for the local log, the spill, keys and the dev key.",
    "log_segment_bytes": "Local log segment size before rotation.",
    # Redis
    "redis_url": "Redis for shared rate limits, idempotency, dedup and keys; unset: in-process.",
    "redis_mode": "standalone, or cluster: Redis Cluster from the seed node(s) in REDIS_URL.",
    "redis_timeout_ms": "Every Redis call gives up after this long and falls back (in cluster mode a whole call, redirects and redis-py's own retries included, after twice this).",
    "redis_breaker_fail_max": "Consecutive Redis failures that open its breaker (local fallback).",
    "redis_breaker_reset_s": "Seconds the Redis breaker stays open.",
    # Keys
    "auth_disabled": "Serve without API keys (logs a warning at start-up). Never in production.",
    "keys_file": "Hashed API keys file (empty: <data_dir>/keys.json).",
    "keys_cache_s": "How long a key read from Redis is trusted before Redis is asked again (a revocation takes effect within it).",
    "keys_stale_s": "While Redis is unreachable, how long past MLGATE_KEYS_CACHE_S a key read from it is still trusted; then 503 (0: never).",
    # Rate limits
    "rate_limits_enabled": "Enforce the token buckets.",
    "rate_limit_key_rate": "Default requests per second per key.",
    "rate_limit_key_burst": "Default burst per key.",
    "rate_limit_tenant_rate": "Requests per second per tenant (all its keys together).",
    "rate_limit_tenant_burst": "Burst per tenant.",
    "rate_limit_tenants": "Tenants with limits of their own: tenant=rate/burst, comma-separated.",
    # Idempotency and dedup
    "idempotency_ttl_s": "How long a response is kept for Idempotency-Key replays.",
    "idempotency_lock_s": "How long an unfinished request holds its Idempotency-Key or record_id claims.",
    "idempotency_max_entries": "Responses kept in process when there is no Redis.",
    "idempotency_max_bytes": (
        "Bytes of responses kept in process, in all, shared fairly between tenants; a "
        "tenant past its share loses its own oldest."
    ),
    "idempotency_redis_tenant_max_bytes": (
        "Bytes of responses kept in Redis per tenant; past it the tenant's oldest go first."
    ),
    "dedup_window_s": "Window in which a repeated record_id is dropped as a duplicate (0: off).",
    "dedup_max_entries": (
        "record_ids remembered in process: all of them without Redis; with it, those of a "
        "tenant past MLGATE_DEDUP_REDIS_TENANT_MAX_IDS or written while Redis fails."
    ),
    "dedup_redis_tenant_max_ids": (
        "record_ids a tenant may have remembered in Redis within the window (190-280 bytes "
        "each for ids of 32 to 128 characters); past it its new ids are remembered in process only, until older ones age out."
    ),
    "dedup_in_flight_wait_s": "How long a batch waits for another request's write of the same record_id (then 409).",
    # Load shedding
    "retry_after_s": "Retry-After seconds sent with 503 for a full mailbox or a model that failed to load.",
    # Quality
    "profiles_dir": "Directory of source feature profiles (sources/<source>.profile.json).",
    "profiles_poll_interval_s": "How often profiles are rescanned (0: at start and on SIGHUP).",
    "drift_window_records": "Records per drift window (tumbling).",
    "drift_psi_threshold": "PSI above which a feature counts as drifting (one warning per crossing).",
    "drift_sample_every": "Ingested rows counted into drift windows: every k-th (range checks see all).",
    "drift_mailbox_size": "Rows waiting for the drift monitor (at most 64 MB of values; one source or model at most half); beyond it they are dropped and counted.",
    # Prediction
    "model_repository": "Model repository: <repo>/<model>/<version>/model.onnx.",
    "default_model": "Model used when a predict request names none.",
    "model_poll_interval_s": "How often the repository is rescanned (0: only on SIGHUP or the load API).",
    "model_load_timeout_s": (
        "How long a model version may take to load (session and warm-up run); past it "
        "the version is UNAVAILABLE until its files change."
    ),
    "request_timeout_ms": "Default predict deadline (X-Request-Timeout overrides per request).",
    "inference_mailbox_size": (
        "Predict requests that may wait per model version; full: 503 at once. A request "
        "that would wait past its deadline is refused at once whatever the room. With "
        "keys, one tenant's requests hold at most three quarters of it."
    ),
    "inference_thread_niceness": (
        "How much nicer than the process the thread that runs each model is (0-19): the "
        "event loop then answers, admits and refuses promptly while a batch computes, "
        "and the model has the rest of the core. onnxruntime's extra threads "
        "(MLGATE_INFERENCE_THREADS > 1) keep the process's niceness."
    ),
    "inference_mailbox_bytes": (
        "Bytes that predict requests not answered yet may hold per model version (their "
        "inputs, and the numbers decoded from REST bodies); full: 503 at once. With "
        "keys, one tenant's requests hold at most three quarters of it."
    ),
    "inference_max_batch_size": "Default most rows per inference batch (model config.json overrides).",
    "inference_max_queue_delay_ms": "Default longest wait to fill a batch (model config.json overrides).",
    "inference_threads": "onnxruntime intra-op threads per model session.",
    "express_lane": "Serve common predict and ingest requests at the connection, without the app's machinery.",
    "model_breaker_fail_max": "Consecutive failed inference runs that open a model version's breaker.",
    "model_breaker_reset_s": "Seconds a model version's breaker stays open (503 meanwhile).",
}


def _fields() -> list[msgspec.inspect.Field]:
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    return list(info.fields)


def _default(field: msgspec.inspect.Field) -> str:
    value = field.default
    if value is None or value is msgspec.NODEFAULT:
        return ""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def env_example() -> str:
    lines = [
        "# mlgate settings: every variable with its default. Copy to .env or an",
        "# EnvironmentFile and uncomment what you change. Generated by",
        "# `mlgate check-config --env-example`.",
    ]
    for field in _fields():
        lines.append("")
        lines.append(f"# {DESCRIPTIONS[field.name]}")
        alias = ALIASES.get(field.name)
        if alias:
            lines.append(f"# (also read from {alias})")
        lines.append(f"# {env_name(field.name)}={_default(field)}")
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for field in _fields():
        default = _default(field)
        shown = f"`{default}`" if default else "(unset)"
        names = f"`{env_name(field.name)}`"
        if field.name in ALIASES:
            names += f" or `{ALIASES[field.name]}`"
        rows.append(f"| {names} | {shown} | {DESCRIPTIONS[field.name]} |")
    return "\n".join(rows) + "\n"
