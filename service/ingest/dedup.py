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
flight and ``d`` once written, the ids of a batch in one Lua script per step and per
``MAX_IDS_PER_CALL`` ids, the parts one after another (one round trip each; the ids
travel as the script's KEYS and the answer as one string of
state characters, far cheaper to parse than a pipeline of SETs); dedup then holds
across processes and hosts. On a Redis Cluster the key is
``mlgate:rid:{<tenant>.<n>}:<id>``: a tenant's ids spread over
``CLUSTER_SLOTS_PER_TENANT`` slots, and each step runs one script call per slot among
the batch's ids, concurrently (a call that fails falls back for its ids only). Redis
holds about 150 bytes per remembered id: records/s x window x 150 B (10k records/s
over the default 600 s window: about 900 MB), so size the window to how long
clients keep retrying; Idempotency-Key covers longer horizons per request. A tenant
keeps at most ``MLGATE_DEDUP_REDIS_TENANT_MAX_IDS`` ids claimed within the window in
Redis (counted per bucket of a sixteenth of the window of Redis's clock, in a hash
beside its ids, a released claim's ids given back; per slot on a Cluster, each an
eighth of it), so one tenant flooding fresh ids cannot fill the Redis every tenant's
limits, answers and ids live in: past it, its new ids are kept in this process's table
only (``mlgate_dedup_kept_in_process_total``, logged as
``dedup_tenant_over_redis_budget``) until its older ones age out; ids already in Redis
are still found there. While a tenant has ids kept here (past its budget, or written
while Redis failed), this process asks its table first for that tenant's ids, for a
window and a lapse, so none of them is claimed anew in Redis. Without Redis, or while it fails (counted as ``mlgate_redis_fallback{operation="dedup"}``),
an in-process table of at most ``MLGATE_DEDUP_MAX_ENTRIES`` ids with the same states
and windows (written ids kept as 64-bit hashes, about 70 bytes each; the oldest are
forgotten first, and a tenant that floods it forgets only its own ids once it holds its
fair share: ``service.protection.fair_share``).
"""

from __future__ import annotations

import asyncio
import math
import time
import zlib
from collections import deque
from collections.abc import Sequence, Set
from dataclasses import dataclass, field

import structlog

from mlgate.config import Settings
from mlgate.service.http.errors import Conflict
from mlgate.service.http.metrics import Metrics
from mlgate.service.ingest.ids import UniqueIds
from mlgate.service.protection.fair_share import FairShareGenerations, FairShareMap
from mlgate.service.protection.shared_redis import RedisUnavailable, SharedRedis
from mlgate.workers.supervision import background_context

log = structlog.get_logger("mlgate.dedup")

PREFIX = "mlgate:rid:"
BUDGET_PREFIX = "mlgate:ridn:"  # a tenant's ids claimed per time bucket
NEW, WRITTEN, IN_FLIGHT = "1", "0", "p"  # what claim found, per id
KEEP_HERE = "n"  # Redis's answer for a new id it did not keep: the tenant is past its budget
# The window in buckets of the budget's count: an id counts at most a bucket longer.
BUDGET_BUCKETS = 16
# A tenant past its budget is logged once in this many seconds at most.
OVER_BUDGET_LOG_S = 60.0
_FIRST_POLL_S, _MAX_POLL_S = 0.01, 0.2
# The most ids one script call takes (``RecordDeduplicator._run``): a few ms in Redis.
MAX_IDS_PER_CALL = 500
# Ids written while Redis failed that a process keeps, to tell Redis once it is back.
MAX_UNSHARED_IDS = 200_000
# How often Redis is asked whether it answers again while ids written without it wait.
UNSHARED_PROBE_S = 0.1
# ... and, while it answers them but fails the sharing itself, from that doubling up to this.
MAX_UNSHARED_PROBE_S = 5.0
# The sharing's retry after a crash: from this, doubling up to the most.
SHARING_RETRY_S, MAX_SHARING_RETRY_S = 1.0, 30.0
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
# between SET NX and GET is claimed anew. Its KEYS[1] is the tenant's budget (per slot
# on a Cluster): a hash of ids claimed per bucket of ARGV[3] seconds of Redis's clock
# (one clock for every host), the ARGV[4] buckets before the current one counted, older
# ones forgotten, the hash kept ARGV[6] seconds. Ids are claimed while the count stays
# within ARGV[5]; past it an id Redis knows gets its state, a new one 'n' (new, not
# kept: the caller keeps it in process).
CLAIM_LUA = """
local lapse, mine = ARGV[1], 'p:' .. ARGV[2]
local bucket = math.floor(tonumber(redis.call('TIME')[1]) / tonumber(ARGV[3]))
local oldest, left = bucket - tonumber(ARGV[4]), tonumber(ARGV[5])
local buckets = redis.call('HGETALL', KEYS[1])
for i = 1, #buckets, 2 do
  if tonumber(buckets[i]) < oldest then
    redis.call('HDEL', KEYS[1], buckets[i])
  else
    left = left - tonumber(buckets[i + 1])
  end
end
local found, claimed = {}, 0
for i = 2, #KEYS do
  local key, state = KEYS[i], 'p'
  if claimed >= left then
    local value = redis.call('GET', key)
    if value == false then
      state = 'n'
    elseif string.sub(value, 1, 1) ~= 'p' then
      state = '0'
    end
  elseif redis.call('SET', key, mine, 'NX', 'EX', lapse) then
    state = '1'
  else
    local value = redis.call('GET', key)
    if value == false then
      if redis.call('SET', key, mine, 'NX', 'EX', lapse) then state = '1' end
    elseif string.sub(value, 1, 1) ~= 'p' then
      state = '0'
    end
  end
  if state == '1' then claimed = claimed + 1 end
  found[#found + 1] = state
end
if claimed > 0 then
  redis.call('HINCRBY', KEYS[1], string.format('%d', bucket), claimed)
  redis.call('EXPIRE', KEYS[1], ARGV[6])
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
# Not written after all: forget the ids this claim still holds, and take them off the
# tenant's budget (KEYS[1], ARGV as for the claim; the current bucket, which may go
# below zero: the sum is what counts).
RELEASE_LUA = """
local mine = 'p:' .. ARGV[2]
local released = 0
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == mine then
    redis.call('DEL', KEYS[i])
    released = released + 1
  end
end
if released > 0 then
  local bucket = math.floor(tonumber(redis.call('TIME')[1]) / tonumber(ARGV[3]))
  redis.call('HINCRBY', KEYS[1], string.format('%d', bucket), -released)
  redis.call('EXPIRE', KEYS[1], ARGV[6])
end
return 1
"""


def _states(answer: object) -> str:
    """A claim script's answer: one state character per id."""
    return answer.decode() if isinstance(answer, bytes) else str(answer)


@dataclass(frozen=True, slots=True)
class Claim:
    """What one ``claim`` call got: per id, whether it is new (and now held by this
    claim's token) or a duplicate; ``held`` the distinct ids it holds."""

    token: str
    new: list[bool]
    held: list[str]
    # Of ``held``, those kept in this process only (the tenant past its Redis budget):
    # never written to Redis, whatever their outcome.
    held_here: frozenset[str] = field(default_factory=frozenset)


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

    def known(self, tenant: str, record_ids: Sequence[str], token: str) -> dict[str, str]:
        """Of ``record_ids``, those this table holds as written or in flight for another
        claim than ``token``'s, with that state; nothing is claimed."""
        now = time.monotonic()
        in_flight = self._in_flight.of(tenant)
        written = self._written.holding(tenant, {hash(record_id) for record_id in record_ids}, now)
        if not in_flight and not written:
            return {}
        found = {}
        for record_id in record_ids:
            entry = in_flight.get(record_id)
            if entry is not None and entry[0] > now and entry[1] != token:
                found[record_id] = IN_FLIGHT
            elif written and hash(record_id) in written:
                found[record_id] = WRITTEN
        return found

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
    def __init__(
        self, settings: Settings, redis: SharedRedis | None = None, metrics: Metrics | None = None
    ) -> None:
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
        # The tenant's budget in Redis, per script call: on a Cluster each of its slots
        # holds a share of it.
        self._budget_ids = settings.dedup_redis_tenant_max_ids
        if redis is not None and redis.cluster:
            self._budget_ids = max(1, self._budget_ids // CLUSTER_SLOTS_PER_TENANT)
        self._bucket_s = max(1.0, self.window_s / BUDGET_BUCKETS)
        self._metrics = metrics
        self._over_budget_logged: dict[str, float] = {}  # tenant -> when
        # Tenants with ids this process kept and Redis does not have (past the budget,
        # or Redis failing), until when (``time.monotonic``): their claims ask this
        # process's table first, so such an id is never claimed anew in Redis.
        self._checked_here_until: dict[str, float] = {}
        # Claim tokens: unique across processes and restarts (a random prefix) without
        # a getrandom system call per claim.
        self._new_token = UniqueIds()
        # Ids written while Redis failed, kept in this process only: (tenant, ids, token,
        # when written), written to Redis once it answers again (``_share_unshared``).
        self._unshared: deque[tuple[str, list[str], str, float]] = deque()
        self._unshared_ids = 0
        self._sharing: asyncio.Task[None] | None = None
        self._share_again = False
        # After a crash of the sharing (a bug: ``_run`` answers Redis failures itself),
        # it runs again in this long, doubling: no recovery may come to start it.
        self._sharing_retry_s = SHARING_RETRY_S
        if redis is not None:
            redis.on_recovered.append(self._redis_recovered)

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
        return f"{PREFIX}{self._tag(tenant, record_id)}{record_id}"

    def _tag(self, tenant: str, record_id: str) -> str:
        assert self._redis is not None
        shard = zlib.crc32(record_id.encode()) % CLUSTER_SLOTS_PER_TENANT
        return self._redis.hash_tag(f"{tenant}.{shard}")

    def _budget_key(self, tenant: str, record_id: str) -> str:
        """The tenant's budget count, in the slot of ``record_id``'s key."""
        if self._redis is None or not self._redis.cluster:
            return f"{BUDGET_PREFIX}{tenant}"
        return f"{BUDGET_PREFIX}{self._tag(tenant, record_id)}"

    def _budget_args(self) -> list[str | float]:
        """The claim and release scripts' bucket length, buckets counted before the
        current one, room and the count's lifetime in seconds."""
        buckets = math.ceil(self.window_s / self._bucket_s)
        return [self._bucket_s, buckets, self._budget_ids, math.ceil((buckets + 1) * self._bucket_s)]

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
        here: set[str] = set()
        try:
            states = await self._claim_states(tenant, distinct, token, here)
            if len(distinct) == len(record_ids) == len(states) == states.count(NEW):
                # The usual batch: distinct ids, all new.
                return Claim(token, [True] * len(states), distinct, frozenset(here))
            found.update(zip(distinct, states, strict=True))
            await self._wait_for_others(tenant, found, token, here)
        except BaseException:
            # Whatever this claim may hold by now (a cancelled call may have claimed in
            # Redis before its answer came back): release only removes this token's ids.
            await asyncio.shield(self._release(tenant, distinct, token, here))
            raise
        first: set[str] = set()
        new = []
        for record_id in record_ids:
            new.append(found[record_id] == NEW and record_id not in first)
            first.add(record_id)
        held = [record_id for record_id, state in found.items() if state == NEW]
        return Claim(token, new, held, frozenset(here.intersection(held)))

    async def _wait_for_others(
        self, tenant: str, found: dict[str, str], token: str, here: set[str]
    ) -> None:
        waiting = [record_id for record_id, state in found.items() if state == IN_FLIGHT]
        give_up_at, pause = time.monotonic() + self.in_flight_wait_s, _FIRST_POLL_S
        while waiting and time.monotonic() < give_up_at:
            await asyncio.sleep(pause)
            pause = min(2 * pause, _MAX_POLL_S)
            states = await self._claim_states(tenant, waiting, token, here)
            found.update(zip(waiting, states, strict=True))
            waiting = [record_id for record_id in waiting if found[record_id] == IN_FLIGHT]
        if waiting:
            # Not "N are being written": the ids this claim gave back so as not to hold
            # them while it waits (``_hold_none_past_a_wait``) wait too (a review).
            raise Conflict(
                f"another request is writing record_ids of this batch ({len(waiting)} of "
                "its ids wait for it); retry once it has finished",
                retry_after_s=1,
            )

    async def _claim_states(
        self, tenant: str, record_ids: Sequence[str], token: str, here: set[str]
    ) -> str:
        """One state character per id. Asked of this process's table, not Redis: the
        ids whose Redis call failed, the new ids Redis did not keep (the tenant past its
        budget; ``here`` gains those this process now holds), and, while the tenant has
        ids kept only here, those ids."""
        known = self._known_here(tenant, record_ids, token)
        asked = [record_id for record_id in record_ids if record_id not in known] if known else record_ids
        found = known
        if asked:
            groups = await self._run("claim", self._lapse_s, tenant, asked, token)
            in_redis: list[str] = []  # ids this claim now holds in Redis
            for ids, answer in groups:
                if answer is None:
                    self._check_here(tenant)
                    states = self._local.claim(tenant, ids, token)
                else:
                    states = _states(answer)
                    if KEEP_HERE in states:
                        states = self._claim_here(tenant, ids, states, token, here)
                if not known and len(groups) == 1 and IN_FLIGHT not in states:
                    return states  # the usual: one call, nothing in flight, ids in order
                if answer is not None:
                    in_redis += [i for i, state in zip(ids, states, strict=True) if state == NEW]
                found.update(zip(ids, states, strict=True))
            await self._hold_none_past_a_wait(tenant, found, in_redis, token, here)
        return "".join(found[record_id] for record_id in record_ids)

    async def _hold_none_past_a_wait(
        self, tenant: str, found: dict[str, str], in_redis: list[str], token: str, here: set[str]
    ) -> None:
        """Give back the new ids this claim took past the first (in id order) it waits
        for, counted in flight now, asked again as it waits. Every claim then holds, while
        it waits, only ids before all those it waits for, so no two claims each wait for
        what the other holds (a review: taken in parts, in slot groups, or a small batch
        between a large one's parts, both waited out the wait to a 409)."""
        waiting = [record_id for record_id, state in found.items() if state == IN_FLIGHT]
        if not waiting:
            return
        first = min(waiting)
        past = [record_id for record_id in in_redis if record_id > first and record_id not in here]
        if not past:
            return
        for ids, answer in await self._run("release", 0, tenant, past, token):
            if answer is not None:  # else still held: its own ids must not be waited for
                found.update(dict.fromkeys(ids, IN_FLIGHT))

    def _known_here(self, tenant: str, record_ids: Sequence[str], token: str) -> dict[str, str]:
        """The ids this process's table holds for ``tenant`` (written, or in flight for
        another claim), while it may hold some that Redis does not."""
        until = self._checked_here_until.get(tenant)
        if until is None:
            return {}
        if until < time.monotonic():
            del self._checked_here_until[tenant]
            return {}
        return self._local.known(tenant, record_ids, token)

    def _check_here(self, tenant: str) -> None:
        """``tenant`` has ids this process kept and Redis may not have: for a window
        and a lapse, its claims ask this process first."""
        if self._redis is None:
            return
        if len(self._checked_here_until) >= 100_000:  # a bound on tenants remembered
            now = time.monotonic()
            self._checked_here_until = {t: u for t, u in self._checked_here_until.items() if u >= now}
        self._checked_here_until[tenant] = time.monotonic() + self.window_s + self._lapse_s

    def _claim_here(
        self, tenant: str, ids: list[str], states: str, token: str, here: set[str]
    ) -> str:
        """``states`` with each id Redis did not keep claimed in this process instead."""
        kept_here = [record_id for record_id, state in zip(ids, states, strict=True) if state == KEEP_HERE]
        local = iter(self._local.claim(tenant, kept_here, token))
        merged = "".join(next(local) if state == KEEP_HERE else state for state in states)
        here.update(
            record_id
            for record_id, state, now in zip(ids, states, merged, strict=True)
            if state == KEEP_HERE and now == NEW
        )
        self._check_here(tenant)
        if self._metrics is not None:
            self._metrics.dedup_kept_in_process.inc(
                sum(1 for state, now in zip(states, merged, strict=True) if state == KEEP_HERE and now == NEW)
            )
        now_s = time.monotonic()
        if now_s - self._over_budget_logged.get(tenant, -math.inf) >= OVER_BUDGET_LOG_S:
            if len(self._over_budget_logged) >= 10_000:  # a bound on tenants remembered
                self._over_budget_logged.clear()
            self._over_budget_logged[tenant] = now_s
            log.warning(
                "dedup_tenant_over_redis_budget",
                tenant=tenant,
                max_ids=self._budget_ids,
                detail="new record_ids of this tenant are remembered in this process only "
                "until its older ones age out of the window",
            )
        return merged

    async def confirm(self, tenant: str, claim: Claim) -> None:
        """The claim's records are written: duplicates from now on, for the window."""
        if not self.enabled or not claim.held:
            return
        shared = claim.held
        if claim.held_here:
            self._local.confirm(tenant, list(claim.held_here), claim.token)
            shared = [record_id for record_id in claim.held if record_id not in claim.held_here]
            if not shared:
                return
        for ids, recorded in await self._run("confirm", self.window_s, tenant, shared, claim.token):
            taken_over = self._redis is not None and recorded is None
            if taken_over:
                self._check_here(tenant)
                self._keep_unshared(tenant, ids, claim.token)
            self._local.confirm(tenant, ids, claim.token, take_over=taken_over)

    def _keep_unshared(self, tenant: str, ids: list[str], token: str) -> None:
        """Written while Redis failed: Redis learns these ids once it answers again, or
        another process would take a client's retry of them for new (a review: a retry
        sent to another process after Redis came back was written again)."""
        self._unshared.append((tenant, ids, token, time.monotonic()))
        self._unshared_ids += len(ids)
        while self._unshared_ids > MAX_UNSHARED_IDS:
            _, dropped, _, _ = self._unshared.popleft()
            self._unshared_ids -= len(dropped)
            log.warning(
                "dedup_ids_not_shared",
                records=len(dropped),
                detail="written while Redis failed, more than this process keeps to tell Redis "
                "later: another process may write a retry of them again",
            )
        self._share_unshared()  # as soon as Redis answers again

    def _redis_recovered(self) -> None:
        """Redis, or a master of it, answers again: what it failed to take goes now."""
        self._share_again = True
        self._share_unshared()

    def _share_unshared(self) -> None:
        """Tell Redis the ids written while it failed, once it answers again (one task
        at a time, which runs until none is left)."""
        if not self._unshared:
            return
        if self._sharing is not None and not self._sharing.done():
            return
        # In a context of its own: started by a request's Redis call, its lines are not
        # that request's.
        self._sharing = asyncio.get_running_loop().create_task(
            self._send_unshared(), context=background_context()
        )
        self._sharing.add_done_callback(self._sharing_ended)

    def _sharing_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            self._sharing_retry_s = SHARING_RETRY_S
            return
        retry_s = self._sharing_retry_s
        self._sharing_retry_s = min(retry_s * 2, MAX_SHARING_RETRY_S)
        log.error("dedup_sharing_crashed", error=repr(error), retry_in_s=retry_s)
        if self._metrics is not None:
            self._metrics.background_task_crashes.labels("dedup-sharing").inc()
        task.get_loop().call_later(retry_s, self._share_unshared, context=background_context())

    async def close(self, timeout_s: float) -> None:
        """Let the ids written while Redis failed reach it, for at most ``timeout_s``
        (none while it is down: the sharing would only probe it)."""
        if self._sharing is not None and not self._sharing.done():
            if self._redis is not None and self._redis.available:
                await asyncio.wait({self._sharing}, timeout=timeout_s)
            self._sharing.cancel()

    async def _send_unshared(self) -> None:
        """Each entry's ids to Redis once it answers again; the ids whose call failed
        (their master still down, on a Cluster) are kept for its recovery.

        While nothing came back (``_share_again``, set by a recovery), Redis is probed
        every ``UNSHARED_PROBE_S``, past its breakers' reset time: another process's
        breaker may let its calls through first, and until these ids are in Redis it
        takes a retry of them for new (a review: retries sent to another process 1.5 s
        after Redis came back were written again)."""
        redis = self._redis
        assert redis is not None
        wait_s = UNSHARED_PROBE_S
        while self._unshared:
            if not (self._share_again or redis.available):
                await redis.ping(past_breakers=True)  # an answer is a recovery
                if not (self._share_again or redis.available):
                    await asyncio.sleep(wait_s)
                    continue
            self._share_again = False
            kept = False
            for _ in range(len(self._unshared)):
                entry = tenant, ids, token, written_at = self._unshared.popleft()
                self._unshared_ids -= len(ids)
                left_s = self.window_s - (time.monotonic() - written_at)
                if left_s < 1:
                    continue
                try:
                    answers = await self._run("confirm", math.ceil(left_s), tenant, ids, token)
                except BaseException:  # a crash, or close: the entry is kept for the next pass
                    self._unshared.appendleft(entry)
                    self._unshared_ids += len(ids)
                    raise
                failed = [record_id for group, answer in answers if answer is None for record_id in group]
                if failed:
                    self._unshared.append((tenant, failed, token, written_at))
                    self._unshared_ids += len(failed)
                    kept = True
            if kept:
                # Redis answers pings but not these (out of memory, read-only, writes
                # paused): tried again less and less often, not ten times a second
                # with a line each way every time (a review).
                wait_s = min(wait_s * 2, MAX_UNSHARED_PROBE_S)
                await asyncio.sleep(wait_s)
            else:
                wait_s = UNSHARED_PROBE_S
        log.info("dedup_ids_shared", detail="ids written while Redis failed are in Redis now")

    async def extend(self, tenant: str, claim: Claim) -> None:
        """The claim's records are still being written: they stay in flight for another
        lapse (the writer calls this every third of it, however long the write takes)."""
        if not self.enabled or not claim.held:
            return
        self._local.extend(tenant, claim.held, claim.token)
        shared = [record_id for record_id in claim.held if record_id not in claim.held_here]
        if shared:
            await self._run("extend", self._lapse_s, tenant, shared, claim.token)

    async def release(self, tenant: str, claim: Claim) -> None:
        """The claim's records were not written after all: forget what it holds."""
        await self._release(tenant, claim.held, claim.token, claim.held_here)

    async def _release(
        self, tenant: str, held: Sequence[str], token: str, held_here: Set[str] = frozenset()
    ) -> None:
        if not self.enabled or not held:
            return
        self._local.release(tenant, held, token)
        shared = [record_id for record_id in held if record_id not in held_here]
        if shared:
            await self._run("release", 0, tenant, shared, token)

    async def _run(
        self, script_name: str, seconds: float, tenant: str, record_ids: Sequence[str], token: str
    ) -> list[tuple[list[str], object | None]]:
        """Per group of ``record_ids`` (one group per cluster slot; standalone: all),
        the script's answer, or None without Redis or when it failed (counted)."""
        redis = self._redis
        if redis is None or script_name not in self._scripts:
            return [(list(record_ids), None)]
        groups = redis.by_slot(record_ids, lambda record_id: self._key(tenant, record_id))

        script = self._scripts[script_name]

        async def run(ids: list[str]) -> tuple[list[str], object | None]:
            keys = [self._key(tenant, record_id) for record_id in ids]
            args: list[str | float] = [seconds, token]
            if script_name in ("claim", "release"):
                keys.insert(0, self._budget_key(tenant, ids[0]))
                args += self._budget_args()
            try:
                return ids, await redis.call("dedup", lambda: script(keys=keys, args=args), key=keys[0])
            except RedisUnavailable:
                return ids, None

        async def run_in_parts(ids: list[str]) -> list[tuple[list[str], object | None]]:
            # One script runs alone in Redis: a batch of 10,000 long ids took 30-155 ms
            # there, and a few of them in a row timed out every other tenant's calls
            # and opened the shared breaker (a review). In parts, one after another,
            # Redis serves the other clients between them.
            if script_name != "claim":
                return [
                    await run(ids[start : start + MAX_IDS_PER_CALL])
                    for start in range(0, len(ids), MAX_IDS_PER_CALL)
                ]
            # Taken in id order, and no part after the first meeting ids in flight for
            # another claim: those would be given back at once (``_hold_none_past_a_wait``).
            # Not asked, they count as in flight, asked again as the claim waits.
            ordered = sorted(ids)
            results: list[tuple[list[str], object | None]] = []
            for start in range(0, len(ordered), MAX_IDS_PER_CALL):
                result = await run(ordered[start : start + MAX_IDS_PER_CALL])
                results.append(result)
                if result[1] is not None and IN_FLIGHT in _states(result[1]):
                    rest = ordered[start + MAX_IDS_PER_CALL :]
                    if rest:
                        results.append((rest, IN_FLIGHT * len(rest)))
                    break
            return results

        if len(groups) == 1 and len(groups[0]) <= MAX_IDS_PER_CALL:
            return [await run(groups[0])]
        parts = await asyncio.gather(*(run_in_parts(ids) for ids in groups))
        return [part for group in parts for part in group]
