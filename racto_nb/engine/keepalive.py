"""What keeps a worker's claim on its work alive, and what hands a dead worker's work to the living.

Celery acknowledges racto_nb's tasks late, so a worker killed mid-call leaves
its message unacknowledged in the broker. On RabbitMQ the broker gives it to
another worker as soon as the dead one's connection drops. On Redis, kombu
gives it back only after ``visibility_timeout`` (Celery's default: an hour)
plus its restore sweep. racto_nb does not wait for that:

* **Heartbeat.** Every live worker process writes ``racto:worker:<node>`` every
  2 s with a 6 s expiry; a client that sees a row STARTED by a node without one says
  the worker is gone and the row will run again.
* **Keep-alive.** Every ``stale_after_s / 3`` the worker renews the lease of
  each chunk it runs and, on Redis, the timestamp kombu keeps for each
  racto_nb message it holds (``unacked_index``), running or waiting in its
  pool. A live worker's message therefore never looks old, however long its
  rows take or however long a retry countdown is.
* **Sweep.** Every few seconds each worker hands back to its queue the
  racto_nb messages whose timestamp is older than ``stale_after_s`` (default
  30 s): their holder stopped renewing them, so it is dead. The restore is
  kombu's own (``restore_by_tag``, a WATCH transaction, safe when several
  workers sweep at once); messages of other tasks are left to kombu.

So with the defaults a killed worker's rows run again on a live worker about
30 to 40 s later, on racto_nb's app and on your own app with Celery's
defaults alike. The lease renewal runs in whichever process runs chunks
(threads, prefork children); the heartbeat, keep-alive and sweep run in the
process that consumes (the one that holds the messages).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from racto_nb.engine.keys import worker_key
from racto_nb.engine.store import Store, connection_errors, store_for

if TYPE_CHECKING:
    from celery import Celery

    from racto_nb.engine.runner import ChunkRunner

__all__ = ["WorkerKeeper", "forget", "watch"]

logger = logging.getLogger(__name__)

#: The sweep looks for dead workers' messages this often.
SWEEP_EVERY_S = 5.0
#: A heartbeat is written this often and lives three times as long: a dead worker is seen within seconds.
HEARTBEAT_EVERY_S = 2.0
#: racto_nb's task names; messages of other tasks are never touched.
TASK_PREFIX = "racto_nb."


# ---------------------------------------------------------------------------- leases (any process that runs chunks)

_watched: set[ChunkRunner] = set()
_watched_lock = threading.Lock()
_renewer: threading.Thread | None = None


def watch(runner: ChunkRunner) -> None:
    """Keep ``runner``'s lease alive until :func:`forget`; starts the renewal thread on first use."""
    global _renewer
    with _watched_lock:
        _watched.add(runner)
        if _renewer is None or not _renewer.is_alive() or _renewer_pid != os.getpid():
            _start_renewer()


def forget(runner: ChunkRunner) -> None:
    """Stop renewing ``runner``'s lease (it is done, or lost it)."""
    with _watched_lock:
        _watched.discard(runner)


_renewer_pid = 0


def _start_renewer() -> None:
    global _renewer, _renewer_pid
    _renewer = threading.Thread(target=_renew_forever, name="racto-lease-renewer", daemon=True)
    _renewer_pid = os.getpid()
    _renewer.start()


def _renew_forever() -> None:
    errors = connection_errors()
    while True:
        with _watched_lock:
            runners = list(_watched)
        pause = min((r.worker.stale_after_s for r in runners), default=30.0) / 3
        for runner in runners:
            try:
                if not runner.store.renew(runner.lease, runner.token, runner.worker.stale_after_s):
                    runner.lost_lease = True
            except errors:
                pass  # the backend is restarting: try again next round
        time.sleep(max(pause, 0.2))


# ---------------------------------------------------------------------------- the consuming process


class WorkerKeeper:
    """Heartbeat, keep-alive of held messages and the sweep, for one worker process of one app."""

    def __init__(self, app: Celery, hostname: str, *, stale_after_s: float, info: dict[str, Any]) -> None:
        self.app = app
        self.hostname = hostname
        self.stale_after_s = stale_after_s
        self.info = {"hostname": hostname, "pid": os.getpid(), "started_at": time.time(), **info}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"racto-keeper:{hostname}", daemon=True)
        self._store: Store | None = None
        self._connection: Any = None

    def start(self) -> WorkerKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread and delete the heartbeat: a worker that stops warm is not "gone"."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        with contextlib.suppress(Exception):  # shutting down: the heartbeat expires on its own
            self._backend_store().delete(worker_key(self.hostname))
        if self._connection is not None:
            self._connection.release()

    def _backend_store(self) -> Store:
        if self._store is None:
            self._store = store_for(self.app.backend)
        return self._store

    def _run(self) -> None:
        every = max(min(self.stale_after_s / 3, HEARTBEAT_EVERY_S), 0.2)
        next_sweep = 0.0
        while not self._stop.is_set():
            try:
                self.beat()
                self.keep_messages_alive()
                if time.monotonic() >= next_sweep:
                    self.sweep()
                    next_sweep = time.monotonic() + min(SWEEP_EVERY_S, every)
            except Exception as exc:
                logger.warning("racto_nb keep-alive: %s: %s", type(exc).__name__, exc)
                self._connection = None
            self._stop.wait(every)

    def beat(self) -> None:
        """Write this worker's heartbeat, with an expiry of three periods."""
        period = max(min(self.stale_after_s / 3, HEARTBEAT_EVERY_S), 0.2)
        self._backend_store().set(worker_key(self.hostname), json.dumps(self.info), ttl_s=3 * period)

    # -- Redis broker only -----------------------------------------------------

    def _channel(self) -> Any | None:
        """A channel of the app's broker when it is Redis (the only broker racto_nb needs to help)."""
        if self._connection is None:
            connection = self.app.connection_for_write()
            if connection.transport.driver_type != "redis":
                return None
            self._connection = connection
        return self._connection.default_channel

    def keep_messages_alive(self) -> None:
        """Refresh kombu's timestamp of every racto_nb message this process holds."""
        from celery.worker import state

        channel = self._channel()
        if channel is None:
            return
        tags = [
            request.message.delivery_tag
            for request in list(state.reserved_requests)
            if str(request.task_name).startswith(TASK_PREFIX) and request.message is not None
        ]
        if tags:
            now = time.time()
            channel.client.zadd(channel.unacked_index_key, dict.fromkeys(tags, now), xx=True)

    def sweep(self) -> int:
        """Hand back racto_nb messages whose holder stopped renewing them; returns how many."""
        channel = self._channel()
        if channel is None:
            return 0
        client = channel.client
        ceiling = time.time() - self.stale_after_s
        tags = client.zrangebyscore(channel.unacked_index_key, 0, ceiling, start=0, num=1000)
        if not tags:
            return 0
        restored = 0
        for tag, raw in zip(tags, client.hmget(channel.unacked_key, tags), strict=True):
            if raw is None:
                continue
            try:
                payload = json.loads(raw)[0]
                name = str((payload.get("headers") or {}).get("task", ""))
            except (ValueError, TypeError, IndexError, AttributeError):
                continue
            if name.startswith(TASK_PREFIX):
                channel.qos.restore_by_tag(tag, client=client)
                restored += 1
        if restored:
            logger.info("racto_nb: handed %d messages of dead workers back to their queues", restored)
        return restored

