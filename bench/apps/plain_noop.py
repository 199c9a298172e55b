"""Plain Celery, nothing of racto_nb: one no-op task, Redis broker (db 0) and result backend (db 1).

The yardstick for "per-row overhead": what Celery itself costs per message on
the same worker. ``BENCH_REDIS`` is ``redis://host:port`` without a db.
"""

from __future__ import annotations

import os

from celery import Celery

_redis = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")
app = Celery("plain_noop", broker=f"{_redis}/0", backend=f"{_redis}/1")


@app.task(name="plain_noop.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """Does nothing: the message, the result write and the worker's bookkeeping are all that is measured."""
