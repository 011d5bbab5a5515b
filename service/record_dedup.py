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
in-flight claim whose request died lapses after ``MLGATE_IDEMPOTENCY_LOCK_S``. So a
client is never told "duplicate" for a record that then failed to land.

With ``REDIS_URL``: one key ``mlgate:rid:<tenant>:<id>`` per record, ``p`` while in
flight and ``d`` once written, all the ids of a batch in one Lua script per step
(one round trip; the ids travel as one newline-joined argument and the answer as one
string of state characters, which costs a quarter of what a pipeline of SETs costs
to pack and parse in Python); dedup then holds across processes and hosts. Redis
holds about 150 bytes per remembered id: records/s x window x 150 B (10k records/s
over the default 600 s window: about 900 MB), so size the window to how long
clients keep retrying; Idempotency-Key covers longer horizons per request. Without
Redis, or while it fails (counted as ``mlgate_redis_fallback{operation="dedup"}``),
an in-process table of at most ``MLGATE_DEDUP_MAX_ENTRIES`` ids with the same states
and windows (the oldest are forgotten first).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from config import Settings
from service.errors import Conflict
from service.shared_redis import RedisUnavailable, SharedRedis

PREFIX = "mlgate:rid:"
NEW, WRITTEN, IN_FLIGHT = "1", "0", "p"  # what claim found, per id
_FIRST_POLL_S, _MAX_POLL_S = 0.01, 0.2

# ARGV: in-flight lapse seconds, key prefix, record ids joined by newlines (ids never
# hold whitespace). Returns one character per id: '1' newly claimed (now in flight),
# '0' written already, 'p' in flight for another request.
CLAIM_LUA = """
local lapse, prefix = ARGV[1], ARGV[2]
local found = {}
for id in string.gmatch(ARGV[3], '[^\\n]+') do
  if redis.call('SET', prefix .. id, 'p', 'NX', 'EX', lapse) then
    found[#found + 1] = '1'
  elseif redis.call('GET', prefix .. id) == 'p' then
    found[#found + 1] = 'p'
  else
    found[#found + 1] = '0'
  end
end
return table.concat(found)
"""
# ARGV: window seconds, key prefix, record ids joined by newlines: now written.
CONFIRM_LUA = """
local window, prefix = ARGV[1], ARGV[2]
for id in string.gmatch(ARGV[3], '[^\\n]+') do
  redis.call('SET', prefix .. id, 'd', 'EX', window)
end
return 1
"""


class LocalSeen:
    """Ids in flight or written, each until its expiry, at most ``max_entries``."""

    def __init__(self, window_s: float, lapse_s: float, max_entries: int) -> None:
        self._window_s = window_s
        self._lapse_s = lapse_s
        self._max = max_entries
        # id -> (expiry, state); re-inserted on every change, so the first is the oldest
        self._seen: dict[str, tuple[float, str]] = {}

    def claim(self, names: Sequence[str]) -> str:
        now = time.monotonic()
        self._expire(now)
        found = []
        for name in names:
            entry = self._seen.get(name)
            if entry is not None and entry[0] > now:
                found.append(IN_FLIGHT if entry[1] == IN_FLIGHT else WRITTEN)
                continue
            self._set(name, now + self._lapse_s, IN_FLIGHT)
            found.append(NEW)
        return "".join(found)

    def confirm(self, names: Sequence[str]) -> None:
        """Mark written the ids claimed here (not those claimed in Redis)."""
        expiry = time.monotonic() + self._window_s
        for name in names:
            if name in self._seen:
                self._set(name, expiry, WRITTEN)

    def release(self, names: Sequence[str]) -> None:
        for name in names:
            self._seen.pop(name, None)

    def _expire(self, now: float) -> None:
        # Oldest first; an entry that lives longer than the ones behind it holds them
        # until it expires too (they count as absent meanwhile, and max_entries bounds them).
        seen = self._seen
        while seen:
            oldest = next(iter(seen))
            if seen[oldest][0] > now:
                return
            del seen[oldest]

    def _set(self, name: str, expiry: float, state: str) -> None:
        self._seen.pop(name, None)
        while len(self._seen) >= self._max:
            self._seen.pop(next(iter(self._seen)))
        self._seen[name] = (expiry, state)


class RecordDeduplicator:
    def __init__(self, settings: Settings, redis: SharedRedis | None = None) -> None:
        self.window_s = settings.dedup_window_s
        self.in_flight_wait_s = settings.dedup_in_flight_wait_s
        self._lapse_s = settings.idempotency_lock_s
        self._redis = redis
        self._claim = redis.script(CLAIM_LUA) if redis is not None else None
        self._confirm = redis.script(CONFIRM_LUA) if redis is not None else None
        self._local = LocalSeen(settings.dedup_window_s, self._lapse_s, settings.dedup_max_entries)

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    @staticmethod
    def _prefix(tenant: str) -> str:
        return f"{PREFIX}{tenant}:"

    def _names(self, tenant: str, record_ids: Sequence[str]) -> list[str]:
        prefix = self._prefix(tenant)
        return [prefix + record_id for record_id in record_ids]

    async def claim(self, tenant: str, record_ids: Sequence[str]) -> list[bool]:
        """Per id, True when it is new (now in flight for this request), False when it
        was written within the window or repeats an earlier id of ``record_ids``.

        Waits for ids in flight for another request; ``Conflict`` when they still are
        after ``in_flight_wait_s`` (this call's claims released)."""
        if not self.enabled or not record_ids:
            return [True] * len(record_ids)
        distinct = list(dict.fromkeys(record_ids))
        found = dict(zip(distinct, await self._claim_states(tenant, distinct), strict=True))
        waiting = [record_id for record_id, state in found.items() if state == IN_FLIGHT]
        give_up_at, pause = time.monotonic() + self.in_flight_wait_s, _FIRST_POLL_S
        while waiting and time.monotonic() < give_up_at:
            await asyncio.sleep(pause)
            pause = min(2 * pause, _MAX_POLL_S)
            found.update(zip(waiting, await self._claim_states(tenant, waiting), strict=True))
            waiting = [record_id for record_id in waiting if found[record_id] == IN_FLIGHT]
        if waiting:
            await self.release(tenant, [rid for rid, state in found.items() if state == NEW])
            raise Conflict(
                f"{len(waiting)} record_id(s) of this batch are being written by another "
                "request; retry once it has finished",
                retry_after_s=1,
            )
        first: set[str] = set()
        flags = []
        for record_id in record_ids:
            flags.append(found[record_id] == NEW and record_id not in first)
            first.add(record_id)
        return flags

    async def _claim_states(self, tenant: str, record_ids: Sequence[str]) -> str:
        if self._redis is not None and self._claim is not None:
            script = self._claim
            args: list[str | int] = [self._lapse_s, self._prefix(tenant), "\n".join(record_ids)]
            try:
                found = await self._redis.call("dedup", lambda: script(keys=[], args=args))
            except RedisUnavailable:
                pass
            else:
                return bytes(found).decode()
        return self._local.claim(self._names(tenant, record_ids))

    async def confirm(self, tenant: str, record_ids: Sequence[str]) -> None:
        """The claimed ids' records are written: duplicates from now on, for the window."""
        if not self.enabled or not record_ids:
            return
        names = self._names(tenant, record_ids)
        self._local.confirm(names)
        if self._redis is not None and self._confirm is not None:
            script = self._confirm
            args: list[str | int] = [self.window_s, self._prefix(tenant), "\n".join(record_ids)]
            try:
                await self._redis.call("dedup", lambda: script(keys=[], args=args))
            except RedisUnavailable:
                pass

    async def release(self, tenant: str, record_ids: Sequence[str]) -> None:
        """Forget claims whose records were not written after all."""
        if not self.enabled or not record_ids:
            return
        names = self._names(tenant, record_ids)
        self._local.release(names)
        if self._redis is not None:
            client = self._redis.client
            try:
                await self._redis.call("dedup", lambda: client.delete(*names))
            except RedisUnavailable:
                pass
