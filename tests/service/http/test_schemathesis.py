"""schemathesis against /openapi.json of a live server: no 5xx, every response as documented.

schemathesis' own pytest integration does not run on pytest 9 (it sets the removed
``Node._nodeid``), so its Python API drives Hypothesis directly: every operation gets a
bounded number of valid (positive) and invalid (negative) requests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service_process import ServiceProcess
from tests.support import free_port

# Per operation; invalid inputs cost more to generate, so they get fewer (fits ~30 s).
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}


def not_a_server_error_but_load_shedding(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """A 5xx is a bug, except load shedding: 503/504 with Retry-After is the contract
    (a generated X-Request-Timeout of 1 ms may legitimately expire on a busy machine)."""
    if response.status_code in (503, 504) and "Retry-After" in response.headers:
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [
    not_a_server_error_but_load_shedding,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _msgpack_safe(value: Any) -> Any:
    """Generated JSON may hold integers wider than msgpack's 64 bits; send those as floats."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return float(value)
    if isinstance(value, list):
        return [_msgpack_safe(item) for item in value]
    if isinstance(value, dict):
        return {key: _msgpack_safe(item) for key, item in value.items()}
    return value


@schemathesis.serializer("application/msgpack")
def _to_msgpack(context: schemathesis.SerializationContext, value: Any) -> bytes:
    packed: bytes = msgpack.packb(_msgpack_safe(value))
    return packed


@schemathesis.serializer("application/x-ndjson")
def _to_ndjson(context: schemathesis.SerializationContext, value: Any) -> bytes:
    # The stream's documented schema is one record; a one-line stream carries it.
    return json.dumps(value).encode() + b"\n"


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    directory = tmp_path_factory.mktemp("schemathesis")
    service = ServiceProcess(
        port=free_port(),
        data_dir=directory / "data",
        output=directory / "service.log",
        env={"MLGATE_RATE_LIMITS_ENABLED": "false", "MLGATE_LOG_LEVEL": "warning"},
    )
    service.start()
    yield service
    service.stop()


def exercise(operation: schemathesis.APIOperation, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def call(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=10)

    call()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_no_5xx_and_documented_responses(
    live_service: ServiceProcess, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(f"{live_service.url}/openapi.json", timeout=10)
    failures: dict[str, str] = {}
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # the document itself is broken here
            failures[str(result.err())] = "invalid operation"
            continue
        operation = result.ok()
        try:
            exercise(operation, mode)
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # no input that could be made invalid
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup is a Base one
            failures[operation.label] = str(exc)  # every operation runs; all are reported
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
