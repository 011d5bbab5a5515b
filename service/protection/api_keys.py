"""API keys: what a key looks like, how it is stored hashed, and the KeyStore that checks one.

A key reads ``mlg_<key_id>_<secret>``: the 16-hex-digit ``key_id`` names the key in
logs, audit events and the CLI; the 256-bit secret is never stored or logged. Only
``sha256(key)`` is kept (a fast hash is enough for a random 256-bit secret; there is
nothing to brute-force) and compared in constant time.

Keys belong to a tenant, carry scopes (``ingest``, ``predict``, ``admin``,
``quality``) and optionally their own rate limit. They live in a JSON keys file
(``MLGATE_KEYS_FILE``, default ``<data_dir>/keys.json``, written atomically, mode
0600) and, with ``REDIS_URL``, in the Redis hash ``mlgate:apikeys`` too, so one
``keys create --store redis`` reaches every process and host. The file is re-read
when it changes (checked once a second, or at once on SIGHUP); keys read from Redis
are trusted for ``MLGATE_KEYS_CACHE_S``, so a revocation takes effect within that.
While Redis is unreachable a key read from it is trusted ``MLGATE_KEYS_STALE_S``
longer, then refused 503 (``KeyStoreUnavailable``) until Redis answers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import msgspec
import structlog

from mlgate.config import Settings
from mlgate.service.protection.shared_redis import RedisUnavailable, SharedRedis

SCOPES = frozenset({"ingest", "predict", "admin", "quality"})
REDIS_HASH = "mlgate:apikeys"
KEY_PREFIX = "mlg_"
_KEY = re.compile(r"^mlg_([0-9a-f]{16})_[A-Za-z0-9_-]{32,}$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
FILE_CHECK_INTERVAL_S = 1.0
log = structlog.get_logger("mlgate.api_keys")
T = TypeVar("T")
MAX_CACHED_REDIS_KEYS = 10_000
# A key's own rate limit: requests a second, and its burst.
MIN_KEY_RATE, MAX_KEY_RATE, MAX_KEY_BURST = 0.001, 1e9, 10**9
MAX_KEY_BURST_READ = 10**12
MAX_KEY_NAME = 200
# Key ids Redis did not know, remembered apart from the known keys: a flood of made-up
# keys (each a 401) pushes out only other made-up ids, never a tenant's cached key,
# which is what keeps that tenant served while Redis is unavailable.
MAX_CACHED_UNKNOWN_KEYS = 10_000


class ApiKey(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A stored key: everything but the secret."""

    key_id: str
    tenant: str
    scopes: frozenset[str]
    hash: str
    created_at: str
    revoked_at: str | None = None
    # The bounds ``keys create`` holds them to, held wherever keys are read too: a keys
    # file edited to a rate of 0 made every request of the key a 500 (a review); it is
    # now a file that does not parse, and the keys read last stay in force.
    # (The burst's bound read is looser than the one created: files of older versions
    # hold larger ones, which work.)
    rate: Annotated[float, msgspec.Meta(ge=MIN_KEY_RATE, le=MAX_KEY_RATE)] | None = None
    burst: Annotated[int, msgspec.Meta(ge=1, le=MAX_KEY_BURST_READ)] | None = None
    name: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class KeysFile(msgspec.Struct, kw_only=True):
    keys: list[ApiKey] = []


# The identity requests get when MLGATE_AUTH_DISABLED=true.
ANONYMOUS = ApiKey(
    key_id="anonymous", tenant="anonymous", scopes=SCOPES, hash="", created_at="1970-01-01T00:00:00Z"
)

_file_decoder = msgspec.json.Decoder(KeysFile)
_key_decoder = msgspec.json.Decoder(ApiKey)
_encoder = msgspec.json.Encoder(order="sorted")


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def key_id_of(presented: str) -> str | None:
    """The key id of a well-formed key, else None."""
    match = _KEY.match(presented)
    return match.group(1) if match else None


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_key(
    tenant: str,
    scopes: frozenset[str],
    *,
    rate: float | None = None,
    burst: int | None = None,
    name: str | None = None,
) -> tuple[str, ApiKey]:
    """A fresh key: (the plaintext, shown once; what is stored)."""
    if not TENANT_PATTERN.match(tenant):
        raise ValueError("tenant must be 1-64 of A-Z a-z 0-9 . _ -")
    unknown = scopes - SCOPES
    if not scopes or unknown:
        raise ValueError(f"scopes must be a non-empty subset of {', '.join(sorted(SCOPES))}")
    if name is not None and not (len(name) <= MAX_KEY_NAME and name.isprintable()):
        # ``keys list`` prints it in a table: a newline forged a row (a review).
        raise ValueError(f"name must be at most {MAX_KEY_NAME} printable characters")
    if (rate is None) != (burst is None):
        raise ValueError("give both --rate and --burst, or neither")
    if rate is not None and burst is not None and not (
        MIN_KEY_RATE <= rate <= MAX_KEY_RATE and 1 <= burst <= MAX_KEY_BURST
    ):
        # ``not (...)``: NaN fails every comparison (a review: ``--rate nan`` stored a
        # key with a burst and no rate; ``1e-320`` a bucket that never refills; a burst
        # of 400 digits made every request of the key a 500).
        raise ValueError("rate must be from 0.001 to 1e9 requests a second, and burst from 1 to 1e9")
    key_id = secrets.token_hex(8)
    plaintext = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    stored = ApiKey(
        key_id=key_id,
        tenant=tenant,
        scopes=scopes,
        hash=hash_key(plaintext),
        created_at=now_rfc3339(),
        rate=rate,
        burst=burst,
        name=name,
    )
    return plaintext, stored


def keys_path(settings: Settings) -> Path:
    return Path(settings.keys_file or Path(settings.data_dir) / "keys.json")


def encode_key(key: ApiKey) -> bytes:
    return _encoder.encode(key)


def decode_key(raw: bytes | str) -> ApiKey:
    return _key_decoder.decode(raw)


class KeyFile:
    """The JSON keys file: read whole, changed under a lock, replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, ApiKey]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        return {key.key_id: key for key in _file_decoder.decode(raw).keys}

    def update(self, change: Callable[[dict[str, ApiKey]], None]) -> None:
        """Apply ``change`` to the keys and write them back; one writer at a time."""
        with self._locked():
            keys = self.load()
            change(keys)
            self._write(keys)

    def _write(self, keys: dict[str, ApiKey]) -> None:
        document = msgspec.json.format(_encoder.encode(KeysFile(keys=list(keys.values()))))
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(document + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class KeysFileError(Exception):
    """The keys file exists but is not a keys file."""


class KeyStoreUnavailable(Exception):
    """The key may live in Redis, and Redis cannot be asked: never let it in."""


class KeyStore:
    """Finds and checks presented keys: the keys file first, then Redis if configured."""

    def __init__(
        self,
        path: Path,
        redis: SharedRedis | None = None,
        cache_s: float = 5.0,
        stale_s: float = 300.0,
    ) -> None:
        self._file = KeyFile(path)
        self._redis = redis
        self._cache_s = cache_s
        self._stale_s = stale_s
        self._file_keys: dict[str, ApiKey] = {}
        self._file_stamp: tuple[int, int] | None = None
        self._file_error: str | None = None  # why the file as last read did not load
        self._checked_at = float("-inf")
        # Keys read from Redis (trusted until their deadline), least recently used first.
        self._redis_keys: OrderedDict[str, tuple[float, ApiKey]] = OrderedDict()
        self._unknown_keys: OrderedDict[str, float] = OrderedDict()  # key id -> deadline
        self.reload(strict=True)

    @property
    def path(self) -> Path:
        return self._file.path

    @property
    def file_key_count(self) -> int:
        return len(self._file_keys)

    def reload(self, *, strict: bool = False) -> None:
        """Re-read the keys file if it changed since the last read. A file that cannot be
        read raises when ``strict`` (start-up, SIGHUP: a reload that kept the old keys
        said it had succeeded, a review), the keys read last staying in force; otherwise
        it is logged."""
        self._checked_at = time.monotonic()
        try:
            stat = self._file.path.stat()
        except FileNotFoundError:
            self._file_keys, self._file_stamp, self._file_error = {}, None, None
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        # The same file as last read: unchanged, unless it failed, which a strict reload
        # reads again (a review: a second SIGHUP said reloaded while it was broken, and
        # one made readable by chmod, which changes no stamp, failed for ever).
        if stamp == self._file_stamp and not (strict and self._file_error is not None):
            return
        try:
            keys = self._file.load()
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("keys_file_unreadable", path=str(self._file.path), error=str(exc))
            self._file_stamp = stamp  # do not retry the same broken file every second
            self._file_error = f"{self._file.path}: {exc}"
            if strict:
                raise KeysFileError(self._file_error) from None
            return
        self._file_keys, self._file_stamp, self._file_error = keys, stamp, None

    async def authenticate(self, presented: str) -> ApiKey | None:
        """The key's record when ``presented`` is a known, unrevoked key; else None."""
        key_id = key_id_of(presented)
        if key_id is None:
            return None
        stored = await self._lookup(key_id)
        if stored is None or stored.revoked:
            return None
        if not hmac.compare_digest(stored.hash, hash_key(presented)):
            return None
        return stored

    def known_now(self, presented: str) -> ApiKey | None:
        """``authenticate`` from what this process already holds (the keys file, keys
        read from Redis and still trusted), never waiting: None when the key is not
        known here now, which says nothing about whether Redis knows it."""
        key_id = key_id_of(presented)
        if key_id is None:
            return None
        if time.monotonic() - self._checked_at >= FILE_CHECK_INTERVAL_S:
            self.reload()
        stored = self._file_keys.get(key_id)
        if stored is None:
            cached = self._redis_keys.get(key_id)
            if cached is None or cached[0] <= time.monotonic():
                return None
            stored = cached[1]
        if stored.revoked or not hmac.compare_digest(stored.hash, hash_key(presented)):
            return None
        return stored

    def expire_cached(self) -> None:
        """Read every key kept from Redis again at its next use (SIGHUP: an operator
        revoking a leaked key; it served ~4 s more, a review). They stay as stale
        entries, trusted as any while Redis cannot be read."""
        now = time.monotonic()
        for key_id, (deadline, stored) in self._redis_keys.items():
            self._redis_keys[key_id] = (min(deadline, now), stored)
        self._unknown_keys.clear()

    async def _lookup(self, key_id: str) -> ApiKey | None:
        if time.monotonic() - self._checked_at >= FILE_CHECK_INTERVAL_S:
            self.reload()
        found = self._file_keys.get(key_id)
        if found is not None or self._redis is None:
            return found
        return await self._lookup_redis(self._redis, key_id)

    async def _lookup_redis(self, redis: SharedRedis, key_id: str) -> ApiKey | None:
        now = time.monotonic()
        cached = self._redis_keys.get(key_id)
        if cached is not None:
            self._redis_keys.move_to_end(key_id)
            if cached[0] > now:
                return cached[1]
        elif self._unknown_keys.get(key_id, 0.0) > now:
            return None
        try:
            raw = await redis.call("api_keys", lambda: redis.client.hget(REDIS_HASH, key_id), key=REDIS_HASH)
        except RedisUnavailable:
            if cached is not None and now < cached[0] + self._stale_s:
                # Stale but known: better than locking the tenant out. For a while
                # only: a key revoked meanwhile would otherwise serve for as long as
                # this host is cut off from Redis (a review).
                return cached[1]
            raise KeyStoreUnavailable("the API key store (Redis) is unavailable") from None
        if raw is None:
            self._redis_keys.pop(key_id, None)
            _remember(self._unknown_keys, key_id, now + self._cache_s, MAX_CACHED_UNKNOWN_KEYS)
            return None
        try:
            stored = decode_key(raw)
        except msgspec.DecodeError as exc:  # ValidationError too: edited out of its bounds
            # Refused as unknown, and said: serving it would take a limit it cannot hold.
            log.error("redis_key_unreadable", key_id=key_id, error=str(exc))
            self._redis_keys.pop(key_id, None)
            _remember(self._unknown_keys, key_id, now + self._cache_s, MAX_CACHED_UNKNOWN_KEYS)
            return None
        self._unknown_keys.pop(key_id, None)
        _remember(self._redis_keys, key_id, (now + self._cache_s, stored), MAX_CACHED_REDIS_KEYS)
        return stored


def _remember(cache: OrderedDict[str, T], key_id: str, value: T, limit: int) -> None:
    """Put ``value`` as the newest entry, the oldest out when ``cache`` is full."""
    cache[key_id] = value
    cache.move_to_end(key_id)
    if len(cache) > limit:
        cache.popitem(last=False)
