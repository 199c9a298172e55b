"""Read task states from the result backend, many at a time, without subscribing.

One look at N tasks is ``ceil(N / chunk)`` MGETs on a key-value backend
(Redis, memcached, the in-process store), not N round trips
(``GroupResult.completed_count``) and not N pub/sub subscriptions
(``AsyncResult.get``). Backends without MGET fall back to one read per task.

:func:`mget` is the one chunked MGET in racto_nb; :class:`ResultReader` adds
the rule every follower of many tasks needs: decode only the values that
changed since the last look.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from celery.backends.base import BaseKeyValueStoreBackend

from racto_nb.errors import RetryScheduled, TaskFailed
from racto_nb.models import TaskResult, TaskStatus

__all__ = [
    "MGET_CHUNK",
    "ResultReader",
    "cancel_key",
    "describe",
    "manifest_key",
    "mget",
    "read_before_start",
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
    "REJECTED": TaskStatus.FAILURE,
    "IGNORED": TaskStatus.FAILURE,
}


def manifest_key(batch_id: str) -> str:
    """Backend key of a batch's manifest (task ids, payloads, source index)."""
    return f"racto-nb-batch-{batch_id}"


def cancel_key(batch_id: str) -> str:
    """Backend key whose presence tells a batch's tasks not to start."""
    return f"racto-nb-cancel-{batch_id}"


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


def read_before_start(backend: Any, task_id: str, batch_id: str | None) -> tuple[dict[str, Any], bool]:
    """A task's stored meta and whether its batch was cancelled, in one round trip."""
    if not isinstance(backend, BaseKeyValueStoreBackend) or not batch_id:
        return backend.get_task_meta(task_id), False
    raw, cancelled = mget(backend, [backend.get_key_for_task(task_id), cancel_key(batch_id)])
    meta = backend.decode_result(raw) if raw is not None else {"status": "PENDING"}
    return meta, cancelled is not None


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
    return {"error": str(exc) or type(exc).__name__, "error_type": type(exc).__name__}


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
    elif status is TaskStatus.STARTED and isinstance(value, dict):
        fields = {"attempts": int(value.get("attempt", 1))}
    elif isinstance(value, BaseException):
        fields = describe(value)
        if isinstance(value, TaskFailed):
            fields["attempts"] = value.attempts
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
        }
    return {"result": value, "attempts": 1}
