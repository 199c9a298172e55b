"""What a row stores in the result backend, and reading it back many rows at a time.

Each row is stored under Celery's own key for its task id, as Celery's own
meta (``status``, ``result``, ``date_done``...), so ``AsyncResult(row_id)``
reads it too. What racto_nb puts in ``result``, and why:

* STARTED: ``{"attempt", "deliveries", "hostname"}``, written before the call,
  so a row whose worker died is told apart from a fresh one and its
  redelivery stays bounded.
* RETRY: a ``RetryScheduled`` error (type, HTTP status, attempt, the time of
  the next try), which a progress line shows as "retry 1 of 3, next try in 4 s".
* FAILURE: a ``TaskFailed`` error (type, HTTP status, attempts; for a
  ``SchemaError`` the reply that did not fit, which becomes ``result``).
* SUCCESS: an envelope ``{"output", "attempts", "latency_s", "custom_id",
  "index", "deliveries", "worker", "cached", "cost_usd", "saved_usd"}``;
  ``TaskResult.result`` is its ``output``.
* PAUSED (racto_nb's own state): ``{"reason"}``, a row waiting for quota or
  budget; it runs when the batch is resumed.

Reading: one look at N rows is ``ceil(N / chunk)`` MGETs, not N round trips
(``GroupResult.completed_count``) and not N pub/sub subscriptions
(``AsyncResult.get``). :func:`mget` is the one chunked MGET in racto_nb;
:class:`ResultReader` adds the rule every follower of many rows needs: decode
only the values that changed since the last look.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from celery import states as celery_states
from celery.backends.base import BaseKeyValueStoreBackend

from racto_nb.errors import RetryScheduled, TaskFailed
from racto_nb.models import TaskResult, TaskStatus
from racto_nb.redact import redact

__all__ = [
    "MGET_CHUNK",
    "ResultReader",
    "describe",
    "encode_meta",
    "envelope",
    "meta_key",
    "mget",
    "read_results",
    "to_task_result",
]

#: Keys per MGET: large enough that a refresh is a few round trips, small enough to keep each reply modest.
MGET_CHUNK = 2000

_STATES = {
    "PENDING": TaskStatus.PENDING,
    "RECEIVED": TaskStatus.PENDING,
    "STARTED": TaskStatus.STARTED,
    "RETRY": TaskStatus.RETRY,
    "SUCCESS": TaskStatus.SUCCESS,
    "FAILURE": TaskStatus.FAILURE,
    "REVOKED": TaskStatus.REVOKED,
    "PAUSED": TaskStatus.PAUSED,
    "REJECTED": TaskStatus.FAILURE,
    "IGNORED": TaskStatus.FAILURE,
}


def meta_key(backend: Any, task_id: str) -> str:
    """The key Celery stores ``task_id``'s state under (``celery-task-meta-<id>``)."""
    key = backend.get_key_for_task(task_id)
    return key.decode() if isinstance(key, bytes) else str(key)


def encode_meta(backend: Any, task_id: str, state: str, result: Any) -> str:
    """``result`` in ``state`` as Celery itself would store it for ``task_id`` (exceptions included)."""
    done = state in celery_states.READY_STATES
    meta = {
        "status": state,
        "result": backend.encode_result(result, state),
        "traceback": None,
        "children": [],
        "date_done": backend.app.now().isoformat() if done else None,
        "task_id": task_id,
    }
    encoded: str = backend.encode(meta)
    return encoded


def envelope(
    output: Any,
    *,
    attempts: int,
    latency_s: float | None,
    custom_id: str | None,
    index: int | None,
    deliveries: int,
    worker: str | None,
    cached: bool = False,
    cost_usd: float | None = None,
    saved_usd: float | None = None,
    history: list[str] | None = None,
) -> dict[str, Any]:
    """What a SUCCESS row stores (see the module docstring)."""
    return {
        "history": list(history or []),
        "output": output,
        "attempts": attempts,
        "latency_s": latency_s,
        "custom_id": custom_id,
        "index": index,
        "deliveries": deliveries,
        "worker": worker,
        "cached": cached,
        "cost_usd": cost_usd,
        "saved_usd": saved_usd,
    }


def mget(backend: BaseKeyValueStoreBackend, keys: Sequence[Any], chunk: int = MGET_CHUNK) -> list[Any]:
    """The stored (still encoded) value of each key, ``None`` where nothing is stored.

    One MGET per ``chunk`` keys: never a round trip per key, never a subscription.
    """
    values: list[Any] = []
    for start in range(0, len(keys), chunk):
        part = list(keys[start : start + chunk])
        got = backend.mget(part)
        if isinstance(got, dict):  # memcached-style clients answer with a mapping
            got = [got.get(key) for key in part]
        values.extend(got)
    return values


def read_results(app: Any, task_ids: Sequence[str]) -> list[TaskResult]:
    """``TaskResult`` for each id, in order, from one batched read."""
    return ResultReader(app.backend).read(task_ids)


class ResultReader:
    """Reads many tasks' states repeatedly, decoding only what changed since the last look.

    A follower of 10,000 waiting tasks pays a few MGETs per look and no JSON
    parsing for the values that did not move: an unchanged value gives back the
    same ``TaskResult`` object as last time. A task in RETRY is recomputed all
    the same, because its countdown moves with the clock.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._seen: dict[str, tuple[Any, dict[str, Any] | None, TaskResult]] = {}

    def read(self, task_ids: Sequence[str]) -> list[TaskResult]:
        """``TaskResult`` for each id, in order."""
        backend = self.backend
        now = time.time()
        if not isinstance(backend, BaseKeyValueStoreBackend):
            return [to_task_result(task_id, backend.get_task_meta(task_id), now=now) for task_id in task_ids]
        raws = mget(backend, [backend.get_key_for_task(task_id) for task_id in task_ids])
        results = []
        for task_id, raw in zip(task_ids, raws, strict=True):
            seen = self._seen.get(task_id)
            if seen is None or seen[0] != raw:
                meta = None if raw is None else backend.decode_result(raw)
                seen = (raw, meta, to_task_result(task_id, meta, now=now))
                self._seen[task_id] = seen
            elif seen[2].status is TaskStatus.RETRY:
                seen = (raw, seen[1], to_task_result(task_id, seen[1], now=now))
                self._seen[task_id] = seen
            results.append(seen[2])
        return results

    def forget(self, task_ids: Sequence[str]) -> None:
        """Drop what was kept for ``task_ids`` (final tasks nobody will look at again)."""
        for task_id in task_ids:
            self._seen.pop(task_id, None)


def describe(exc: BaseException) -> dict[str, Any]:
    """Fields of a ``TaskResult`` that describe a stored exception of any kind."""
    if isinstance(exc, (TaskFailed, RetryScheduled)):
        return {"error": exc.message, "error_type": exc.error_type, "status_code": exc.status_code}
    return {"error": redact(str(exc)) or type(exc).__name__, "error_type": type(exc).__name__}


def to_task_result(task_id: str, meta: dict[str, Any] | None, *, now: float | None = None) -> TaskResult:
    """Translate one stored meta into a ``TaskResult``.

    Understands what racto_nb's tasks store (an envelope on success, ``TaskFailed``
    / ``RetryScheduled`` otherwise, a progress dict while STARTED) and degrades
    gracefully for plain Celery tasks sharing the backend.
    """
    if not meta:
        return TaskResult(task_id=task_id, status=TaskStatus.PENDING)
    status = _STATES.get(str(meta.get("status")), TaskStatus.STARTED)
    value = meta.get("result")
    fields: dict[str, Any] = {}
    if status is TaskStatus.SUCCESS:
        fields = _from_envelope(value)
    elif status is TaskStatus.PAUSED and isinstance(value, dict):
        fields = {"error": str(value.get("reason") or "paused"), "error_type": "Paused"}
    elif status is TaskStatus.STARTED and isinstance(value, dict):
        fields = {
            "attempts": int(value.get("attempt", 1)),
            "deliveries": value.get("deliveries"),
            "worker": value.get("hostname"),
        }
    elif isinstance(value, BaseException):
        fields = describe(value)
        if isinstance(value, TaskFailed):
            fields["attempts"] = value.attempts
            fields["history"] = list(getattr(value, "history", None) or [])
            reply = getattr(value, "reply", None)
            if isinstance(reply, dict):
                fields["result"] = reply  # the reply that did not fit the schema: its content stays readable
        elif isinstance(value, RetryScheduled):
            wait = value.retry_at - (time.time() if now is None else now)
            fields.update(attempts=value.attempts, max_retries=value.max_retries, retry_in_s=max(wait, 0.0))
    return TaskResult(task_id=task_id, status=status, **fields)


def _from_envelope(value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and "output" in value and "attempts" in value:
        return {
            "result": value["output"],
            "attempts": value["attempts"],
            "latency_s": value.get("latency_s"),
            "custom_id": value.get("custom_id"),
            "index": value.get("index"),
            "deliveries": value.get("deliveries"),
            "worker": value.get("worker"),
            "cached": bool(value.get("cached", False)),
            "cost_usd": value.get("cost_usd"),
            "saved_usd": value.get("saved_usd"),
            "history": list(value.get("history") or []),
        }
    return {"result": value, "attempts": 1}
