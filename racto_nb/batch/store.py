"""What a batch keeps in the result backend, and the bulk writes it needs.

Kept apart from :mod:`racto_nb.batch.batch` because it is backend plumbing:
REVOKED marks written in one pipeline instead of two round trips a task, and a
JSON form of a pandas index (JSON, not pickle: the manifest is read back from
a shared backend, and unpickling what a shared store hands you runs its code).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import pandas as pd
from celery import states
from celery.exceptions import TaskRevokedError

from racto_nb.engine.results import mget

#: Tasks per pipeline when marking many REVOKED at once.
REVOKE_CHUNK = 1000


def mark_revoked(backend: Any, task_ids: Sequence[str], *, reason: str) -> int:
    """Mark tasks that have not started REVOKED; returns how many were marked.

    On Redis, tasks with nothing stored yet are marked with ``SET NX`` in a
    pipeline: a task that wrote STARTED a moment ago keeps its state (and
    10,000 marks cost a few round trips). Tasks already holding a state are
    marked only while it is PENDING or RETRY.
    """
    if not task_ids:
        return 0
    client = _redis_client(backend)
    if client is None:
        return _mark_one_by_one(backend, task_ids, reason)
    meta = backend._get_result_meta(
        result=backend.encode_result(TaskRevokedError(reason), states.REVOKED),
        state=states.REVOKED,
        traceback=None,
        request=None,
    )
    expires = int(backend.expires) if backend.expires else None
    marked = 0
    taken: list[str] = []
    for start in range(0, len(task_ids), REVOKE_CHUNK):
        chunk = task_ids[start : start + REVOKE_CHUNK]
        with client.pipeline(transaction=False) as pipe:
            for task_id in chunk:
                value = backend.encode({**meta, "task_id": task_id})
                pipe.set(backend.get_key_for_task(task_id), value, ex=expires, nx=True)
            outcomes = pipe.execute()
        marked += sum(1 for ok in outcomes if ok)
        taken += [task_id for task_id, ok in zip(chunk, outcomes, strict=True) if not ok]
    return marked + _mark_one_by_one(backend, taken, reason)


def _mark_one_by_one(backend: Any, task_ids: Sequence[str], reason: str) -> int:
    marked = 0
    keys = [backend.get_key_for_task(task_id) for task_id in task_ids]
    for task_id, raw in zip(task_ids, mget(backend, keys), strict=True):
        status = backend.decode_result(raw).get("status") if raw is not None else states.PENDING
        if status in (states.PENDING, states.RETRY):
            backend.mark_as_revoked(task_id, reason=reason)
            marked += 1
    return marked


def _redis_client(backend: Any) -> Any:
    try:
        from celery.backends.redis import RedisBackend
    except ImportError:  # pragma: no cover - redis is a dependency
        return None
    return backend.client if isinstance(backend, RedisBackend) else None


# ---------------------------------------------------------------------------- index <-> JSON


def index_to_json(index: pd.Index) -> dict[str, Any]:
    """A JSON-safe description of ``index`` (any index: duplicates, MultiIndex, dates)."""
    levels = [index.get_level_values(level) for level in range(index.nlevels)]
    return {
        "names": [_json_name(name) for name in index.names],
        "dtypes": [str(level.dtype) for level in levels],
        "levels": [json.loads(json.dumps(level.tolist(), default=_json_default)) for level in levels],
    }


def index_from_json(data: dict[str, Any]) -> pd.Index:
    """The index :func:`index_to_json` described; values keep their dtype where pandas can parse it."""
    arrays = [_level(values, dtype) for values, dtype in zip(data["levels"], data["dtypes"], strict=True)]
    if len(arrays) == 1:
        return arrays[0].rename(data["names"][0])
    return pd.MultiIndex.from_arrays(arrays, names=data["names"])


def _level(values: list[Any], dtype: str) -> pd.Index:
    values = [tuple(v) if isinstance(v, list) else v for v in values]  # JSON turned tuples into lists
    try:
        return pd.Index(values, dtype=dtype)
    except (TypeError, ValueError):
        return pd.Index(values)


def _json_name(name: Any) -> Any:
    return name if name is None or isinstance(name, (str, int, float, bool)) else str(name)


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)
