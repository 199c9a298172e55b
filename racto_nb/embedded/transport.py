"""In-process broker transport and result backend for the embedded mode.

Why not kombu's ``memory://`` and Celery's ``cache+memory://`` as they are:

* kombu's memory transport polls: an idle consumer sleeps ``polling_interval``
  (1 s by default) between looks at its queues, and with late acks and a
  prefetch of one per thread it sleeps again every time the pool is full. 100
  instant tasks took seconds. Polling faster (0.01 s) trades that latency for
  a kernel that never idles. This transport instead wakes waiting consumers
  the moment a message is put, acknowledged or rejected; the poll remains
  only as a safety net.
* ``cache+memory://`` keeps results in one global LRU of 5,000 entries: a
  batch of 6,000 rows would silently lose its first results (they would look
  PENDING forever). :class:`InProcessBackend` keeps every result until the
  app is dropped.

Both are process-local, like the embedded worker they serve.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty, Queue
from time import monotonic
from typing import Any

from celery.backends.base import KeyValueStoreBackend
from kombu.transport import memory, virtual
from kombu.utils.encoding import ensure_bytes as _ensure_bytes

__all__ = ["Channel", "InProcessBackend", "SharedResults", "Transport", "interrupt_consumers"]

#: Safety-net poll while nothing is signalled (the wake-ups do the real work).
FALLBACK_POLL_S = 0.5

_changed = threading.Condition()
_generation = 0
_interrupting = 0


def _signal_change() -> None:
    global _generation
    with _changed:
        _generation += 1
        _changed.notify_all()


@contextmanager
def interrupt_consumers() -> Iterator[None]:
    """While active, ``drain_events`` returns (as a timeout) instead of waiting.

    The embedded worker stops inside this, so its consumer loop re-checks the
    shutdown flag at once instead of after its 2 s drain timeout. It has to
    last until the thread exits: Celery's loop drains once more on the way out.
    """
    global _generation, _interrupting
    with _changed:
        _interrupting += 1
        _generation += 1
        _changed.notify_all()
    try:
        yield
    finally:
        with _changed:
            _interrupting -= 1


class Channel(memory.Channel):
    """kombu's memory channel, signalling every change a waiting consumer cares about."""

    #: Own queues, apart from other ``memory://`` users in the process (e.g. Celery's test fixtures).
    queues: dict[str, Queue[Any]] = {}  # noqa: RUF012 - kombu's design: class-level, process-wide

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self._queue_for(queue)

    def _queue_for(self, queue: str) -> Queue[Any]:
        # setdefault is atomic: the client and the worker thread may both create a queue.
        return self.queues.setdefault(queue, Queue())

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        super()._put(queue, message, **kwargs)  # type: ignore[no-untyped-call]
        _signal_change()

    def _put_fanout(self, exchange: str, message: Any, routing_key: str | None = None, **kwargs: Any) -> None:
        super()._put_fanout(exchange, message, routing_key, **kwargs)  # type: ignore[no-untyped-call]
        _signal_change()

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        # A freed prefetch slot is what a full thread pool is waiting for.
        super().basic_ack(delivery_tag, multiple)  # type: ignore[no-untyped-call]
        _signal_change()

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue)  # type: ignore[no-untyped-call]
        _signal_change()


class Transport(memory.Transport):
    """Memory transport whose ``drain_events`` waits on a condition instead of sleeping."""

    Channel = Channel
    global_state = virtual.BrokerState()  # type: ignore[no-untyped-call]
    polling_interval = FALLBACK_POLL_S
    driver_type = "memory"
    driver_name = "racto-memory"

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:  # type: ignore[override]
        start = monotonic()
        while True:
            with _changed:
                seen = _generation
            try:
                self.cycle.get(self._deliver, timeout=timeout)  # type: ignore[union-attr]
                return
            except Empty:
                pass
            remaining = None if timeout is None else timeout - (monotonic() - start)
            if _interrupting or (remaining is not None and remaining <= 0):
                raise TimeoutError()  # socket.timeout: what kombu's callers catch
            wait = self.polling_interval if remaining is None else min(self.polling_interval, remaining)
            with _changed:
                if _generation == seen:
                    _changed.wait(wait)


def ensure_bytes(key: Any) -> bytes:
    """Keys as bytes: Celery's task keys are bytes, racto_nb's batch keys are str."""
    return key if isinstance(key, bytes) else bytes(_ensure_bytes(key))  # type: ignore[no-untyped-call]


class SharedResults:
    """One app's in-process results: the dict, its lock, and what is built on them (the racto store)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[bytes, Any] = {}
        self.extras: dict[str, Any] = {}


class InProcessBackend(KeyValueStoreBackend):  # type: ignore[misc]
    """Results in a dict shared by every thread of the app, unbounded, never expiring.

    Celery creates one backend object per thread (``app.backend`` is
    thread-local), so the dict hangs off the app, not the backend object:
    the worker's pool threads and the notebook then see the same results.
    """

    supports_native_join = False
    #: One object for all threads (the store is shared and locked anyway).
    thread_safe = True

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(app, *args, **kwargs)
        #: Shared by every backend object of this app (see :class:`SharedResults`).
        self.shared: SharedResults = app.__dict__.setdefault("_racto_in_process_results", SharedResults())

    def get(self, key: Any) -> Any:
        return self.shared.data.get(ensure_bytes(key))

    def mget(self, keys: Any) -> list[Any]:
        data = self.shared.data
        return [data.get(ensure_bytes(key)) for key in keys]

    def set(self, key: Any, value: Any) -> None:
        with self.shared.lock:
            self.shared.data[ensure_bytes(key)] = value

    def delete(self, key: Any) -> None:
        with self.shared.lock:
            self.shared.data.pop(ensure_bytes(key), None)

    def incr(self, key: Any) -> int:
        with self.shared.lock:
            value = int(self.shared.data.get(ensure_bytes(key)) or 0) + 1
            self.shared.data[ensure_bytes(key)] = value
            return value

    def expire(self, key: Any, value: Any) -> None:
        """Results live as long as the app: a kernel session, not days."""

    def as_uri(self, *args: Any, **kwargs: Any) -> str:
        return "in-process://"
