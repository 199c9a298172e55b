"""A minimal Celery app for tests that need a real worker process.

Broker and backend come from the environment because the worker is a separate
process started against a throwaway Redis whose port is only known at run time.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery(
    "ping_app",
    broker=os.environ["RACTO_TEST_BROKER"],
    backend=os.environ["RACTO_TEST_BACKEND"],
)
app.conf.update(broker_connection_retry_on_startup=True, task_acks_late=True)


@app.task(name="ping_app.add")  # type: ignore[untyped-decorator]  # celery is untyped
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="ping_app.pid")  # type: ignore[untyped-decorator]
def pid() -> int:
    """Which worker process ran the task."""
    return os.getpid()
