"""Settings from the environment: every MLGATE_ variable parses, a bad value stops
start-up with an error naming the variable, and ``check-config`` says so too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mlgate.config import Settings, SettingsError, env_name, load_settings, orphaned_workers
from mlgate.config.settings import ALIASES

INFO = msgspec.inspect.type_info(Settings)
assert isinstance(INFO, msgspec.inspect.StructType)
FIELDS = INFO.fields

# Variables that only make sense together with another one.
PARTNERS: dict[str, dict[str, str]] = {
    "tls_cert_file": {"MLGATE_TLS_KEY_FILE": "/etc/mlgate/key.pem"},
    "tls_key_file": {"MLGATE_TLS_CERT_FILE": "/etc/mlgate/cert.pem"},
}


def _sample(field: msgspec.inspect.Field) -> tuple[str, Any]:
    """A valid environment string for ``field`` other than its default, and its value."""
    kind = field.type
    if isinstance(kind, msgspec.inspect.UnionType):
        kind = next(t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType))
    default = field.default
    if isinstance(kind, msgspec.inspect.BoolType):
        return ("false", False) if default else ("true", True)
    if isinstance(kind, msgspec.inspect.IntType):
        number = (default if isinstance(default, int) else 0) + 1
        if kind.le is not None:
            number = min(number, kind.le)
        return str(number), number
    if isinstance(kind, msgspec.inspect.FloatType):
        real = (default if isinstance(default, float) else 0.0) + 1.5
        if kind.le is not None:
            real = kind.le if default != kind.le else kind.le / 2
        return str(real), real
    if field.name == "kafka_compression":
        return "gzip", "gzip"  # the codec every Python has
    if isinstance(kind, msgspec.inspect.LiteralType):
        choice = next(v for v in reversed(kind.values) if v != default)
        return str(choice), choice
    if isinstance(kind, msgspec.inspect.StrType):
        return "some-value", "some-value"
    if isinstance(kind, msgspec.inspect.VarTupleType) and isinstance(
        kind.item_type, msgspec.inspect.IntType
    ):
        return " 3, 5 ,7", (3, 5, 7)
    if field.name == "rate_limit_tenants":
        return "acme=200/400, globex=0.5/3", ("acme=200/400", "globex=0.5/3")
    raise AssertionError(f"no sample value for {field.name} of type {kind!r}; add one here")


@pytest.mark.parametrize("field", FIELDS, ids=[env_name(f.name) for f in FIELDS])
def test_each_variable_parses(field: msgspec.inspect.Field) -> None:
    text, expected = _sample(field)
    settings = load_settings({env_name(field.name): text, **PARTNERS.get(field.name, {})})
    assert getattr(settings, field.name) == expected


def test_no_variables_give_the_documented_defaults() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.kafka_bootstrap_servers is None  # the local log is the sink
    assert settings.feature_dims == (128, 256, 512, 768)


@pytest.mark.parametrize(
    "entry", ["acme=0/3", "acme=5", "acme=1/0", "=1/2", "a b=1/2", "acme=1/2,acme=3/4"]
)
def test_a_malformed_tenant_limit_stops_start_up_naming_the_variable(entry: str) -> None:
    with pytest.raises(SettingsError, match="MLGATE_RATE_LIMIT_TENANTS"):
        load_settings({"MLGATE_RATE_LIMIT_TENANTS": entry})


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("false", False), ("False", False), ("0", False)],
)
def test_boolean_variables_take_true_false_1_0(text: str, expected: bool) -> None:
    assert load_settings({"MLGATE_ACCESS_LOG": text}).access_log is expected


@pytest.mark.parametrize("name", ["MLGATE_KAFKA_BOOTSTRAP_SERVERS", "MLGATE_REDIS_URL"])
def test_empty_optional_variable_means_unset(name: str) -> None:
    settings = load_settings({name: ""})
    assert getattr(settings, name.removeprefix("MLGATE_").lower()) is None


@pytest.mark.parametrize("field", sorted(ALIASES))
def test_conventional_names_are_honoured_and_ours_win(field: str) -> None:
    info = next(f for f in FIELDS if f.name == field)
    text, expected = _sample(info)
    assert getattr(load_settings({ALIASES[field]: text}), field) == expected
    both = load_settings({ALIASES[field]: text, env_name(field): str(info.default or "")})
    assert getattr(both, field) == info.default


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"MLGATE_PORT": "eighty"}, "MLGATE_PORT"),
        ({"MLGATE_PORT": "70000"}, "MLGATE_PORT"),
        ({"PORT": "eighty"}, "PORT"),
        ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
        ({"MLGATE_ACCESS_LOG": "maybe"}, "MLGATE_ACCESS_LOG"),
        ({"MLGATE_LOG_LEVEL": "loud"}, "MLGATE_LOG_LEVEL"),
        ({"MLGATE_FEATURE_DIMS": "128,x"}, "MLGATE_FEATURE_DIMS"),
        ({"MLGATE_FEATURE_DIMS": "0"}, "MLGATE_FEATURE_DIMS"),
        ({"MLGATE_FEATURE_DIMS": ""}, "MLGATE_FEATURE_DIMS"),
        ({"MLGATE_MAX_BODY_BYTES": "-1"}, "MLGATE_MAX_BODY_BYTES"),
        ({"MLGATE_MAX_BATCH_RECORDS": "100001"}, "MLGATE_MAX_BATCH_RECORDS"),
        ({"MLGATE_SHUTDOWN_TIMEOUT_S": "soon"}, "MLGATE_SHUTDOWN_TIMEOUT_S"),
        ({"MLGATE_VALUE_FORMAT": "xml"}, "MLGATE_VALUE_FORMAT"),
        ({"MLGATE_KAFKA_COMPRESSION": "brotli"}, "MLGATE_KAFKA_COMPRESSION"),
        # A review: each spilled every record for ever, Kafka blamed, or failed later.
        ({"MLGATE_KAFKA_COMPRESSION": "snappy"}, "MLGATE_KAFKA_COMPRESSION"),  # not installed
        ({"MLGATE_KAFKA_TOPIC": ""}, "MLGATE_KAFKA_TOPIC"),
        ({"MLGATE_KAFKA_TOPIC": "a,,b"}, "MLGATE_KAFKA_TOPIC"),
        ({"MLGATE_KAFKA_TOPIC": ".."}, "MLGATE_KAFKA_TOPIC"),
        ({"MLGATE_PORT": "0"}, "MLGATE_PORT"),
        ({"MLGATE_SHUTDOWN_TIMEOUT_S": "1e23"}, "MLGATE_SHUTDOWN_TIMEOUT_S"),
        ({"MLGATE_FEATURE_MIN": "5", "MLGATE_FEATURE_MAX": "1"}, "MLGATE_FEATURE_MIN"),
        ({"MLGATE_TLS_CERT_FILE": "/etc/cert.pem"}, "MLGATE_TLS_CERT_FILE"),
        # Empty, the log and keys went to the current directory (a review).
        ({"MLGATE_DATA_DIR": ""}, "MLGATE_DATA_DIR"),
        # Retry-After 300 digits long, and a Redis bucket's expiry PEXPIRE refused.
        ({"MLGATE_RATE_LIMIT_KEY_RATE": "1e-300"}, "MLGATE_RATE_LIMIT_KEY_RATE"),
        ({"MLGATE_RATE_LIMIT_TENANT_RATE": "0.0001"}, "MLGATE_RATE_LIMIT_TENANT_RATE"),
        ({"MLGATE_RATE_LIMIT_TENANTS": "acme=0." + "0" * 299 + "1/1"}, "MLGATE_RATE_LIMIT_TENANTS"),
        ({"MLGATE_RATE_LIMIT_TENANTS": "acme=2000000000/1"}, "MLGATE_RATE_LIMIT_TENANTS"),
        ({"MLGATE_RATE_LIMIT_TENANTS": "acme=10/1" + "0" * 400}, "MLGATE_RATE_LIMIT_TENANTS"),
        ({"MLGATE_RATE_LIMIT_KEY_BURST": "1" + "0" * 400}, "MLGATE_RATE_LIMIT_KEY_BURST"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_bad_value_raises_settings_error_naming_the_variable(
    environ: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    assert str(caught.value).startswith(f"{named}: ")


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


def _check_config(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLGATE_")}
    clean.pop("PORT", None)
    return subprocess.run(
        [sys.executable, "-m", "mlgate", "check-config"],
        env={**clean, **environ},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_config_exits_2_naming_the_bad_variable() -> None:
    result = _check_config({"MLGATE_MAX_BODY_BYTES": "lots"})
    assert result.returncode == 2
    assert "MLGATE_MAX_BODY_BYTES" in result.stderr
    assert result.stdout == ""


def test_check_config_prints_the_settings_it_would_run_with() -> None:
    result = _check_config({"MLGATE_PORT": "9123", "MLGATE_FEATURE_DIMS": "4,8"})
    assert result.returncode == 0, result.stderr
    printed = msgspec.json.decode(result.stdout)
    assert printed["port"] == 9123 and printed["feature_dims"] == [4, 8]


def test_check_config_refuses_several_processes_without_redis_as_serve_does() -> None:
    """It said 0 for settings ``serve`` refuses (a review)."""
    result = _check_config({"REDIS_URL": "", "MLGATE_WORKERS": "2"})
    assert result.returncode == 2
    assert "MLGATE_WORKERS=2 without REDIS_URL" in result.stderr
    allowed = _check_config({"MLGATE_WORKERS": "2", "MLGATE_PER_PROCESS_STATE": "true"})
    assert allowed.returncode == 0, allowed.stderr


def test_the_refusal_of_several_processes_names_web_concurrency_when_that_set_them() -> None:
    """A review: a PaaS's WEB_CONCURRENCY=2 was refused naming MLGATE_WORKERS."""
    result = _check_config({"REDIS_URL": "", "WEB_CONCURRENCY": "2"})
    assert result.returncode == 2
    assert "WEB_CONCURRENCY=2 without REDIS_URL" in result.stderr


def test_the_refusal_of_several_processes_names_the_flag_when_that_set_them() -> None:
    """A review: ``serve --workers 2`` was refused naming MLGATE_WORKERS, not set."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLGATE_")}
    clean.pop("WEB_CONCURRENCY", None)
    result = subprocess.run(
        [sys.executable, "-m", "mlgate", "serve", "--workers", "2"],
        env={**clean, "REDIS_URL": ""}, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert "--workers 2 without REDIS_URL" in result.stderr


def test_drain_grace_longer_than_the_shutdown_budget_stops_start_up() -> None:
    with pytest.raises(SettingsError, match="MLGATE_DRAIN_GRACE_S"):
        load_settings({"MLGATE_DRAIN_GRACE_S": "30", "MLGATE_SHUTDOWN_TIMEOUT_S": "20"})


def test_a_retry_after_over_an_hour_stops_start_up() -> None:
    # A connection held after a 503 is kept until Retry-After: it must stay bounded.
    with pytest.raises(SettingsError, match="MLGATE_RETRY_AFTER_S"):
        load_settings({"MLGATE_RETRY_AFTER_S": "3601"})
    assert load_settings({"MLGATE_RETRY_AFTER_S": "3600"}).retry_after_s == 3600


def test_a_misspelled_variable_stops_start_up_naming_the_setting_it_resembles() -> None:
    """A review: MLGATE_KAFKA_BOOTSTRAP was ignored, and mlgate acknowledged records
    into its local log (an ephemeral disk on a PaaS) instead of Kafka."""
    with pytest.raises(
        SettingsError, match="MLGATE_KAFKA_BOOTSTRAP: .*MLGATE_KAFKA_BOOTSTRAP_SERVERS"
    ):
        load_settings({"MLGATE_KAFKA_BOOTSTRAP": "broker:9092"})


def test_an_unknown_variable_with_no_close_setting_stops_start_up_too() -> None:
    with pytest.raises(SettingsError, match="MLGATE_NO_SUCH_THING: not a setting"):
        load_settings({"MLGATE_NO_SUCH_THING": "1"})


@pytest.mark.parametrize("name", ["MLGATE_API_KEY", "MLGATE_LB_BIND", "MLGATE_HOST_1"])
def test_the_clients_and_the_example_balancers_variables_are_let_be(name: str) -> None:
    assert load_settings({name: "x"}) == load_settings({})


def test_inference_threads_are_bounded() -> None:
    """A review's MLGATE_INFERENCE_THREADS=100000 started 22,389 threads in 16.7 GB."""
    with pytest.raises(SettingsError, match="MLGATE_INFERENCE_THREADS"):
        load_settings({"MLGATE_INFERENCE_THREADS": "100000"})


def test_the_variables_kubernetes_injects_for_a_service_are_let_be() -> None:
    """A review: a Service named mlgate-redis in the namespace gives every pod these
    (service links, on by default); refusing them stopped a legitimate deployment."""
    injected = {
        "MLGATE_REDIS_SERVICE_HOST": "10.0.0.7",
        "MLGATE_REDIS_SERVICE_PORT": "6379",
        "MLGATE_REDIS_SERVICE_PORT_REDIS": "6379",
        "MLGATE_REDIS_PORT": "tcp://10.0.0.7:6379",
        "MLGATE_REDIS_PORT_6379_TCP": "tcp://10.0.0.7:6379",
        "MLGATE_REDIS_PORT_6379_TCP_PROTO": "tcp",
        "MLGATE_REDIS_PORT_6379_TCP_PORT": "6379",
        "MLGATE_REDIS_PORT_6379_TCP_ADDR": "10.0.0.7",
    }
    assert load_settings(injected) == load_settings({})


def test_a_kubernetes_service_named_mlgate_does_not_set_the_port() -> None:
    assert load_settings({"MLGATE_PORT": "tcp://10.0.0.9:8080"}).port == load_settings({}).port
    assert load_settings({"MLGATE_PORT": "tcp://10.0.0.9:8080", "PORT": "9000"}).port == 9000


def test_data_directories_past_the_process_count_are_shared_out_by_index(tmp_path: Path) -> None:
    """A run with more processes left ``worker-<i>`` directories: each is taken over by
    the process ``i % workers`` (its spill drained), the others left to their owners."""
    for name in ("worker-1", "worker-2", "worker-3", "worker-5", "worker-x", "log"):
        (tmp_path / name).mkdir()
    (tmp_path / "worker-4").write_text("a file, not a directory")
    first = Settings(data_dir=str(tmp_path), workers=2, worker_index=0)
    second = Settings(data_dir=str(tmp_path), workers=2, worker_index=1)
    assert orphaned_workers(first) == [2]
    assert orphaned_workers(second) == [3, 5]
    assert orphaned_workers(Settings(data_dir=str(tmp_path / "absent"))) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [("MLGATE_PROFILES_POLL_INTERVAL_S", "inf"), ("MLGATE_FEATURE_MIN", "nan"), ("MLGATE_KAFKA_BREAKER_RESET_S", "infinity")],
)
def test_a_setting_that_is_not_a_finite_number_is_refused(name: str, value: str) -> None:
    """A review: an infinite poll interval passed, then ``serve`` died on it with a
    traceback; a NaN feature bound was read as none."""
    with pytest.raises(SettingsError, match=f"{name}: must be a finite number"):
        load_settings({name: value})


@pytest.mark.parametrize(
    "servers",
    ["127.0.0.1:abc", ",", "a:9092,", "127.0.0.1:99999", "host:0", ":::", ":9092", "host:", "[::1", "[::1]9092", "[::1]:", "fe80::1%lo"],
)
def test_a_kafka_bootstrap_list_that_names_no_broker_is_refused(servers: str) -> None:
    """A review: these were taken, and every record spilled while the log said Kafka
    was unreachable."""
    with pytest.raises(SettingsError, match="KAFKA_BOOTSTRAP_SERVERS: "):
        load_settings({"MLGATE_KAFKA_BOOTSTRAP_SERVERS": servers})


@pytest.mark.parametrize(
    "servers",
    ["localhost", "127.0.0.1:9092", "a:1, b:2", "[::1]:9092", "[::1]", "::1", "[fe80::1%lo]:9092", "kafka-0.kafka:19092"],
)
def test_a_kafka_bootstrap_list_of_brokers_is_taken(servers: str) -> None:
    assert load_settings({"MLGATE_KAFKA_BOOTSTRAP_SERVERS": servers}).kafka_bootstrap_servers == servers


def test_a_redis_url_whose_port_is_not_a_number_is_refused_without_its_password() -> None:
    with pytest.raises(SettingsError, match="REDIS_URL: a port that is not a number") as refused:
        load_settings({"REDIS_URL": "redis://:hunter6pw@h:notaport"})
    assert "hunter6pw" not in str(refused.value)
    assert load_settings({"REDIS_URL": "h1:7000,h2:7001"}).redis_url == "h1:7000,h2:7001"
