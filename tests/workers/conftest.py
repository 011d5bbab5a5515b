"""Fixtures of the inference worker's tests: the demo model's session, and workers on
it closed at the end of each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import onnxruntime as ort
import pytest

from mlgate.workers.inference.batching import InferenceWorker
from tests.service_process import REPO

DEMO = REPO / "models" / "demo" / "1" / "model.onnx"

@pytest.fixture(scope="module")
def demo_session() -> ort.InferenceSession:
    return ort.InferenceSession(str(DEMO), providers=["CPUExecutionProvider"])


WorkerFactory = Callable[..., InferenceWorker]


@pytest.fixture
async def make_worker(demo_session: ort.InferenceSession) -> AsyncIterator[WorkerFactory]:
    workers: list[InferenceWorker] = []

    def make(session: Any = None, **options: Any) -> InferenceWorker:
        options.setdefault("max_queue_delay_s", 0.001)
        worker = InferenceWorker(
            session or demo_session,
            input_names=["input"],
            output_names=["probabilities"],
            model="demo",
            **options,
        )
        worker.start()
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        await worker.close(drain_s=1)
