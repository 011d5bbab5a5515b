"""Settings: one frozen Struct read once from the environment.

Every field maps to an environment variable named ``MLGATE_<FIELD>`` (upper case);
a few conventional names are honoured too (``PORT``, ``REDIS_URL``,
``WEB_CONCURRENCY``). List fields take comma-separated values. A bad value stops
start-up with a ``SettingsError`` naming the variable.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
from collections.abc import Mapping
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

PREFIX = "MLGATE_"

# MLGATE_ variables that are not the service's settings: the Python client's key, the
# example load balancer's (deploy/haproxy.cfg), and those Kubernetes injects for every
# Service of the namespace (service links: a Service "mlgate-redis" gives
# MLGATE_REDIS_SERVICE_HOST, MLGATE_REDIS_PORT_6379_TCP_ADDR, ...; and
# MLGATE_REDIS_PORT=tcp://..., told apart by its value).
NOT_SETTINGS = re.compile(
    r"^MLGATE_(?:API_KEY|LB_[A-Z_]+|HOST_[0-9]+"
    r"|[A-Z0-9_]+_SERVICE_(?:HOST|PORT(?:_[A-Z0-9_]+)?)"
    r"|[A-Z0-9_]+_PORT_[0-9]+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)$"
)
SERVICE_LINK_VALUE = re.compile(r"^(?:tcp|udp|sctp)://")

# Conventional names a PaaS or operator sets without our prefix; ours win when both exist.
ALIASES: dict[str, str] = {
    "port": "PORT",
    "redis_url": "REDIS_URL",
    "workers": "WEB_CONCURRENCY",
}

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
LimitRate = Annotated[float, msgspec.Meta(ge=0.001, le=1e9)]  # requests a second
# A burst of 400 digits passed, and every request of its tenant was a 500 (a review).
LimitBurst = Annotated[int, msgspec.Meta(ge=1, le=10**9)]
TenantLimit = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[^=,\s]+=(?:[1-9][0-9]*(?:\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)/[1-9][0-9]*$",
        description="tenant=rate/burst, rate > 0 requests per second, burst >= 1",
    ),
]


class SettingsError(ValueError):
    """A setting has a value mlgate cannot start with."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Serving
    host: str = "0.0.0.0"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8080
    workers: PositiveInt = 1
    # Several processes without REDIS_URL keep idempotency keys, record dedup and rate
    # limits each of its own: refused at start unless this accepts it.
    per_process_state: bool = False
    worker_timeout_s: Annotated[float, msgspec.Meta(ge=1.0)] = 10.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    # A day at most: past it the shutdown watchdog's clock overflows (a review: 1e23).
    shutdown_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 20.0
    drain_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # Set by the supervisor for each of --workers N processes; picks its data directory.
    worker_index: Annotated[int, msgspec.Meta(ge=0)] = 0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    # HTTP limits
    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    max_held_body_bytes: PositiveInt = 512 * 1024 * 1024
    max_stream_record_bytes: PositiveInt = 1024 * 1024
    # Connections: how long a slow or idle client may hold a socket, and how many may
    head_timeout_s: PositiveFloat = 20.0
    body_timeout_s: PositiveFloat = 30.0
    body_min_rate_bytes: PositiveInt = 32 * 1024
    max_connections: PositiveInt = 10_000

    # Ingestion
    max_batch_records: Annotated[int, msgspec.Meta(gt=0, le=100_000)] = 10_000
    feature_dims: Annotated[tuple[PositiveInt, ...], msgspec.Meta(min_length=1)] = (128, 256, 512, 768)
    feature_min: float | None = None
    feature_max: float | None = None
    value_format: Literal["json", "msgpack"] = "json"
    schema_version: str = "1"

    # Kafka sink (unset bootstrap servers: the embedded local log is the sink)
    kafka_bootstrap_servers: str | None = None
    # Kafka's own rule for a topic's name (``Topic.validate``); one it refuses would
    # spill every record for ever, Kafka blamed for what is a setting (a review).
    kafka_topic: Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9._-]{1,249}$")] = "mlgate.records"
    kafka_enable_idempotence: bool = False
    kafka_linger_ms: Annotated[int, msgspec.Meta(ge=0)] = 2
    kafka_max_batch_bytes: PositiveInt = 1024 * 1024
    kafka_request_timeout_ms: PositiveInt = 5_000
    kafka_compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "none"

    # Kafka outage: breaker, then spill to the local log and drain it back later
    kafka_breaker_fail_max: PositiveInt = 3
    kafka_breaker_reset_s: PositiveFloat = 5.0
    spill_max_records: PositiveInt = 1_000_000
    spill_tenant_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.75
    spill_drain_batch_records: PositiveInt = 2000

    # Writer actors (Kafka or local log)
    writer_mailbox_size: PositiveInt = 1024
    writer_max_batch_records: PositiveInt = 5000
    ingest_max_held_values: PositiveInt = 8_000_000
    writer_max_in_flight: PositiveInt = 32

    # Embedded local log
    data_dir: Annotated[str, msgspec.Meta(min_length=1)] = "data"
    log_segment_bytes: PositiveInt = 64 * 1024 * 1024

    # Shared state
    redis_url: str | None = None
    # cluster: redis_url names seed node(s), comma-separated; keys hash-tagged per slot
    redis_mode: Literal["standalone", "cluster"] = "standalone"
    # Every Redis call gives up after this long (connect and reply) and falls back.
    redis_timeout_ms: PositiveInt = 200
    redis_breaker_fail_max: PositiveInt = 3
    redis_breaker_reset_s: PositiveFloat = 2.0

    # API keys (empty keys_file: <data_dir>/keys.json; REDIS_URL adds keys kept in Redis)
    auth_disabled: bool = False
    keys_file: str = ""
    keys_cache_s: PositiveFloat = 5.0
    keys_stale_s: Annotated[float, msgspec.Meta(ge=0)] = 300.0

    # Rate limits: token buckets per key and per tenant (tokens per second, burst)
    rate_limits_enabled: bool = True
    # As ``mlgate keys create --rate``: 1e-300 made Retry-After 300 digits long.
    rate_limit_key_rate: LimitRate = 500.0
    rate_limit_key_burst: LimitBurst = 1000
    rate_limit_tenant_rate: LimitRate = 1000.0
    rate_limit_tenant_burst: LimitBurst = 2000
    # Per-tenant exceptions to the two above: "tenant=rate/burst", comma-separated.
    rate_limit_tenants: tuple[TenantLimit, ...] = ()

    # Idempotency-Key responses and record_id dedup (dedup_window_s 0: off)
    idempotency_ttl_s: PositiveInt = 86_400
    idempotency_lock_s: PositiveInt = 60
    idempotency_max_entries: PositiveInt = 10_000
    # Bytes of kept answers: in process in all, in Redis per tenant (at least 64 KiB).
    idempotency_max_bytes: Annotated[int, msgspec.Meta(ge=65_536)] = 256 * 2**20
    idempotency_redis_tenant_max_bytes: Annotated[int, msgspec.Meta(ge=65_536)] = 256 * 2**20
    dedup_window_s: Annotated[int, msgspec.Meta(ge=0)] = 600
    dedup_max_entries: PositiveInt = 1_000_000
    # record_ids a tenant may have remembered in Redis within the window (190-280 B each)
    dedup_redis_tenant_max_ids: PositiveInt = 10_000_000
    dedup_in_flight_wait_s: PositiveFloat = 5.0

    # Load shedding
    # At most an hour: a connection held after a 503 is kept that long at most.
    retry_after_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 1

    # Data quality: feature profiles (<profiles_dir>/sources/<source>.profile.json and
    # <model_repository>/<model>/profile.json, rescanned every profiles_poll_interval_s,
    # 0: at start and on SIGHUP only) and drift over tumbling windows of records
    profiles_dir: str = "profiles"
    profiles_poll_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    drift_window_records: PositiveInt = 5000
    drift_psi_threshold: PositiveFloat = 0.2
    drift_sample_every: PositiveInt = 1
    # Rows waiting for the drift monitor; past it, observations are dropped and counted.
    drift_mailbox_size: PositiveInt = 20_000

    # Prediction
    model_repository: str = "models"
    default_model: str = "demo"
    model_poll_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    model_load_timeout_s: PositiveFloat = 300.0
    request_timeout_ms: PositiveInt = 1000
    inference_mailbox_size: PositiveInt = 4096
    inference_mailbox_bytes: PositiveInt = 128 * 1024 * 1024
    inference_max_batch_size: PositiveInt = 64
    inference_max_queue_delay_ms: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    # More threads than cores only contend; the bound keeps a typo from starting
    # thousands (a review's 100000 took 16.7 GB and never listened).
    inference_threads: Annotated[int, msgspec.Meta(gt=0, le=256)] = 1
    inference_thread_niceness: Annotated[int, msgspec.Meta(ge=0, le=19)] = 5
    # Common predict requests answered at the connection (service/process/express.py).
    express_lane: bool = True
    model_breaker_fail_max: PositiveInt = 5
    model_breaker_reset_s: PositiveFloat = 10.0

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                # ``inf`` passes ``ge``/``gt`` bounds (a review: an infinite poll interval
                # was taken, then ``serve`` died on it in ``math.ceil``; a NaN bound on
                # features was read as none).
                raise ValueError(f"must be a finite number - at `$.{name}`")
        if self.redis_url:
            for seed in self.redis_url.split(","):
                url = seed.strip() if "://" in seed else f"redis://{seed.strip()}"
                try:
                    _ = urlsplit(url).port  # reading it raises for one that is not a number
                except ValueError:
                    raise ValueError("a port that is not a number - at `$.redis_url`") from None
        if self.kafka_bootstrap_servers is not None:
            for address in self.kafka_bootstrap_servers.split(","):
                problem = _broker_address_problem(address.strip())
                if problem:
                    raise ValueError(f"{problem} - at `$.kafka_bootstrap_servers`")
        if self.kafka_topic in (".", ".."):
            raise ValueError("'.' and '..' are not topic names Kafka takes - at `$.kafka_topic`")
        if self.kafka_compression != "none" and not _codec_installed(self.kafka_compression):
            raise ValueError(
                f"the {self.kafka_compression} library is not installed "
                f"(pip install {_CODEC_PACKAGES[self.kafka_compression]}) - at `$.kafka_compression`"
            )
        if self.drain_grace_s >= self.shutdown_timeout_s:
            raise ValueError(
                "drain_grace_s must be shorter than shutdown_timeout_s - at `$.drain_grace_s`"
            )
        if self.max_held_body_bytes < self.max_body_bytes:
            # Else one body of the largest size would always be refused.
            raise ValueError(
                "max_held_body_bytes must be at least max_body_bytes - at `$.max_held_body_bytes`"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both or neither of the TLS files - at `$.tls_cert_file`")
        if (
            self.feature_min is not None
            and self.feature_max is not None
            and self.feature_min > self.feature_max
        ):
            raise ValueError("feature_min must not exceed feature_max - at `$.feature_min`")
        tenants = [entry.partition("=")[0] for entry in self.rate_limit_tenants]
        if len(tenants) != len(set(tenants)):
            raise ValueError("a tenant is listed twice - at `$.rate_limit_tenants`")
        for entry in self.rate_limit_tenants:
            # As MLGATE_RATE_LIMIT_TENANT_RATE (a review: 0.000...1 made Retry-After
            # 300 digits long).
            rate, _, burst = entry.partition("=")[2].partition("/")
            if not (0.001 <= float(rate) <= 1e9 and len(burst) <= 10 and int(burst) <= 10**9):
                raise ValueError(
                    f"{entry[:80]}: a rate must be from 0.001 to 1e9 requests a second, a burst "
                    "at most 1e9 - at `$.rate_limit_tenants`"
                )


def _broker_address_problem(address: str) -> str | None:
    """What is wrong with one of ``kafka_bootstrap_servers``' addresses, as aiokafka
    reads them (``host``, ``host:port``, ``[ipv6]:port`` or a bare IPv6 address), if
    anything: a review saw ``127.0.0.1:abc`` and ``,`` taken, every record then
    spilled while the log said Kafka was unreachable."""
    if not address:
        return "an empty address in the list"
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or not host or rest and not rest.startswith(":"):
            return f"{address[:80]!r} is not [address]:port"
        if not rest:
            return None  # the default port
        port = rest[1:]
    elif ":" in address:
        try:
            # As aiokafka tells one (a review: ``ipaddress`` takes a ``%zone``, which
            # aiokafka then reads as a port and refuses).
            socket.inet_pton(socket.AF_INET6, address)
            return None  # a bare IPv6 address: the default port
        except (OSError, ValueError):
            host, _, port = address.rpartition(":")
        if not host:
            return f"{address[:80]!r} names no host"
    else:
        return None
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return f"{address[:80]!r}: a port that is not a number from 1 to 65535"
    return None


def worker_data_dir(settings: Settings) -> str:
    """Each of several processes keeps its own local log and spill."""
    if settings.worker_index == 0:
        return settings.data_dir
    return f"{settings.data_dir}/worker-{settings.worker_index}"


def orphaned_workers(settings: Settings) -> list[int]:
    """The worker indexes of data directories no process of ``settings.workers``
    owns (left by a run with more processes), which this process takes over: those
    ``i`` past the count with ``i % workers == worker_index``, in order."""
    found: list[int] = []
    try:
        with os.scandir(settings.data_dir) as entries:
            for entry in entries:
                index = entry.name.removeprefix("worker-")
                if (
                    index != entry.name
                    and index.isascii()
                    and index.isdigit()
                    and int(index) >= settings.workers
                    and int(index) % settings.workers == settings.worker_index
                    and entry.is_dir()
                ):
                    found.append(int(index))
    except OSError:  # no data directory yet
        return []
    return sorted(found)


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def _is_sequence_field(field: msgspec.inspect.Field) -> bool:
    field_type = field.type
    if isinstance(field_type, msgspec.inspect.UnionType):
        field_type = next(t for t in field_type.types if not isinstance(t, msgspec.inspect.NoneType))
    return isinstance(field_type, msgspec.inspect.TupleType | msgspec.inspect.VarTupleType | msgspec.inspect.ListType)


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build Settings from ``environ`` (default ``os.environ``) plus explicit overrides."""
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    names: dict[str, str] = {}  # field -> the variable that set it (PORT or MLGATE_PORT)
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        for name in (env_name(field.name), ALIASES.get(field.name)):
            if name and name in environ:
                value: object = environ[name]
                if name.endswith("_PORT") and SERVICE_LINK_VALUE.match(environ[name]):
                    continue  # a Service named "mlgate" in Kubernetes: not our port
                if _is_sequence_field(field):
                    value = [part.strip() for part in str(value).split(",") if part.strip()]
                elif value == "" and field.default is None and field.required is False:
                    value = None
                raw[field.name] = value
                names[field.name] = name
                break
    _refuse_unknown_names(environ, {env_name(field.name) for field in info.fields})
    raw.update(overrides)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_name_the_variable(str(exc), names)) from None


def _refuse_unknown_names(environ: Mapping[str, str], known: set[str]) -> None:
    """A ``MLGATE_`` variable that is no setting is a mistake to stop on, not to ignore:
    a misspelled Kafka address would have mlgate acknowledge records into its local
    log (on a PaaS, an ephemeral disk). The variables of mlgate's client, of the example
    load balancer configuration and of Kubernetes service links are let be."""
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name in known or NOT_SETTINGS.match(name):
            continue
        if name.endswith("_PORT") and SERVICE_LINK_VALUE.match(environ[name]):
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise SettingsError(f"{name}: not a setting of this version of mlgate{hint}")


def _name_the_variable(message: str, names: Mapping[str, str]) -> str:
    match = re.search(r"`\$\.(\w+)", message)
    if not match:
        return f"invalid settings: {message}"
    field = match.group(1)
    return f"{names.get(field, env_name(field))}: {message.split(' - at ')[0]}"


_CODEC_PACKAGES = {"gzip": "(built in)", "lz4": "lz4", "zstd": "zstandard", "snappy": "python-snappy"}


def _codec_installed(codec: str) -> bool:
    """Whether aiokafka can compress with ``codec`` here: one it cannot failed every
    produce, records spilled for ever and Kafka was blamed (a review)."""
    from aiokafka import codec as codecs  # only to check this setting

    return bool(getattr(codecs, f"has_{codec}")())
