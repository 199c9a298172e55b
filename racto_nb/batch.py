"""A batch: one task per row, tracked until every row is final, never losing one.

``Batch`` owns the bookkeeping a notebook needs around ``parallel_batch``:

* a manifest (task ids, payloads, the source index) saved in the result
  backend *before* the first message is sent, so a restarted kernel can
  rebuild the same DataFrame with :meth:`Batch.attach`;
* publishing in a background thread, so 10,000 rows return control at once;
* refreshes that read only the unfinished tasks, in chunked MGETs;
* cancel (a flag the tasks check, plus REVOKED marks for waiting tasks) and
  retry-failed (new tasks for the failed rows, in the same result).

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
from celery.backends.base import KeyValueStoreBackend
from celery.utils import uuid

from racto_nb.errors import TaskFailed
from racto_nb.models import BatchItem, BatchProgress, TaskResult, TaskStatus
from racto_nb.publish import publish_many
from racto_nb.results import cancel_key, manifest_key, read_results

if TYPE_CHECKING:
    from racto_nb.worker import RactoCeleryWorker

SKIPPED_ERROR_TYPE = "NotSent"
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
    ) -> None:
        self.worker = worker
        self.batch_id = batch_id
        self.index = index
        self.task_ids = task_ids
        self.payloads = payloads
        self.reasons = reasons
        self.created_at = created_at
        self.cancelled = False
        self.publish_error: BaseException | None = None
        self._started = time.monotonic()
        self._results: list[TaskResult | None] = [None] * len(task_ids)
        self._lock = threading.RLock()
        self._publishers: list[threading.Thread] = []
        self._submitted = 0
        self._to_submit = 0
        for position, reason in enumerate(reasons):
            if reason is not None:
                self._results[position] = TaskResult(
                    task_id="",
                    status=TaskStatus.FAILURE,
                    error=reason,
                    error_type=SKIPPED_ERROR_TYPE,
                    index=position,
                )

    def __repr__(self) -> str:
        return f"<Batch {self.batch_id} rows={len(self.task_ids)}>"

    # ------------------------------------------------------------------ creation

    @classmethod
    def submit(
        cls,
        worker: RactoCeleryWorker,
        prompts: Sequence[str | BatchItem | None],
        *,
        index: pd.Index | None = None,
        reasons: Sequence[str | None] | None = None,
        temperature: float = 0.0,
        max_tokens: int = 4096,
        background: bool = True,
    ) -> Batch:
        """Validate every prompt, save the manifest, then publish.

        ``prompts[i] is None`` marks a row that is not sent; ``reasons[i]``
        says why (it becomes the row's error). Nothing is enqueued when any
        prompt is invalid.
        """
        if len(prompts) == 0:
            raise ValueError("nothing to send: the batch has no rows")
        index = pd.RangeIndex(len(prompts)) if index is None else index
        if len(index) != len(prompts):
            raise ValueError(f"index has {len(index)} entries for {len(prompts)} prompts")
        reasons = list(reasons) if reasons is not None else [None] * len(prompts)
        reasons = [r if p is not None else (r or "no prompt for this row") for p, r in zip(prompts, reasons, strict=True)]
        sendable = [p for p in prompts if p is not None]
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
        batch._publish(list(range(len(payloads))), background=background)
        return batch

    @classmethod
    def attach(cls, worker: RactoCeleryWorker, batch_id: str) -> Batch:
        """Rebuild a batch from its manifest, e.g. after a kernel restart.

        Works while the batch is still running; results come from the backend.
        """
        backend = _kv_backend(worker)
        raw = backend.get(manifest_key(batch_id))
        if raw is None:
            raise LookupError(
                f"no batch {batch_id!r} in the result backend: check the id, and that this kernel uses "
                "the same result backend (results expire after the app's result_expires)"
            )
        data = json.loads(raw)
        batch = cls(
            worker,
            batch_id=batch_id,
            index=_index_from_json(data["index"]),
            task_ids=data["task_ids"],
            payloads=data["payloads"],
            reasons=data["reasons"],
            created_at=data["created_at"],
        )
        batch._submitted = batch._to_submit = sum(t is not None for t in batch.task_ids)
        batch.cancelled = backend.get(cancel_key(batch_id)) is not None
        return batch

    def save(self) -> None:
        """Write the manifest to the result backend (same expiry as results)."""
        manifest = {
            "task_ids": self.task_ids,
            "payloads": self.payloads,
            "reasons": self.reasons,
            "index": _index_to_json(self.index),
            "created_at": self.created_at,
        }
        _kv_backend(self.worker).set(manifest_key(self.batch_id), json.dumps(manifest))

    # ------------------------------------------------------------------ publishing

    def _publish(self, positions: list[int], *, background: bool) -> None:
        sendable = [p for p in positions if self.task_ids[p] is not None]
        with self._lock:
            self._to_submit += len(sendable)
        payloads = [self.payloads[p] for p in sendable]
        task_ids = [self.task_ids[p] for p in sendable]

        def send() -> None:
            base = self._submitted

            def on_sent(count: int) -> None:
                self._submitted = base + count

            try:
                publish_many(
                    self.worker.app,
                    self.worker.generate_task,
                    [(p,) for p in payloads],
                    [t for t in task_ids if t is not None],
                    group_id=self.batch_id,
                    on_sent=on_sent,
                )
            except Exception as exc:  # broker gone mid-way: say so for every unsent row
                self.publish_error = exc
                self._mark_unsent(task_ids[self._submitted - base :], exc)

        if background:
            thread = threading.Thread(target=send, name=f"racto-publish-{self.batch_id[:8]}", daemon=True)
            self._publishers.append(thread)
            thread.start()
        else:
            send()

    def _mark_unsent(self, task_ids: Sequence[str | None], exc: BaseException) -> None:
        failure = TaskFailed(f"not submitted: the broker failed ({exc}); retry the failed rows", "SubmitError")
        backend = self.worker.app.backend
        for task_id in task_ids:
            if task_id is not None:
                try:
                    backend.store_result(task_id, failure, "FAILURE")
                except Exception:  # the backend may be down too; refresh will show them PENDING
                    break

    def join_publisher(self, timeout_s: float | None = None) -> bool:
        """Wait until every message has been handed to the broker."""
        for thread in list(self._publishers):
            thread.join(timeout_s)
        return not any(thread.is_alive() for thread in self._publishers)

    # ------------------------------------------------------------------ state

    def refresh(self) -> BatchProgress:
        """Read the unfinished tasks' states (one MGET per chunk) and summarise."""
        with self._lock:
            open_positions = [
                position
                for position, result in enumerate(self._results)
                if self.task_ids[position] is not None and (result is None or not result.status.is_final)
            ]
            task_ids = [self.task_ids[p] or "" for p in open_positions]
            for position, result in zip(open_positions, read_results(self.worker.app, task_ids), strict=True):
                payload = self.payloads[position] or {}
                result.index = position
                result.custom_id = payload.get("custom_id")
                self._results[position] = result
            return self._progress()

    def _progress(self) -> BatchProgress:
        counts = dict.fromkeys(TaskStatus, 0)
        for result in self._results:
            counts[result.status if result is not None else TaskStatus.PENDING] += 1
        elapsed = time.monotonic() - self._started
        done = sum(n for status, n in counts.items() if status.is_final)
        total = len(self._results)
        rate = done / elapsed if elapsed > 0 and done else None
        eta = (total - done) / rate if rate else None
        return BatchProgress(
            batch_id=self.batch_id,
            total=total,
            counts=counts,
            elapsed_s=elapsed,
            rate_per_s=rate,
            eta_s=eta,
            finished=done == total,
            cancelled=self.cancelled,
            submitted=self._submitted + sum(r is not None for r in self.reasons),
        )

    def wait(
        self,
        *,
        timeout_s: float | None = None,
        interval_s: float = 0.2,
        on_progress: Callable[[BatchProgress], None] | None = None,
        stop: threading.Event | None = None,
    ) -> BatchProgress:
        """Refresh until every row is final, ``timeout_s`` passes or ``stop`` is set."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            progress = self.refresh()
            if on_progress is not None:
                on_progress(progress)
            if progress.finished or (deadline is not None and time.monotonic() >= deadline):
                return progress
            pause = interval_s if deadline is None else max(0.0, min(interval_s, deadline - time.monotonic()))
            if stop is not None:
                if stop.wait(pause):
                    return progress
            else:
                time.sleep(pause)

    def results(self) -> list[TaskResult]:
        """One ``TaskResult`` per row, in row order, as of the last refresh."""
        with self._lock:
            return [
                (r.model_copy() if r is not None else TaskResult(task_id=t or "", status=TaskStatus.PENDING, index=i))
                for i, (r, t) in enumerate(zip(self._results, self.task_ids, strict=True))
            ]

    def to_frame(self) -> pd.DataFrame:
        """The results as a DataFrame indexed like the source, one row per row."""
        return results_frame(self.results(), self.index)

    # ------------------------------------------------------------------ control

    def cancel(self) -> int:
        """Stop what has not started: returns how many tasks were revoked.

        A flag in the result backend tells every task of this batch not to
        start (it scales past Celery's in-memory revoke list and reaches tasks
        waiting in a retry countdown); waiting tasks are marked REVOKED now so
        the view shows it at once. Running calls finish: the threads pool cannot
        interrupt them.
        """
        backend = _kv_backend(self.worker)
        backend.set(cancel_key(self.batch_id), "1")
        self.cancelled = True
        self.refresh()
        revoked = 0
        with self._lock:
            for position, result in enumerate(self._results):
                task_id = self.task_ids[position]
                if task_id and result is not None and result.status in (TaskStatus.PENDING, TaskStatus.RETRY):
                    backend.mark_as_revoked(task_id, reason="batch cancelled")
                    revoked += 1
        self.refresh()
        return revoked

    def retry_failed(self, *, background: bool = True) -> int:
        """Resubmit the rows that failed as new tasks in this same batch.

        Rows that were never sent (missing values) and revoked rows stay as
        they are. Returns how many rows were resubmitted.
        """
        with self._lock:
            positions = [
                position
                for position, result in enumerate(self._results)
                if result is not None
                and result.status is TaskStatus.FAILURE
                and self.task_ids[position] is not None
            ]
            for position in positions:
                self.task_ids[position] = uuid()
                self._results[position] = None
            if not positions:
                return 0
            self.cancelled = False
        _kv_backend(self.worker).delete(cancel_key(self.batch_id))
        self.save()
        self._publish(positions, background=background)
        return len(positions)


def results_frame(results: Sequence[TaskResult], index: pd.Index) -> pd.DataFrame:
    """DataFrame of ``TaskResult`` rows (see ``FRAME_COLUMNS``) on ``index``."""
    rows = []
    for result in results:
        response = result.result if isinstance(result.result, dict) else {}
        usage = response.get("usage") or {}
        rows.append(
            {
                "task_id": result.task_id or None,
                "status": result.status.value,
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
    return frame


def _kv_backend(worker: RactoCeleryWorker) -> KeyValueStoreBackend:
    backend = worker.app.backend
    if not isinstance(backend, KeyValueStoreBackend):
        raise RuntimeError(
            f"batches need a key-value result backend (Redis, or cache+memory:// when embedded); "
            f"this app uses {type(backend).__name__}"
        )
    return backend


def _index_to_json(index: pd.Index) -> dict[str, Any]:
    # JSON, not pickle: the manifest is read back from a shared backend.
    frame = index.to_frame(index=False)
    return {
        "names": [None if n is None else str(n) for n in index.names],
        "values": json.loads(frame.to_json(orient="values", date_format="iso")),
        "dtypes": [str(dtype) for dtype in frame.dtypes],
    }


def _index_from_json(data: dict[str, Any]) -> pd.Index:
    columns = list(zip(*data["values"], strict=True)) if data["values"] else [() for _ in data["names"]]
    arrays = [
        pd.Index(list(column), dtype=dtype if dtype != "object" else None)
        for column, dtype in zip(columns, data["dtypes"], strict=True)
    ]
    if len(arrays) == 1:
        return arrays[0].rename(data["names"][0])
    return pd.MultiIndex.from_arrays(arrays, names=data["names"])
