"""/api/v2/predict and /api/v1/predict over HTTP, against real onnxruntime sessions."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import onnxruntime as ort
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings
from mlgate.schemas.predict import MAX_INSTANCES
from mlgate.service.state import METRICS, MODEL_REPOSITORY
from mlgate.workers.inference.batching import InferenceWorker
from models.make_demo_model import build_mlp
from tests.service_process import REPO
from tests.support import ManagedProcess, until

Client = TestClient[web.Request, web.Application]
DEMO_REPO = REPO / "models"


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 128)).astype(np.float32)


def add_version(root: Path, version: int, seed: int, config: str | None = None) -> None:
    staging = root / "demo" / f".staging-{version}"
    staging.mkdir(parents=True)
    (staging / "model.onnx").write_bytes(build_mlp(seed=seed).SerializeToString())
    if config is not None:
        (root / "demo" / "config.json").write_text(config)
    os.rename(staging, root / "demo" / str(version))


def expected(model_file: Path, data: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": data})[0]


class GatedSession:
    """Wraps a worker's real session: runs wait for ``gate``; the rows computed are kept."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.computed: list[np.ndarray] = []

    def run(
        self,
        names: Sequence[str] | None,
        feed: Mapping[str, np.ndarray],
        run_options: ort.RunOptions | None = None,
    ) -> Sequence[np.ndarray]:
        self.entered.set()
        self.gate.wait(10)
        self.computed.append(feed["input"].copy())
        return self.session.run(names, dict(feed), run_options)


def gate_worker(worker: InferenceWorker, monkeypatch: pytest.MonkeyPatch) -> GatedSession:
    gated = GatedSession(worker._session)
    monkeypatch.setattr(worker, "_session", gated)
    return gated


GatedDemo = Callable[..., Awaitable[tuple[Client, GatedSession]]]


@pytest.fixture
def gated_demo(
    app_client: Any,
    make_settings: Callable[..., Settings],
    repo_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> GatedDemo:
    """(client, gate) over a demo model computing one row per batch, its runs held by
    the gate, with an inference mailbox of the given size."""

    async def make(mailbox_size: int, **more: Any) -> tuple[Client, GatedSession]:
        add_version(repo_root, 1, seed=1, config='{"max_batch_size": 1}')
        settings = make_settings(
            model_repository=str(repo_root), inference_mailbox_size=mailbox_size, **more
        )
        client: Client = await app_client(settings)
        worker = client.app[MODEL_REPOSITORY].resolve("demo").worker
        return client, gate_worker(worker, monkeypatch)

    return make


@pytest.fixture
def repo_root(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
async def demo_client(app_client: Any, make_settings: Callable[..., Settings]) -> Client:
    client: Client = await app_client(make_settings(model_repository=str(DEMO_REPO)))
    return client


async def predict(
    client: Client, body: dict[str, Any], **headers: str
) -> tuple[int, dict[str, Any]]:
    response = await client.post("/api/v2/predict", json=body, headers=headers)
    return response.status, await response.json()


async def test_single_row_answers_the_argmax_class_and_its_probability(demo_client: Client) -> None:
    data = rows(1, seed=7)
    status, body = await predict(demo_client, {"features": data[0].tolist(), "request_id": "r-1"})
    probabilities = expected(DEMO_REPO / "demo" / "1" / "model.onnx", data)[0]
    assert status == 200
    assert body["prediction"] == int(probabilities.argmax())
    assert body["confidence"] == pytest.approx(float(probabilities.max()), abs=1e-6)
    assert body["label"] == ["negative", "positive"][body["prediction"]]
    assert (body["model"], body["model_version"], body["request_id"]) == ("demo", "1", "r-1")
    assert body["latency_ms"] > 0


async def test_instances_answer_one_prediction_per_row_in_order(demo_client: Client) -> None:
    data = rows(5, seed=3)
    status, body = await predict(demo_client, {"instances": data.tolist()})
    probabilities = expected(DEMO_REPO / "demo" / "1" / "model.onnx", data)
    assert status == 200
    assert [p["prediction"] for p in body["predictions"]] == probabilities.argmax(axis=1).tolist()
    confidences = [p["confidence"] for p in body["predictions"]]
    np.testing.assert_allclose(confidences, probabilities.max(axis=1), atol=1e-6)


async def test_msgpack_in_and_out(demo_client: Client) -> None:
    response = await demo_client.post(
        "/api/v2/predict",
        data=msgspec.msgpack.encode({"features": rows(1)[0].tolist()}),
        headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"},
    )
    assert response.status == 200 and response.content_type == "application/msgpack"
    assert msgspec.msgpack.decode(await response.read())["model_version"] == "1"


async def test_v1_answers_the_v2_prediction_as_result_with_deprecation_headers(
    demo_client: Client,
) -> None:
    features = rows(1, seed=5)[0].tolist()
    response = await demo_client.post("/api/v1/predict", json={"features": features})
    body = await response.json()
    _, v2 = await predict(demo_client, {"features": features})
    assert response.status == 200
    assert body == {"result": v2["prediction"]}
    assert response.headers["Deprecation"].startswith("@")
    assert response.headers["Sunset"].endswith("GMT")
    assert (
        'rel="successor-version"' in response.headers["Link"]
        and "/api/v2/predict" in response.headers["Link"]
    )


@pytest.mark.parametrize(
    ("body", "status"),
    [({"features": [1.0]}, 422), ({"features": [0.0] * 128, "model": "nope"}, 404)],
    ids=["invalid", "unknown-model"],
)
async def test_v1_errors_carry_the_deprecation_headers_too(
    demo_client: Client, body: dict[str, object], status: int
) -> None:
    response = await demo_client.post("/api/v1/predict", json=body)
    assert response.status == status
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.headers["Deprecation"].startswith("@")
    assert "Sunset" in response.headers and "successor-version" in response.headers["Link"]


async def test_v1_refusals_before_the_handler_carry_the_deprecation_headers(
    app_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await app_client(make_settings(model_repository=str(DEMO_REPO), auth_disabled=False))
    response = await client.post("/api/v1/predict", json={"features": [0.0] * 128})
    assert response.status == 401
    assert response.headers["Deprecation"].startswith("@") and "Sunset" in response.headers
    v2 = await client.post("/api/v2/predict", json={"features": [0.0] * 128})
    assert v2.status == 401 and "Deprecation" not in v2.headers


async def test_unknown_model_or_version_is_404(demo_client: Client) -> None:
    features = rows(1)[0].tolist()
    status, body = await predict(demo_client, {"features": features, "model": "nope"})
    assert status == 404 and body["status"] == 404
    status, _ = await predict(demo_client, {"features": features, "model_version": "9"})
    assert status == 404


async def test_a_long_unknown_model_name_is_cut_in_its_404(demo_client: Client) -> None:
    """A review: a 10 MB model name came back whole in the 404's detail."""
    features = rows(1)[0].tolist()
    status, body = await predict(demo_client, {"features": features, "model": "m" * 100_000})
    assert status == 404
    assert len(body["detail"]) < 300 and "(100000 characters)" in body["detail"]


async def test_a_model_that_failed_to_load_here_is_503_with_retry_after_on_every_route(
    app_client: Any, make_settings: Callable[..., Settings], repo_root: Path
) -> None:
    add_version(repo_root, 1, seed=1)
    (repo_root / "broken" / "1").mkdir(parents=True)
    (repo_root / "broken" / "1" / "model.onnx").write_bytes(b"garbage")
    client: Client = await app_client(make_settings(model_repository=str(repo_root)))
    features = rows(1)[0].tolist()
    response = await client.post("/api/v2/predict", json={"features": features, "model": "broken"})
    body = await response.json()
    assert (response.status, response.headers["Retry-After"]) == (503, "1")
    assert body["type"].endswith("/model-unavailable") and "failed to load" in body["detail"]
    infer = {"inputs": [{"name": "features", "shape": [1, 128], "datatype": "FP32", "data": features}]}
    response = await client.post("/v2/models/broken/infer", json=infer)
    assert response.status == 503 and "failed to load" in (await response.json())["error"]
    # The protocol's readiness stays a 4xx ("not ready"), and an unknown model a 404.
    assert (await client.get("/v2/models/broken/ready")).status == 404
    response = await client.post("/api/v2/predict", json={"features": features, "model": "nope"})
    assert response.status == 404
    assert client.app[METRICS].model_load_failures.labels("broken", "1")._value.get() == 1


async def test_ready_names_the_default_model_that_failed_to_load_and_why(
    app_client: Any, make_settings: Callable[..., Settings], repo_root: Path
) -> None:
    (repo_root / "demo" / "1").mkdir(parents=True)
    (repo_root / "demo" / "1" / "model.onnx").write_bytes(b"garbage")
    client: Client = await app_client(make_settings(model_repository=str(repo_root)))
    response = await client.get("/ready")
    body = await response.json()
    assert response.status == 503 and body["checks"]["models"] is False
    assert body["reasons"]["models"].startswith(
        "the default model: model 'demo' is not serving: failed to load version 1"
    )


@pytest.mark.parametrize(
    "named", [{"model_version": "abc"}, {"model_version": "0"}, {"model": "no/pe"}], ids=str
)
async def test_a_model_or_version_no_model_could_have_is_404_too(
    demo_client: Client, named: dict[str, str]
) -> None:
    status, body = await predict(demo_client, {"features": rows(1)[0].tolist(), **named})
    assert status == 404 and "not serving" in body["detail"]


async def test_wrong_feature_count_is_422_located_at_features(demo_client: Client) -> None:
    status, body = await predict(demo_client, {"features": [1.0, 2.0]})
    assert status == 422
    assert body["errors"] == [{"loc": "features", "msg": "expected 128 features, got 2"}]


async def test_ragged_instances_are_422(demo_client: Client) -> None:
    status, body = await predict(demo_client, {"instances": [[1.0] * 128, [1.0] * 128, [1.0] * 127]})
    assert status == 422 and body["errors"][0]["loc"] == "instances[2]"
    assert body["errors"][0]["msg"] == "127 features where instances[0] has 128"


async def test_features_and_instances_together_are_422(demo_client: Client) -> None:
    status, _ = await predict(demo_client, {"features": [1.0] * 128, "instances": [[1.0] * 128]})
    assert status == 422


async def test_non_finite_features_are_422(demo_client: Client) -> None:
    response = await demo_client.post(
        "/api/v2/predict",
        data=msgspec.msgpack.encode({"features": [float("nan")] + [0.0] * 127}),
        headers={"Content-Type": "application/msgpack"},
    )
    assert response.status == 422


async def test_feature_beyond_the_float32_range_is_422(demo_client: Client) -> None:
    status, body = await predict(demo_client, {"features": [0.0, 1e300] + [0.0] * 126})
    assert status == 422
    assert body["errors"][0]["loc"] == "features[1]"


async def test_a_non_finite_value_of_an_instance_is_located_by_row_and_column(demo_client: Client) -> None:
    instances = [[0.0] * 128, [0.0] * 5 + [float("inf")] + [0.0] * 122]
    response = await demo_client.post(
        "/api/v2/predict",
        data=msgspec.msgpack.encode({"instances": instances}),
        headers={"Content-Type": "application/msgpack"},
    )
    assert response.status == 422
    assert (await response.json())["errors"][0]["loc"] == "instances[1][5]"


async def test_more_msgpack_instances_than_allowed_is_422_quoting_the_rows_sent(demo_client: Client) -> None:
    """A review: the detail quoted the rows times the widest row allowed as the values sent."""
    response = await demo_client.post(
        "/api/v2/predict",
        data=msgspec.msgpack.encode({"instances": [[0.5, 0.5]] * (MAX_INSTANCES + 76)}),
        headers={"Content-Type": "application/msgpack"},
    )
    assert response.status == 422
    answer = await response.json()
    assert f"takes at most {MAX_INSTANCES} instances, got {MAX_INSTANCES + 76}" in answer["detail"]
    assert answer["errors"] == [{"loc": "instances", "msg": f"more than {MAX_INSTANCES} instances"}]


async def test_two_request_timeout_fields_are_400_as_two_values_in_one_are(demo_client: Client) -> None:
    """A review: of two fields the first was taken; ``5000, 0`` in one field was 400."""
    headers = [("X-Request-Timeout", "5000"), ("X-Request-Timeout", "0"), ("Content-Type", "application/json")]
    response = await demo_client.post(
        "/api/v2/predict", data=msgspec.json.encode({"features": [0.0] * 128}), headers=headers
    )
    assert response.status == 400
    assert "X-Request-Timeout" in (await response.json())["detail"]


async def test_malformed_or_sub_millisecond_request_timeout_is_400(demo_client: Client) -> None:
    for value in ("soon", "0", "0.5", "nan", "600001", "1_000", "١٢٣", "1e3", "+100"):
        headers = {"X-Request-Timeout": value}
        status, _ = await predict(demo_client, {"features": [0.0] * 128}, **headers)
        assert status == 400, value


async def test_pinned_version_serves_that_version(
    app_client: Any, make_settings: Callable[..., Settings], repo_root: Path
) -> None:
    add_version(repo_root, 1, seed=1, config='{"version_policy": "all"}')
    add_version(repo_root, 2, seed=2)
    client = await app_client(make_settings(model_repository=str(repo_root)))
    data = rows(1, seed=11)
    for version in ("1", "2"):
        status, body = await predict(
            client, {"features": data[0].tolist(), "model_version": version}
        )
        probabilities = expected(repo_root / "demo" / version / "model.onnx", data)[0]
        assert status == 200 and body["model_version"] == version
        assert body["confidence"] == pytest.approx(float(probabilities.max()), abs=1e-6)
    _, latest = await predict(client, {"features": data[0].tolist()})
    assert latest["model_version"] == "2"


async def test_500_concurrent_predicts_each_answer_their_own_row(
    app_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await app_client(
        make_settings(model_repository=str(DEMO_REPO), inference_mailbox_size=1024)
    )
    data = rows(500, seed=42)
    probabilities = expected(DEMO_REPO / "demo" / "1" / "model.onnx", data)
    answers = await asyncio.gather(
        *(predict(client, {"features": data[i].tolist()}) for i in range(500))
    )
    for i, (status, body) in enumerate(answers):
        assert status == 200
        assert body["prediction"] == int(probabilities[i].argmax())
        assert body["confidence"] == pytest.approx(float(probabilities[i].max()), abs=1e-6)
    worker = client.app[MODEL_REPOSITORY].resolve("demo").worker
    assert worker.stats.batches < 500  # they were batched, and still not mixed up


async def test_version_2_added_while_requests_flow_becomes_latest_without_a_failed_request(
    app_client: Any, make_settings: Callable[..., Settings], repo_root: Path
) -> None:
    add_version(repo_root, 1, seed=1)
    client = await app_client(make_settings(model_repository=str(repo_root)))
    stop = asyncio.Event()
    answered = asyncio.Event()
    answers: list[tuple[int, str]] = []

    async def keep_predicting(seed: int) -> None:
        while not stop.is_set():
            status, body = await predict(client, {"features": rows(1, seed)[0].tolist()})
            answers.append((status, body.get("model_version", "")))
            answered.set()

    async def until_answered(count: int) -> None:
        while len(answers) < count:
            answered.clear()
            await answered.wait()

    clients = [asyncio.create_task(keep_predicting(i)) for i in range(16)]
    await until_answered(50)
    add_version(repo_root, 2, seed=2)
    await client.app[MODEL_REPOSITORY].poll()
    await until_answered(len(answers) + 50)
    stop.set()
    await asyncio.gather(*clients)
    assert {status for status, _ in answers} == {200}
    assert answers[0][1] == "1" and answers[-1][1] == "2"


async def test_flooded_tiny_mailbox_answers_the_excess_503_at_once_and_nothing_hangs(gated_demo: GatedDemo) -> None:
    client, gated = await gated_demo(2)

    async def timed(i: int) -> tuple[int, float, str | None]:
        started = time.monotonic()
        response = await client.post("/api/v2/predict", json={"features": rows(1, i)[0].tolist()})
        return response.status, time.monotonic() - started, response.headers.get("Retry-After")

    computing = asyncio.create_task(timed(0))
    await asyncio.to_thread(gated.entered.wait, 5)
    tasks = [asyncio.create_task(timed(i)) for i in range(1, 41)]
    done: set[asyncio.Task[tuple[int, float, str | None]]] = set()
    while len(done) < 38:  # the mailbox admits two; the rest are shed
        finished, _ = await asyncio.wait(
            set(tasks) - done, timeout=5, return_when=asyncio.FIRST_COMPLETED
        )
        assert finished, "a shed request hung"
        done |= finished
    shed = [task.result() for task in done]
    assert {status for status, _, _ in shed} == {503}
    assert all(retry_after == "1" for _, _, retry_after in shed)
    assert max(elapsed for _, elapsed, _ in shed) < 1.0
    gated.gate.set()
    admitted = await asyncio.wait_for(asyncio.gather(computing, *(set(tasks) - done)), 5)
    assert [status for status, _, _ in admitted] == [200, 200, 200]


async def test_queued_predicts_count_their_decoded_rows_against_the_byte_bound(
    gated_demo: GatedDemo,
) -> None:
    # A 128-feature row holds 512 B of float32 and 4 KiB of decoded floats until
    # answered: two fit in 10,000 bytes (one computing, one queued), not three.
    client, gated = await gated_demo(100, inference_mailbox_bytes=10_000)
    computing = asyncio.create_task(predict(client, {"features": rows(1, 0)[0].tolist()}))
    await asyncio.to_thread(gated.entered.wait, 5)
    queued = asyncio.create_task(predict(client, {"features": rows(1, 1)[0].tolist()}))
    await asyncio.sleep(0.1)
    status, body = await predict(client, {"features": rows(1, 2)[0].tolist()})
    assert status == 503 and "bytes" in body["detail"]
    gated.gate.set()
    assert [(await computing)[0], (await queued)[0]] == [200, 200]


async def test_a_full_mailbox_sheds_before_the_rows_are_decoded(gated_demo: GatedDemo) -> None:
    client, gated = await gated_demo(1)
    computing = asyncio.create_task(predict(client, {"features": rows(1, 0)[0].tolist()}))
    await asyncio.to_thread(gated.entered.wait, 5)
    queued = asyncio.create_task(predict(client, {"features": rows(1, 1)[0].tolist()}))
    await asyncio.sleep(0.1)
    assert client.app[MODEL_REPOSITORY].resolve("demo").worker.mailbox_full
    # Rows that would be a 422 are not even looked at: the answer is the 503.
    status, body = await predict(client, {"features": ["not", "numbers"]})
    assert status == 503 and body["retry_after_s"] == 1
    # A body naming another model goes on to its own answer.
    status, _ = await predict(client, {"features": rows(1)[0].tolist(), "model": "other"})
    assert status == 404
    gated.gate.set()
    assert [(await computing)[0], (await queued)[0]] == [200, 200]


async def test_deadline_passed_while_queued_is_504_without_compute(
    app_client: Any,
    make_settings: Callable[..., Settings],
    repo_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_version(repo_root, 1, seed=1, config='{"max_batch_size": 1}')
    client = await app_client(make_settings(model_repository=str(repo_root)))
    worker = client.app[MODEL_REPOSITORY].resolve("demo").worker
    gated = gate_worker(worker, monkeypatch)
    first = asyncio.create_task(predict(client, {"features": rows(1, 1)[0].tolist()}))
    await asyncio.to_thread(gated.entered.wait, 5)
    late = asyncio.create_task(
        predict(client, {"features": rows(1, 2)[0].tolist()}, **{"X-Request-Timeout": "30"})
    )
    await asyncio.sleep(0.1)  # the 30 ms deadline has to pass in real time
    assert worker.mailbox_depth == 1
    gated.gate.set()
    assert (await first)[0] == 200
    status, body = await late
    assert status == 504 and body["status"] == 504
    assert len(gated.computed) == 1
    np.testing.assert_array_equal(gated.computed[0], rows(1, 1))


async def test_ready_reports_the_models_check(demo_client: Client) -> None:
    response = await demo_client.get("/ready")
    body = await response.json()
    assert response.status == 200 and body["checks"]["models"] is True


async def test_ready_is_not_ready_while_a_crashed_inference_worker_restarts(
    demo_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = demo_client.app[MODEL_REPOSITORY].resolve("demo").worker
    worker._restarts._settle_s = 3600  # the restarted worker stays unsettled
    hand_to_thread = worker._hand_to_thread

    def crash(*args: Any) -> None:
        monkeypatch.setattr(worker, "_hand_to_thread", hand_to_thread)
        raise RuntimeError("worker bug")

    monkeypatch.setattr(worker, "_hand_to_thread", crash)
    status, body = await predict(demo_client, {"features": rows(1)[0].tolist()})
    assert status == 503 and "crashed" in body["detail"]
    response = await demo_client.get("/ready")
    body = await response.json()
    assert response.status == 503 and body["checks"]["models"] is False
    assert body["reasons"]["models"] == "the inference worker of demo/1 restarts after a crash"
    assert demo_client.app[METRICS].background_task_crashes.labels("inference demo/1")._value.get() == 1

    worker._restarts._settle_s = 0
    await until(lambda: worker.healthy)
    assert (await demo_client.get("/ready")).status == 200
    status, body = await predict(demo_client, {"features": rows(1)[0].tolist()})
    assert status == 200


async def test_a_predicts_deadline_counts_the_time_it_waited_before_its_handler(
    app_client: Any, make_settings: Callable[..., Settings], redis_server: ManagedProcess
) -> None:
    """A review: with Redis stalled, a 150 ms deadline was answered 200 after 0.41 s: the
    deadline counted from the handler, after the rate limit's wait for Redis."""
    client = await app_client(
        make_settings(
            model_repository=str(DEMO_REPO),
            redis_url=f"redis://127.0.0.1:{redis_server.port}",
            redis_timeout_ms=300,
        )
    )
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)  # the rate limit waits 300 ms
    try:
        status, body = await predict(
            client, {"features": rows(1)[0].tolist()}, **{"X-Request-Timeout": "100"}
        )
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert status == 504 and body["status"] == 504
