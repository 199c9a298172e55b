"""Every key racto_nb keeps in the result backend, named in one place.

Row results use Celery's own keys (``celery-task-meta-<row id>``), so a row is
a task as far as ``AsyncResult`` and ``GroupResult`` can tell. What racto_nb
adds lives under ``racto:``; each key says who writes it and who reads it.
"""

from __future__ import annotations

__all__ = [
    "PREFIX",
    "batch_key",
    "batches_key",
    "budget_key",
    "cancel_key",
    "chunk_task_id",
    "events_key",
    "lease_key",
    "pause_key",
    "published_key",
    "publisher_key",
    "row_id",
    "worker_key",
    "worker_pattern",
]

PREFIX = "racto:"


def row_id(batch_id: str, position: int, round_no: int = 0) -> str:
    """A row's task id: its batch, its position, and the retry round that sent it (none for the first)."""
    return f"{batch_id}.{position}" if round_no == 0 else f"{batch_id}.{position}.r{round_no}"


def chunk_task_id(batch_id: str, round_no: int, chunk: int) -> str:
    """The Celery task id of one chunk's message: the same every time the chunk is (re)sent."""
    return f"{batch_id}:{round_no}:{chunk}"


def batch_key(batch_id: str) -> str:
    """The batch's manifest (JSON, small): written by the submitting kernel, read by ``attach``."""
    return f"{PREFIX}batch:{batch_id}"


def batches_key() -> str:
    """Every batch submitted to this backend and when (a hash id -> time): written at submit, read by ``batches()``."""
    return f"{PREFIX}batches"


def published_key(batch_id: str) -> str:
    """Chunks handed to the broker so far, per round (a hash): written by the publisher, read by ``attach``."""
    return f"{PREFIX}batch:{batch_id}:published"


def publisher_key(batch_id: str) -> str:
    """Lease of the kernel that publishes the batch, so two attached kernels never both send it."""
    return f"{PREFIX}batch:{batch_id}:publisher"


def events_key(batch_id: str) -> str:
    """Row state changes of a notebook batch (a stream): written by workers, read by the kernel."""
    return f"{PREFIX}batch:{batch_id}:events"


def cancel_key(batch_id: str) -> str:
    """Present once a batch (or one of its rounds) is cancelled: rows that meet it are never run."""
    return f"{PREFIX}cancel:{batch_id}"


def pause_key(batch_id: str) -> str:
    """Present while a batch is paused (quota, budget): rows that meet it wait, they do not fail."""
    return f"{PREFIX}pause:{batch_id}"


def budget_key(batch_id: str) -> str:
    """A batch's spending cap and what is spent and reserved against it (a hash)."""
    return f"{PREFIX}budget:{batch_id}"


def lease_key(chunk_task: str) -> str:
    """Who runs a chunk now: taken by one worker at a time, refreshed while it lives."""
    return f"{PREFIX}lease:{chunk_task}"


def chunk_runs_key(chunk_task: str) -> str:
    """How many runners have taken a chunk's lease: its unfinished rows were handed to that many workers."""
    return f"{PREFIX}runs:{chunk_task}"


def worker_key(hostname: str) -> str:
    """A worker process's heartbeat: present while it lives (a few seconds' expiry, refreshed)."""
    return f"{PREFIX}worker:{hostname}"


def worker_pattern() -> str:
    """All heartbeats, for listing the fleet."""
    return f"{PREFIX}worker:*"
