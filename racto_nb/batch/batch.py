"""A batch: one task per row, tracked until every row is final, never losing one.

``Batch`` owns the bookkeeping a notebook needs around the engine:

* a manifest (task ids, payloads, the source index) saved in the result
  backend *before* the first message is sent, so a restarted kernel can
  rebuild the same DataFrame with :meth:`Batch.attach`;
* publishing in a background thread, so 10,000 rows return control at once
  (``group().apply_async()`` costs about 1 ms a task and blocks the cell);
* refreshes that read only the unfinished tasks, in chunked MGETs, and decode
  only the values that changed since the last look;
* cancel (a flag the tasks check, plus REVOKED marks for waiting tasks) and
  retry-failed (new tasks for the failed rows, in the same result).

Rows the template skipped (missing values) are part of the result, with status
``skipped``, but not of the progress: they are not tasks.

Views never call Celery: they receive the ``BatchProgress`` that
:meth:`Batch.refresh` computes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
from celery.backends.base import BaseKeyValueStoreBackend
from celery.utils import uuid

from racto_nb.batch.store import index_from_json, index_to_json, mark_revoked
from racto_nb.engine.polling import poll
from racto_nb.engine.publish import publish_many
from racto_nb.engine.results import ResultReader, cancel_key, manifest_key
from racto_nb.errors import BatchNotFound, InvalidArgument, TaskFailed, Unsupported
from racto_nb.models import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, BatchItem, BatchProgress, TaskResult, TaskStatus

if TYPE_CHECKING:
    from racto_nb.engine.worker import RactoCeleryWorker

#: ``error_type`` of rows that were never sent (their frame status is ``skipped``).
SKIPPED_ERROR_TYPE = "NotSent"
SKIPPED_STATUS = "skipped"
#: Messages per publish call; cancel stops the publisher between two chunks.
PUBLISH_CHUNK = 500
#: How long rows marked REVOKED by cancel() keep being read. A task that checked the cancel
#: flag just before it was set may write STARTED over the mark a moment later and run; reading
#: those rows again until this window closes reports what really happened, not the mark.
RECHECK_S = 1.0
#: Pause between setting the cancel flag and marking waiting tasks REVOKED, so a task that read
#: the flag a moment before it was set has written STARTED (and is left alone) by then.
CANCEL_GRACE_S = 0.05
MANIFEST_VERSION = 1
FRAME_COLUMNS = [
    "task_id",
    "status",
    "content",
    "parsed",
    "error",
    "error_type",
    "status_code",
    "attempts",
    "latency_s",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "custom_id",
]


class Batch:
    """A submitted batch and its live state. Thread-safe.

    Build one with :meth:`submit` or :meth:`attach`; read it with
    :meth:`refresh`, :meth:`wait`, :meth:`results` and :meth:`to_frame`.
    """

    def __init__(
        self,
        worker: RactoCeleryWorker,
        *,
        batch_id: str,
        index: pd.Index,
        task_ids: list[str | None],
        payloads: list[dict[str, Any] | None],
        reasons: list[str | None],
        created_at: float,
        groups: list[str] | None = None,
    ) -> None:
        self.worker = worker
        self.batch_id = batch_id
        self.index = index
        self.task_ids = task_ids
        self.payloads = payloads
        self.reasons = reasons
        self.created_at = created_at
        #: Group ids of the publishing rounds: the batch id, then one per retry-failed.
        self.groups = groups or [batch_id]
        self.cancelled = False
        self.publish_error: BaseException | None = None
        self._sent = [position for position, task_id in enumerate(task_ids) if task_id is not None]
        self._results: list[TaskResult | None] = [None] * len(task_ids)
        self._reader = ResultReader(_kv_backend(worker))
        self._lock = threading.RLock()
        self._publishers: list[threading.Thread] = []
        self._stop_publishing = threading.Event()
        self._submitted = 0
        self._finished_at: float | None = None
        # Rows cancel() marked REVOKED, re-read for a moment: see RECHECK_S.
        self._recheck: set[int] = set()
        self._recheck_until = 0.0
        for position, reason in enumerate(reasons):
            if task_ids[position] is None:
                self._results[position] = TaskResult(
                    task_id="",
                    status=TaskStatus.FAILURE,
                    error=reason or "no prompt for this row; row not sent",
                    error_type=SKIPPED_ERROR_TYPE,
                    index=position,
                )

    def __repr__(self) -> str:
        return f"<Batch {self.batch_id} rows={len(self.task_ids)} tasks={len(self._sent)}>"

    # ------------------------------------------------------------------ creation

    @classmethod
    def submit(
        cls,
        worker: RactoCeleryWorker,
        prompts: Sequence[str | BatchItem | None],
        *,
        index: pd.Index | None = None,
        reasons: Sequence[str | None] | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        background: bool = True,
    ) -> Batch:
        """Validate every prompt, save the manifest, then publish.

        ``prompts[i] is None`` marks a row that is not sent; ``reasons[i]``
        says why (it becomes the row's error). Nothing is enqueued when any
        prompt is invalid. With ``background=True`` the messages go out from a
        daemon thread and this returns once the manifest is saved.
        """
        if len(prompts) == 0:
            raise InvalidArgument("nothing to send: the batch has no rows")
        index = pd.RangeIndex(len(prompts)) if index is None else index
        if len(index) != len(prompts):
            raise InvalidArgument(f"index has {len(index)} entries for {len(prompts)} prompts")
        _require_storable(index)
        given = list(reasons) if reasons is not None else [None] * len(prompts)
        if len(given) != len(prompts):
            raise InvalidArgument(f"reasons has {len(given)} entries for {len(prompts)} prompts")
        reasons = [
            None if p is not None else (r or "no prompt for this row; row not sent")
            for p, r in zip(prompts, given, strict=True)
        ]
        sendable = [p for p in prompts if p is not None]
        if not sendable:
            raise InvalidArgument(f"nothing to send: no row has a prompt ({reasons[0]})")
        checked = iter(worker.batch_payloads(sendable, temperature=temperature, max_tokens=max_tokens))
        payloads: list[dict[str, Any] | None] = []
        for position, prompt in enumerate(prompts):
            payload = next(checked) if prompt is not None else None
            if payload is not None:
                payload["index"] = position
            payloads.append(payload)
        batch = cls(
            worker,
            batch_id=uuid(),
            index=index,
            task_ids=[uuid() if p is not None else None for p in payloads],
            payloads=payloads,
            reasons=reasons,
            created_at=time.time(),
        )
        batch.save()
        batch._publish(batch._sent, group_id=batch.batch_id, background=background)
        return batch

    @classmethod
    def attach(cls, worker: RactoCeleryWorker, batch_id: str) -> Batch:
        """Rebuild a batch from its manifest, e.g. after a kernel restart.

        Works while the batch is still running; results come from the backend.
        """
        backend = _kv_backend(worker)
        raw = backend.get(manifest_key(batch_id))
        if raw is None:
            raise BatchNotFound(
                f"no batch {batch_id!r} in the result backend: check the id, and that this kernel is "
                "connected to the same result backend (results expire after the app's result_expires)"
            )
        data = json.loads(raw)
        owner = data.get("worker", worker.name)
        if owner != worker.name:
            raise BatchNotFound(
                f"batch {batch_id!r} was submitted through the worker named {owner!r}, not {worker.name!r}; "
                f"attach with that worker (its retries must run the same kit)"
            )
        batch = cls(
            worker,
            batch_id=batch_id,
            index=index_from_json(data["index"]),
            task_ids=data["task_ids"],
            payloads=data["payloads"],
            reasons=data["reasons"],
            created_at=data["created_at"],
            groups=data.get("groups"),
        )
        batch._submitted = len(batch._sent)
        batch.cancelled = backend.get(cancel_key(batch.groups[-1])) is not None
        return batch

    def save(self) -> None:
        """Write the manifest to the result backend (same expiry as results)."""
        manifest = {
            "version": MANIFEST_VERSION,
            "worker": self.worker.name,
            "task_ids": self.task_ids,
            "payloads": self.payloads,
            "reasons": self.reasons,
            "index": index_to_json(self.index),
            "created_at": self.created_at,
            "groups": self.groups,
        }
        _kv_backend(self.worker).set(manifest_key(self.batch_id), json.dumps(manifest))

    # ------------------------------------------------------------------ publishing

    def _publish(self, positions: Sequence[int], *, group_id: str, background: bool) -> None:
        task_ids = [self.task_ids[p] or "" for p in positions]
        payloads = [self.payloads[p] for p in positions]

        def send() -> None:
            sent = 0
            try:
                for start in range(0, len(task_ids), PUBLISH_CHUNK):
                    if self._stop_publishing.is_set():
                        break  # cancel() marks the rest REVOKED once this thread is done
                    chunk = slice(start, start + PUBLISH_CHUNK)
                    # One chunk is one pipelined write on Redis: it is in the broker, or none of it is.
                    publish_many(
                        self.worker.app,
                        self.worker.generate_task,
                        [(p,) for p in payloads[chunk]],
                        task_ids[chunk],
                        group_id=group_id,
                        chunk_size=PUBLISH_CHUNK,
                    )
                    done = min(start + PUBLISH_CHUNK, len(task_ids))
                    with self._lock:
                        self._submitted += done - sent
                    sent = done
            except Exception as exc:  # broker gone mid-way: say so for every unsent row
                self.publish_error = exc
                self._mark_unsent(positions[sent:], exc)

        if not background:
            send()
            return
        thread = threading.Thread(target=send, name=f"racto-publish-{self.batch_id[:8]}", daemon=True)
        with self._lock:
            self._publishers = [t for t in self._publishers if t.is_alive()] + [thread]
        thread.start()

    def _mark_unsent(self, positions: Sequence[int], exc: BaseException) -> None:
        """Fail the rows that never reached the broker, here and (if it answers) in the backend.

        Set in memory first: with the backend down too, the rows would
        otherwise read PENDING forever; as failures the batch ends and
        "Retry failed" can send them again.
        """
        message = f"not submitted: the broker failed ({exc}); retry the failed rows"
        with self._lock:
            for position in positions:
                self._results[position] = TaskResult(
                    task_id=self.task_ids[position] or "",
                    status=TaskStatus.FAILURE,
                    error=message,
                    error_type="SubmitError",
                    index=position,
                    custom_id=(self.payloads[position] or {}).get("custom_id"),
                )
        failure = TaskFailed(message, "SubmitError")
        backend = self.worker.app.backend
        for position in positions:
            try:
                backend.store_result(self.task_ids[position], failure, "FAILURE")
            except Exception:  # the backend is down too: the in-memory failures stand
                break

    def join_publisher(self, timeout_s: float | None = None) -> bool:
        """Wait until every message has been handed to the broker; ``False`` if still sending."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in list(self._publishers):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._publishers)

    # ------------------------------------------------------------------ state

    @property
    def total(self) -> int:
        """Tasks in the batch: rows that were sent (skipped rows are not tasks)."""
        return len(self._sent)

    @property
    def finished(self) -> bool:
        """Every task is final, as of the last refresh."""
        with self._lock:
            return all(self._is_final(p) for p in self._sent) and not self._recheck

    def _is_final(self, position: int) -> bool:
        return self._status(position).is_final

    def _status(self, position: int) -> TaskStatus:
        result = self._results[position]
        return TaskStatus.PENDING if result is None else result.status

    def refresh(self) -> BatchProgress:
        """Read the unfinished tasks' states (one MGET per chunk) and summarise.

        Only values that changed since the last refresh are decoded (see
        :class:`~racto_nb.engine.results.ResultReader`), so a refresh of 10,000
        waiting tasks costs a few MGETs and no JSON parsing.
        """
        with self._lock:
            recheck = set(self._recheck)
            if recheck and time.monotonic() >= self._recheck_until:
                self._recheck.clear()  # this read is their last
            positions = [p for p in self._sent if not self._is_final(p) or p in recheck]
            task_ids = [self.task_ids[p] or "" for p in positions]
            for position, result in zip(positions, self._reader.read(task_ids), strict=True):
                result.index = position
                result.custom_id = (self.payloads[position] or {}).get("custom_id")
                self._results[position] = result
            self._reader.forget([t for p, t in zip(positions, task_ids, strict=True) if self._is_final(p)])
            return self._progress()

    def _progress(self) -> BatchProgress:
        counts = dict.fromkeys(TaskStatus, 0)
        for position in self._sent:
            result = self._results[position]
            counts[result.status if result is not None else TaskStatus.PENDING] += 1
        total = len(self._sent)
        done = sum(n for status, n in counts.items() if status.is_final)
        finished = done == total and not self._recheck
        now = time.time()
        if finished and self._finished_at is None:
            self._finished_at = now
        end = self._finished_at if finished and self._finished_at is not None else now
        elapsed = max(0.0, end - self.created_at)
        rate = done / elapsed if elapsed > 0 and done else None
        eta = (total - done) / rate if rate else None
        return BatchProgress(
            batch_id=self.batch_id,
            total=total,
            counts=counts,
            elapsed_s=elapsed,
            rate_per_s=rate,
            eta_s=eta,
            finished=finished,
            cancelled=self.cancelled,
            submitted=min(self._submitted, total),
        )

    def wait(
        self,
        *,
        timeout_s: float | None = None,
        interval_s: float = 0.2,
        on_progress: Callable[[BatchProgress], None] | None = None,
        stop: threading.Event | None = None,
    ) -> BatchProgress:
        """Refresh until every task is final, ``timeout_s`` passes or ``stop`` is set.

        The shared poll loop (:func:`~racto_nb.engine.polling.poll`) paces the
        refreshes: at most every ``interval_s``, and never more often than three
        times the cost of one, so following a huge batch never eats the kernel's CPU.
        """

        def look() -> BatchProgress:
            progress = self.refresh()
            if on_progress is not None:
                on_progress(progress)
            return progress

        progress, _ = poll(look, lambda p: p.finished, timeout_s=timeout_s, stop=stop, max_pause_s=interval_s)
        return progress

    def results(self) -> list[TaskResult]:
        """One ``TaskResult`` per row, in row order, as of the last refresh.

        Skipped rows are ``FAILURE`` with ``error_type="NotSent"`` here and
        ``skipped`` in :meth:`to_frame`.
        """
        with self._lock:
            return [
                (
                    r.model_copy()
                    if r is not None
                    else TaskResult(task_id=t or "", status=TaskStatus.PENDING, index=i)
                )
                for i, (r, t) in enumerate(zip(self._results, self.task_ids, strict=True))
            ]

    def to_frame(self) -> pd.DataFrame:
        """The results as a DataFrame indexed like the source, one row per row.

        ``frame.attrs["racto_batch_id"]`` names the batch, so a frame is enough to reattach.
        """
        frame = results_frame(self.results(), self.index)
        frame.attrs["racto_batch_id"] = self.batch_id
        return frame

    # ------------------------------------------------------------------ control

    def cancel(self) -> int:
        """Stop what has not started: returns how many tasks are now revoked.

        A flag in the result backend tells every task of this batch not to
        start (it scales past Celery's in-memory revoke list and reaches tasks
        waiting in a retry countdown); the publisher stops; waiting tasks are
        marked REVOKED now so the view shows it at once. Running calls finish:
        the threads pool cannot interrupt them.
        """
        backend = _kv_backend(self.worker)
        self.refresh()
        with self._lock:
            before = {p for p in self._sent if self._status(p) is TaskStatus.REVOKED}
        for group in self.groups:
            backend.set(cancel_key(group), "1")
        self.cancelled = True
        self._stop_publishing.set()
        self.join_publisher(timeout_s=30.0)
        time.sleep(CANCEL_GRACE_S)
        with self._lock:
            self.refresh()
            waiting = [p for p in self._sent if self._status(p) in (TaskStatus.PENDING, TaskStatus.RETRY)]
            mark_revoked(backend, [self.task_ids[p] or "" for p in waiting], reason="batch cancelled")
            self._recheck.update(waiting)
            self._recheck_until = time.monotonic() + RECHECK_S
            self.refresh()
            # Counted from the backend: a worker that met the flag first marked its task itself.
            return sum(1 for p in self._sent if self._status(p) is TaskStatus.REVOKED and p not in before)

    def retry_failed(self, *, background: bool = True) -> int:
        """Resubmit the rows that failed as new tasks in this same batch.

        Skipped rows and revoked rows stay as they are. The new tasks form a
        new publishing round (group) so the cancel flag of an earlier round
        keeps its revoked tasks from ever starting. Returns how many rows were
        resubmitted.
        """
        with self._lock:
            positions = [p for p in self._sent if self._status(p) is TaskStatus.FAILURE]
            if not positions:
                return 0
            self._recheck.difference_update(positions)
            for position in positions:
                self.task_ids[position] = uuid()
                self._results[position] = None
            group_id = f"{self.batch_id}.r{len(self.groups)}"
            self.groups.append(group_id)
            self.cancelled = False
            self._finished_at = None
            self._submitted -= len(positions)
            self._stop_publishing.clear()
        self.save()
        self._publish(positions, group_id=group_id, background=background)
        return len(positions)


def results_frame(results: Sequence[TaskResult], index: pd.Index) -> pd.DataFrame:
    """DataFrame of ``TaskResult`` rows (see ``FRAME_COLUMNS``) on ``index``."""
    rows = []
    for result in results:
        response = result.result if isinstance(result.result, dict) else {}
        usage = response.get("usage") or {}
        skipped = not result.task_id and result.error_type == SKIPPED_ERROR_TYPE
        rows.append(
            {
                "task_id": result.task_id or None,
                "status": SKIPPED_STATUS if skipped else result.status.value,
                "content": result.content,
                "parsed": response.get("parsed"),
                "error": result.error,
                "error_type": result.error_type,
                "status_code": result.status_code,
                "attempts": result.attempts,
                "latency_s": result.latency_s,
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "total_tokens": usage.get("total_tokens"),
                "custom_id": result.custom_id,
            }
        )
    frame = pd.DataFrame(rows, columns=FRAME_COLUMNS, index=index)
    for column in ("status_code", "prompt_tokens", "completion_tokens", "total_tokens"):
        frame[column] = frame[column].astype("Int64")
    frame["latency_s"] = frame["latency_s"].astype("float64")
    return frame


def _require_storable(index: pd.Index) -> None:
    """Refuse, before anything is sent, an index that would come back different on attach."""
    stored = index_from_json(json.loads(json.dumps(index_to_json(index))))
    same_types = [a.dtype for a in _levels(stored)] == [b.dtype for b in _levels(index)]
    if not (same_types and stored.equals(index)):
        raise InvalidArgument(
            f"this index ({type(index).__name__}, dtype {index.dtype}) cannot be stored for reattaching "
            "unchanged; use df.reset_index() (keeping it as a column) before sending the rows"
        )


def _levels(index: pd.Index) -> list[pd.Index]:
    return [index.get_level_values(level) for level in range(index.nlevels)]


def _kv_backend(worker: RactoCeleryWorker) -> BaseKeyValueStoreBackend:
    backend = worker.app.backend
    if not isinstance(backend, BaseKeyValueStoreBackend):
        raise Unsupported(
            f"batches need a key-value result backend (Redis, or the embedded in-process backend); "
            f"this app uses {type(backend).__name__}: set the app's result_backend to a redis:// URL"
        )
    return backend
