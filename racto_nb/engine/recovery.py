"""Client-side recovery: rows whose worker is gone, and chunks that left no trace at all.

The worker side (:mod:`racto_nb.engine.keepalive`) hands a dead worker's
messages to a live one. Two things only the client can see:

* **A row STARTED by a worker without a heartbeat** is not running: it waits
  to run again. :func:`mark_orphans` shows it so (RETRY, ``error_type``
  ``"WorkerLost"``) instead of a plain "started" that would never move.
* **A chunk with no trace anywhere.** Between Redis's BRPOP and kombu's record
  of the message as unacknowledged there is a moment in which a SIGKILLed
  worker takes a message with it for good (measured here: about 1 in 14 kills).
  The client knows every chunk it sent: one that has no row state, no lease,
  is not held by any worker, and was sent before a chunk that has already
  been taken (the queue is first in, first out) is gone. :func:`find_vanished`
  names those; the caller sends them again with the same task id, and the
  worker that runs them skips whatever already finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from racto_nb.engine.keys import lease_key, worker_key, worker_pattern
from racto_nb.engine.store import MemoryStore, Store
from racto_nb.models import TaskResult, TaskStatus

__all__ = ["LiveWorkers", "find_vanished", "mark_orphans"]


class LiveWorkers:
    """Which worker nodes have a heartbeat, read at most every ``every_s`` seconds."""

    def __init__(self, store: Store, *, every_s: float = 2.0) -> None:
        self.store = store
        self.every_s = every_s
        self._alive: set[str] = set()
        self._read_at = float("-inf")

    @property
    def applies(self) -> bool:
        """The embedded worker writes no heartbeat: it cannot die without the kernel."""
        return not isinstance(self.store, MemoryStore)

    def alive(self, hostnames: Sequence[str]) -> set[str]:
        """Those of ``hostnames`` whose heartbeat is present."""
        if time.monotonic() - self._read_at >= self.every_s:
            wanted = sorted(set(hostnames))
            found = self.store.mget([worker_key(h) for h in wanted])
            self._alive = {h for h, value in zip(wanted, found, strict=True) if value is not None}
            self._read_at = time.monotonic()
        return self._alive

    def listing(self) -> list[dict[str, Any]]:
        """Every live worker's heartbeat record (node name, pid, queues, concurrency, started_at)."""
        keys = self.store.scan(worker_pattern())
        records = [json.loads(raw) for raw in self.store.mget(keys) if raw is not None]
        return sorted(records, key=lambda r: str(r.get("hostname")))


def mark_orphans(results: list[TaskResult], workers: LiveWorkers) -> list[TaskResult]:
    """``results`` with every row STARTED by a worker that has no heartbeat shown as waiting to run again."""
    if not workers.applies:
        return results
    hosts = [r.worker for r in results if r.status is TaskStatus.STARTED and r.worker]
    if not hosts:
        return results
    alive = workers.alive(hosts)
    marked = []
    for result in results:
        if result.status is TaskStatus.STARTED and result.worker and result.worker not in alive:
            result = result.model_copy(
                update={
                    "status": TaskStatus.RETRY,
                    "error_type": "WorkerLost",
                    "error": f"its worker {result.worker} stopped answering; it runs again on a live worker",
                }
            )
        marked.append(result)
    return marked


def find_vanished(app: Any, store: Store, candidates: Sequence[str]) -> list[str]:
    """Of ``candidates`` (chunk task ids the caller found without any row state), those no one holds.

    Held means: a runner's lease on it, or (Redis broker) an unacknowledged
    message for it in a worker's hands. The caller must have seen a chunk sent
    after each candidate already taken, so the candidate is no longer queued.
    """
    if not candidates:
        return []
    leases = store.mget([lease_key(c) for c in candidates])
    loose = [c for c, lease in zip(candidates, leases, strict=True) if lease is None]
    if not loose:
        return []
    held = _unacked_task_ids(app)
    return [c for c in loose if c not in held]


def _unacked_task_ids(app: Any) -> set[str]:
    """Task ids of every message kombu's Redis transport records as delivered and not yet acknowledged."""
    with app.connection_for_read() as connection:
        if connection.transport.driver_type != "redis":
            return set()  # AMQP tracks deliveries itself; nothing is lost between take and record
        channel = connection.default_channel
        ids: set[str] = set()
        for _tag, raw in channel.client.hscan_iter(channel.unacked_key, count=1000):
            try:
                payload = json.loads(raw)[0]
                ids.add(str(payload["headers"]["id"]))
            except (ValueError, TypeError, KeyError, IndexError):
                continue
        return ids
