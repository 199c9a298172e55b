"""The fleet's state at one moment: is the broker there, which workers are online, what waits.

``%racto_status`` displays :func:`status`. Every step has a deadline, so a dead
or silent broker is reported within the timeout instead of hanging the cell.
"""

from __future__ import annotations

import html
import time
from typing import Any, Literal

from celery import Celery
from pydantic import BaseModel, ConfigDict, Field

from racto_nb.config import BROKER_ANSWER_TIMEOUT_S, is_embedded_url, load_config, mask_url
from racto_nb.engine.celery_app import build_celery
from racto_nb.engine.recovery import LiveWorkers
from racto_nb.engine.store import MemoryStore, store_for
from racto_nb.engine.worker import RactoCeleryWorker
from racto_nb.errors import InvalidSource
from racto_nb.fleet.connection import connected_worker
from racto_nb.fleet.probe import broker_unreachable_message, call_with_deadline, connect_once, queue_depth

__all__ = ["FleetStatus", "WorkerInfo", "status", "worker_heartbeats"]

#: How long ``inspect`` collects worker replies: every online worker answers well within it.
INSPECT_TIMEOUT_S = 1.0

# --------------------------------------------------------------------------- status


class WorkerInfo(BaseModel):
    """One online worker, as it answered ``inspect().stats()``."""

    name: str
    concurrency: int | None = Field(default=None, description="Pool size (threads or processes).")
    pool: str | None = None
    processed: int = Field(default=0, description="Tasks this worker has run since it started.")


class FleetStatus(BaseModel):
    """Broker reachability, workers online and queue depth, at one moment."""

    model_config = ConfigDict(frozen=True)

    mode: Literal["embedded", "broker"]
    broker: str = Field(description="Broker URL, password masked.")
    reachable: bool
    latency_ms: float | None = None
    workers: list[WorkerInfo] = Field(default_factory=list)
    queue: str = "celery"
    queue_depth: int | None = Field(default=None, description="Messages waiting, not yet taken by a worker.")
    error: str | None = None
    checked_in_s: float = Field(default=0.0, description="How long the check took.")

    @property
    def total_concurrency(self) -> int:
        return sum(w.concurrency or 0 for w in self.workers)

    def _lines(self) -> list[tuple[str, str]]:
        where = f"{self.broker} (embedded, in this kernel)" if self.mode == "embedded" else self.broker
        if not self.reachable:
            return [("broker", f"{where}: UNREACHABLE"), ("error", self.error or "")]
        latency = f" ({self.latency_ms:.1f} ms)" if self.latency_ms is not None else ""
        rows = [("broker", f"{where}: reachable{latency}")]
        rows.append(("workers", f"{len(self.workers)} online, {self.total_concurrency} slots"))
        for w in self.workers:
            rows.append(("", f"{w.name}: {w.pool or '?'} x {w.concurrency or '?'}, processed {w.processed}"))
        depth = "unknown" if self.queue_depth is None else f"{self.queue_depth} waiting"
        rows.append(("queue", f"{self.queue}: {depth}"))
        if self.error:
            rows.append(("note", self.error))
        return rows

    def __str__(self) -> str:
        return "\n".join(f"{label:<8} {text}" for label, text in self._lines())

    def _repr_html_(self) -> str:
        colour = "#1a7f37" if self.reachable else "#cf222e"
        body = "".join(
            f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(label)}</th>"
            f"<td style='text-align:left'>{html.escape(text)}</td></tr>"
            for label, text in self._lines()
        )
        return f"<table style='border-left:3px solid {colour}'>{body}</table>"


def status(
    target: RactoCeleryWorker | Celery | str | None = None, *, timeout_s: float = BROKER_ANSWER_TIMEOUT_S
) -> FleetStatus:
    """Check the broker, list workers online and count queued tasks, in at most about ``timeout_s``.

    ``target`` is a worker, a Celery app or a broker URL; by default the
    current connection, or the configured broker when not connected (this
    never connects or starts anything). A dead broker is reported in the
    result (``reachable=False`` and an ``error`` naming the fix), not raised.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    app = _app_for(target)
    url = str(app.conf.broker_url)
    embedded = is_embedded_url(url)
    common: dict[str, Any] = {
        "mode": "embedded" if embedded else "broker",
        "broker": mask_url(url) or "",
        "queue": str(app.conf.task_default_queue),
    }

    def left() -> float:
        return max(deadline - time.monotonic(), 0.1)

    try:
        latency = call_with_deadline(lambda: connect_once(app), left(), "the broker")
    except Exception as exc:
        return FleetStatus(
            **common,
            reachable=False,
            error=broker_unreachable_message(url, str(exc) or type(exc).__name__),
            checked_in_s=time.monotonic() - started,
        )
    notes = []
    depth = None
    try:
        depth = call_with_deadline(lambda: queue_depth(app), left(), "the queue-depth query")
    except Exception as exc:
        notes.append(f"queue depth unavailable: {exc}")
    workers: list[WorkerInfo] = []
    try:
        stats = call_with_deadline(
            # Embedded: exactly one worker can answer, so stop collecting at its reply.
            lambda: app.control.inspect(timeout=min(INSPECT_TIMEOUT_S, left()), limit=1 if embedded else None).stats(),
            left(),
            "the workers' stats query",
        )
        workers = [_worker_info(name, info) for name, info in sorted((stats or {}).items())]
    except Exception as exc:
        notes.append(f"worker list unavailable: {exc}")
    if embedded and not workers:
        notes.append("no embedded worker is running in this kernel: %racto_connect (racto_nb.connect()) starts one")
    return FleetStatus(
        **common,
        reachable=True,
        latency_ms=latency * 1000,
        workers=workers,
        queue_depth=depth,
        error="; ".join(notes) or None,
        checked_in_s=time.monotonic() - started,
    )


def _app_for(target: RactoCeleryWorker | Celery | str | None) -> Celery:
    if isinstance(target, RactoCeleryWorker):
        return target.app
    if isinstance(target, Celery):
        return target
    if isinstance(target, str):
        return build_celery(load_config(), broker_url=target)
    if target is not None:
        raise InvalidSource(f"status() takes a worker, a Celery app or a broker URL, not {type(target).__name__}")
    current = connected_worker()
    return current.app if current is not None else build_celery(load_config())


def _worker_info(name: str, info: dict[str, Any]) -> WorkerInfo:
    pool = info.get("pool") or {}
    implementation = str(pool.get("implementation", ""))
    short = implementation.split(":")[0].rsplit(".", 1)[-1] or None  # celery.concurrency.thread:TaskPool
    total = info.get("total") or {}
    return WorkerInfo(
        name=name,
        concurrency=pool.get("max-concurrency"),
        pool=short,
        processed=sum(int(v) for v in total.values()) if isinstance(total, dict) else 0,
    )


def worker_heartbeats(worker: RactoCeleryWorker) -> list[dict[str, Any]] | None:
    """The heartbeat of every live worker process on ``worker``'s backend (``None`` when embedded: none are written).

    Read from the backend, not by a broadcast: it answers at once, with no
    worker online as well, and lists workers started from any kernel.
    """
    store = store_for(worker.app.backend)
    if isinstance(store, MemoryStore):
        return None
    return LiveWorkers(store).listing()
