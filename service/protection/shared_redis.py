"""SharedRedis: the app's one Redis client, behind a breaker, for state shared by processes.

Rate-limit buckets, idempotency records, record-id dedup and API keys kept in Redis
all go through ``SharedRedis.call``. Every call is bounded by short socket timeouts
(``MLGATE_REDIS_TIMEOUT_MS``) and no retries, so Redis can never hang a request; a
failure or an open breaker raises ``RedisUnavailable`` and the caller falls back to
its in-process state. The switch to and from the fallback is logged once each way and
every fallback is counted (``mlgate_redis_fallback{operation}``).

``MLGATE_REDIS_MODE=cluster`` talks to a Redis Cluster (redis-py's asyncio
``RedisCluster``, from the seed node(s) in ``REDIS_URL``, comma-separated). A script
there must touch one hash slot: every script declares its keys in ``KEYS``, key names
carry a hash tag (``hash_tag``: ``{tenant}`` and the like; nothing in standalone mode,
so the key names of a single Redis stay as they were), and a call that would span
slots is split per slot (``by_slot``). A master that dies fails its slots' calls until
its replica is promoted: the callers fall back meanwhile, as for any Redis failure,
and the client learns the new topology on the next call. Each master has a breaker of
its own, so one slow or dead master costs only the calls of its slots. redis-py
follows a cluster's redirects and retries ``TRYAGAIN`` and ``CLUSTERDOWN`` itself,
sleeping between tries (a review saw calls of 0.85 s and 1.15 s against a 200 ms
timeout): there a whole call is bounded, at twice the timeout.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import (
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

from mlgate.config import Settings
from mlgate.workers.breaker import Breaker, BreakerOpen

T = TypeVar("T")
Item = TypeVar("Item")
RedisMode = Literal["standalone", "cluster"]
# What a new connection met (``SharedRedis._connected``).
RunMet = Literal["first", "continued", "restarted"]
log = structlog.get_logger("mlgate.redis")


class RedisUnavailable(Exception):
    """Redis failed, timed out or its breaker is open; use the local fallback."""


class RedisMisconfigured(ValueError):
    """``REDIS_URL`` or ``MLGATE_REDIS_MODE`` names no Redis this client can use: an
    operator's error at start-up, not an outage to wait out."""


class SharedRedis:
    def __init__(
        self,
        url: str,
        *,
        mode: RedisMode = "standalone",
        timeout_s: float = 0.2,
        fail_max: int = 3,
        reset_s: float = 2.0,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        self.cluster = mode == "cluster"
        # The run of Redis the last new connection met (``run_node``: the master's
        # ``host:port`` in cluster mode) and who is told of each run met; by server,
        # its run and replication history (``_connected``).
        self.run_id: str | None = None
        self.run_node: str | None = None
        self._runs: dict[str, tuple[str, str | None]] = {}
        self._replids: set[str] = set()  # every replication id met, at any address
        self.on_run: list[Callable[[RunMet], None]] = []
        # A whole call in cluster mode, redirects and redis-py's own retries included.
        self._call_bound_s = 2 * timeout_s if self.cluster else None
        try:
            self.client: aioredis.Redis | RedisCluster = (
                _cluster_client(url, timeout_s, self._connected)
                if self.cluster
                else aioredis.Redis.from_url(
                    # ``host:port`` as the cluster seeds take it (a review: a traceback).
                    url if "://" in url else f"redis://{url}",
                    socket_timeout=timeout_s,
                    socket_connect_timeout=timeout_s,
                    # redis-py retries with backoff by default; a request must not wait for that.
                    retry=Retry(NoBackoff(), 0),
                    retry_on_timeout=False,
                    client_name="mlgate",
                    redis_connect_func=self._connected,
                )
            )
        except ValueError as exc:  # a scheme or database redis-py does not take
            raise RedisMisconfigured(str(exc)) from exc
        self.breaker = Breaker("redis", fail_max=fail_max, reset_s=reset_s, exclude=())
        self._fail_max, self._reset_s = fail_max, reset_s
        # In cluster mode, a breaker per master a keyed call goes to (by its name,
        # ``host:port``): one master slow or dead opened the one breaker for every
        # tenant, those whose slots were served all along too (a review).
        self._node_breakers: dict[str, Breaker] = {}
        self._on_fallback = on_fallback
        # Called when a breaker's call succeeds again after failing (Redis, or one of
        # its masters, back).
        self.on_recovered: list[Callable[[], None]] = []
        # The breakers whose last call failed (Redis down for their calls until one
        # succeeds).
        self._failing: set[str] = set()
        # When a call last succeeded (``time.monotonic``): on a quiet host nothing calls
        # Redis, and an outage is seen only when something pings it (``redis_sampler``).
        self.answered_at = -math.inf
        # The breakers whose Redis (or master) refused a write (out of memory under
        # ``noeviction``, a read-only replica, a failing snapshot): reads still answer
        # there, so only a write that succeeds (``ping``'s write probe) says it is back.
        self._writes_refused: set[str] = set()

    @classmethod
    def from_settings(
        cls, settings: Settings, on_fallback: Callable[[str], None] | None = None
    ) -> SharedRedis:
        assert settings.redis_url
        return cls(
            settings.redis_url,
            mode=settings.redis_mode,
            timeout_s=settings.redis_timeout_ms / 1000,
            fail_max=settings.redis_breaker_fail_max,
            reset_s=settings.redis_breaker_reset_s,
            on_fallback=on_fallback,
        )

    @property
    def available(self) -> bool:
        """False while the last call to Redis (to a master, in cluster mode) failed."""
        return not self._failing

    def hash_tag(self, name: str) -> str:
        """A key-name part that puts every key carrying it in one cluster slot:
        ``{name}:`` in cluster mode, nothing in standalone mode (key names unchanged)."""
        return f"{{{name}}}:" if self.cluster else ""

    def by_slot(self, items: Iterable[Item], key: Callable[[Item], str]) -> list[list[Item]]:
        """``items`` grouped by the cluster slot of ``key(item)``, each group in the
        order given; in standalone mode one group of them all."""
        if not self.cluster:
            every = list(items)
            return [every] if every else []
        groups: dict[int, list[Item]] = {}
        for item in items:
            groups.setdefault(key_slot(key(item).encode()), []).append(item)
        return list(groups.values())

    def script(self, source: str) -> AsyncScript:
        """A Lua script run with EVALSHA (loaded again by redis-py after a Redis restart)."""
        return self.client.register_script(source)

    async def call(self, operation: str, func: Callable[[], Awaitable[T]], key: str | None = None) -> T:
        """``await func()`` through the breaker; ``RedisUnavailable`` instead of any failure.
        ``key``: a key the call touches (all its keys are in one slot), whose master's
        breaker it goes through in cluster mode."""
        return await self._through(self._breaker_for(key), operation, func)

    async def _through(
        self,
        breaker: Breaker,
        operation: str,
        func: Callable[[], Awaitable[T]],
        *,
        past_breaker: bool = False,
    ) -> T:
        """``past_breaker``: ``func`` runs even while the breaker is open, as a probe
        (no fallback counted: nothing fell back), and closes it when it succeeds."""
        if self._call_bound_s is not None:
            func = partial(_bounded, func, self._call_bound_s)
        try:
            result = await (func() if past_breaker else breaker.call(func))
        except (BreakerOpen, RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            if not past_breaker:
                self._fell_back(breaker, operation, exc)
            raise RedisUnavailable(operation) from exc
        if past_breaker:
            breaker.close()
        self.answered_at = time.monotonic()
        # A read answered while writes are refused is no recovery (a review: each
        # answered read said "recovered", so /ready said ready, 300 times a minute, while
        # every write failed); ``ping`` probes with a write.
        if breaker.name in self._failing and breaker.name not in self._writes_refused:
            self._recovered(breaker.name, operation)
        return result

    def _recovered(self, name: str, operation: str, event: str = "redis_recovered") -> None:
        self._failing.discard(name)
        log.info(event, operation=operation, breaker=name)
        # Each master back, not only the last: one still down must not hold back what
        # the others could take now (a review).
        for callback in self.on_recovered:
            callback()

    def _breaker_for(self, key: str | None) -> Breaker:
        if key is None or not isinstance(self.client, RedisCluster):
            return self.breaker
        try:
            node = self.client.get_node_from_key(key)
        except (RedisError, RedisClusterException):  # the slots are not known yet
            return self.breaker
        if node is None:
            return self.breaker
        breaker = self._node_breakers.get(node.name)
        if breaker is None:
            breaker = self._node_breakers[node.name] = Breaker(
                f"redis {node.name}", fail_max=self._fail_max, reset_s=self._reset_s, exclude=()
            )
        return breaker

    async def check_mode(self) -> None:
        """``RedisMisconfigured`` when cluster mode meets a Redis that is no cluster
        (else redis-py's exception left start-up as a traceback); any other failure is
        an outage, which the callers fall back from."""
        if not isinstance(self.client, RedisCluster):
            return
        try:
            await self.client.initialize()
        except RedisClusterException as exc:
            if "Cluster mode is not enabled" in str(exc):
                raise RedisMisconfigured(f"MLGATE_REDIS_MODE=cluster, but {exc}") from exc
        except (RedisError, OSError, TimeoutError):
            pass

    async def ping(self, *, past_breakers: bool = False) -> bool:
        """Whether Redis answers: in cluster mode, every master whose breaker's last call
        failed (a master no longer serving slots, failed over, is let go of), else one.
        ``past_breakers``: asked even while their breakers are open, which an answer
        closes (a probe: ``RecordDeduplicator`` holding ids to tell Redis)."""
        failing = {name: b for name, b in self._node_breakers.items() if b.name in self._failing}
        if not failing or not isinstance(self.client, RedisCluster):
            if self.breaker.name in self._writes_refused:
                return await self._write_probe(self.breaker, WRITE_PROBE_KEY, self.client.set)
            try:
                await self._through(
                    self.breaker, "ping", self.client.ping, past_breaker=past_breakers
                )
            except RedisUnavailable:
                return False
            return True
        cluster = self.client
        serving = {node.name: node for node in cluster.get_primaries()}
        answered = True
        for name, breaker in failing.items():
            node = serving.get(name)
            if node is None:
                self._writes_refused.discard(breaker.name)
                # Failed over: its slots are served elsewhere, and it may still be down
                # (a review read "recovered" of a master still frozen).
                self._recovered(breaker.name, "ping", event="redis_master_replaced")
                continue
            if breaker.name in self._writes_refused:
                key = _probe_key_on(cluster, name)
                if key is None or not await self._write_probe(breaker, key, cluster.set):
                    answered = False
                continue
            try:
                await self._through(
                    breaker,
                    "ping",
                    partial(cluster.ping, target_nodes=node),
                    past_breaker=past_breakers,
                )
            except RedisUnavailable:
                answered = False
        return answered

    async def _write_probe(
        self, breaker: Breaker, key: str, setter: Callable[..., Awaitable[object]]
    ) -> bool:
        """Whether Redis takes a write again after refusing them: a short-lived key set
        past the breaker, which closes it and ends the outage when it succeeds."""
        try:
            await setter(key, b"1", px=WRITE_PROBE_TTL_MS)
        except (RedisError, RedisClusterException, OSError, TimeoutError):
            return False
        self._writes_refused.discard(breaker.name)
        breaker.close()
        self.answered_at = time.monotonic()
        if breaker.name in self._failing:
            self._recovered(breaker.name, "write_probe")
        return True

    async def persistent(self, master: str | None = None) -> bool | None:
        """Whether Redis keeps its data over a restart (snapshots or an append-only
        file), as its configuration says; None when it does not say (``CONFIG``
        refused or renamed, as managed Redis does). In cluster mode, whether every
        master does (a review: a master restarted empty was never warned of): False
        when one does not; ``master`` (``host:port``): that one's only."""
        servers = self._servers()
        if master is not None and self.cluster:
            servers = [node for node in servers if node is not None and node.name == master]
        answers = [
            _keeps_data(await self._config(("save", "appendonly"), node)) for node in servers
        ]
        if False in answers:
            return False
        return None if None in answers or not answers else True

    async def _connected(self, connection: AbstractConnection) -> None:
        """redis-py's hook for each new connection: set up as ever, then Redis's
        ``INFO`` read: its ``run_id`` and replication ids. ``on_run`` is told of the
        first run met, and of each other one after: ``continued`` when it carries the
        history of the one before (a replica promoted, or a restart from its own
        files), else ``restarted`` (a review: a failover behind one address was said
        to have lost everything). redis-py replaces a connection Redis closed before
        using it, so a restart between calls fails none of them: nothing else would
        tell."""
        await connection.on_connect()
        try:
            await connection.send_command("INFO")
            info = _info_fields(await connection.read_response())
        except ResponseError:  # refused or renamed (as managed Redis may): nothing learnt
            return
        run_id = info.get("run_id")
        # By master in cluster mode: each has runs of its own, and one restarted empty
        # (no replica to take over) lost its slots' state (a review).
        server = f"{getattr(connection, 'host', '')}:{getattr(connection, 'port', '')}"
        known = self._runs.get(server)
        if not run_id or (known is not None and run_id == known[0]):
            return
        replids = {
            replid
            for replid in (info.get("master_replid"), info.get("master_replid2"))
            if replid is not None and replid != "0" * 40
        }
        first = not self._runs
        # It carries a history: the one last met at this address (a restart from its
        # own files), another master's met before, or any other's (``master_replid2``:
        # a replica promoted, a master back from a failover with its replica's data; a
        # review saw a failback called a restart that lost everything). A run that
        # restarted empty has a new id and none before it.
        continued = bool(replids & self._replids) or info.get("master_replid2") in replids
        self._replids |= replids
        self._runs[server] = (run_id, info.get("master_replid"))
        self.run_id, self.run_node = run_id, server if self.cluster else None
        if known is None and not first:
            return  # another master met for the first time: no run of it went before
        change: RunMet = "first" if first else "continued" if continued else "restarted"
        for callback in self.on_run:
            callback(change)

    async def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy``; None when it does not say (as ``persistent``).
        In cluster mode, of the masters that evict, the policy that loses most (any key
        before expiring keys only), else ``noeviction`` when every master says so."""
        policies = []
        for node in self._servers():
            value = (await self._config(("maxmemory-policy",), node)).get("maxmemory-policy")
            policies.append(str(value) if value is not None else None)
        evicting = [policy for policy in policies if policy not in (None, "noeviction")]
        if evicting:  # the one that loses most: any key before expiring ones (a review)
            return min(evicting, key=lambda policy: not policy.startswith("allkeys-"))
        return None if None in policies or not policies else "noeviction"

    def _servers(self) -> list[ClusterNode | None]:
        """The servers a configuration is read from: every master of a cluster (as
        its client knows them now), else the one Redis (None)."""
        if isinstance(self.client, RedisCluster):
            return list(self.client.get_primaries())
        return [None]

    async def _config(self, names: tuple[str, ...], node: ClusterNode | None) -> dict[str, str]:
        """``CONFIG GET`` of each of ``names`` on ``node`` (a cluster's master, or the one
        Redis); what it does not answer is left out."""
        found: dict[str, str] = {}
        for name in names:
            try:
                if node is None:
                    answer = await self.client.config_get(name)
                else:
                    answer = await self.client.execute_command(
                        "CONFIG GET", name, target_nodes=node
                    )
            except (RedisError, RedisClusterException, OSError, TimeoutError):
                continue
            found.update(_config_fields(answer))
        return found

    async def close(self) -> None:
        await self.client.aclose()

    def _fell_back(self, breaker: Breaker, operation: str, exc: BaseException) -> None:
        if self._on_fallback is not None:
            self._on_fallback(operation)
        refused = _refuses_writes(exc)
        if refused:
            self._writes_refused.add(breaker.name)
        if breaker.name not in self._failing:
            self._failing.add(breaker.name)
            log.warning(
                "redis_unavailable",
                operation=operation,
                breaker=breaker.name,
                error=f"{type(exc).__name__}: {exc}",
                writes_refused=refused,
                fallback="in-process state until Redis answers again"
                + (" (and takes a write)" if refused else ""),
            )


# What Redis answers a write it refuses while reads go on: out of memory under
# ``noeviction`` (also from inside a script), a read-only replica, a failing snapshot,
# too few replicas (``min-replicas-to-write``).
_WRITE_REFUSALS = ("OOM command not allowed", "READONLY", "MISCONF", "NOREPLICAS")
WRITE_PROBE_KEY = "mlgate:write-probe"
WRITE_PROBE_TTL_MS = 10_000


def _info_fields(info: object) -> dict[str, str]:
    """The ``name:value`` fields of an ``INFO`` answer as the connection read it."""
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    fields = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon and value.strip():
            fields[name.strip()] = value.strip()
    return fields


async def _bounded(func: Callable[[], Awaitable[T]], bound_s: float) -> T:
    """``await func()``, or ``TimeoutError`` once ``bound_s`` has passed. In a task of
    its own, waited for rather than cancelled at the bound: redis-py's ``wait_for``
    around each send can swallow a cancellation that lands as the send ends (Python
    3.11), and a call then ran on unbounded (a review: 1.6 s against 0.4)."""
    call = asyncio.ensure_future(func())
    try:
        done, _ = await asyncio.wait({call}, timeout=bound_s)
    except BaseException:
        call.cancel()
        call.add_done_callback(_retrieved)
        raise
    if call in done:
        return call.result()
    call.cancel()
    call.add_done_callback(_retrieved)
    raise TimeoutError(f"no answer within {bound_s:g} s")


def _retrieved(call: asyncio.Future[Any]) -> None:
    """A call given up on: its end, whatever it is, is nobody's (nothing logged)."""
    if not call.cancelled():
        call.exception()


def _config_fields(answer: object) -> dict[str, str]:
    """``CONFIG GET``'s answer as names and values, as a dict or as the flat list a
    cluster node's connection may give."""
    if isinstance(answer, dict):
        pairs = list(answer.items())
    elif isinstance(answer, list | tuple):
        pairs = list(zip(answer[::2], answer[1::2], strict=False))
    else:
        return {}
    return {_text(name): _text(value) for name, value in pairs}


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _keeps_data(config: Mapping[str, str]) -> bool | None:
    """Whether a server's ``save`` and ``appendonly`` keep its data over a restart."""
    if "save" not in config or "appendonly" not in config:
        return None
    return bool(config["save"].strip()) or config["appendonly"].lower() == "yes"


def _refuses_writes(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, (OutOfMemoryError, ReadOnlyError)) or any(
        refusal in text for refusal in _WRITE_REFUSALS
    )


def _probe_key_on(cluster: RedisCluster, node_name: str) -> str | None:
    """A write-probe key whose slot the master ``node_name`` serves, if one is found."""
    for n in range(4096):
        key = f"{WRITE_PROBE_KEY}:{{{n}}}"
        try:
            node = cluster.get_node_from_key(key)
        except (RedisError, RedisClusterException):
            return None
        if node is not None and node.name == node_name:
            return key
    return None


def _cluster_client(
    url: str, timeout_s: float, connected: Callable[[AbstractConnection], Awaitable[None]]
) -> RedisCluster:
    """A ``RedisCluster`` from seed nodes ``redis://[user:password@]host:port,...``
    (credentials from the first seed that has them)."""
    seeds = [urlsplit(seed if "://" in seed else f"redis://{seed}") for seed in url.split(",") if seed.strip()]
    if not seeds:
        raise ValueError("REDIS_URL names no seed node")
    if any(seed.scheme not in ("redis", "rediss") or not seed.hostname for seed in seeds):
        # A unix socket's seed became 127.0.0.1:6379, whatever listened there (a review).
        raise ValueError("cluster mode takes redis://host:port seeds (no unix sockets)")
    credentialed = next((seed for seed in seeds if seed.password), None)
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(seed.hostname or "127.0.0.1", seed.port or 6379) for seed in seeds],
        username=credentialed.username if credentialed else None,
        password=credentialed.password if credentialed else None,
        ssl=seeds[0].scheme == "rediss",
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # No retries (a request must not wait for them); MOVED/ASK redirects still work.
        retry=Retry(NoBackoff(), 0),
        client_name="mlgate",
    )
    # Each new connection's hook, as the standalone client's ``redis_connect_func``: the
    # async cluster takes none of its own, and makes every node's connections from
    # these arguments (the seeds' copies made already).
    cluster.connection_kwargs["redis_connect_func"] = connected
    for node in cluster.nodes_manager.startup_nodes.values():
        node.connection_kwargs["redis_connect_func"] = connected
    return cluster
