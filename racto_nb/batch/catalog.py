"""The batches a backend knows, newest first: how an id lost with a restarted kernel's output is found again.

Every submit adds the batch to one small hash (``racto:batches``: id ->
submitted at). Listing reads that hash and the few newest manifests, never
the keyspace, so it costs the same beside a million result keys. Counts per
state come from each batch's checkpoint on this machine (the final rows);
what is not final there is counted as ``unfinished`` rather than guessed.
A batch whose manifest has expired is dropped from the hash as it is met.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from racto_nb.batch.checkpoint import SKIPPED_STATUS, Checkpoint
from racto_nb.engine.keys import batch_key, batches_key
from racto_nb.engine.store import store_for
from racto_nb.errors import BatchNotFound

if TYPE_CHECKING:
    from racto_nb.engine.worker import RactoCeleryWorker

__all__ = ["BatchSummary", "latest_batch_id", "recent_batches", "remember"]

#: The word ``--attach`` and :func:`racto_nb.api.attach` accept for the newest batch.
LATEST = "latest"


class BatchSummary(BaseModel):
    """One line of ``%racto_batches``."""

    batch_id: str
    submitted_at: datetime
    rows: int
    title: str = Field(default="", description="What submitted it: the magic's line, or the title given.")
    host: str = ""
    counts: dict[str, int] = Field(default_factory=dict, description="Final rows per state, from the checkpoint.")
    unfinished: int | None = Field(default=None, description="Rows not final; None when the checkpoint is elsewhere.")


def remember(worker: RactoCeleryWorker, batch_id: str, submitted_at: float) -> None:
    """Add a new batch to the backend's list (called once, at submit)."""
    with store_for(worker.app.backend).batch() as pipe:
        pipe.hset(batches_key(), batch_id, repr(submitted_at))


def recent_batches(worker: RactoCeleryWorker, limit: int = 20) -> list[BatchSummary]:
    """The ``limit`` newest batches submitted through ``worker``'s name, newest first."""
    store = store_for(worker.app.backend)
    known = store.hgetall(batches_key())
    newest = sorted(known, key=lambda batch_id: float(known[batch_id]), reverse=True)
    found: list[BatchSummary] = []
    gone: list[str] = []
    for start in range(0, len(newest), max(limit, 1)):
        ids = newest[start : start + max(limit, 1)]
        for batch_id, raw in zip(ids, store.mget([batch_key(i) for i in ids]), strict=True):
            if raw is None:
                gone.append(batch_id)
                continue
            manifest = json.loads(raw)
            if manifest.get("worker", worker.name) == worker.name:
                found.append(_summary(manifest))
            if len(found) >= limit:
                break
        if len(found) >= limit:
            break
    store.hdel(batches_key(), *gone)
    return found


def latest_batch_id(worker: RactoCeleryWorker) -> str:
    """The newest batch's id, for ``--attach latest``."""
    newest = recent_batches(worker, limit=1)
    if not newest:
        raise BatchNotFound(
            "no batches in this result backend yet (or they expired): submit one, or connect to the backend "
            "that ran it"
        )
    return newest[0].batch_id


def _summary(manifest: dict[str, Any]) -> BatchSummary:
    rows = int(manifest.get("rows", 0))
    folder = Path(str(manifest.get("checkpoint", "")))
    counts: dict[str, int] = {}
    unfinished: int | None = None
    checkpoint = Checkpoint(folder.parent, str(manifest["batch"]))
    if folder.name and checkpoint.exists():
        counts = dict(Counter(checkpoint.final_statuses()))
        if checkpoint.spooled_parts():
            reasons = checkpoint.reasons()
            skipped = len(reasons) - reasons.null_count
            if skipped:
                counts[SKIPPED_STATUS] = skipped
        unfinished = rows - sum(counts.values())
    return BatchSummary(
        batch_id=str(manifest["batch"]),
        submitted_at=datetime.fromtimestamp(float(manifest.get("created_at", 0.0)), tz=timezone.utc),
        rows=rows,
        title=str(manifest.get("title") or ""),
        host=str(manifest.get("host") or ""),
        counts=counts,
        unfinished=unfinished,
    )
