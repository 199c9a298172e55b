"""Running one chunk on a worker: each row its own attempts, retries and result.

A chunk's rows run one after another in the pool thread that took the
message; the pool's size is how many calls a worker process has in flight.
A row that fails transiently waits for its retry in a small schedule while
the next rows run, so one ``Retry-After: 30`` never holds the rest back.

What makes a chunk safe to run again (after a worker died, or when the same
message arrives twice):

* **A lease.** One runner at a time holds ``racto:lease:<chunk>``; the worker's
  keep-alive renews it. A second delivery waits for the lease to free up (its
  holder died) or for the chunk to finish, and never runs a row twice.
* **Rows that are final are skipped.** The runner reads every row's stored
  state first: a finished row is never paid for again. A row found STARTED
  was in flight when its worker died: it runs again, counted in
  ``deliveries``, and fails as ``WorkerLost`` once that passes
  ``max_redeliveries`` (a row that kills its worker would loop forever).
* **States are written before the call** (STARTED) and after it, with retries
  while the backend is restarting; final results go out in one round trip
  for several rows.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from celery import states
from celery.exceptions import TaskRevokedError

from racto_nb.engine import keepalive
from racto_nb.engine.chunks import ChunkPayload, RowSpec
from racto_nb.engine.classify import classify
from racto_nb.engine.keys import events_key, lease_key
from racto_nb.engine.results import encode_meta, envelope, meta_key
from racto_nb.engine.store import Store, retrying, store_for
from racto_nb.errors import RetryScheduled, TaskFailed
from racto_nb.kits.base import run_chat
from racto_nb.models import ChatConfig

if TYPE_CHECKING:
    from celery import Task

    from racto_nb.engine.worker import RactoCeleryWorker

__all__ = ["EVENTS_MAXLEN", "ChunkRunner"]

#: How long the runner keeps retrying a write while the backend is down before giving the chunk up.
WRITE_BUDGET_S = 600.0
#: Final rows are written together, at least this often.
FLUSH_EVERY_S = 0.05
FLUSH_ROWS = 32
#: A cancel flag is looked at no more often than this.
FLAG_EVERY_S = 0.5
#: Stream entries a batch's event stream keeps (a follower that falls further behind rescans).
EVENTS_MAXLEN = 100_000

#: One-letter event codes, as a kernel reads them from the stream.
EVENT_CODES = {
    states.STARTED: "S",
    states.RETRY: "R",
    states.SUCCESS: "D",
    states.FAILURE: "F",
    states.REVOKED: "V",
}


@dataclass(order=True)
class _Row:
    due: float
    seq: int
    spec: RowSpec = field(compare=False)
    key: str = field(compare=False)
    attempts: int = field(default=0, compare=False)  # calls made so far
    deliveries: int = field(default=1, compare=False)  # workers the current attempt was handed to


@dataclass
class _Write:
    row: _Row
    state: str
    value: str


class ChunkRunner:
    """Runs the rows of one chunk message (see the module docstring)."""

    def __init__(self, worker: RactoCeleryWorker, task: Task, payload: ChunkPayload) -> None:
        self.worker = worker
        self.payload = payload
        self.backend = task.backend
        self.store: Store = store_for(task.backend)
        self.chunk = str(task.request.id)
        self.hostname = task.request.hostname or "unknown"
        self.token = uuid4().hex
        self.lease = lease_key(self.chunk)
        self.lost_lease = False
        self._writes: list[_Write] = []
        self._flushed_at = time.monotonic()
        self._flags_at = 0.0
        self._cancelled = False
        self._expires = float(self.backend.expires) if self.backend.expires else None

    # ------------------------------------------------------------------ the run

    def run(self) -> None:
        """Take the lease, run every row that is not final yet, write the results, let go."""
        if not self._take_lease():
            return
        try:
            rows = self._load_rows()
            self._execute(rows)
        finally:
            self._flush()
            keepalive.forget(self)
            retrying(lambda: self.store.release(self.lease, self.token), budget_s=WRITE_BUDGET_S)

    def _take_lease(self) -> bool:
        stale = self.worker.stale_after_s
        give_up = time.monotonic() + 2 * stale
        while True:
            taken = retrying(
                lambda: self.store.set(self.lease, self.token, ttl_s=stale, only_new=True), budget_s=WRITE_BUDGET_S
            )
            if taken:
                keepalive.watch(self)
                return True
            # Another runner holds it: wait for it to finish the rows, or for its lease to lapse (it died).
            if time.monotonic() >= give_up or not self._unfinished():
                return False
            time.sleep(1.0)

    def _unfinished(self) -> list[int]:
        keys = [meta_key(self.backend, row["id"]) for row in self.payload["rows"]]
        raws = retrying(lambda: self.store.mget(keys), budget_s=WRITE_BUDGET_S)
        return [i for i, raw in enumerate(raws) if raw is None or not _final(self.backend.decode_result(raw))]

    def _load_rows(self) -> list[_Row]:
        specs = self.payload["rows"]
        keys = [meta_key(self.backend, spec["id"]) for spec in specs]
        raws = retrying(lambda: self.store.mget(keys), budget_s=WRITE_BUDGET_S)
        rows: list[_Row] = []
        limit = self.worker.max_redeliveries + 1
        for seq, (spec, key, raw) in enumerate(zip(specs, keys, raws, strict=True)):
            meta = None if raw is None else self.backend.decode_result(raw)
            if meta is not None and _final(meta):
                continue  # finished by an earlier delivery: never paid for again
            row = _Row(due=0.0, seq=seq, spec=spec, key=key)
            status, value = (meta or {}).get("status"), (meta or {}).get("result")
            if status == states.STARTED and isinstance(value, dict):
                # In flight when its worker died: the same attempt again, one more delivery.
                row.attempts = int(value.get("attempt", 1)) - 1
                row.deliveries = int(value.get("deliveries", 1)) + 1
                if row.deliveries > limit:
                    self._fail_lost(row)
                    continue
            elif status == states.RETRY and isinstance(value, RetryScheduled):
                row.attempts, row.due = value.attempts, value.retry_at
            rows.append(row)
        return rows

    def _execute(self, rows: list[_Row]) -> None:
        fresh = deque(row for row in rows if row.due == 0.0)
        waiting = [row for row in rows if row.due != 0.0]
        heapq.heapify(waiting)
        while fresh or waiting:
            if self.lost_lease:
                return  # another runner owns the chunk now; it runs what is left
            if self._is_cancelled():
                for row in [*fresh, *waiting]:
                    self._buffer(row, states.REVOKED, _revoked())
                return
            now = time.time()
            if waiting and waiting[0].due <= now:
                row = heapq.heappop(waiting)
            elif fresh:
                row = fresh.popleft()
            else:
                self._flush()
                time.sleep(min(waiting[0].due - now, FLAG_EVERY_S))
                continue
            if self._attempt(row):
                heapq.heappush(waiting, row)
            if len(self._writes) >= FLUSH_ROWS or time.monotonic() - self._flushed_at >= FLUSH_EVERY_S:
                self._flush()

    def _attempt(self, row: _Row) -> bool:
        """One call for ``row``; ``True`` when it is to be retried (``row.due`` says when)."""
        retry = self.worker.retry_config
        attempt = row.attempts + 1
        error: BaseException | None = None
        output: Any = None
        with self._kit_slot():
            info = {"attempt": attempt, "deliveries": row.deliveries, "hostname": self.hostname}
            self._write_now(row, states.STARTED, encode_meta(self.backend, row.spec["id"], states.STARTED, info))
            started = time.perf_counter()
            try:
                output = self._work(row.spec)
            except Exception as exc:
                error = exc
            latency = round(time.perf_counter() - started, 6)
        spec = row.spec
        if error is None:
            result = envelope(
                output,
                attempts=attempt,
                latency_s=latency,
                custom_id=spec.get("c"),
                index=spec.get("p"),
                deliveries=row.deliveries,
                worker=self.hostname,
            )
            self._buffer(row, states.SUCCESS, result)
            return False
        verdict = classify(error)
        what = verdict.error_type + (f" (HTTP {verdict.status_code})" if verdict.status_code else "")
        what += f": {_explain(error, with_cause=verdict.status_code is None)}"
        if verdict.retryable and attempt <= retry.max_retries:
            countdown = retry.countdown(attempt - 1, verdict.retry_after_s)
            row.attempts, row.deliveries, row.due = attempt, 1, time.time() + countdown
            scheduled = RetryScheduled(
                what, verdict.error_type, verdict.status_code, attempt, retry.max_retries, row.due
            )
            self._write_now(row, states.RETRY, encode_meta(self.backend, spec["id"], states.RETRY, scheduled))
            return True
        why = f"gave up after {attempt} attempts" if verdict.retryable else "not retried"
        failure = TaskFailed(f"{what} ({why})", verdict.error_type, verdict.status_code, attempt)
        self._buffer(row, states.FAILURE, failure)
        return False

    def _work(self, spec: RowSpec) -> Any:
        if self.payload["kind"] == "ingest":
            rag = self.worker.rag
            if rag is None:
                raise TaskFailed("this worker process has no rag object configured", "RuntimeError")
            return [_chunk_dict(chunk) for chunk in rag.ingest(spec["path"], **(spec.get("meta") or {}))]
        defaults = self.payload["defaults"]
        config = ChatConfig(
            user_message=spec["m"],
            temperature=spec.get("t", defaults["temperature"]),
            max_tokens=spec.get("k", defaults["max_tokens"]),
            history=defaults.get("history") or [],
            extra=spec.get("x", defaults.get("extra") or {}),
        )
        return run_chat(self.worker.kit, config)

    def _kit_slot(self) -> AbstractContextManager[Any]:
        slot = self.worker.kit_slot
        return slot if slot is not None else nullcontext()

    def _fail_lost(self, row: _Row) -> None:
        limit = self.worker.max_redeliveries
        attempt = row.attempts + 1
        self._buffer(
            row,
            states.FAILURE,
            TaskFailed(
                f"WorkerLost: the worker running attempt {attempt} died {row.deliveries - 1} times; "
                f"not redelivered again (max_redeliveries={limit})",
                "WorkerLost",
                None,
                attempt,
            ),
        )

    # ------------------------------------------------------------------ flags

    def _is_cancelled(self) -> bool:
        flags = self.payload["flags"]
        if self._cancelled or not flags or time.monotonic() - self._flags_at < FLAG_EVERY_S:
            return self._cancelled
        self._flags_at = time.monotonic()
        found = retrying(lambda: self.store.mget(flags), budget_s=WRITE_BUDGET_S)
        self._cancelled = any(value is not None for value in found)
        return self._cancelled

    # ------------------------------------------------------------------ writing

    def _buffer(self, row: _Row, state: str, result: Any) -> None:
        self._writes.append(_Write(row, state, encode_meta(self.backend, row.spec["id"], state, result)))

    def _write_now(self, row: _Row, state: str, value: str) -> None:
        self._send([_Write(row, state, value)])

    def _flush(self) -> None:
        writes, self._writes = self._writes, []
        self._flushed_at = time.monotonic()
        if writes:
            self._send(writes)

    def _send(self, writes: list[_Write]) -> None:
        events = events_key(self.payload["batch"]) if self.payload["events"] else None

        def send() -> None:
            with self.store.batch() as batch:
                for write in writes:
                    batch.set(write.row.key, write.value, ttl_s=self._expires)
                    if write.state in states.READY_STATES:
                        batch.publish(write.row.key, write.value)  # AsyncResult.get() waits on this channel
                if events is not None:
                    entry = ",".join(f"{w.row.spec.get('p', 0)}:{EVENT_CODES[w.state]}" for w in writes)
                    batch.append(events, entry, maxlen=EVENTS_MAXLEN)
                    if self._expires:
                        batch.expire(events, self._expires)

        retrying(send, budget_s=WRITE_BUDGET_S)


def _final(meta: dict[str, Any]) -> bool:
    return meta.get("status") in states.READY_STATES


def _revoked() -> TaskRevokedError:
    return TaskRevokedError("batch cancelled")


def _chunk_dict(chunk: Any) -> Any:
    return chunk.model_dump(mode="json") if hasattr(chunk, "model_dump") else chunk


def _explain(exc: BaseException, *, with_cause: bool) -> str:
    """The message, plus the low-level cause SDKs hide behind "Connection error."."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if with_cause and cause is not None and not (str(cause) and str(cause) in text):
        detail = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        text += f" (caused by {detail})"
    return text

