"""``RactoCeleryWorker``: the seed's API over Celery, with honest retries.

Kits and RAG objects are captured by closure, exactly as in the RactoGateway
docs: the module that builds the worker must be imported by the ``celery
worker`` process too. What crosses the broker is JSON only (the prompt and its
parameters), never a kit, a key or a provider object.

What a task stores in the result backend, and why:

* STARTED, written by the task itself with the attempt number and how many
  times this attempt was delivered, so a task whose worker died can be told
  apart from a fresh one and redelivery stays bounded.
* RETRY with a ``RetryScheduled`` error: type, HTTP status, attempt and the
  time of the next try, which a progress line shows as "retry 1 of 3, next
  try in 4 s".
* FAILURE with a ``TaskFailed`` error: type, HTTP status, attempts.
* SUCCESS with an envelope ``{"output", "attempts", "latency_s", "custom_id",
  "index"}``; ``TaskResult.result`` is its ``output`` (the response dict).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore
from celery.result import AsyncResult, GroupResult
from celery.utils import uuid
from vine import barrier

from racto_nb.config import DEFAULT_VISIBILITY_TIMEOUT_S, check_retry_fits_visibility, check_worker_name
from racto_nb.engine.classify import classify
from racto_nb.engine.polling import poll
from racto_nb.engine.publish import publish_many
from racto_nb.engine.results import ResultReader, read_before_start, read_results
from racto_nb.errors import InvalidArgument, InvalidSource, RetryScheduled, TaskFailed, Unsupported
from racto_nb.kits.base import Kit, Rag, require_kit, require_rag, run_chat
from racto_nb.models import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    BatchItem,
    ChatConfig,
    RetryConfig,
    TaskResult,
    TaskStatus,
)

#: A task whose worker died this many times in one attempt fails instead of
#: being redelivered again (a poison message would otherwise loop forever).
DEFAULT_MAX_REDELIVERIES = 3
_REDIS_SCHEMES = ("redis", "rediss", "sentinel", "sqs")
#: The seed API's waits: quick first looks (a fast answer is not held back), then at most every 50 ms.
_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.05


class BatchGroupResult(GroupResult):  # type: ignore[misc]
    """A ``GroupResult`` that remembers each item's ``custom_id``.

    ``GroupResult.restore()`` gives back a plain ``GroupResult``; custom ids of
    finished items still come back with their results.
    """

    custom_ids: list[str | None]


class RactoCeleryWorker:
    """Celery-backed task queue for LLM kits.

    Args:
        app: A configured ``celery.Celery``; you keep control of its broker,
            backend, serializers and routing.
        kit: Any object with ``chat(config)``: a racto_nb kit, a RactoGateway
            kit, or your own.
        rag: Any object with ``ingest(path, **metadata)`` returning chunks
            (e.g. RactoGateway's ``RactoRAG``); needed only by
            :meth:`ingest_document`.
        retry_config: Backoff policy; defaults to ``RetryConfig()``.
        name: Distinguishes several workers on one app. Task names are
            ``racto_nb.<name>.generate`` and ``racto_nb.<name>.ingest``; a
            worker process must build the same names to run them.
        max_redeliveries: How often one attempt may be redelivered after its
            worker process died before the task fails with ``WorkerLost``.
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
        max_redeliveries: int = DEFAULT_MAX_REDELIVERIES,
        replace: bool = False,
    ) -> None:
        self.app = app
        self.kit = require_kit(kit)
        self.rag = require_rag(rag)
        check_worker_name(name)
        self.retry_config = retry_config or RetryConfig()
        self.name = name
        self.max_redeliveries = max_redeliveries
        _check_visibility_timeout(app, self.retry_config)
        self._claim_name(replace)
        self.generate_task = self._register("generate")
        self.ingest_task = self._register("ingest")

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
    ) -> AsyncResult:
        """Enqueue one chat call; returns at once with the task's ``AsyncResult``.

        The request is validated here, so bad input raises before anything is
        enqueued instead of failing later in a worker.
        """
        config = ChatConfig(
            user_message=user_message,
            temperature=temperature,
            max_tokens=max_tokens,
            history=history or [],  # type: ignore[arg-type]
            extra=extra or {},
        )
        _require_json(config.extra, "extra")
        return self._send(self.generate_task, (config.model_dump(mode="json"),))

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
        return self._send(self.ingest_task, (str(path), metadata))

    def parallel_batch(
        self,
        items: Sequence[BatchItem | str],
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> BatchGroupResult:
        """Fan ``items`` out as one task each; returns the batch's ``GroupResult``.

        Every item is validated before the first is enqueued. An item's own
        ``temperature``/``max_tokens``/``extra`` win when set (``0.0`` included).
        Messages go out on one producer without the per-task result
        subscription ``group().apply_async()`` makes.
        """
        payloads = self.batch_payloads(items, temperature=temperature, max_tokens=max_tokens)
        group_id = uuid()
        task_ids = [uuid() for _ in payloads]
        publish_many(self.app, self.generate_task, [(p,) for p in payloads], task_ids, group_id=group_id)
        return self.group_result(group_id, task_ids, [p["custom_id"] for p in payloads])

    def _send(self, task: Task, args: tuple[Any, ...]) -> AsyncResult:
        # Same path as batches: no per-task result subscription left in Redis.
        task_id = uuid()
        publish_many(self.app, task, [args], [task_id])
        return self.app.AsyncResult(task_id)

    def batch_payloads(
        self,
        items: Sequence[BatchItem | str],
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> list[dict[str, Any]]:
        """Validated JSON payloads for ``items``, one per item, in order."""
        if isinstance(items, (str, BatchItem)):
            raise InvalidSource("items must be a list of strings or BatchItems, not a single item")
        defaults = ChatConfig(user_message="-", temperature=temperature, max_tokens=max_tokens)
        payloads = []
        for index, raw in enumerate(items):
            item = BatchItem(user_message=raw) if isinstance(raw, str) else BatchItem.model_validate(raw)
            config = ChatConfig(
                user_message=item.user_message,
                temperature=defaults.temperature if item.temperature is None else item.temperature,
                max_tokens=defaults.max_tokens if item.max_tokens is None else item.max_tokens,
                extra=item.extra or {},
            )
            _require_json(config.extra, f"items[{index}].extra")
            payloads.append({**config.model_dump(mode="json"), "custom_id": item.custom_id, "index": index})
        return payloads

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

    def get_result(self, task_id: str) -> TaskResult:
        """The task's state now, without blocking (STARTED and RETRY included)."""
        return read_results(self.app, [task_id])[0]

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
        """Poll ``task_ids`` until all are final or time runs out; each look reads only the unfinished ones."""
        if timeout_s is not None and timeout_s < 0:
            raise InvalidArgument(f"timeout_s must be >= 0 or None (got {timeout_s})")
        reader = ResultReader(self.app.backend)
        results: dict[str, TaskResult] = {}
        pending = list(dict.fromkeys(task_ids))

        def look() -> list[str]:
            nonlocal pending
            for result in reader.read(pending):
                results[result.task_id] = result
            finished = [task_id for task_id in pending if results[task_id].status.is_final]
            reader.forget(finished)
            pending = [task_id for task_id in pending if not results[task_id].status.is_final]
            return pending

        poll(look, lambda left: not left, timeout_s=timeout_s, first_pause_s=_POLL_FIRST_S, max_pause_s=_POLL_MAX_S)
        for task_id in pending:
            results[task_id] = timed_out(results[task_id], timeout_s)
        return [results[task_id].model_copy() for task_id in task_ids]

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

    def _register(self, action: str) -> Task:
        """The task for ``action``, created once per app and name.

        Celery keeps the first callable registered under a name, so the body
        does not capture this instance: it runs whichever worker holds the name
        when the task executes (a re-run cell's new retry policy, a
        ``replace=True`` kit).
        """
        task_name = f"racto_nb.{self.name}.{action}"
        tasks: dict[str, Task] = self.app.__dict__.setdefault("_racto_tasks", {})
        if task_name in tasks:
            return tasks[task_name]
        registry: dict[str, RactoCeleryWorker] = self.app.__dict__["_racto_workers"]
        name = self.name

        def task_body(task: Task, *args: Any) -> dict[str, Any]:
            holder = registry[name]
            result: dict[str, Any] = getattr(holder, f"_run_{action}")(task, *args)
            return result

        task_body.__name__ = task_body.__qualname__ = f"{self.name}_{action}"
        task: Task = self.app.task(
            bind=True,
            name=task_name,
            # Not shared: a shared task is copied into every Celery app created
            # later, so a second app's worker of the same name would run this
            # worker's kit (the first registration wins).
            shared=False,
            # A worker killed mid-call must not lose the task: acknowledge only
            # after it ran, and requeue when the process running it is lost.
            acks_late=True,
            reject_on_worker_lost=True,
            serializer="json",
            # The task writes its own STARTED state (with attempt counts).
            track_started=False,
        )(task_body)
        tasks[task_name] = task
        return task

    def _run_generate(self, task: Task, payload: dict[str, Any]) -> dict[str, Any]:
        # Read, never pop: Celery builds a retry's message from these same args.
        item = {"custom_id": payload.get("custom_id"), "index": payload.get("index")}
        config = ChatConfig.model_validate({k: v for k, v in payload.items() if k not in item})
        return self._attempt(task, lambda: run_chat(self.kit, config), item)

    def _run_ingest(self, task: Task, path: str, metadata: dict[str, Any]) -> dict[str, Any]:
        rag = self.rag
        if rag is None:
            raise TaskFailed("this worker process has no rag object configured", "RuntimeError")
        return self._attempt(task, lambda: [_chunk_dict(c) for c in rag.ingest(path, **metadata)], {})

    def _attempt(self, task: Task, work: Callable[[], Any], item: dict[str, Any]) -> dict[str, Any]:
        cfg = self.retry_config
        retries_so_far = int(task.request.retries or 0)
        attempt = retries_so_far + 1
        self._mark_started(task, attempt)
        started = time.perf_counter()
        try:
            output = work()
        except Exception as exc:
            verdict = classify(exc)
            what = verdict.error_type + (f" (HTTP {verdict.status_code})" if verdict.status_code else "")
            what += f": {_explain(exc, with_cause=verdict.status_code is None)}"
            if verdict.retryable and retries_so_far < cfg.max_retries:
                countdown = cfg.countdown(retries_so_far, verdict.retry_after_s)
                scheduled = RetryScheduled(
                    what,
                    verdict.error_type,
                    verdict.status_code,
                    attempt,
                    cfg.max_retries,
                    time.time() + countdown,
                )
                raise task.retry(exc=scheduled, countdown=countdown, max_retries=cfg.max_retries) from None
            why = f"gave up after {attempt} attempts" if verdict.retryable else "not retried"
            raise TaskFailed(f"{what} ({why})", verdict.error_type, verdict.status_code, attempt) from None
        return {
            "output": output,
            "attempts": attempt,
            "latency_s": round(time.perf_counter() - started, 6),
            **item,
        }

    def _mark_started(self, task: Task, attempt: int) -> None:
        # One read + one write per attempt buys bounded redelivery on every
        # broker (a STARTED record for this same attempt means its worker died
        # mid-call) and batch cancel that reaches tasks in a retry countdown.
        previous, cancelled = read_before_start(task.backend, task.request.id, task.request.group)
        if previous.get("status") == "REVOKED":
            raise Ignore()  # revoked by a batch cancel while this message waited: never run it
        if cancelled:
            task.backend.mark_as_revoked(task.request.id, reason="batch cancelled", request=task.request)
            raise Ignore()
        deliveries = 1
        recorded = previous.get("result") if previous.get("status") == "STARTED" else None
        if isinstance(recorded, dict) and recorded.get("attempt") == attempt:
            deliveries = int(recorded.get("deliveries", 1)) + 1
        if deliveries > self.max_redeliveries + 1:
            raise TaskFailed(
                f"WorkerLost: the worker running attempt {attempt} died {deliveries - 1} times; "
                f"not redelivered again (max_redeliveries={self.max_redeliveries})",
                "WorkerLost",
                None,
                attempt,
            )
        task.update_state(
            state="STARTED",
            meta={"attempt": attempt, "deliveries": deliveries, "hostname": task.request.hostname},
        )


def _explain(exc: BaseException, *, with_cause: bool) -> str:
    """The message, plus the low-level cause SDKs hide behind "Connection error."."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if with_cause and cause is not None and not (str(cause) and str(cause) in text):
        detail = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        text += f" (caused by {detail})"
    return text


def _same_kit(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and a == b)


def _chunk_dict(chunk: Any) -> Any:
    return chunk.model_dump(mode="json") if hasattr(chunk, "model_dump") else chunk


def _require_json(value: Any, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidSource(f"{what} must be JSON-serialisable (str, number, bool, list, dict): {exc}") from None


def timed_out(result: TaskResult, timeout_s: float | None) -> TaskResult:
    """``result`` as a wait that ran out reports it: the real status, ``error_type="WaitTimeout"``."""
    cut = result.model_copy()
    cut.error = f"wait timed out after {timeout_s:g} s; the task is still {cut.status.value}"
    cut.error_type = "WaitTimeout"
    return cut


def _check_visibility_timeout(app: Celery, cfg: RetryConfig) -> None:
    """On Redis and SQS, a retry countdown must stay below the visibility timeout (see config)."""
    url = str(app.conf.broker_url or "")
    if not url.startswith(_REDIS_SCHEMES):
        return
    options = app.conf.broker_transport_options or {}
    check_retry_fits_visibility(
        cfg.max_delay_s,
        float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT_S)),
        max_delay="RetryConfig.max_delay_s",
        visibility="broker_transport_options['visibility_timeout']",
    )


__all__ = ["BatchGroupResult", "RactoCeleryWorker", "TaskStatus"]
