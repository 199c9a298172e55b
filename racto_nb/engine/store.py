"""The few operations racto_nb needs from the result backend, for Redis and for the in-process store.

Celery's result backend stores one value per task. A batch needs a little
more: a lease that only its holder may renew, a stream of row events a kernel
can follow from where it stopped, a hash of publishing progress, and writes
grouped into one round trip. :class:`Store` names exactly those; Redis gets
them from redis-py (pipelines, ``SET NX PX``, streams, two short Lua scripts),
the embedded mode from a dict under a lock. Nothing above this module knows
which one it talks to.

Values are what Celery's backend encodes (JSON text); keys are ``str``.
Every call is one round trip (a batch of writes included), so a caller can
wrap any of them in :func:`retrying` when the backend may be restarting.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from celery.backends.base import BaseKeyValueStoreBackend

from racto_nb.config import env_name, mask_url
from racto_nb.errors import BrokerUnreachable, Unsupported

__all__ = ["Batch", "MemoryStore", "RedisStore", "Store", "connection_errors", "retrying", "store_for"]

T = TypeVar("T")

#: Longest pause between two reconnect attempts.
MAX_BACKOFF_S = 5.0


class Batch(Protocol):
    """Writes collected and sent in one round trip (a pipeline on Redis)."""

    def set(self, key: str, value: str | bytes, *, ttl_s: float | None = None, only_new: bool = False) -> None: ...

    def publish(self, channel: str, value: str | bytes) -> None: ...

    def append(self, stream: str, entry: str, *, maxlen: int) -> None: ...

    def expire(self, key: str, ttl_s: float) -> None: ...

    def delete(self, key: str) -> None: ...

    def hset(self, key: str, field: str, value: str) -> None: ...


class Store(Protocol):
    """Key-value operations on the result backend; see the module docstring."""

    def get(self, key: str) -> bytes | None: ...

    def mget(self, keys: Sequence[str]) -> list[bytes | None]: ...

    def set(self, key: str, value: str | bytes, *, ttl_s: float | None = None, only_new: bool = False) -> bool:
        """Store ``value``; with ``only_new``, only where nothing is stored yet (returns whether it was)."""

    def delete(self, *keys: str) -> None: ...

    def incr(self, key: str, *, ttl_s: float) -> int:
        """Add one to the counter at ``key`` (which lives ``ttl_s`` from now) and return it."""

    def exists(self, key: str) -> bool: ...

    def hgetall(self, key: str) -> dict[str, str]: ...

    def hdel(self, key: str, *fields: str) -> None: ...

    def renew(self, key: str, token: str, ttl_s: float) -> bool:
        """Extend ``key``'s expiry if it still holds ``token`` (a lease its holder keeps alive)."""

    def release(self, key: str, token: str) -> None:
        """Delete ``key`` if it still holds ``token``."""

    def read(self, stream: str, after: str, count: int) -> list[tuple[str, str]]:
        """Up to ``count`` stream entries after id ``after`` (``"0"``: from the start), oldest first."""

    def first_id(self, stream: str) -> str | None:
        """The oldest entry still in the stream (to tell whether a reader fell behind a trim)."""

    def scan(self, pattern: str) -> list[str]: ...

    @contextmanager
    def batch(self) -> Iterator[Batch]: ...


def store_for(backend: Any) -> Store:
    """The store behind a Celery result backend: Redis, or the embedded in-process one."""
    from racto_nb.embedded.transport import InProcessBackend

    if isinstance(backend, InProcessBackend):
        return MemoryStore.of(backend)
    try:
        from celery.backends.redis import RedisBackend
    except ImportError:  # pragma: no cover - redis is a dependency
        RedisBackend = ()
    if isinstance(backend, RedisBackend):
        return RedisStore(backend.client)
    kind = type(backend).__name__
    hint = "" if isinstance(backend, BaseKeyValueStoreBackend) else " (it is not a key-value store)"
    raise Unsupported(
        f"racto_nb needs a Redis result backend (or the embedded one); this app uses {kind}{hint}: "
        "set the app's result_backend to a redis:// URL"
    )


def connection_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the backend is not answering right now", not "the request was wrong"."""
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ConnectionError, TimeoutError)


def broker_unreachable_message(url: str | None, reason: str, what: str = "broker") -> str:
    """What went wrong and how to fix it, with the URL's password masked (``what``: broker or result backend)."""
    return (
        f"cannot reach the {what} at {mask_url(url)}: {reason.rstrip('.')}. Start it (Redis: `redis-server`, or "
        "`redis-server --daemonize yes`), or pass another URL: racto_nb.connect('redis://HOST:6379/0'). "
        f"To run without a broker, unset {env_name('broker_url')} and call racto_nb.connect()"
    )


def backend_unreachable(app: Any, exc: BaseException) -> BrokerUnreachable:
    """The one-line error for a result backend that did not answer (raise it ``from None``)."""
    url = str(app.conf.result_backend or app.conf.broker_url)
    return BrokerUnreachable(broker_unreachable_message(url, str(exc) or type(exc).__name__, "result backend"))


def retrying(
    fn: Callable[[], T],
    *,
    budget_s: float,
    on_retry: Callable[[int, float, BaseException], None] | None = None,
    stop: threading.Event | None = None,
) -> T:
    """``fn()``, tried again with a growing pause (up to 5 s) while the backend is unreachable.

    Gives up after ``budget_s`` (re-raising the last error) or when ``stop`` is
    set; ``on_retry(attempt, pause_s, error)`` lets the caller say what it is
    doing. Errors other than connection errors are raised at once.
    """
    errors = connection_errors()
    deadline = time.monotonic() + budget_s
    attempt = 0
    pause = 0.2
    while True:
        try:
            return fn()
        except errors as exc:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                raise
            wait = min(pause, left)
            if on_retry is not None:
                on_retry(attempt, wait, exc)
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)
            pause = min(pause * 2, MAX_BACKOFF_S)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# ---------------------------------------------------------------------------- Redis

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class _RedisBatch:
    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def set(self, key: str, value: str | bytes, *, ttl_s: float | None = None, only_new: bool = False) -> None:
        self.pipe.set(key, value, px=None if ttl_s is None else int(ttl_s * 1000), nx=only_new)

    def publish(self, channel: str, value: str | bytes) -> None:
        self.pipe.publish(channel, value)

    def append(self, stream: str, entry: str, *, maxlen: int) -> None:
        self.pipe.xadd(stream, {"e": entry}, maxlen=maxlen, approximate=True)

    def expire(self, key: str, ttl_s: float) -> None:
        self.pipe.pexpire(key, int(ttl_s * 1000))

    def delete(self, key: str) -> None:
        self.pipe.delete(key)

    def hset(self, key: str, field: str, value: str) -> None:
        self.pipe.hset(key, field, value)


class RedisStore:
    """:class:`Store` over a redis-py client (the result backend's own)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self.client.get(key)
        return value

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return list(self.client.mget(keys)) if keys else []

    def set(self, key: str, value: str | bytes, *, ttl_s: float | None = None, only_new: bool = False) -> bool:
        px = None if ttl_s is None else int(ttl_s * 1000)
        return bool(self.client.set(key, value, px=px, nx=only_new))

    def delete(self, *keys: str) -> None:
        if keys:
            self.client.delete(*keys)

    def incr(self, key: str, *, ttl_s: float) -> int:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.pexpire(key, int(ttl_s * 1000))
            count, _ = pipe.execute()
        return int(count)

    def exists(self, key: str) -> bool:
        return bool(self.client.exists(key))

    def hgetall(self, key: str) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in self.client.hgetall(key).items()}

    def hdel(self, key: str, *fields: str) -> None:
        if fields:
            self.client.hdel(key, *fields)

    def renew(self, key: str, token: str, ttl_s: float) -> bool:
        return bool(self._renew(keys=[key], args=[token, int(ttl_s * 1000)]))

    def release(self, key: str, token: str) -> None:
        self._release(keys=[key], args=[token])

    def read(self, stream: str, after: str, count: int) -> list[tuple[str, str]]:
        entries = self.client.xrange(stream, min=f"({after}" if after != "0" else "-", count=count)
        return [(_text(entry_id), _text(fields[b"e"])) for entry_id, fields in entries]

    def first_id(self, stream: str) -> str | None:
        entries = self.client.xrange(stream, count=1)
        return _text(entries[0][0]) if entries else None

    def scan(self, pattern: str) -> list[str]:
        return [_text(key) for key in self.client.scan_iter(match=pattern, count=1000)]

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        with self.client.pipeline(transaction=False) as pipe:
            yield _RedisBatch(pipe)
            pipe.execute()


# ---------------------------------------------------------------------------- in-process


class MemoryStore:
    """:class:`Store` over the embedded backend's dict: the same operations under one lock.

    Expiry is honoured (leases depend on it) and checked when a key is read.
    Streams are lists of ``(id, entry)`` with ids ``<n>-0`` as Redis writes them.
    """

    def __init__(self, data: dict[bytes, Any], lock: threading.Lock) -> None:
        self._data = data
        self._lock = lock
        self._expiry: dict[bytes, float] = {}
        self._seq = 0

    @classmethod
    def of(cls, backend: Any) -> MemoryStore:
        """The one store of an in-process backend (shared by every thread of its app)."""
        shared = backend.shared
        with shared.lock:
            store: MemoryStore | None = shared.extras.get("store")
            if store is None:
                store = cls(shared.data, shared.lock)
                shared.extras["store"] = store
        return store

    def _live(self, key: bytes) -> bool:
        deadline = self._expiry.get(key)
        if deadline is not None and time.monotonic() >= deadline:
            self._data.pop(key, None)
            self._expiry.pop(key, None)
            return False
        return key in self._data

    def _put(self, key: str, value: Any, ttl_s: float | None) -> None:
        raw = key.encode()
        self._data[raw] = value
        if ttl_s is None:
            self._expiry.pop(raw, None)
        else:
            self._expiry[raw] = time.monotonic() + ttl_s

    def get(self, key: str) -> bytes | None:
        with self._lock:
            raw = key.encode()
            value = self._data.get(raw) if self._live(raw) else None
            return value.encode() if isinstance(value, str) else value

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.get(key) for key in keys]

    def set(self, key: str, value: str | bytes, *, ttl_s: float | None = None, only_new: bool = False) -> bool:
        with self._lock:
            if only_new and self._live(key.encode()):
                return False
            self._put(key, value, ttl_s)
            return True

    def delete(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._data.pop(key.encode(), None)
                self._expiry.pop(key.encode(), None)

    def incr(self, key: str, *, ttl_s: float) -> int:
        with self._lock:
            count = int(self._data.get(key.encode()) or 0) + 1 if self._live(key.encode()) else 1
            self._put(key, str(count).encode(), ttl_s)
            return count

    def exists(self, key: str) -> bool:
        with self._lock:
            return self._live(key.encode())

    def hgetall(self, key: str) -> dict[str, str]:
        with self._lock:
            raw = key.encode()
            return dict(self._data.get(raw) or {}) if self._live(raw) else {}

    def hdel(self, key: str, *fields: str) -> None:
        with self._lock:
            table = self._data.get(key.encode())
            if isinstance(table, dict):
                for field in fields:
                    table.pop(field, None)

    def renew(self, key: str, token: str, ttl_s: float) -> bool:
        with self._lock:
            raw = key.encode()
            if not self._live(raw) or _text(self._data[raw]) != token:
                return False
            self._expiry[raw] = time.monotonic() + ttl_s
            return True

    def release(self, key: str, token: str) -> None:
        with self._lock:
            raw = key.encode()
            if self._live(raw) and _text(self._data[raw]) == token:
                self._data.pop(raw, None)
                self._expiry.pop(raw, None)

    def read(self, stream: str, after: str, count: int) -> list[tuple[str, str]]:
        with self._lock:
            entries: list[tuple[str, str]] = list(self._data.get(stream.encode()) or [])
        floor = _seq_of(after)
        return [(entry_id, entry) for entry_id, entry in entries if _seq_of(entry_id) > floor][:count]

    def first_id(self, stream: str) -> str | None:
        with self._lock:
            entries = self._data.get(stream.encode()) or []
            return entries[0][0] if entries else None

    def scan(self, pattern: str) -> list[str]:
        with self._lock:
            keys = [key.decode() for key in list(self._data) if self._live(key)]
        return [key for key in keys if fnmatch.fnmatchcase(key, pattern)]

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        ops: list[Callable[[], None]] = []
        yield _MemoryBatch(self, ops)
        with self._lock:
            for op in ops:
                op()

    # Called under the lock by _MemoryBatch's queued operations.
    def _append(self, stream: str, entry: str, maxlen: int) -> None:
        self._seq += 1
        entries = self._data.setdefault(stream.encode(), [])
        entries.append((f"{self._seq}-0", entry))
        if len(entries) > maxlen:
            del entries[: len(entries) - maxlen]

    def _hset(self, key: str, field: str, value: str) -> None:
        self._data.setdefault(key.encode(), {})[field] = value


def _seq_of(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0]) if entry_id not in ("0", "") else 0


class _MemoryBatch:
    def __init__(self, store: MemoryStore, ops: list[Callable[[], None]]) -> None:
        self._store = store
        self._ops = ops

    def set(self, key: str, value: str | bytes, *, ttl_s: float | None = None, only_new: bool = False) -> None:
        def op() -> None:
            if not (only_new and self._store._live(key.encode())):
                self._store._put(key, value, ttl_s)

        self._ops.append(op)

    def publish(self, channel: str, value: str | bytes) -> None:
        """Nobody subscribes in-process: readers look the value up."""

    def append(self, stream: str, entry: str, *, maxlen: int) -> None:
        self._ops.append(lambda: self._store._append(stream, entry, maxlen))

    def expire(self, key: str, ttl_s: float) -> None:
        def op() -> None:
            raw = key.encode()
            if raw in self._store._data:
                self._store._expiry[raw] = time.monotonic() + ttl_s

        self._ops.append(op)

    def delete(self, key: str) -> None:
        def op() -> None:
            self._store._data.pop(key.encode(), None)
            self._store._expiry.pop(key.encode(), None)

        self._ops.append(op)

    def hset(self, key: str, field: str, value: str) -> None:
        self._ops.append(lambda: self._store._hset(key, field, value))
