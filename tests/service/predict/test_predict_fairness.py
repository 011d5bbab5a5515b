"""Predict between tenants, over HTTP (through the app, and through the server's door
and express lane): a tenant flooding a model's queue with large requests, within its
rate limit, neither holds up another tenant's row behind all of them nor takes the
whole queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from mlgate.config import Settings
from mlgate.service.app import create_app
from mlgate.service.process.server import CappedAppRunner
from mlgate.service.state import MODEL_REPOSITORY
from mlgate.workers.inference.batching import InferenceWorker
from tests.service.predict.test_predict_api import GatedSession, add_version, gate_worker, rows
from tests.support import KeyMaker, free_port


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Tenants:
    """A demo model computing one row a run, its runs held by ``gated``'s gate, served
    to the tenants ``flood`` and ``quiet``."""

    session: aiohttp.ClientSession
    url: str
    worker: InferenceWorker
    gated: GatedSession
    keys: dict[str, str]

    async def predict(self, tenant: str, body: dict[str, Any]) -> Answer:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        async with self.session.post(f"{self.url}/api/v2/predict", json=body, headers=headers) as r:
            return Answer(r.status, dict(r.headers), await r.json())

    async def infer(self, tenant: str, data: np.ndarray) -> Answer:
        """An Open Inference Protocol infer of ``data``'s rows."""
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        body = {
            "inputs": [
                {"name": "input", "shape": list(data.shape), "datatype": "FP32", "data": data.ravel().tolist()}
            ]
        }
        url = f"{self.url}/v2/models/demo/infer"
        async with self.session.post(url, json=body, headers=headers) as r:
            return Answer(r.status, dict(r.headers), await r.json())

    async def until_queued(self, count: int) -> None:
        """Until ``count`` requests wait for the model (queued, or handed to its
        thread behind the run computing)."""
        for _ in range(500):
            if self.worker.mailbox_depth >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.worker.mailbox_depth} requests queued, not {count}")


@pytest.fixture(params=["app", "door"])
async def two_tenants(
    request: pytest.FixtureRequest,
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    api_keys: KeyMaker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Callable[..., Awaitable[Tenants]]]:
    """``app``: through aiohttp's test server; ``door``: through mlgate's own server,
    whose door admits predicts and whose express lane answers them."""
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def make(mailbox_size: int = 64) -> Tenants:
        root = tmp_path / "models"
        add_version(root, 1, seed=1, config='{"max_batch_size": 1}')
        keys = {tenant: api_keys.create(tenant=tenant, scopes="predict") for tenant in ("flood", "quiet")}
        settings = make_settings(
            model_repository=str(root),
            inference_mailbox_size=mailbox_size,
            keys_file=str(api_keys.path),
            auth_disabled=False,
        )
        app = create_app(settings)
        if request.param == "app":
            client = await aiohttp_client(app)
            session, url = client.session, str(client.make_url("")).rstrip("/")
        else:
            runner = CappedAppRunner(app, max_connections=100, access_log=None)
            await runner.setup()
            cleanups.append(runner.cleanup)
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            session, url = aiohttp.ClientSession(), f"http://127.0.0.1:{port}"
            cleanups.insert(0, session.close)
        worker = app[MODEL_REPOSITORY].resolve("demo").worker
        return Tenants(session, url, worker, gate_worker(worker, monkeypatch), keys)

    yield make
    for cleanup in cleanups:
        await cleanup()


def _run_of(gated: GatedSession, row: np.ndarray) -> int:
    for index, computed in enumerate(gated.computed):
        if any(np.array_equal(row, each) for each in computed):
            return index
    raise AssertionError("the row was never computed")


async def test_a_tenants_row_is_not_computed_after_everything_another_tenant_queued(
    two_tenants: Callable[..., Awaitable[Tenants]],
) -> None:
    served = await two_tenants()
    floods = [
        asyncio.create_task(served.predict("flood", {"instances": rows(4, seed).tolist()}))
        for seed in range(8)
    ]
    await asyncio.to_thread(served.gated.entered.wait, 5)
    await served.until_queued(7)
    single = rows(1, 99)
    quiet = asyncio.create_task(served.predict("quiet", {"features": single[0].tolist()}))
    await served.until_queued(8)
    served.gated.gate.set()
    answers = await asyncio.gather(quiet, *floods)
    assert [answer.status for answer in answers] == [200] * 9
    # The run computing, the one handed to the thread behind it, at most one more.
    assert _run_of(served.gated, single[0]) <= 3
    assert len(served.gated.computed) == 9


async def test_a_tenants_row_is_not_computed_after_everything_another_tenant_queued_by_infer(
    two_tenants: Callable[..., Awaitable[Tenants]],
) -> None:
    served = await two_tenants()
    floods = [asyncio.create_task(served.infer("flood", rows(4, seed))) for seed in range(8)]
    await asyncio.to_thread(served.gated.entered.wait, 5)
    await served.until_queued(7)
    single = rows(1, 99)
    quiet = asyncio.create_task(served.infer("quiet", single))
    await served.until_queued(8)
    served.gated.gate.set()
    answers = await asyncio.gather(quiet, *floods)
    assert [answer.status for answer in answers] == [200] * 9
    assert _run_of(served.gated, single[0]) <= 3


async def test_a_tenant_flooding_a_model_is_refused_503_while_another_still_gets_in(
    two_tenants: Callable[..., Awaitable[Tenants]],
) -> None:
    served = await two_tenants(mailbox_size=8)
    computing = asyncio.create_task(served.predict("flood", {"features": rows(1)[0].tolist()}))
    await asyncio.to_thread(served.gated.entered.wait, 5)
    floods = [
        asyncio.create_task(served.predict("flood", {"features": rows(1, seed)[0].tolist()}))
        for seed in range(1, 13)
    ]
    for _ in range(500):  # until each is refused, or waits for the model
        if sum(task.done() for task in floods) + served.worker.mailbox_depth == len(floods):
            break
        await asyncio.sleep(0.01)
    shed = [task for task in floods if task.done()]
    assert shed
    # Refused for its share (the door, counting the flood's requests on their way to
    # the model, may call the mailbox full first).
    for answer in (task.result() for task in shed):
        assert answer.status == 503 and answer.headers["Retry-After"]
        assert "inference mailbox of demo/1" in answer.body["detail"]
    waiting = served.worker.mailbox_depth
    assert waiting < 8  # the mailbox had room left: the flood's share was full
    quiet = asyncio.create_task(served.predict("quiet", {"features": rows(1, 99)[0].tolist()}))
    await served.until_queued(waiting + 1)
    served.gated.gate.set()
    assert (await quiet).status == 200
    answered = await asyncio.gather(computing, *(task for task in floods if task not in shed))
    assert [answer.status for answer in answered] == [200] * (1 + waiting)
