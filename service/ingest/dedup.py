"""Record-level dedup: a ``record_id`` ingested once is not written again within a window.

A record id goes through two states per tenant: *in flight* from ``claim`` until its
write is acknowledged, then *written* (``confirm``) for ``MLGATE_DEDUP_WINDOW_S``
seconds (0 turns dedup off). ``claim`` reports which ids of a batch are new (now in
flight for this request); the ingest route writes only those and counts ids already
written in ``records_duplicate``. A repeat inside one batch is a duplicate of its first
occurrence. If the write fails, ``release`` forgets the claims, so a retry is not
mistaken for a duplicate.

An id in flight for another request is neither new nor (yet) a duplicate: ``claim``
waits for that write's outcome, up to ``MLGATE_DEDUP_IN_FLIGHT_WAIT_S``: written, the
id is a duplicate; released (the write failed), this request claims it and writes it.
Still in flight after the wait: ``Conflict`` (409 with Retry-After, as for an
Idempotency-Key in flight), this request's own claims released, nothing written. An
in-flight claim is extended (``extend``) while its write runs, however long, and lapses
after ``MLGATE_IDEMPOTENCY_LOCK_S`` once its request died. So a
client is never told "duplicate" for a record that then failed to land. Each claim
carries a token of its own: confirming or releasing touches only ids this claim still
holds, never another request's claim taken after ours lapsed. If Redis fails between
claim and confirm, the ids stay protected for the lapse rather than the window (and in
this process's table for the window).

With ``REDIS_URL``: one key ``mlgate:rid:<tenant>:<id>`` per record, ``p`` while in
flight and ``d`` once written, all the ids of a batch in one Lua script per step
(one round trip; the ids travel as the script's KEYS and the answer as one string of
state characters, far cheaper to parse than a pipeline of SETs); dedup then holds
across processes and hosts. On a Redis Cluster the key is
``mlgate:rid:{<tenant>.<n>}:<id>``: a tenant's ids spread over
``CLUSTER_SLOTS_PER_TENANT`` slots, and each step runs one script call per slot among
the batch's ids, concurrently (a call that fails falls back for its ids only). Redis
holds about 150 bytes per remembered id: records/s x window x 150 B (10k records/s
over the default 600 s window: about 900 MB), so size the window to how long
clients keep retrying; Idempotency-Key covers longer horizons per request. Without
Redis, or while it fails (counted as ``mlgate_redis_fallback{operation="dedup"}``),
an in-process table of at most ``MLGATE_DEDUP_MAX_ENTRIES`` ids with the same states
and windows (written ids kept as 64-bit hashes, about 70 bytes each; the oldest are
forgotten first, and a tenant that floods it forgets only its own ids once it holds its
fair share: ``service.protection.fair_share``).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from mlgate.config import Settings
from mlgate.service.http.errors import Conflict
from mlgate.service.ingest.ids import UniqueIds
from mlgate.service.protection.fair_share import FairShareGenerations, FairShareMap
from mlgate.service.protection.shared_redis import RedisUnavailable, SharedRedis

PREFIX = "mlgate:rid:"
NEW, WRITTEN, IN_FLIGHT = "1", "0", "p"  # what claim found, per id
_FIRST_POLL_S, _MAX_POLL_S = 0.01, 0.2
# On a Redis Cluster a tenant's ids spread over this many hash tags (slots): its dedup
# memory over up to as many masters, at up to as many script calls per batch.
CLUSTER_SLOTS_PER_TENANT = 8

# Values: 'p:<token>' while the claim with that token writes the record, 'd' once
# written. KEYS of every script: the records' keys (one slot on a Redis Cluster).
# ARGV: seconds (lapse or window), the claim's token.
#
# Claim answers one character per key: '1' newly claimed, '0' written already, 'p' in
# flight for another claim (any value starting with 'p', so the tokenless 'p' of the
# previous release still counts as in flight while both run). A key that expired
# between SET NX and GET is claimed anew.
CLAIM_LUA = """
local lapse, mine = ARGV[1], 'p:' .. ARGV[2]
local found = {}
for _, key in ipairs(KEYS) do
  local state = 'p'
  if redis.call('SET', key, mine, 'NX', 'EX', lapse) then
    state = '1'
  else
    local value = redis.call('GET', key)
    if value == false then
      if redis.call('SET', key, mine, 'NX', 'EX', lapse) then state = '1' end
    elseif string.sub(value, 1, 1) ~= 'p' then
      state = '0'
    end
  end
  found[#found + 1] = state
end
return table.concat(found)
"""
# Written: the ids this claim holds, or that nobody holds any more (ours lapsed).
CONFIRM_LUA = """
local window, mine = ARGV[1], 'p:' .. ARGV[2]
for _, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value == false or value == mine then
    redis.call('SET', key, 'd', 'EX', window)
  end
end
return 1
"""
# Still being written: push back the lapse of the ids this claim still holds.
EXTEND_LUA = """
local lapse, mine = ARGV[1], 'p:' .. ARGV[2]
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == mine then
    redis.call('EXPIRE', key, lapse)
  end
end
return 1
"""
# Not written after all: forget the ids this claim still holds.
RELEASE_LUA = """
local mine = 'p:' .. ARGV[2]
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == mine then
    redis.call('DEL', key)
  end
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """What one ``claim`` call got: per id, whether it is new (and now held by this
    claim's token) or a duplicate; ``held`` the distinct ids it holds."""

    token: str
    new: list[bool]
    held: list[str]


class LocalSeen:
    """Ids in flight (with their claim's token) until their lapse, and ids written until
    the window ends, at most ``max_entries`` of each shared fairly among tenants (one
    tenant's flood of ids evicts its own, never another tenant's); the same states as
    the Redis keys.

    In flight: a few batches' ids at a time, in a ``FairShareMap`` keyed by the id.
    Written: up to ``max_entries`` ids, kept as their 64-bit ``hash`` (SipHash with this
    process's random key, so no client can aim at a collision; a new id is taken for
    one of a million remembered with odds of 1 in 10^13) in ``FairShareGenerations``, which drops them a
    generation at a time: about 70 bytes per id rather than 300, and an id is remembered
    for the window and at most a 32nd of it longer.
    """

    def __init__(self, window_s: float, lapse_s: float, max_entries: int) -> None:
        self._window_s = window_s
        self._lapse_s = lapse_s
        # per tenant, id -> (expiry, token); re-inserted on every change, oldest first
        self._in_flight: FairShareMap[tuple[float, str]] = FairShareMap(max_entries)
        self._written = FairShareGenerations(max_entries, window_s, window_s / 32)

    def claim(self, tenant: str, record_ids: Sequence[str], token: str) -> str:
        """One state per id; ``record_ids`` are distinct."""
        now = time.monotonic()
        # Oldest first; an entry that lives longer than the ones behind it holds them
        # until it expires too (they count as absent meanwhile, and max_entries bounds them).
        self._in_flight.drop_oldest_while(tenant, lambda entry: entry[0] <= now)
        written = self._written.holding(tenant, {hash(record_id) for record_id in record_ids}, now)
        in_flight = self._in_flight.of(tenant)
        mine = (now + self._lapse_s, token)
        if not written and in_flight.keys().isdisjoint(record_ids):
            # The usual batch: every id new, claimed in one update.
            self._in_flight.put_all(tenant, list(record_ids), mine)
            return NEW * len(record_ids)
        found = []
        for record_id in record_ids:
            entry = in_flight.get(record_id)
            if entry is not None and entry[0] > now:
                found.append(IN_FLIGHT)
            elif written and hash(record_id) in written:
                found.append(WRITTEN)
            else:
                self._in_flight.put(tenant, record_id, mine)
                found.append(NEW)
        return "".join(found)

    def confirm(
        self, tenant: str, record_ids: Sequence[str], token: str, *, take_over: bool = False
    ) -> None:
        """Mark written the ids this claim holds here; with ``take_over`` (Redis failed
        to record them) every one of them, whoever holds it here."""
        in_flight = self._in_flight.of(tenant)
        if take_over:
            held: Sequence[str] = [record_id for record_id in record_ids if record_id in in_flight]
            written = record_ids
        else:
            held = written = [
                record_id
                for record_id in record_ids
                if (entry := in_flight.get(record_id)) is not None and entry[1] == token
            ]
        self._in_flight.pop_all(tenant, held)
        self._written.add(tenant, [hash(record_id) for record_id in written], time.monotonic())

    def extend(self, tenant: str, record_ids: Sequence[str], token: str) -> None:
        extended = (time.monotonic() + self._lapse_s, token)
        for record_id in record_ids:
            entry = self._in_flight.get(tenant, record_id)
            if entry is not None and entry[1] == token:
                self._in_flight.put(tenant, record_id, extended)

    def release(self, tenant: str, record_ids: Sequence[str], token: str) -> None:
        for record_id in record_ids:
            entry = self._in_flight.get(tenant, record_id)
            if entry is not None and entry[1] == token:
                self._in_flight.pop(tenant, record_id)


class RecordDeduplicator:
    def __init__(self, settings: Settings, redis: SharedRedis | None = None) -> None:
        self.window_s = settings.dedup_window_s
        self.in_flight_wait_s = settings.dedup_in_flight_wait_s
        self.lapse_s = self._lapse_s = settings.idempotency_lock_s
        self._redis = redis
        self._scripts = (
            {name: redis.script(source) for name, source in
             (("claim", CLAIM_LUA), ("confirm", CONFIRM_LUA), ("extend", EXTEND_LUA),
              ("release", RELEASE_LUA))}
            if redis is not None
            else {}
        )
        self._local = LocalSeen(settings.dedup_window_s, self._lapse_s, settings.dedup_max_entries)
        # Claim tokens: unique across processes and restarts (a random prefix) without
        # a getrandom system call per claim.
        self._new_token = UniqueIds()

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    @property
    def shared(self) -> bool:
        """Kept in Redis: each step of a claim is a round trip."""
        return self._redis is not None

    def _key(self, tenant: str, record_id: str) -> str:
        """``mlgate:rid:<tenant>:<id>``; on a Redis Cluster ``mlgate:rid:{<tenant>.<n>}:<id>``,
        ``n`` one of ``CLUSTER_SLOTS_PER_TENANT`` from a hash of the id."""
        if self._redis is None or not self._redis.cluster:
            return f"{PREFIX}{tenant}:{record_id}"
        shard = zlib.crc32(record_id.encode()) % CLUSTER_SLOTS_PER_TENANT
        return f"{PREFIX}{self._redis.hash_tag(f'{tenant}.{shard}')}{record_id}"

    async def claim(self, tenant: str, record_ids: Sequence[str]) -> Claim:
        """Per id, new (now held by this claim) or written within the window; an id
        repeating an earlier one of ``record_ids`` is not new.

        Waits for ids in flight for another request; ``Conflict`` when they still are
        after ``in_flight_wait_s``. Refused or cancelled, it releases what it held."""
        token = self._new_token()
        if not self.enabled or not record_ids:
            return Claim(token, [True] * len(record_ids), [])
        distinct = list(dict.fromkeys(record_ids))
        found: dict[str, str] = {}
        try:
            states = await self._claim_states(tenant, distinct, token)
            if len(distinct) == len(record_ids) == len(states) == states.count(NEW):
                # The usual batch: distinct ids, all new.
                return Claim(token, [True] * len(states), distinct)
            found.update(zip(distinct, states, strict=True))
            await self._wait_for_others(tenant, found, token)
        except BaseException:
            # Whatever this claim may hold by now (a cancelled call may have claimed in
            # Redis before its answer came back): release only removes this token's ids.
            await asyncio.shield(self._release(tenant, distinct, token))
            raise
        first: set[str] = set()
        new = []
        for record_id in record_ids:
            new.append(found[record_id] == NEW and record_id not in first)
            first.add(record_id)
        return Claim(token, new, [record_id for record_id, state in found.items() if state == NEW])

    async def _wait_for_others(self, tenant: str, found: dict[str, str], token: str) -> None:
        waiting = [record_id for record_id, state in found.items() if state == IN_FLIGHT]
        give_up_at, pause = time.monotonic() + self.in_flight_wait_s, _FIRST_POLL_S
        while waiting and time.monotonic() < give_up_at:
            await asyncio.sleep(pause)
            pause = min(2 * pause, _MAX_POLL_S)
            found.update(zip(waiting, await self._claim_states(tenant, waiting, token), strict=True))
            waiting = [record_id for record_id in waiting if found[record_id] == IN_FLIGHT]
        if waiting:
            raise Conflict(
                f"{len(waiting)} record_id(s) of this batch are being written by another "
                "request; retry once it has finished",
                retry_after_s=1,
            )

    async def _claim_states(self, tenant: str, record_ids: Sequence[str], token: str) -> str:
        """One state character per id; the ids whose Redis call failed, from this
        process's table."""
        groups = await self._run("claim", self._lapse_s, tenant, record_ids, token)
        answers = [
            answer.decode()
            if isinstance(answer, bytes)
            else answer
            if isinstance(answer, str)
            else self._local.claim(tenant, ids, token)
            for ids, answer in groups
        ]
        if len(answers) == 1:  # one group: the ids in their order
            return answers[0]
        found: dict[str, str] = {}
        for (ids, _), states in zip(groups, answers, strict=True):
            found.update(zip(ids, states, strict=True))
        return "".join(found[record_id] for record_id in record_ids)

    async def confirm(self, tenant: str, claim: Claim) -> None:
        """The claim's records are written: duplicates from now on, for the window."""
        if not self.enabled or not claim.held:
            return
        for ids, recorded in await self._run("confirm", self.window_s, tenant, claim.held, claim.token):
            self._local.confirm(
                tenant, ids, claim.token, take_over=self._redis is not None and recorded is None
            )

    async def extend(self, tenant: str, claim: Claim) -> None:
        """The claim's records are still being written: they stay in flight for another
        lapse (the writer calls this every third of it, however long the write takes)."""
        if not self.enabled or not claim.held:
            return
        self._local.extend(tenant, claim.held, claim.token)
        await self._run("extend", self._lapse_s, tenant, claim.held, claim.token)

    async def release(self, tenant: str, claim: Claim) -> None:
        """The claim's records were not written after all: forget what it holds."""
        await self._release(tenant, claim.held, claim.token)

    async def _release(self, tenant: str, held: Sequence[str], token: str) -> None:
        if not self.enabled or not held:
            return
        self._local.release(tenant, held, token)
        await self._run("release", 0, tenant, held, token)

    async def _run(
        self, script_name: str, seconds: float, tenant: str, record_ids: Sequence[str], token: str
    ) -> list[tuple[list[str], object | None]]:
        """Per group of ``record_ids`` (one group per cluster slot; standalone: all),
        the script's answer, or None without Redis or when it failed (counted)."""
        script = self._scripts.get(script_name)
        redis = self._redis
        if redis is None or script is None:
            return [(list(record_ids), None)]
        groups = redis.by_slot(record_ids, lambda record_id: self._key(tenant, record_id))

        async def run(ids: list[str]) -> tuple[list[str], object | None]:
            keys = [self._key(tenant, record_id) for record_id in ids]
            args: list[str | float] = [seconds, token]
            try:
                return ids, await redis.call("dedup", lambda: script(keys=keys, args=args))
            except RedisUnavailable:
                return ids, None

        if len(groups) == 1:
            return [await run(groups[0])]
        return list(await asyncio.gather(*(run(ids) for ids in groups)))
