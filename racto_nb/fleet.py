"""Worker processes and fleet status, as plain functions the magics wrap.

``%racto_workers start N`` is :func:`start_workers`, ``%racto_workers stop``
is :func:`stop_workers`, ``%racto_status`` displays :func:`status`. Workers
started here are ``celery -A racto_nb.app worker`` processes that inherit
this kernel's environment, plus the broker this kernel is connected to, so
their configuration (kit, retry policy, worker name) matches the notebook's.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from celery import Celery
from pydantic import BaseModel, ConfigDict, Field

from racto_nb import connection
from racto_nb.config import build_celery, env_name, is_embedded_url, load_config, mask_url
from racto_nb.probe import broker_unreachable_message, call_with_deadline, connect_once, queue_depth
from racto_nb.worker import RactoCeleryWorker
from racto_nb.workers import WorkerPool, WorkerProcess

__all__ = [
    "DEFAULT_APP",
    "EmbeddedBrokerError",
    "FleetStatus",
    "WorkerInfo",
    "running_workers",
    "start_workers",
    "status",
    "stop_workers",
]

DEFAULT_APP = "racto_nb.app"
#: How long ``inspect`` collects worker replies: every online worker answers well within it.
INSPECT_TIMEOUT_S = 1.0

_started: list[WorkerProcess] = []


# --------------------------------------------------------------------------- processes


def start_workers(
    n: int = 1,
    *,
    concurrency: int = 32,
    app: str = DEFAULT_APP,
    timeout_s: float = 60.0,
    cwd: Path | None = None,
) -> list[WorkerProcess]:
    """Start ``n`` worker processes (thread pool of ``concurrency``) and wait until they take tasks.

    They inherit this process's environment (so ``RACTO_*`` settings and API
    keys match) and run in ``cwd`` (default: the notebook's directory, so a
    ``racto_nb.toml`` or an app module next to the notebook is found). With
    the default app they also get the broker and result backend this kernel
    is connected to. Stop them with :func:`stop_workers`; they are also
    stopped when the kernel exits.

    Raises:
        RuntimeError: the current connection is embedded (in-process), which
            other processes cannot reach; or a worker failed to start (with
            its log's tail).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    env = _broker_env() if app == DEFAULT_APP else {}
    pool = WorkerPool.of(app, n, concurrency=concurrency, env=env, cwd=cwd or Path.cwd())
    pool.start(timeout_s=timeout_s)
    _started.extend(pool.workers)
    return list(pool.workers)


def stop_workers(workers: Sequence[WorkerProcess] | None = None, *, timeout_s: float = 10.0) -> int:
    """Warm-stop ``workers`` (default: every worker :func:`start_workers` started); return how many."""
    chosen = list(_started if workers is None else workers)
    stopped = [w for w in chosen if w.is_alive()]
    WorkerPool(chosen).stop(timeout_s=timeout_s)
    _started[:] = [w for w in _started if w not in chosen]
    return len(stopped)


def running_workers() -> list[WorkerProcess]:
    """Workers started by :func:`start_workers` that are still alive."""
    return [w for w in _started if w.is_alive()]


class EmbeddedBrokerError(RuntimeError):
    """Worker processes were asked for while the kernel's broker lives in the kernel."""


def _broker_env() -> dict[str, str]:
    current = connection._current
    if current is not None:
        broker = str(current.app.conf.broker_url or "")
        backend = current.app.conf.result_backend
    else:
        cfg = load_config()
        broker, backend = cfg.broker_url or "", cfg.result_backend
    if is_embedded_url(broker or None):
        raise EmbeddedBrokerError(
            "worker processes need a broker they can reach, and this kernel runs embedded (in-process). "
            "Start Redis (`redis-server --daemonize yes`) and call "
            "racto_nb.connect('redis://127.0.0.1:6379/0') first, or set "
            f"{env_name('broker_url')} before starting the kernel"
        )
    env = {env_name("broker_url"): broker}
    if isinstance(backend, str) and "://" in backend:
        env[env_name("result_backend")] = backend
    return env


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


def status(target: RactoCeleryWorker | Celery | str | None = None, *, timeout_s: float = 5.0) -> FleetStatus:
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
        raise TypeError(f"status() takes a worker, a Celery app or a broker URL, not {type(target).__name__}")
    current = connection._current
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
