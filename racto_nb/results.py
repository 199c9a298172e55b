"""Read task states from the result backend, many at a time, without subscribing.

One refresh of N tasks is ``ceil(N / chunk)`` MGETs on a key-value backend
(Redis, memcached, the in-process cache), not N round trips
(``GroupResult.completed_count``) and not N pub/sub subscriptions
(``AsyncResult.get``). Backends without MGET fall back to one read per task.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from celery.backends.base import BaseKeyValueStoreBackend

from racto_nb.errors import RetryScheduled, TaskFailed, describe
from racto_nb.models import TaskResult, TaskStatus

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


def read_before_start(backend: Any, task_id: str, batch_id: str | None) -> tuple[dict[str, Any], bool]:
    """A task's stored meta and whether its batch was cancelled, in one round trip."""
    if not isinstance(backend, BaseKeyValueStoreBackend) or not batch_id:
        return backend.get_task_meta(task_id), False
    keys = [backend.get_key_for_task(task_id), cancel_key(batch_id)]
    values = backend.mget(keys)
    if isinstance(values, dict):
        values = [values.get(key) for key in keys]
    meta = backend.decode_result(values[0]) if values[0] is not None else {"status": "PENDING"}
    return meta, values[1] is not None


def fetch_metas(
    backend: Any, task_ids: Sequence[str], chunk: int = MGET_CHUNK
) -> list[dict[str, Any] | None]:
    """Stored meta for each id (``None`` where nothing is stored yet), in order."""
    if not isinstance(backend, BaseKeyValueStoreBackend):
        return [backend.get_task_meta(task_id) for task_id in task_ids]
    metas: list[dict[str, Any] | None] = []
    for start in range(0, len(task_ids), chunk):
        keys = [backend.get_key_for_task(task_id) for task_id in task_ids[start : start + chunk]]
        values = backend.mget(keys)
        if isinstance(values, dict):  # memcached-style clients answer with a mapping
            values = [values.get(key) for key in keys]
        metas.extend(None if raw is None else backend.decode_result(raw) for raw in values)
    return metas


def read_results(app: Any, task_ids: Sequence[str], chunk: int = MGET_CHUNK) -> list[TaskResult]:
    """``TaskResult`` for each id, in order, from one batched read."""
    now = time.time()
    metas = fetch_metas(app.backend, task_ids, chunk)
    return [to_task_result(task_id, meta, now=now) for task_id, meta in zip(task_ids, metas, strict=True)]


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
