"""A real Celery worker in a daemon thread of this process: the no-setup mode.

A fresh notebook has no Redis and no worker processes, and a worker process
could not import the notebook's kit anyway. So the embedded mode runs Celery's
own ``WorkController`` (consumer, thread pool, acks, retries, remote control)
in a thread, on racto_nb's in-process transport. Everything downstream (task
bodies, retries, batch bookkeeping, progress) is the code path a fleet runs;
only the wire is shorter. ``task_always_eager`` would skip the broker, the
retry countdowns and the result states, which is exactly what must be real.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
from typing import Any

from celery import Celery
from celery import _state as celery_state
from celery.result import _set_task_join_will_block
from celery.worker import WorkController
from celery.worker import state as worker_state

from racto_nb.config import DEFAULT_EMBEDDED_CONCURRENCY
from racto_nb.embedded.transport import Channel, interrupt_consumers
from racto_nb.engine.keys import events_key
from racto_nb.engine.results import encode_meta, meta_key
from racto_nb.engine.runner import EVENT_CODES, EVENTS_MAXLEN, embedded_stopped_failure, mark_embedded_stopped
from racto_nb.engine.store import store_for
from racto_nb.errors import EmbeddedError, InvalidArgument

__all__ = ["EmbeddedWorker"]

_QUIET_LOGGER = "celery.app.trace"


class _Controller(WorkController):  # type: ignore[misc]
    """``WorkController`` that says when its consumer takes tasks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        self.ready.set()


class EmbeddedWorker:
    """Start and stop one thread-pool Celery worker for ``app`` inside this process.

    Stopping is a warm shutdown: tasks already running finish; tasks still
    queued can never run (the queue lives in this app only), so they are
    failed with ``error_type == "EmbeddedStopped"``: their batches end, and
    "Retry failed" after a new ``connect()`` sends them again.
    """

    def __init__(
        self, app: Celery, *, concurrency: int = DEFAULT_EMBEDDED_CONCURRENCY, hostname: str | None = None
    ) -> None:
        if concurrency < 1:
            raise InvalidArgument(f"concurrency must be >= 1, not {concurrency}")
        self.app = app
        self.concurrency = concurrency
        self.hostname = hostname or f"racto-embedded-{os.getpid()}@{socket.gethostname()}"
        self._thread: threading.Thread | None = None
        self._quieted: int | None = None
        self._previous_default: Celery | None = None

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else "stopped"
        return f"EmbeddedWorker({self.hostname!r}, concurrency={self.concurrency}, {state})"

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = 10.0) -> EmbeddedWorker:
        """Start the worker thread; return once its consumer takes tasks."""
        if self.is_alive():
            return self
        mark_embedded_stopped(self.app, False)
        self._quiet_task_logs()
        # The threads pool runs each task through ``current_app`` (as a CLI
        # worker does), so this app must be the process default while it runs.
        self._previous_default = celery_state.default_app
        self.app.set_default()
        controller = _Controller(
            app=self.app,
            hostname=self.hostname,
            concurrency=self.concurrency,
            pool="threads",
            loglevel="WARNING",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        thread = threading.Thread(target=controller.start, name=f"racto-embedded:{self.hostname}", daemon=True)
        self._thread = thread
        thread.start()
        step = 0.01
        waited = 0.0
        while not controller.ready.wait(step):
            waited += step
            if not thread.is_alive() or waited >= timeout_s:
                self.stop(timeout_s=2.0)
                raise EmbeddedError(
                    f"the embedded Celery worker did not start within {timeout_s:g} s "
                    f"(thread {'died' if not thread.is_alive() else 'still starting'}); "
                    "see the 'celery' logger output above"
                )
        # The pool marks the whole process as "inside a task", which makes
        # AsyncResult.get() in the notebook raise; Celery's own embedded-worker
        # helper clears the flag the same way.
        _set_task_join_will_block(False)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Warm shutdown: running tasks finish, then the thread exits. Safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is not None:
            mark_embedded_stopped(self.app)  # rows begun finish; rows not begun fail (nothing will run them)
        try:
            if thread is not None and thread.is_alive():
                # Celery's own embedded-worker helper stops a threaded worker this
                # way: the consumer loop raises WorkerShutdown when it sees the flag.
                worker_state.should_stop = 0
                try:
                    with interrupt_consumers():
                        thread.join(timeout_s)
                finally:
                    worker_state.should_stop = None
        finally:
            # Whatever happened above, the rows still queued fail (nothing will run them) and the
            # process gets its logging and default app back: a timeout leaves no half-stopped worker.
            self._fail_queued()
            self._restore_task_logs()
            if celery_state.default_app is self.app:
                celery_state.default_app = self._previous_default
            self._previous_default = None
        if thread is not None and thread.is_alive():
            raise EmbeddedError(
                f"the embedded worker did not stop within {timeout_s:g} s: a call is still running and "
                "finishes in the background (the thread pool cannot interrupt it; set a shorter kit timeout)"
            )

    def _fail_queued(self) -> None:
        """Fail every row of every chunk still queued: they can never run once this worker is gone."""
        # Each RactoCeleryWorker has its own queue (racto_nb.<name>); unacknowledged messages are back in them
        # by now (kombu restores a closed channel's unacked messages).
        names = {str(self.app.conf.task_default_queue)}
        names.update(w.queue for w in self.app.__dict__.get("_racto_workers", {}).values())
        queues = [q for q in (Channel.queues.pop(name, None) for name in sorted(names)) if q is not None]
        failure = embedded_stopped_failure()
        backend = self.app.backend
        store = store_for(backend)
        with store.batch() as batch:
            for queue in queues:
                while not queue.empty():
                    chunk = _chunk_of(queue.get_nowait())
                    if chunk is None:
                        continue
                    rows = chunk.get("rows") or []
                    for row in rows:
                        task_id = str(row["id"])
                        batch.set(meta_key(backend, task_id), encode_meta(backend, task_id, "FAILURE", failure))
                    if chunk.get("events") and rows:  # a notebook batch follows its rows by their events
                        entry = ",".join(f"{row.get('p', 0)}:{EVENT_CODES['FAILURE']}" for row in rows)
                        batch.append(events_key(str(chunk["batch"])), entry, maxlen=EVENTS_MAXLEN)

    def _quiet_task_logs(self) -> None:
        # A failed row is reported in its TaskResult; Celery's ERROR line for it
        # would land in whatever notebook cell happens to be running.
        logger = logging.getLogger(_QUIET_LOGGER)
        if logger.level == logging.NOTSET:
            self._quieted = logger.level
            logger.setLevel(logging.CRITICAL)

    def _restore_task_logs(self) -> None:
        if self._quieted is not None:
            logging.getLogger(_QUIET_LOGGER).setLevel(self._quieted)
            self._quieted = None


def _chunk_of(message: Any) -> dict[str, Any] | None:
    """The chunk payload (batch id, rows with their ids and positions) of one queued in-process message."""
    if not isinstance(message, dict):
        return None
    body = message.get("body")
    if not isinstance(body, (str, bytes)):
        return None
    if (message.get("properties") or {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    try:
        chunk = json.loads(body)[0][0]
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return chunk if isinstance(chunk, dict) and isinstance(chunk.get("rows"), list) else None
