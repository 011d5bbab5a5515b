"""The in-process record-dedup table is shared fairly among tenants: one tenant's flood
of record ids forgets only its own, so another tenant's retry is still a duplicate."""

from __future__ import annotations

from typing import Any

from mlgate.config import Settings
from mlgate.service.state import RECORD_SINK
from tests.conftest import AppClientFactory
from tests.support import KeyMaker

MAX_ENTRIES = 50


def _batch(ids: list[str]) -> dict[str, object]:
    return {
        "source": "s",
        "records": [{"record_id": rid, "features": [1.0, 2.0, 3.0, 4.0]} for rid in ids],
    }


async def test_a_tenants_flood_of_record_ids_keeps_another_tenants_dedup(
    app_client: AppClientFactory, make_settings: Any, api_keys: KeyMaker
) -> None:
    victim = {"X-API-Key": api_keys.create(tenant="victim", scopes="ingest")}
    flooder = {"X-API-Key": api_keys.create(tenant="flooder", scopes="ingest")}
    settings: Settings = make_settings(
        keys_file=str(api_keys.path),
        auth_disabled=False,
        rate_limits_enabled=False,
        feature_dims=(4,),
        dedup_max_entries=MAX_ENTRIES,
    )
    client = await app_client(settings)
    first = await client.post("/api/v2/ingest", json=_batch(["order-1"]), headers=victim)
    assert (await first.json())["records_accepted"] == 1

    for round_ in range(4):
        ids = [f"flood-{round_}-{i}" for i in range(MAX_ENTRIES)]
        flood = await client.post("/api/v2/ingest", json=_batch(ids), headers=flooder)
        assert flood.status == 202

    retry = await client.post("/api/v2/ingest", json=_batch(["order-1"]), headers=victim)
    answer = await retry.json()
    assert (answer["records_accepted"], answer["records_duplicate"]) == (0, 1)
    assert client.app[RECORD_SINK].next_offset == 1 + 4 * MAX_ENTRIES
