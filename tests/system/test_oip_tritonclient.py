"""The stock Triton HTTP client (``tritonclient.http``) against a live mlgate process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.service_process import REPO
from tests.support import free_port

ROOT = REPO
DEMO_MODEL = ROOT / "models" / "demo"


@dataclass
class LiveServer:
    process: subprocess.Popen[bytes]
    url: str
    repository: Path

    def client(self) -> httpclient.InferenceServerClient:
        return httpclient.InferenceServerClient(self.url, connection_timeout=5, network_timeout=10)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(workdir: Path) -> LiveServer:
    """``mlgate serve`` on a free port over a copy of the demo model repository."""
    repository = workdir / "models"
    shutil.copytree(DEMO_MODEL, repository / "demo")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLGATE_") and k != "REDIS_URL"}
    env.update(
        MLGATE_HOST="127.0.0.1",
        MLGATE_PORT=str(port),
        MLGATE_AUTH_DISABLED="true",
        MLGATE_DATA_DIR=str(workdir / "data"),
        MLGATE_MODEL_REPOSITORY=str(repository),
        MLGATE_MODEL_POLL_INTERVAL_S="0",
        MLGATE_LOG_LEVEL="warning",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "mlgate", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = LiveServer(process, f"127.0.0.1:{port}", repository)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if server.client().is_server_ready():
                return server
        except (InferenceServerException, OSError):
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError("mlgate did not become ready")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("oip"))
    yield live
    live.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A server of the test's own, for tests that change its repository."""
    live = start_server(tmp_path)
    yield live
    live.stop()


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 128)).astype(np.float32)


def direct(data: np.ndarray, model_file: Path = DEMO_MODEL / "1" / "model.onnx") -> np.ndarray:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": data})[0]


def infer(
    client: httpclient.InferenceServerClient, data: np.ndarray, *, binary: bool, **options: object
) -> httpclient.InferResult:
    tensor = httpclient.InferInput("input", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
    return client.infer("demo", [tensor], outputs=wanted, **options)


def test_server_is_live_ready_and_describes_itself(server: LiveServer) -> None:
    client = server.client()
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "mlgate"
    assert {"binary_tensor_data", "model_repository"} <= set(metadata["extensions"])


def test_model_metadata_comes_from_the_onnx_graph(server: LiveServer) -> None:
    client = server.client()
    assert client.is_model_ready("demo") and client.is_model_ready("demo", "1")
    metadata = client.get_model_metadata("demo")
    assert metadata["versions"] == ["1"] and metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 128]}]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]
    config = client.get_model_config("demo")
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [128]


def test_json_tensors_infer_equals_onnxruntime(server: LiveServer) -> None:
    data = rows(8, seed=1)
    result = infer(server.client(), data, binary=False, request_id="json-1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), direct(data), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["model_version"] == "1" and response["id"] == "json-1"


async def test_async_client_json_infer_and_repository_calls_work(own_server: LiveServer) -> None:
    # tritonclient.http.aio sends application/octet-stream even for JSON-only bodies.
    client = aioclient.InferenceServerClient(own_server.url)
    try:
        data = rows(4, seed=5)
        tensor = aioclient.InferInput("input", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data, binary_data=False)
        wanted = [aioclient.InferRequestedOutput("probabilities", binary_data=False)]
        result = await client.infer("demo", [tensor], outputs=wanted)
        np.testing.assert_allclose(result.as_numpy("probabilities"), direct(data), rtol=1e-5, atol=1e-6)
        await client.unload_model("demo")
        assert not await client.is_model_ready("demo")
        await client.load_model("demo")
        assert await client.is_model_ready("demo")
    finally:
        await client.close()


def test_binary_tensors_infer_equals_onnxruntime(server: LiveServer) -> None:
    data = rows(16, seed=2)
    result = infer(server.client(), data, binary=True)
    assert result.get_output("probabilities")["parameters"]["binary_data_size"] == 16 * 2 * 4
    np.testing.assert_allclose(result.as_numpy("probabilities"), direct(data), rtol=1e-5, atol=1e-6)


def test_outputs_default_to_binary_when_none_are_named(server: LiveServer) -> None:
    data = rows(3, seed=3)
    tensor = httpclient.InferInput("input", [3, 128], "FP32")
    tensor.set_data_from_numpy(data)
    result = server.client().infer("demo", [tensor])
    np.testing.assert_allclose(result.as_numpy("probabilities"), direct(data), rtol=1e-5, atol=1e-6)


def test_gzip_compressed_binary_request_is_accepted(server: LiveServer) -> None:
    data = rows(4, seed=4)
    result = infer(server.client(), data, binary=True, request_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("probabilities"), direct(data), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_a_compressed_answer_asked_for_is_read_by_the_client(
    server: LiveServer, coding: str, binary: bool
) -> None:
    data = rows(200, seed=6)  # outputs of 1.6 KB: compressed
    result = infer(server.client(), data, binary=binary, response_compression_algorithm=coding)
    np.testing.assert_allclose(result.as_numpy("probabilities"), direct(data), rtol=1e-5, atol=1e-6)


def test_wrong_input_shape_is_refused_with_422(server: LiveServer) -> None:
    tensor = httpclient.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
    with pytest.raises(InferenceServerException) as refused:
        server.client().infer("demo", [tensor])
    assert refused.value.status() == "422" and "[-1, 128]" in refused.value.message()


def test_wrong_datatype_is_refused_with_422(server: LiveServer) -> None:
    tensor = httpclient.InferInput("input", [1, 128], "FP64")
    tensor.set_data_from_numpy(np.zeros((1, 128), dtype=np.float64))
    with pytest.raises(InferenceServerException) as refused:
        server.client().infer("demo", [tensor])
    assert refused.value.status() == "422" and "FP32" in refused.value.message()


def test_unknown_model_or_version_is_404(server: LiveServer) -> None:
    client = server.client()
    assert not client.is_model_ready("nope")
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("demo", "7")
    assert missing.value.status() == "404"


def test_repository_unload_and_load_switch_the_model_off_and_on(own_server: LiveServer) -> None:
    client = own_server.client()
    client.unload_model("demo")
    assert not client.is_model_ready("demo")
    assert client.get_model_repository_index() == [
        {"name": "demo", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    ]
    client.load_model("demo")
    assert client.is_model_ready("demo")
    data = rows(2, seed=5)
    np.testing.assert_allclose(
        infer(client, data, binary=True).as_numpy("probabilities"),
        direct(data),
        rtol=1e-5,
        atol=1e-6,
    )


def test_broken_version_is_reported_in_the_index_and_the_old_one_keeps_serving(
    own_server: LiveServer,
) -> None:
    client = own_server.client()
    (own_server.repository / "demo" / "config.json").write_text('{"version_policy": "all"}')
    broken = own_server.repository / "demo" / "2"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    # The load fails, as Triton's does, naming why; the version that loaded serves.
    with pytest.raises(InferenceServerException, match="failed to load version 2"):
        client.load_model("demo")
    index = {entry["version"]: entry for entry in client.get_model_repository_index()}
    assert index["1"]["state"] == "READY"
    assert (
        index["2"]["state"] == "UNAVAILABLE" and "failed to load version 2" in index["2"]["reason"]
    )
    assert not client.is_model_ready("demo", "2")
    data = rows(2, seed=6)
    result = infer(client, data, binary=False)
    assert result.get_response()["model_version"] == "1"
    np.testing.assert_allclose(result.as_numpy("probabilities"), direct(data), rtol=1e-5, atol=1e-6)


def test_inference_statistics_count_what_was_served(own_server: LiveServer) -> None:
    """Triton's statistics extension, as tritonclient and perf_analyzer read it."""
    client = own_server.client()
    assert "statistics" in client.get_server_metadata()["extensions"]
    for seed in range(3):
        infer(client, rows(2, seed), binary=True)
    [stats] = client.get_inference_statistics("demo")["model_stats"]
    assert (stats["name"], stats["version"]) == ("demo", "1")
    assert stats["inference_count"] == 6 and 1 <= stats["execution_count"] <= 3
    served = stats["inference_stats"]
    assert served["success"]["count"] == 3 and served["success"]["ns"] > 0
    assert served["fail"] == {"count": 0, "ns": 0}
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert served[part]["count"] == 3, part
    assert served["success"]["ns"] >= served["compute_infer"]["ns"] / 3
    assert sum(batch["compute_infer"]["count"] for batch in stats["batch_stats"]) == stats["execution_count"]
    assert stats["last_inference"] > 0
    assert client.get_inference_statistics()["model_stats"] == [stats]
    assert client.get_inference_statistics("demo", "1")["model_stats"] == [stats]
    with pytest.raises(InferenceServerException, match="not serving"):
        client.get_inference_statistics("nope")


@pytest.mark.parametrize("binary", [True, False])
def test_classification_answers_each_rows_top_classes_as_triton_writes_them(
    server: LiveServer, binary: bool
) -> None:
    data = rows(3, seed=4)
    tensor = httpclient.InferInput("input", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)]
    result = server.client().infer("demo", [tensor], outputs=wanted)
    classes = result.as_numpy("probabilities")
    assert classes.shape == (3, 2)
    expected = direct(data)
    labels = ("negative", "positive")
    for row, probabilities in zip(classes, expected, strict=True):
        order = np.argsort(-probabilities)
        texts = [value.decode() if isinstance(value, bytes) else value for value in row]
        assert texts == [f"{probabilities[i]:f}:{i}:{labels[i]}" for i in order]


def test_classification_of_one_class_and_of_more_than_there_are(server: LiveServer) -> None:
    data = rows(1, seed=5)
    tensor = httpclient.InferInput("input", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    client = server.client()
    one = client.infer("demo", [tensor], outputs=[httpclient.InferRequestedOutput("probabilities", class_count=1)])
    many = client.infer("demo", [tensor], outputs=[httpclient.InferRequestedOutput("probabilities", class_count=9)])
    assert one.as_numpy("probabilities").shape == (1, 1)
    assert many.as_numpy("probabilities").shape == (1, 2)
