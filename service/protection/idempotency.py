"""Idempotency records: the first response to an Idempotency-Key, kept to be replayed.

``service.protection.middleware`` applies them to requests.

Semantics follow Stripe and draft-ietf-httpapi-idempotency-key-header:

- A POST with ``Idempotency-Key`` (1-255 printable ASCII characters) claims the key
  for its tenant, with a fingerprint: sha256 of method, path and query, and the
  (decompressed) body. The body is read up front for this, so such a request's body
  is bounded by ``MLGATE_MAX_BODY_BYTES`` even on the streaming endpoint.
- When the handler answers 2xx or 4xx (but not 429), status, body and a few headers
  (``Content-Type``, ``Location``, ``Link``, ``Deprecation``, ``Sunset``,
  ``Inference-Header-Content-Length``) are stored
  for ``MLGATE_IDEMPOTENCY_TTL_S`` (default 86400 s = 24 h). A 5xx, a 429 or an
  exception releases the key instead, so a retry runs the request again.
- A repeat with the same fingerprint gets the stored answer with
  ``Idempotent-Replayed: true`` and the handler does not run; a different
  fingerprint under the same key is 422; a repeat while the first is still running is
  409 with ``Retry-After``. While the request runs, its claim is extended every third
  of ``MLGATE_IDEMPOTENCY_LOCK_S`` however long it takes; it lapses after that lock only
  should its process die (or Redis fail throughout).

Once a request holds its claim it runs to the end in a task of its own, even if the
client disconnects and aiohttp cancels the handler: its answer is stored, so the
client's retry gets it instead of running the write a second time.

Keys live in Redis with ``REDIS_URL`` (one Lua script to claim, one to store or
release), at most ``MLGATE_IDEMPOTENCY_REDIS_TENANT_MAX_BYTES`` of answers per tenant
(its oldest out first); else in a bounded in-process map (``MLGATE_IDEMPOTENCY_MAX_ENTRIES``
and ``MLGATE_IDEMPOTENCY_MAX_BYTES`` in all, oldest out first, each tenant's flood
evicting only its own entries once it holds its fair share:
``service.protection.fair_share``). An answer larger than the budget is not kept: its
key is released, and a repeat runs again. On a Redis Cluster a tenant's records
share the hash tag ``{tenant}`` (one slot, on one master: the claims extended together
are grouped per tenant slot, one call each).

While Redis fails (a timeout, its breaker open), a key cannot be claimed: the request
is refused at once with ``IdempotencyUnavailable`` (503, ``Retry-After``) and nothing
runs. An in-process store knows nothing of the answers in Redis, and falling back to
it ran repeats of answered requests again during any hiccup (a review: every retry
in a 350 ms pause wrote its records twice). A request that ran but whose answer could
not be stored is stored again every ``FINISH_RETRY_S`` until Redis takes it (a repeat
meanwhile is 409, as while it ran), for at most ``MLGATE_IDEMPOTENCY_LOCK_S``: then
its claim lapses, and a repeat runs again. A claim whose call failed is released the
same way: Redis may still have run it, and nobody would own it.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec
import structlog

from mlgate.config import Settings
from mlgate.service.protection.fair_share import FairShareMap
from mlgate.service.protection.shared_redis import RedisUnavailable, SharedRedis
from mlgate.workers.breaker import BreakerOpen
from mlgate.workers.supervision import background_context

T = TypeVar("T")
HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
KEPT_HEADERS = (
    "Content-Type",
    "Location",
    "Link",
    "Deprecation",
    "Sunset",
    "Inference-Header-Content-Length",  # OIP binary tensor answers
)

log = structlog.get_logger("mlgate.idempotency")
# How often answers Redis could not take are offered again (``_store_unfinished``).
FINISH_RETRY_S = 0.5


class IdempotencyUnavailable(Exception):
    """Redis, where keys live, cannot be asked now: the request must not run.
    ``retry_after_s``: until Redis's breaker lets a call through again (at least 1)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

# What Redis holds for a kept answer besides its bytes and key names (measured: 1M
# answers of 255 bytes with 82-byte names took 702 bytes each), and the bounds of one
# finishing call's work (FINISH_LUA).
ENTRY_OVERHEAD_BYTES = 288
CLEANUP_PER_CALL = 64


def allocated_bytes(size: int) -> int:
    """What Redis's allocator (jemalloc) takes for a string value of ``size`` bytes: the
    string with its header (3, 5 or 9 bytes by its length) and closing null, rounded
    up to jemalloc's size class, four a doubling, so up to a quarter more (reviews: 33
    KB answers took 22% more memory than the budget counted, and lengths at a class's
    top, a power of two among them, a class more without the header). FINISH_LUA's
    ``allocated`` is the same."""
    n = size + (3 if size < 1 << 8 else 5 if size < 1 << 16 else 9) + 1
    if n <= 16:
        return 16
    step = 1
    while step * 8 < n:
        step *= 2
    return -(-n // step) * step


_ALLOCATED_LUA = """
local function allocated(size)
  local n = size + 1
  if size < 256 then n = n + 3 elseif size < 65536 then n = n + 5 else n = n + 9 end
  if n <= 16 then return 16 end
  local step = 1
  while step * 8 < n do step = step * 2 end
  return math.ceil(n / step) * step
end
"""
EVICTIONS_PER_CALL = 64

# KEYS: the record. ARGV: the in-flight entry, its lifetime in ms.
# Returns the existing entry, or nil after storing ours.
CLAIM_LUA = """
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
# KEYS: the record, the tenant's index of kept answers (a sorted set of
# "<answer bytes>:<record>" by when each expires, server time in ms), the tenant's
# counted bytes. ARGV: our in-flight entry, the final entry ('' to release), ttl ms, the
# tenant's budget. Returns 0 (the claim was no longer ours), 1 (done), 2 (not kept, larger
# than the budget), 3 (not kept, no room made within this call's evictions); not kept is
# released.
#
# An answer counts its bytes as allocated (``allocated_bytes``), twice its key name (the
# key and the index member) and ENTRY_OVERHEAD_BYTES (Redis's own structures for both):
# what Redis holds for it. The index member keeps its length as sent, which the
# eviction below compares with the record's.
# Redis runs one script at a time for every client, so each call does a bounded amount
# of work: at most CLEANUP_PER_CALL expired members forgotten and EVICTIONS_PER_CALL
# answers pushed out; a backlog (a tenant back after a long pause) clears over calls.
# An evicted member's record is deleted only if it still holds an answer of that
# length, never a newer claim on the key taken after Redis itself dropped the answer
# (maxmemory) or it expired: in-flight entries all have one length (a 64-character
# fingerprint, a 16-character owner), and an answer of exactly that length is left to
# expire rather than risk it.
FINISH_LUA = _ALLOCATED_LUA + f"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local size, ttl, budget = #ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local overhead = 2 * #KEYS[1] + {ENTRY_OVERHEAD_BYTES}
if size == 0 then redis.call('DEL', KEYS[1]) return 1 end
local weight = allocated(size) + overhead
if weight > budget then redis.call('DEL', KEYS[1]) return 2 end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local kept = tonumber(redis.call('GET', KEYS[3]) or '0')
local function forget(member)
  local sep = string.find(member, ':', 1, true)
  local record = string.sub(member, sep + 1)
  local bytes = tonumber(string.sub(member, 1, sep - 1))
  kept = kept - allocated(bytes) - 2 * #record - {ENTRY_OVERHEAD_BYTES}
  return record, bytes
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, {CLEANUP_PER_CALL})) do
  forget(member)
  redis.call('ZREM', KEYS[2], member)
end
local evicted = 0
while kept + weight > budget and evicted < {EVICTIONS_PER_CALL} do
  local oldest = redis.call('ZPOPMIN', KEYS[2])
  if #oldest == 0 then kept = 0 break end
  local record, bytes = forget(oldest[1])
  if bytes ~= #ARGV[1] and redis.call('STRLEN', record) == bytes then redis.call('DEL', record) end
  evicted = evicted + 1
end
if kept < 0 then kept = 0 end
local outcome = 1
if kept + weight > budget then
  outcome = 3
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
  -- Counted once: the member may be there still, its answer dropped by Redis.
  if redis.call('ZADD', KEYS[2], now + ttl, size .. ':' .. KEYS[1]) == 1 then
    kept = kept + weight
  end
end
local keep_ms = math.max(ttl, redis.call('PTTL', KEYS[2]), redis.call('PTTL', KEYS[3]))
redis.call('SET', KEYS[3], kept, 'PX', keep_ms)
redis.call('PEXPIRE', KEYS[2], keep_ms)
return outcome
"""
# KEYS: records in flight. ARGV: our in-flight entry for each, then the lifetime in ms.
# Extends the claims still ours; a finished or lapsed one is left alone.
EXTEND_LUA = """
local lock_ms = ARGV[#ARGV]
for i, record in ipairs(KEYS) do
  if redis.call('GET', record) == ARGV[i] then redis.call('PEXPIRE', record, lock_ms) end
end
return 1
"""
MAX_EXTENDS_PER_CALL = 256


class StoredResponse(msgspec.Struct, frozen=True, array_like=True):
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Entry(msgspec.Struct, frozen=True, array_like=True):
    fingerprint: str
    owner: str  # a random token per claim, so only its claimant finishes it
    response: StoredResponse | None = None  # None while in flight


_encode = msgspec.msgpack.Encoder().encode
_decode_entry = msgspec.msgpack.Decoder(Entry).decode


@dataclass(frozen=True, slots=True)
class Claim:
    record: str
    in_flight: bytes
    backend: Literal["redis", "local"]
    tenant: str
    # The X-Request-ID of the request that claimed it: what is said of the claim later,
    # outside that request (``_store_unfinished``), names it (a review: one request's
    # answer stored late was logged under another's id).
    request_id: str | None = None


class LocalEntries:
    """The in-process store, per tenant, insertion-ordered, each entry with its deadline:
    claims in flight (at most ``max_entries``) apart from kept answers (at most
    ``max_entries`` and ``max_bytes`` in all), so that answers pushed out never take a
    claim still running with them (its repeat would run a second time instead of 409).
    Both are shared fairly: one tenant's flood of keys, or of large answers, evicts its
    own entries once it holds its share, never another tenant's (``FairShareMap`` for
    the counts; by bytes here, the same rule)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._claims: FairShareMap[tuple[float, bytes]] = FairShareMap(max_entries)
        self._answers: FairShareMap[tuple[float, bytes]] = FairShareMap(
            max_entries, on_evict=self._evicted
        )
        self._max_bytes = max_bytes
        self._bytes: dict[str, int] = {}  # per tenant, of the answers it holds
        self._total_bytes = 0

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def claim(self, tenant: str, record: str, in_flight: bytes, lock_s: float) -> bytes | None:
        now = time.monotonic()
        for entries in (self._claims, self._answers):
            current = entries.get(tenant, record)
            if current is not None and current[0] > now:
                return current[1]
        self._pop_answer(tenant, record)  # lapsed
        self._claims.put(tenant, record, (now + lock_s, in_flight))
        return None

    def extend(self, tenant: str, record: str, in_flight: bytes, lock_s: float) -> None:
        """Push back the lapse of a claim still ours."""
        current = self._claims.get(tenant, record)
        if current is not None and current[1] == in_flight:
            self._claims.put(tenant, record, (time.monotonic() + lock_s, in_flight))

    def finish(
        self, tenant: str, record: str, in_flight: bytes, final: bytes | None, ttl_s: float
    ) -> bool:
        """Store ``final`` (None: release the claim); False if it was not kept: the
        claim was no longer ours, or the answer alone is larger than the whole store."""
        current = self._claims.get(tenant, record)
        if current is None or current[1] != in_flight:
            return False
        self._claims.pop(tenant, record)
        if final is None or len(final) > self._max_bytes:
            return False
        self._pop_answer(tenant, record)
        self._answers.put(tenant, record, (time.monotonic() + ttl_s, final))
        self._count(tenant, len(final))
        while self._total_bytes > self._max_bytes:
            self._evict_bytes_for(tenant, record)
        return True

    def _pop_answer(self, tenant: str, record: str) -> None:
        entry = self._answers.pop(tenant, record)
        if entry is not None:
            self._count(tenant, -len(entry[1]))

    def _evicted(self, tenant: str, record: str, entry: tuple[float, bytes]) -> None:
        self._count(tenant, -len(entry[1]))

    def _count(self, tenant: str, delta: int) -> None:
        held = self._bytes.get(tenant, 0) + delta
        if held:
            self._bytes[tenant] = held
        else:
            del self._bytes[tenant]
        self._total_bytes += delta

    def _evict_bytes_for(self, tenant: str, new_record: str) -> None:
        share = self._max_bytes // len(self._bytes)
        victim = tenant
        oldest = self._answers.oldest(tenant)
        # The newest answer is never the one evicted: it fits alone (finish keeps no
        # larger one), so while over budget another answer is there to go.
        if self._bytes.get(tenant, 0) < max(1, share) or oldest is None or oldest[0] == new_record:
            others = [name for name in self._bytes if name != tenant]
            victim = max(others, key=self._bytes.__getitem__)
            oldest = self._answers.oldest(victim)
        assert oldest is not None
        self._pop_answer(victim, oldest[0])


class IdempotencyStore:
    def __init__(
        self,
        settings: Settings,
        redis: SharedRedis | None = None,
        on_crash: Callable[[str], None] = lambda task: None,
    ) -> None:
        """``on_crash``: told the name of a background loop that failed (counted)."""
        self._on_crash = on_crash
        self._ttl_s = settings.idempotency_ttl_s
        self._lock_s = settings.idempotency_lock_s
        self._redis = redis
        self._claim = redis.script(CLAIM_LUA) if redis is not None else None
        self._finish = redis.script(FINISH_LUA) if redis is not None else None
        self._extend = redis.script(EXTEND_LUA) if redis is not None else None
        self._redis_tenant_max_bytes = settings.idempotency_redis_tenant_max_bytes
        self._local = LocalEntries(settings.idempotency_max_entries, settings.idempotency_max_bytes)
        self._running: set[asyncio.Task[Any]] = set()
        # Claims whose requests still run, by record, with the task that claimed; the
        # refresher extends them every third of the lock while that task lives (a claim
        # its task left unfinished lapses as before), and runs only while there are some.
        self._held: dict[str, tuple[Claim, asyncio.Task[Any] | None]] = {}
        self._refresher: asyncio.Task[None] | None = None
        # Answers Redis could not take when their request ended: (claim, final entry,
        # when to give up); ``_store_unfinished`` offers them again. Keyed by claim
        # (record and in-flight entry, whose owner is random): a retry's claim of the
        # same key is another entry, never in the place of an answer (a review).
        # Releases apart, each bounded alone: a flood of them pushes out no answer.
        self._unfinished: dict[tuple[str, bytes], tuple[Claim, bytes | None, float]] = {}
        self._unreleased: dict[tuple[str, bytes], tuple[Claim, bytes | None, float]] = {}
        self._max_unfinished = settings.idempotency_max_entries
        self._finisher: asyncio.Task[None] | None = None
        self._closing = False  # drained: no finisher starts again

    async def run_to_completion(self, work: Coroutine[Any, Any, T]) -> T:
        """``await work`` in a task of its own that finishes even if the caller is cancelled."""
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._forget)
        return await asyncio.shield(task)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for requests that outlived their handlers; the
        claims of any still running are left to lapse."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout_s)
        self._closing = True
        for name in ("_refresher", "_finisher"):
            task = getattr(self, name)
            setattr(self, name, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._unfinished:
            log.warning("idempotency_answers_not_stored_at_shutdown", answers=len(self._unfinished))
        self._unfinished.clear()
        self._unreleased.clear()

    def _hold(self, claim: Claim) -> None:
        self._held[claim.record] = (claim, asyncio.current_task())
        if self._refresher is None:
            # Serves every claim held: in no request's context (its lines name none).
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_held(), context=background_context()
            )

    async def _refresh_held(self) -> None:
        """Keep extending the claims whose requests still run: a request slower than
        ``idempotency_lock_s`` keeps its claim, so a retry meanwhile is 409, never a
        second run. Exits once none is held (the next claim starts it again)."""
        try:
            while self._held:
                await asyncio.sleep(self._lock_s / 3)
                try:
                    await self._extend_claims(self._still_running())
                except Exception as exc:  # a claim not extended still lapses, as before
                    log.error("idempotency_extend_failed", error=repr(exc))
                    self._on_crash("idempotency-refresher")
        finally:
            if self._refresher is asyncio.current_task():
                self._refresher = None

    def _still_running(self) -> list[Claim]:
        for record, (_, task) in list(self._held.items()):
            if task is not None and task.done():
                del self._held[record]
        return [claim for claim, _ in self._held.values()]

    async def _extend_claims(self, claims: list[Claim]) -> None:
        shared = []
        for claim in claims:
            if claim.backend == "local" or self._redis is None:
                self._local.extend(claim.tenant, claim.record, claim.in_flight, self._lock_s)
            else:
                shared.append(claim)
        if self._redis is None or self._extend is None:
            return
        lock_ms = self._lock_s * 1000
        for group in self._redis.by_slot(shared, lambda claim: claim.record):
            for start in range(0, len(group), MAX_EXTENDS_PER_CALL):
                part = group[start : start + MAX_EXTENDS_PER_CALL]
                try:
                    await self._redis.call("idempotency", self._extend_call(part, lock_ms), key=part[0].record)
                except RedisUnavailable:
                    log.warning("idempotency_extend_failed", claims=len(part))

    def _extend_call(self, claims: list[Claim], lock_ms: int) -> Callable[[], Awaitable[Any]]:
        script = self._extend
        assert script is not None
        keys = [claim.record for claim in claims]
        args: list[bytes | int] = [claim.in_flight for claim in claims]
        args.append(lock_ms)
        return lambda: script(keys=keys, args=args)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: nobody may be left to await it

    def record_name(self, tenant: str, key: str) -> str:
        """The record's key name: ``mlgate:idem:<tenant>:<sha256 of key>``; on a Redis
        Cluster ``mlgate:idem:{<tenant>}:<sha256>``, every record of a tenant in one slot."""
        return self._tenant_prefix(tenant) + hashlib.sha256(key.encode()).hexdigest()

    def _tenant_prefix(self, tenant: str) -> str:
        tag = self._redis.hash_tag(tenant) if self._redis is not None else ""
        return f"mlgate:idem:{tag or tenant + ':'}"

    async def claim(self, tenant: str, key: str, fingerprint: str) -> Claim | Entry:
        """Our claim on ``key``, or the entry someone already holds under it."""
        record = self.record_name(tenant, key)
        in_flight = _encode(Entry(fingerprint=fingerprint, owner=secrets.token_hex(8)))
        if self._redis is not None and self._claim is not None:
            script, lock_ms = self._claim, self._lock_s * 1000
            try:
                existing = await self._redis.call(
                    "idempotency", lambda: script(keys=[record], args=[in_flight, lock_ms]), key=record
                )
            except RedisUnavailable as exc:
                # A call that timed out may still be run by Redis: its claim, owned by
                # nobody, would make every retry 409 for the whole lock (a review).
                # Released like an answer not stored, once Redis answers; not when the
                # breaker refused it (never sent).
                if not _never_sent(exc):
                    self._finish_later(Claim(record, in_flight, "redis", tenant, _request_id()), None)
                cause = exc.__cause__
                raise IdempotencyUnavailable(
                    f"Idempotency keys cannot be checked now ({exc}); nothing was done: retry",
                    cause.retry_after_s if isinstance(cause, BreakerOpen) else 1,
                ) from None
            if existing is None:
                return self._held_claim(Claim(record, in_flight, "redis", tenant, _request_id()))
            return _decode_entry(existing)
        existing = self._local.claim(tenant, record, in_flight, self._lock_s)
        if existing is None:
            return self._held_claim(Claim(record, in_flight, "local", tenant, _request_id()))
        return _decode_entry(existing)

    def _held_claim(self, claim: Claim) -> Claim:
        self._hold(claim)
        return claim

    async def complete(self, claim: Claim, response: StoredResponse) -> None:
        entry = _decode_entry(claim.in_flight)
        final = _encode(Entry(fingerprint=entry.fingerprint, owner="", response=response))
        await self._finish_claim(claim, final)

    async def release(self, claim: Claim) -> None:
        await self._finish_claim(claim, None)

    async def _finish_claim(self, claim: Claim, final: bytes | None) -> None:
        held = self._held.get(claim.record)
        if held is not None and held[0] is claim:
            del self._held[claim.record]
        if claim.backend == "local" or self._redis is None or self._finish is None:
            kept = self._local.finish(
                claim.tenant, claim.record, claim.in_flight, final, self._ttl_s
            )
            if final is not None and not kept and len(final) > self._local.max_bytes:
                self._not_kept(claim, final)
            return
        try:
            await self._finish_in_redis(claim, final)
        except RedisUnavailable:
            # Offered again until Redis takes it; until then repeats get 409.
            log.warning("idempotency_finish_failed", stored=final is not None)
            self._finish_later(claim, final)

    def _finish_later(self, claim: Claim, final: bytes | None) -> None:
        """Queue ``claim``'s finish (``final`` None: its release) for ``_store_unfinished``:
        at most ``MLGATE_IDEMPOTENCY_MAX_ENTRIES`` answers and as many releases, the
        oldest given up first."""
        if self._closing:
            return  # after the drain: its claim lapses
        queue = self._unreleased if final is None else self._unfinished
        queue[claim.record, claim.in_flight] = (claim, final, time.monotonic() + self._lock_s)
        while len(queue) > self._max_unfinished:
            given_up, _, _ = queue.pop(next(iter(queue)))
            if final is not None:
                log.error(
                    "idempotency_answer_never_stored",
                    tenant=given_up.tenant,
                    reason="too many waiting",
                    request_id=given_up.request_id,
                )
        if self._finisher is None:
            self._finisher = asyncio.get_running_loop().create_task(
                self._store_unfinished(), context=background_context()
            )

    async def _finish_in_redis(self, claim: Claim, final: bytes | None) -> int:
        """Redis's outcome: 0 the claim was no longer ours (lapsed), 1 done, 2 and 3 the
        answer not kept."""
        assert self._redis is not None and self._finish is not None
        script, ttl_ms = self._finish, self._ttl_s * 1000
        prefix = self._tenant_prefix(claim.tenant)
        keys = [claim.record, prefix + "~kept", prefix + "~bytes"]
        args: list[bytes | int] = [
            claim.in_flight,
            final or b"",
            ttl_ms,
            self._redis_tenant_max_bytes,
        ]
        outcome = int(await self._redis.call("idempotency", lambda: script(keys=keys, args=args), key=claim.record))
        if outcome in (2, 3) and final is not None:
            self._not_kept(claim, final, "too large" if outcome == 2 else "no room yet")
        return outcome

    async def _store_unfinished(self) -> None:
        """Offer Redis again the answers it could not take, oldest first, until each is
        stored or its claim has lapsed (then a repeat runs again: logged), and the
        releases of claims whose call failed. Exits once none is left (the next failed
        finish starts it again)."""
        try:
            while self._unfinished or self._unreleased:
                await asyncio.sleep(FINISH_RETRY_S)
                for queue in (self._unfinished, self._unreleased):
                    if not await self._offer_again(queue):
                        break  # Redis still failing: the rest wait for the next turn
        except Exception as exc:  # its answers' claims lapse, as before this loop
            log.error("idempotency_store_unfinished_failed", error=repr(exc))
            self._on_crash("idempotency-finisher")
            self._unfinished.clear()
            self._unreleased.clear()
        finally:
            if self._finisher is asyncio.current_task():
                self._finisher = None

    async def _offer_again(
        self, queue: dict[tuple[str, bytes], tuple[Claim, bytes | None, float]]
    ) -> bool:
        """One turn over ``queue``; False when Redis failed again."""
        for key, entry in list(queue.items()):
            claim, final, give_up_at = entry
            if time.monotonic() >= give_up_at:  # its claim has lapsed by now
                queue.pop(key, None)
                if final is not None:
                    log.error(
                        "idempotency_answer_never_stored",
                        tenant=claim.tenant,
                        reason="Redis down",
                        request_id=claim.request_id,
                    )
                continue
            try:
                outcome = await self._finish_in_redis(claim, final)
            except RedisUnavailable:
                return False
            queue.pop(key, None)  # the same claim's entry: a key never holds another
            if final is None:
                continue
            if outcome == 0:
                log.error(
                    "idempotency_answer_never_stored",
                    tenant=claim.tenant,
                    reason="claim lapsed",
                    request_id=claim.request_id,
                )
            else:
                log.info("idempotency_answer_stored_late", tenant=claim.tenant, request_id=claim.request_id)
        return True

    @staticmethod
    def _not_kept(claim: Claim, final: bytes, reason: str = "too large") -> None:
        # Released, so a repeat runs again (record dedup still keeps its records from
        # being written twice within its window).
        log.warning(
            "idempotency_answer_not_kept", tenant=claim.tenant, bytes=len(final), reason=reason
        )


def _request_id() -> str | None:
    """The X-Request-ID of the request being served, as its log lines carry it."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    return request_id if isinstance(request_id, str) else None


def _never_sent(exc: RedisUnavailable) -> bool:
    """The call was refused by Redis's open breaker before it was made."""
    cause = exc.__cause__
    return isinstance(cause, BreakerOpen) and cause.failure is None


def fingerprint(method: str, path_qs: str, body: bytes, reading: str = "") -> str:
    """What makes a repeat the same request: method, path and query, body, and
    ``reading``, the headers that say how the body is read (its media type, an OIP
    binary body's header length): the same bytes sent as msgpack rather than JSON, or
    split elsewhere into header and tensors, are another request. Without ``reading``,
    the fingerprint earlier versions kept (``matches`` takes it)."""
    digest = hashlib.sha256()
    if reading:
        # "v2 " first: the earlier format begins with the method, so no body sent
        # under it can be read as this one's reading (a review forged a replay so).
        digest.update(f"v2 {method} {path_qs}\n{reading}\n".encode())
    else:
        digest.update(f"{method} {path_qs}\n".encode())
    digest.update(body)
    return digest.hexdigest()


def matches(kept: str, method: str, path_qs: str, body: bytes, reading: str) -> bool:
    """Whether a kept fingerprint is this request's: its own, or the one an earlier
    version kept without ``reading`` (an answer kept before an upgrade, up to
    ``MLGATE_IDEMPOTENCY_TTL_S`` old, still replays to its retry: a review saw every such
    retry refused 422)."""
    return kept == fingerprint(method, path_qs, body, reading) or kept == fingerprint(
        method, path_qs, body
    )


def stores(status: int, work_began: bool = False) -> bool:
    """Which answers are kept for the key's repeats: 2xx, and 4xx but 409 and 429 of a
    request whose handler began its work (``WORK_BEGAN``: records written, a model load
    tried). A request refused before that (not decodable, too large, not valid: 400,
    413, 415, 422) did nothing, and as Stripe's API does, its key stays free for the
    request fixed (a review: the fix was refused 422 "used with a different request"
    for the key's whole day). 409, 429 (something else in flight, over a limit) and 5xx
    are worth a retry with the same key."""
    if 200 <= status < 300:
        return True
    return work_began and 400 <= status < 500 and status not in (409, 429)
