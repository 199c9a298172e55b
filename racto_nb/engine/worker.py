"""``RactoCeleryWorker``: the seed's API over Celery, with honest retries and nothing lost.

Kits and RAG objects are captured by closure, exactly as in the RactoGateway
docs: the module that builds the worker must be imported by the ``celery
worker`` process too. What crosses the broker is JSON only (the prompts and
their parameters), never a kit, a key or a provider object.

Every call the seed API makes is a *row*: its own task id, its own result in
the backend (a Celery meta, so ``AsyncResult(row_id)`` reads it), its own
retries. Rows travel in *chunks* (:mod:`racto_nb.engine.chunks`), one Celery
task ``racto_nb.<name>.rows`` per chunk, which :mod:`racto_nb.engine.runner`
runs on the worker. ``generate`` is a chunk of one row; ``parallel_batch``
sends as many rows per message as its size calls for.

Each name has its own queue (``racto_nb.<name>`` unless ``queue=`` says
otherwise), and a ``celery worker`` that imports the module consumes the
queues of every ``RactoCeleryWorker`` it defines, so two fleets on one broker
never take each other's tasks.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task, signals
from celery.result import AsyncResult, GroupResult
from celery.utils import uuid
from vine import barrier

from racto_nb.config import DEFAULT_STALE_AFTER_S, check_worker_name, mask_url
from racto_nb.engine.chunks import PAYLOAD_VERSION, ChunkPayload, RowSpec, chunk_spans, rows_per_chunk
from racto_nb.engine.keepalive import WorkerKeeper
from racto_nb.engine.keys import chunk_task_id, row_id
from racto_nb.engine.polling import poll
from racto_nb.engine.publish import publish_many
from racto_nb.engine.recovery import LiveWorkers, find_vanished, mark_orphans
from racto_nb.engine.results import ResultReader
from racto_nb.engine.runner import ChunkRunner
from racto_nb.engine.spending import Spending, SpendSettings
from racto_nb.engine.store import Store, backend_unreachable, connection_errors, retrying, store_for
from racto_nb.errors import InvalidArgument, InvalidSource, Unsupported
from racto_nb.kits.base import Kit, Rag, require_kit, require_rag
from racto_nb.models import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    BatchItem,
    ChatConfig,
    RetryConfig,
    TaskResult,
    TaskStatus,
)
from racto_nb.redact import install_log_redaction
from racto_nb.structured import OutputSpec

__all__ = [
    "DEFAULT_MAX_REDELIVERIES",
    "FOLLOW_PID_ENV",
    "STARTED_BY_ENV",
    "BatchGroupResult",
    "RactoCeleryWorker",
    "TaskStatus",
    "timed_out",
]

logger = logging.getLogger(__name__)

#: A row whose worker died this many times in one attempt fails instead of
#: being redelivered again (a poison message would otherwise loop forever).
DEFAULT_MAX_REDELIVERIES = 3
#: The seed API's waits: quick first looks (a fast answer is not held back), then at most every 20 ms;
#: a look that costs more (thousands of ids) waits three times its cost, so a long wait stays cheap.
_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.02
#: How long ``wait`` keeps trying a result backend that stopped answering (a restart) before raising.
WAIT_RECONNECT_BUDGET_S = 60.0
#: A chunk sent this long ago with no trace of any of its rows is checked for having been lost.
VANISHED_AFTER_S = 15.0
#: Chunks this client remembers having sent, so ``wait`` can send a lost one again.
_REMEMBERED_CHUNKS = 10_000


class BatchGroupResult(GroupResult):  # type: ignore[misc]
    """A ``GroupResult`` that remembers each item's ``custom_id``.

    ``GroupResult.restore()`` gives back a plain ``GroupResult``; custom ids of
    finished items still come back with their results.
    """

    custom_ids: list[str | None]


@dataclass
class _Sent:
    """A chunk this client published, kept until its rows are final (see ``wait_many``)."""

    payload: ChunkPayload
    seq: int
    at: float


class RactoCeleryWorker:
    """Celery-backed task queue for LLM kits.

    Args:
        app: A configured ``celery.Celery``; you keep control of its broker,
            backend, serializers and routing.
        kit: Any object with ``chat(config)``: a racto_nb kit, a RactoGateway
            kit, or your own. A kit with ``max_concurrency`` (``LocalKit``: 1)
            gets no more calls at once per process, and a row is STARTED only
            once its call really begins.
        rag: Any object with ``ingest(path, **metadata)`` returning chunks
            (e.g. RactoGateway's ``RactoRAG``); needed only by
            :meth:`ingest_document`.
        retry_config: Backoff policy; defaults to ``RetryConfig()``.
        name: Distinguishes several workers on one app. The task is
            ``racto_nb.<name>.rows``; a worker process must build the same
            name to run it.
        queue: Where this worker's tasks go; default ``racto_nb.<name>``.
        max_redeliveries: How often one attempt may be redelivered after its
            worker process died before the row fails with ``WorkerLost``.
        stale_after_s: A worker that stopped renewing its claim for this long
            is dead: its rows are handed to a live worker (see
            :mod:`racto_nb.engine.keepalive`).
        spending: Rate limits (shared by the fleet), prices, and the pay-once
            ledger's expiry and size (see :mod:`racto_nb.engine.spending`).
        replace: Take over ``name`` from a live worker with a different kit
            (otherwise that is an error: one would silently run the other's kit).
    """

    def __init__(
        self,
        app: Celery,
        *,
        kit: Kit,
        rag: Rag | None = None,
        retry_config: RetryConfig | None = None,
        name: str = "default",
        queue: str | None = None,
        max_redeliveries: int = DEFAULT_MAX_REDELIVERIES,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        spending: SpendSettings | None = None,
        replace: bool = False,
    ) -> None:
        self.app = app
        self.kit = require_kit(kit)
        self.rag = require_rag(rag)
        self.name = check_worker_name(name)
        self.queue = queue or f"racto_nb.{name}"
        self.retry_config = retry_config or RetryConfig()
        self.max_redeliveries = max_redeliveries
        if stale_after_s <= 0:
            raise InvalidArgument(f"stale_after_s must be > 0 (got {stale_after_s})")
        self.stale_after_s = stale_after_s
        #: The ledger, the rate governor and the prices this worker's calls go through.
        self.spending = Spending(self.kit, spending or SpendSettings())
        slots = getattr(kit, "max_concurrency", None)
        #: Held around every call when the kit takes a limited number at once.
        self.kit_slot = threading.BoundedSemaphore(slots) if isinstance(slots, int) and slots > 0 else None
        self._sent: OrderedDict[str, _Sent] = OrderedDict()
        self._sent_seq = 0
        self._sent_lock = threading.Lock()
        self._claim_name(replace)
        self.task = self._register()
        _install_worker_hooks(app)

    def __repr__(self) -> str:
        return f"RactoCeleryWorker(name={self.name!r}, kit={self.kit!r}, retry_config={self.retry_config!r})"

    # ------------------------------------------------------------------ client API

    def generate(
        self,
        user_message: str,
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        history: list[dict[str, str]] | None = None,
        extra: dict[str, Any] | None = None,
        cache: bool = False,
        output: OutputSpec | None = None,
    ) -> AsyncResult:
        """Enqueue one chat call; returns at once with the task's ``AsyncResult``.

        The request is validated here, so bad input raises before anything is
        enqueued instead of failing later in a worker. ``cache=True`` answers it
        from the pay-once ledger when the same request was paid for before
        (:mod:`racto_nb.costs.ledger`). ``output`` (:func:`racto_nb.structured.output_spec`):
        the reply is constrained or checked against it, and ``parsed`` is the validated object.
        """
        config = ChatConfig(
            user_message=user_message,
            temperature=temperature,
            max_tokens=max_tokens,
            history=history or [],  # type: ignore[arg-type]
            extra=extra or {},
        )
        _require_json(config.extra, "extra")
        task_id = uuid()
        rows: list[RowSpec] = [{"id": task_id, "m": config.user_message}]
        opts: dict[str, Any] = {"cache": cache}
        if output is not None:
            opts["output"] = output.description()
        self.send(task_id, "chat", self.defaults(config), rows, opts=opts)
        return self.app.AsyncResult(task_id)

    def ingest_document(self, path: str, **metadata: Any) -> AsyncResult:
        """Enqueue ``rag.ingest(path, **metadata)`` on a worker.

        Raises:
            Unsupported: at once, when this worker has no ``rag`` (a ``RuntimeError``).
        """
        if self.rag is None:
            raise Unsupported(
                "ingest_document needs a RAG object: pass rag=<RactoRAG or any object with "
                "ingest(path, **metadata)> to RactoCeleryWorker"
            )
        _require_json(metadata, "metadata")
        task_id = uuid()
        self.send(task_id, "ingest", {}, [{"id": task_id, "path": str(path), "meta": metadata}])
        return self.app.AsyncResult(task_id)

    def parallel_batch(
        self,
        items: Sequence[BatchItem | str],
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> BatchGroupResult:
        """Fan ``items`` out, several rows per message as the size calls for; returns the ``GroupResult``.

        Every item is validated before the first is enqueued. An item's own
        ``temperature``/``max_tokens``/``extra`` win when set (``0.0`` included).
        Each item is a task of its own (``group.results[i].id``); messages go
        out on one producer without the per-task result subscription
        ``group().apply_async()`` makes.
        """
        defaults, rows = self.batch_rows(items, temperature=temperature, max_tokens=max_tokens)
        group_id = uuid()
        for row in rows:
            row["id"] = row_id(group_id, row["p"])
        self.send(group_id, "chat", defaults, rows)
        return self.group_result(group_id, [r["id"] for r in rows], [r.get("c") for r in rows])

    def batch_rows(
        self,
        items: Sequence[BatchItem | str],
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> tuple[dict[str, Any], list[RowSpec]]:
        """The batch defaults and one validated row per item, in order (ids left to the caller)."""
        if isinstance(items, (str, BatchItem)):
            raise InvalidSource("items must be a list of strings or BatchItems, not a single item")
        defaults = self.defaults(ChatConfig(user_message="-", temperature=temperature, max_tokens=max_tokens))
        rows: list[RowSpec] = []
        for index, raw in enumerate(items):
            item = BatchItem(user_message=raw) if isinstance(raw, str) else BatchItem.model_validate(raw)
            row: RowSpec = {"id": "", "p": index, "m": item.user_message}
            if item.custom_id is not None:
                row["c"] = item.custom_id
            if item.temperature is not None:
                row["t"] = item.temperature
            if item.max_tokens is not None:
                row["k"] = item.max_tokens
            if item.extra:
                _require_json(item.extra, f"items[{index}].extra")
                row["x"] = item.extra
            rows.append(row)
        return defaults, rows

    @staticmethod
    def defaults(config: ChatConfig) -> dict[str, Any]:
        """What every row of a chunk shares: ``config`` without its message."""
        return config.model_dump(mode="json", exclude={"user_message", "output"})

    def chunk(
        self,
        batch_id: str,
        kind: str,
        defaults: dict[str, Any],
        rows: list[RowSpec],
        *,
        events: bool = False,
        flags: Sequence[str] = (),
        opts: dict[str, Any] | None = None,
    ) -> ChunkPayload:
        """The message body for ``rows`` (see :class:`~racto_nb.engine.chunks.ChunkPayload`)."""
        if kind not in ("chat", "ingest"):
            raise InvalidArgument(f"kind must be 'chat' or 'ingest', not {kind!r}")
        return {
            "v": PAYLOAD_VERSION,
            "batch": batch_id,
            "kind": "chat" if kind == "chat" else "ingest",
            "defaults": defaults,
            "rows": rows,
            "events": events,
            "flags": list(flags),
            "opts": dict(opts or {}),
        }

    def publish(self, chunks: Sequence[tuple[str, ChunkPayload]]) -> None:
        """Hand ``(chunk task id, payload)`` messages to the broker, pipelined; remembered for ``wait``."""
        publish_many(
            self.app, self.task, [(payload,) for _, payload in chunks], [cid for cid, _ in chunks], queue=self.queue
        )
        with self._sent_lock:
            for chunk_id, payload in chunks:
                self._sent_seq += 1
                self._sent[chunk_id] = _Sent(payload, self._sent_seq, time.monotonic())
                self._sent.move_to_end(chunk_id)
            while len(self._sent) > _REMEMBERED_CHUNKS:
                self._sent.popitem(last=False)

    def send(
        self,
        batch_id: str,
        kind: str,
        defaults: dict[str, Any],
        rows: list[RowSpec],
        *,
        opts: dict[str, Any] | None = None,
    ) -> None:
        """Publish ``rows`` in chunks sized for their number (the seed API's path)."""
        size = rows_per_chunk(len(rows))
        self.publish(
            [
                (chunk_task_id(batch_id, 0, n), self.chunk(batch_id, kind, defaults, rows[start:stop], opts=opts))
                for n, (start, stop) in enumerate(chunk_spans(len(rows), size))
            ]
        )

    def group_result(
        self, group_id: str, task_ids: Sequence[str], custom_ids: Sequence[str | None]
    ) -> BatchGroupResult:
        """A ``GroupResult`` over already-chosen task ids (saved for ``restore``)."""
        # An explicit (empty) barrier: the default one calls then() on every
        # child, which subscribes each task id to Redis pub/sub.
        children = [self.app.AsyncResult(task_id) for task_id in task_ids]
        result = BatchGroupResult(group_id, children, app=self.app, ready_barrier=barrier())
        result.custom_ids = list(custom_ids)
        return result

    @property
    def store(self) -> Store:
        """The result backend's store (see :mod:`racto_nb.engine.store`)."""
        return store_for(self.app.backend)

    def get_result(self, task_id: str) -> TaskResult:
        """The task's state now, without blocking (STARTED and RETRY included)."""
        try:
            results = ResultReader(self.app.backend).read([task_id])
            return mark_orphans(results, LiveWorkers(self.store))[0]
        except connection_errors() as exc:
            raise backend_unreachable(self.app, exc) from None

    def wait(self, task_id: str, *, timeout_s: float | None = None) -> TaskResult:
        """Block until the task is final or ``timeout_s`` passes.

        On timeout the status stays what the task really is (pending, started,
        retry) and ``error`` says the wait timed out: a timeout is a fact about
        the wait, not about the task.
        """
        return self.wait_many([task_id], timeout_s=timeout_s)[0]

    def wait_parallel(self, group_result: GroupResult, *, timeout_s: float | None = None) -> list[TaskResult]:
        """Block until every task of a batch is final or ``timeout_s`` passes.

        Returns one ``TaskResult`` per item in submission order, each with its
        own state; items cut off by the timeout keep their real status and say so
        in ``error``.
        """
        task_ids = [child.id for child in group_result.results]
        results = self.wait_many(task_ids, timeout_s=timeout_s)
        custom_ids = getattr(group_result, "custom_ids", None)
        for index, result in enumerate(results):
            result.index = index
            if custom_ids is not None:
                result.custom_id = custom_ids[index]
        return results

    def wait_many(self, task_ids: Sequence[str], *, timeout_s: float | None = None) -> list[TaskResult]:
        """Poll ``task_ids`` until all are final or time runs out; each look reads only the unfinished ones.

        A worker that died shows as RETRY ``WorkerLost`` until its rows run
        again; a chunk this client sent that left no trace is sent again.
        """
        if timeout_s is not None and timeout_s < 0:
            raise InvalidArgument(f"timeout_s must be >= 0 or None (got {timeout_s})")
        reader = ResultReader(self.app.backend)
        workers = LiveWorkers(self.store)
        results: dict[str, TaskResult] = {}
        pending = list(dict.fromkeys(task_ids))
        checked_at = time.monotonic()

        def read() -> list[TaskResult]:
            return mark_orphans(reader.read(pending), workers)

        def look() -> list[str]:
            nonlocal pending, checked_at
            try:
                # A backend restarting (or failing over) is waited for, a while; then it is an error.
                fresh = retrying(read, budget_s=WAIT_RECONNECT_BUDGET_S)
            except connection_errors() as exc:
                raise backend_unreachable(self.app, exc) from None
            for result in fresh:
                results[result.task_id] = result
            finished = [task_id for task_id in pending if results[task_id].status.is_final]
            reader.forget(finished)
            pending = [task_id for task_id in pending if not results[task_id].status.is_final]
            if pending and time.monotonic() - checked_at >= VANISHED_AFTER_S:
                checked_at = time.monotonic()
                self.resend_vanished(results)
            return pending

        poll(look, lambda left: not left, timeout_s=timeout_s, first_pause_s=_POLL_FIRST_S, max_pause_s=_POLL_MAX_S)
        for task_id in pending:
            results[task_id] = timed_out(results[task_id], timeout_s)
        return [results[task_id].model_copy() for task_id in task_ids]

    def resend_vanished(self, known: dict[str, TaskResult]) -> int:
        """Send again the chunks this client sent that left no trace; returns how many.

        ``known`` is what the caller last read per row id. A chunk qualifies
        when every row of it is still PENDING, it was sent a while ago, a chunk
        sent after it has been taken, and no worker holds it.
        """
        with self._sent_lock:
            sent = list(self._sent.items())
        taken = [s.seq for _, s in sent if _touched(s.payload, known)]
        latest_taken = max(taken, default=0)
        now = time.monotonic()
        candidates = [
            chunk_id
            for chunk_id, s in sent
            if s.seq < latest_taken and now - s.at >= VANISHED_AFTER_S and _untouched(s.payload, known)
        ]
        lost = find_vanished(self.app, self.store, candidates)
        if lost:
            with self._sent_lock:
                chunks = [(chunk_id, self._sent[chunk_id].payload) for chunk_id in lost if chunk_id in self._sent]
            self.publish(chunks)
        with self._sent_lock:  # forget chunks whose rows are all final
            for chunk_id, s in sent:
                if _all_final(s.payload, known):
                    self._sent.pop(chunk_id, None)
        return len(lost)

    # ------------------------------------------------------------------ worker side

    def _claim_name(self, replace: bool) -> None:
        # A plain dict, not weak references: the holder of a name must live as
        # long as the app, since its tasks look it up at run time.
        registry: dict[str, RactoCeleryWorker] = self.app.__dict__.setdefault("_racto_workers", {})
        holder = registry.get(self.name)
        if holder is not None and not replace and not _same_kit(holder.kit, self.kit):
            raise InvalidArgument(
                f"a RactoCeleryWorker named {self.name!r} with another kit ({holder.kit!r}) is already "
                f"registered on this Celery app; pass name='<another name>' to run both kits, or "
                f"replace=True to take the name over"
            )
        registry[self.name] = self

    def _register(self) -> Task:
        """The rows task, created once per app and name.

        Celery keeps the first callable registered under a name, so the body
        does not capture this instance: it runs whichever worker holds the name
        when the task executes (a re-run cell's new retry policy, a
        ``replace=True`` kit).
        """
        task_name = f"racto_nb.{self.name}.rows"
        tasks: dict[str, Task] = self.app.__dict__.setdefault("_racto_tasks", {})
        if task_name in tasks:
            return tasks[task_name]
        registry: dict[str, RactoCeleryWorker] = self.app.__dict__["_racto_workers"]
        name = self.name

        def task_body(task: Task, payload: ChunkPayload) -> None:
            ChunkRunner(registry[name], task, payload).run()

        task_body.__name__ = task_body.__qualname__ = f"{self.name}_rows"
        task: Task = self.app.task(
            bind=True,
            name=task_name,
            # Not shared: a shared task is copied into every Celery app created
            # later, so a second app's worker of the same name would run this
            # worker's kit (the first registration wins).
            shared=False,
            # A worker killed mid-chunk must not lose it: acknowledge only after
            # it ran, and requeue when the process running it is lost.
            acks_late=True,
            reject_on_worker_lost=True,
            serializer="json",
            # Rows store their own results; the chunk task's return value is nothing.
            ignore_result=True,
        )(task_body)
        tasks[task_name] = task
        return task


# ---------------------------------------------------------------------------- the worker process's side


def _install_worker_hooks(app: Celery) -> None:
    """Once per app: a ``celery worker`` of it consumes racto_nb's queues and keeps its claims alive."""
    if app.__dict__.get("_racto_hooks"):
        return
    app.__dict__["_racto_hooks"] = True
    keepers: list[WorkerKeeper] = []

    def racto_workers() -> list[RactoCeleryWorker]:
        return list(app.__dict__.get("_racto_workers", {}).values())

    def consume_queues(sender: Any = None, instance: Any = None, **_: Any) -> None:
        if getattr(instance, "app", None) is app:
            for worker in racto_workers():
                instance.app.amqp.queues.select_add(worker.queue)

    def start_keeper(sender: Any = None, **_: Any) -> None:
        workers = racto_workers()
        if sender is None or sender.app is not app or not workers:
            return
        info = {
            "names": sorted(w.name for w in workers),
            "queues": sorted({w.queue for w in workers}),
            "concurrency": getattr(getattr(sender, "pool", None), "limit", None),
            "broker": mask_url(str(app.conf.broker_url or "")),
        }
        started_by = os.environ.get(STARTED_BY_ENV)
        if started_by:
            info["started_by"] = started_by
        stale = min(w.stale_after_s for w in workers)
        keepers.append(WorkerKeeper(app, str(sender.hostname), stale_after_s=stale, info=info).start())
        follow = os.environ.get(FOLLOW_PID_ENV)
        if follow and follow.isdigit():
            _follow_parent(int(follow))

    def stop_keepers(sender: Any = None, **_: Any) -> None:
        while keepers:
            keepers.pop().stop()

    def redact_logs(sender: Any = None, logger: Any = None, **_: Any) -> None:
        # Celery's handlers print task errors, kombu's and the SDKs' warnings: none may show a key.
        install_log_redaction(logger)

    signals.celeryd_after_setup.connect(consume_queues, weak=False)
    signals.after_setup_logger.connect(redact_logs, weak=False)
    signals.after_setup_task_logger.connect(redact_logs, weak=False)
    signals.worker_ready.connect(start_keeper, weak=False)
    signals.worker_shutting_down.connect(stop_keepers, weak=False)
    signals.worker_shutdown.connect(stop_keepers, weak=False)


#: Set by ``start_workers`` (``%racto_workers start``): the kernel's pid, which the worker lives no longer than.
FOLLOW_PID_ENV = "RACTO_FOLLOW_PID"
#: Set by ``start_workers``: ``host:pid`` of the kernel that started the worker, shown in its heartbeat.
STARTED_BY_ENV = "RACTO_STARTED_BY"
#: How often a worker started from a kernel checks that the kernel is still there.
FOLLOW_EVERY_S = 1.0


def _follow_parent(pid: int) -> None:
    """Warm-stop this worker once process ``pid`` (the kernel that started it) is gone.

    A kernel that exits normally stops its workers itself (atexit). One that
    is killed (a hard restart, the OOM killer) cannot, and the workers would
    live on unseen. They are its children, so when it dies they are
    re-parented: that is checked every second, portably, without
    ``prctl(PR_SET_PDEATHSIG)``, which would also need ``preexec_fn`` in a
    kernel full of threads. SIGTERM is Celery's warm shutdown: running rows
    finish, messages not yet taken stay in the broker.
    """

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(FOLLOW_EVERY_S)
        logger.warning("racto_nb: the kernel (pid %d) that started this worker is gone; stopping the worker", pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="racto-follow-kernel", daemon=True).start()


# ---------------------------------------------------------------------------- helpers


def timed_out(result: TaskResult, timeout_s: float | None) -> TaskResult:
    """``result`` as a wait that ran out reports it: the real status, ``error_type="WaitTimeout"``."""
    cut = result.model_copy()
    cut.error = f"wait timed out after {timeout_s:g} s; the task is still {cut.status.value}"
    cut.error_type = "WaitTimeout"
    return cut


def _row_states(payload: ChunkPayload, known: dict[str, TaskResult]) -> list[TaskStatus | None]:
    return [None if (r := known.get(row["id"])) is None else r.status for row in payload["rows"]]


def _touched(payload: ChunkPayload, known: dict[str, TaskResult]) -> bool:
    found = _row_states(payload, known)
    return any(s is not None and s is not TaskStatus.PENDING for s in found)


def _untouched(payload: ChunkPayload, known: dict[str, TaskResult]) -> bool:
    found = _row_states(payload, known)
    return all(s is TaskStatus.PENDING for s in found)


def _all_final(payload: ChunkPayload, known: dict[str, TaskResult]) -> bool:
    return all(s is not None and s.is_final for s in _row_states(payload, known))


def _same_kit(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and a == b)


def _require_json(value: Any, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidSource(f"{what} must be JSON-serialisable (str, number, bool, list, dict): {exc}") from None
