"""Running one chunk on a worker: each row its own attempts, retries and result.

A chunk's rows run one after another in the pool thread that took the
message; the pool's size is how many calls a worker process has in flight.
A row that fails transiently waits for its retry in a small schedule while
the next rows run, so one ``Retry-After: 30`` never holds the rest back.

With structured output (``opts["output"]``, :mod:`racto_nb.structured`) the
kit gets the spec on ``config.output`` and every reply is checked after the
call: a reply that does not fit is a retryable ``SchemaError``, asked again at
once with the prompt saying what was wrong, and a row that never fits fails
with its last reply kept in the stored error.

What makes a chunk safe to run again (after a worker died, or when the same
message arrives twice):

* **A lease.** One runner at a time holds ``racto:lease:<chunk>``; the worker's
  keep-alive renews it. A second delivery waits for the lease to free up (its
  holder died) or for the chunk to finish, and never runs a row twice.
* **Rows that are final are skipped.** The runner reads every row's stored
  state first: a finished row is never paid for again. A row found STARTED
  was in flight when its worker died: it runs again, counted in
  ``deliveries``, and fails as ``WorkerLost`` once that passes
  ``max_redeliveries`` (a row that kills its worker would loop forever).
* **States are written around the call**, with retries while the backend is
  restarting; final results go out in one round trip for several rows.
  STARTED is written before the call when the chunk ran before (a worker
  died in it: each row must be counted before it can kill another), and
  otherwise only once the call outlives 50 ms (:mod:`racto_nb.engine.start_marks`),
  so a fast model pays no round trip per row for it.
* **Deliveries are counted per chunk run.** Each runner that takes the lease
  counts itself (``racto:runs:<chunk>``); a row not final when it starts was
  handed to that many workers, and its ``deliveries`` says so, whether or not
  the dead one had stored its STARTED. So a call that may have been paid for
  twice always shows ``deliveries >= 2``.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from celery import states
from celery.exceptions import TaskRevokedError

from racto_nb.costs.governor import hold_from_headers
from racto_nb.engine import keepalive
from racto_nb.engine.chunks import ChunkPayload, RowSpec
from racto_nb.engine.classify import classify
from racto_nb.engine.keys import chunk_runs_key, events_key, lease_key, pause_key
from racto_nb.engine.results import encode_meta, envelope, meta_key
from racto_nb.engine.start_marks import start_marks
from racto_nb.engine.store import Store, retrying, store_for
from racto_nb.errors import RetryScheduled, SchemaError, TaskFailed
from racto_nb.kits.base import run_chat
from racto_nb.models import ChatConfig
from racto_nb.redact import redact
from racto_nb.structured import OutputSpec

if TYPE_CHECKING:
    from celery import Task

    from racto_nb.engine.worker import RactoCeleryWorker

__all__ = ["EVENTS_MAXLEN", "ChunkRunner", "embedded_stopped", "embedded_stopped_failure", "mark_embedded_stopped"]

#: How long the runner keeps retrying a write while the backend is down before giving the chunk up.
WRITE_BUDGET_S = 600.0
#: Final rows are written together, at least this often.
FLUSH_EVERY_S = 0.05
FLUSH_ROWS = 32
#: A deferred STARTED write gives up this soon (the row's result is written either way).
START_MARK_BUDGET_S = 2.0
#: A cancel flag is looked at no more often than this.
FLAG_EVERY_S = 0.5
#: Stream entries a batch's event stream keeps (a follower that falls further behind rescans).
EVENTS_MAXLEN = 100_000

#: A row waiting for the account (out of quota) or the batch's budget: not run, not failed (Celery's own
#: vocabulary has no such state; ``AsyncResult`` reports it as it is stored).
PAUSED = "PAUSED"
#: An attempt's line in a row's history is cut here: the history says what happened, the error says it in full.
HISTORY_CHARS = 200
#: One-letter event codes, as a kernel reads them from the stream.
EVENT_CODES = {
    states.STARTED: "S",
    states.RETRY: "R",
    states.SUCCESS: "D",
    states.FAILURE: "F",
    states.REVOKED: "V",
    PAUSED: "P",
}
#: A call waiting for the rate governor looks at the cancel and pause flags at least this often.
GOVERNOR_NAP_S = 0.5


@dataclass(order=True)
class _Row:
    due: float
    seq: int
    spec: RowSpec = field(compare=False)
    key: str = field(compare=False)
    attempts: int = field(default=0, compare=False)  # calls made so far
    deliveries: int = field(default=1, compare=False)  # workers the current attempt was handed to
    config: ChatConfig | None = field(default=None, compare=False)  # chat rows: the request
    fingerprint: str | None = field(default=None, compare=False)  # its key in the ledger, when cached
    history: list[str] = field(default_factory=list, compare=False)  # what went wrong in each earlier attempt


@dataclass
class _Write:
    row: _Row
    state: str
    value: str


class ChunkRunner:
    """Runs the rows of one chunk message (see the module docstring)."""

    def __init__(self, worker: RactoCeleryWorker, task: Task, payload: ChunkPayload) -> None:
        self.worker = worker
        self.payload = payload
        self.backend = task.backend
        self.store: Store = store_for(task.backend)
        self.chunk = str(task.request.id)
        self.hostname = task.request.hostname or "unknown"
        self.token = uuid4().hex
        self.lease = lease_key(self.chunk)
        self.lost_lease = False
        #: Redelivered (its worker died, or the broker restored it): every row's STARTED is stored before its call.
        self.eager_start = bool((task.request.delivery_info or {}).get("redelivered"))
        #: Runners (this one included) that took this chunk's lease.
        self.runs = 1
        self._writes: list[_Write] = []
        self._flushed_at = time.monotonic()
        self._flags_at = 0.0
        self._cancelled = False
        self._paused: str | None = None
        self._expires = float(self.backend.expires) if self.backend.expires else None
        opts = payload.get("opts") or {}
        self.spending = worker.spending
        # The seed API sends no opts: it never answers from the ledger (the notebook layer asks for it).
        self.cache = bool(opts.get("cache", False)) and payload["kind"] == "chat"
        self.output: dict[str, Any] | None = opts.get("output")
        #: What every reply must be (choices or a schema): the kit gets it, the runner checks each reply against it.
        self.spec = OutputSpec.model_validate(self.output) if self.output and payload["kind"] == "chat" else None
        cap = opts.get("max_cost_usd")
        self.budget = None if cap is None else self.spending.budget(self.store, payload["batch"], float(cap))
        self.governor = self.spending.governor(self.store) if payload["kind"] == "chat" else None
        self._remember: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ the run

    def run(self) -> None:
        """Take the lease, run every row that is not final yet, write the results, let go."""
        if not self._take_lease():
            return
        try:
            rows = self._load_rows()
            self._execute(rows)
        finally:
            self._flush()
            keepalive.forget(self)
            retrying(lambda: self.store.release(self.lease, self.token), budget_s=WRITE_BUDGET_S)

    def _take_lease(self) -> bool:
        stale = self.worker.stale_after_s
        give_up = time.monotonic() + 2 * stale
        while True:
            taken = retrying(
                lambda: self.store.set(self.lease, self.token, ttl_s=stale, only_new=True), budget_s=WRITE_BUDGET_S
            )
            if taken:
                keepalive.watch(self)
                self.runs = retrying(self._count_run, budget_s=WRITE_BUDGET_S)
                return True
            # Another runner holds it: wait for it to finish the rows, or for its lease to lapse (it died).
            if time.monotonic() >= give_up or not self._unfinished():
                return False
            time.sleep(1.0)

    def _count_run(self) -> int:
        """This runner is one more that took the chunk: the count lives as long as the rows' results."""
        return self.store.incr(chunk_runs_key(self.chunk), ttl_s=max(self._expires or 0.0, 24 * 3600.0))

    def _unfinished(self) -> list[int]:
        keys = [meta_key(self.backend, row["id"]) for row in self.payload["rows"]]
        raws = retrying(lambda: self.store.mget(keys), budget_s=WRITE_BUDGET_S)
        return [i for i, raw in enumerate(raws) if raw is None or not _final(self.backend.decode_result(raw))]

    def _load_rows(self) -> list[_Row]:
        specs = self.payload["rows"]
        keys = [meta_key(self.backend, spec["id"]) for spec in specs]
        raws = retrying(lambda: self.store.mget(keys), budget_s=WRITE_BUDGET_S)
        rows: list[_Row] = []
        limit = self.worker.max_redeliveries + 1
        # A row with a stored state means the chunk ran before, whatever the broker says.
        self.eager_start = self.eager_start or self.runs > 1 or any(raw is not None for raw in raws)
        for seq, (spec, key, raw) in enumerate(zip(specs, keys, raws, strict=True)):
            meta = None if raw is None else self.backend.decode_result(raw)
            if meta is not None and _final(meta):
                continue  # finished by an earlier delivery: never paid for again
            row = _Row(due=0.0, seq=seq, spec=spec, key=key, config=self._config(spec))
            status, value = (meta or {}).get("status"), (meta or {}).get("result")
            if status == states.STARTED and isinstance(value, dict):
                # In flight when its worker died: the same attempt again, one more delivery.
                row.attempts = int(value.get("attempt", 1)) - 1
                row.deliveries = int(value.get("deliveries", 1)) + 1
                if row.deliveries > limit:
                    self._fail_lost(row)
                    continue
            elif status == states.RETRY and isinstance(value, RetryScheduled):
                row.attempts, row.due = value.attempts, value.retry_at
            elif meta is None:
                # Never marked STARTED: a dead runner may still have called it (within the 50 ms grace).
                row.deliveries = self.runs
            rows.append(row)
        return rows

    def _config(self, spec: RowSpec) -> ChatConfig | None:
        if self.payload["kind"] != "chat":
            return None
        defaults = self.payload["defaults"]
        return ChatConfig(
            user_message=spec["m"],
            temperature=spec.get("t", defaults["temperature"]),
            max_tokens=spec.get("k", defaults["max_tokens"]),
            history=defaults.get("history") or [],
            extra=spec.get("x", defaults.get("extra") or {}),
            output=self.spec,
        )

    def _answer_from_ledger(self, rows: list[_Row]) -> list[_Row]:
        """Rows already paid for (by any batch, any kernel) are answered from the ledger; the rest run."""
        ledger = self.spending.ledger(self.store) if self.cache else None
        if ledger is None:
            return rows
        for row in rows:
            assert row.config is not None
            row.fingerprint = self.spending.fingerprint(row.config, self.output)
        keyed = [row for row in rows if row.fingerprint is not None]
        found = retrying(lambda: ledger.get_many([row.fingerprint or "" for row in keyed]), budget_s=WRITE_BUDGET_S)
        answered = set()
        for row, entry in zip(keyed, found, strict=True):
            if entry is not None and row.attempts == 0:
                cached = self._envelope(
                    row, entry["output"], attempts=0, latency=0.0, cached=True, saved=entry.get("cost_usd")
                )
                self._buffer(row, states.SUCCESS, cached)
                answered.add(row.seq)
        return [row for row in rows if row.seq not in answered]

    def _envelope(
        self, row: _Row, output: Any, *, attempts: int, latency: float, cached: bool, saved: float | None = None
    ) -> dict[str, Any]:
        usage = output.get("usage") if isinstance(output, dict) else None
        cost = 0.0 if cached else self.spending.cost(output.get("model") if isinstance(output, dict) else None, usage)
        return envelope(
            output,
            attempts=attempts,
            latency_s=latency,
            custom_id=row.spec.get("c"),
            index=row.spec.get("p"),
            deliveries=row.deliveries,
            worker=self.hostname,
            cached=cached,
            cost_usd=cost,
            saved_usd=saved if cached else None,
            history=row.history,
        )

    def _execute(self, rows: list[_Row]) -> None:
        rows = self._answer_from_ledger(rows)
        fresh = deque(row for row in rows if row.due == 0.0)
        waiting = [row for row in rows if row.due != 0.0]
        heapq.heapify(waiting)
        while fresh or waiting:
            if self.lost_lease:
                return  # another runner owns the chunk now; it runs what is left
            if embedded_stopped(self.worker.app):
                for row in [*fresh, *waiting]:
                    self._buffer(row, states.FAILURE, embedded_stopped_failure())
                return
            if self._is_cancelled():
                for row in [*fresh, *waiting]:
                    self._buffer(row, states.REVOKED, _revoked())
                return
            if self._paused is not None:
                for row in [*fresh, *waiting]:
                    self._buffer(row, PAUSED, {"reason": self._paused})
                return
            now = time.time()
            if waiting and waiting[0].due <= now:
                row = heapq.heappop(waiting)
            elif fresh:
                row = fresh.popleft()
            else:
                self._flush()
                time.sleep(min(waiting[0].due - now, FLAG_EVERY_S))
                continue
            outcome = self._attempt(row)
            if outcome == "retry":
                heapq.heappush(waiting, row)
            elif outcome == "stopped":
                fresh.appendleft(row)  # cancelled or paused while it waited its turn: the loop says which
            if len(self._writes) >= FLUSH_ROWS or time.monotonic() - self._flushed_at >= FLUSH_EVERY_S:
                self._flush()

    def _attempt(self, row: _Row) -> str:
        """One call for ``row``: ``"done"``, ``"retry"`` (``row.due`` says when) or ``"stopped"`` before it began.

        Before the call: the fleet's rate governor (waiting as long as it says,
        still heeding cancel and pause) and the batch's budget. After it: the
        governor learns the real token count and any hold the provider asked
        for, the budget the real cost, the ledger the answer.
        """
        retry = self.worker.retry_config
        attempt = row.attempts + 1
        error: BaseException | None = None
        output: Any = None
        tokens = self.spending.prompt_tokens(row.config) + row.config.max_tokens if row.config is not None else 0
        if self.governor is not None and not self._wait_for_governor(tokens):
            return "stopped"
        reserved = 0.0
        if self.budget is not None and row.config is not None:
            reserved = self.spending.highest_cost(tokens - row.config.max_tokens, row.config.max_tokens) or 0.0
            if not retrying(lambda: self.budget.reserve(reserved), budget_s=WRITE_BUDGET_S):  # type: ignore[union-attr]
                self._pause("the batch reached its max_cost_usd; raise it and resume: run.resume(max_cost_usd=...)")
                return "stopped"
        with self._kit_slot():
            mark = self._mark_started(row, attempt)
            started = time.perf_counter()
            try:
                output = self._work(row)
            except Exception as exc:
                error = exc
            finally:
                if mark is not None:
                    start_marks.disarm(mark)  # before any later state of the row is written
            latency = round(time.perf_counter() - started, 6)
        spec = row.spec
        usage = output.get("usage") if isinstance(output, dict) else None
        self._settle(tokens, usage, reserved, output if isinstance(output, dict) else None)
        if error is None and self.spec is not None:
            error = self._check(output)
        if error is None:
            result = self._envelope(row, output, attempts=attempt, latency=latency, cached=False)
            self._buffer(row, states.SUCCESS, result)
            if row.fingerprint is not None and self.cache:
                self._remember[row.fingerprint] = {"output": output, "cost_usd": result["cost_usd"]}
            return "done"
        verdict = classify(error)
        if verdict.status_code == 429 and self.governor is not None:
            # One worker's 429 holds the whole fleet, not just this thread.
            self.governor.hold(verdict.retry_after_s or retry.countdown(attempt - 1))
        if verdict.out_of_quota:
            self._pause(f"the provider says the account is out of quota ({_explain(error, with_cause=False)})")
            row.attempts = attempt
            return "stopped"
        what = verdict.error_type + (f" (HTTP {verdict.status_code})" if verdict.status_code else "")
        what += f": {_explain(error, with_cause=verdict.status_code is None)}"
        if verdict.retryable and attempt <= retry.max_retries:
            row.history.append(f"attempt {attempt}: {what[:HISTORY_CHARS]}")
            if isinstance(error, SchemaError) and self.spec is not None and row.config is not None:
                # Asked again, told what was wrong: the same request at temperature 0 would get the same reply.
                told = self.spec.reask_message(spec["m"], str(error))
                row.config = row.config.model_copy(update={"user_message": told})
            countdown = retry.countdown(attempt - 1, verdict.retry_after_s)
            row.attempts, row.deliveries, row.due = attempt, 1, time.time() + countdown
            scheduled = RetryScheduled(
                what, verdict.error_type, verdict.status_code, attempt, retry.max_retries, row.due
            )
            self._write_now(row, states.RETRY, encode_meta(self.backend, spec["id"], states.RETRY, scheduled))
            return "retry"
        why = f"gave up after {attempt} attempts" if verdict.retryable else "not retried"
        reply = output if isinstance(error, SchemaError) and isinstance(output, dict) else None
        failure = TaskFailed(
            f"{what} ({why})", verdict.error_type, verdict.status_code, attempt, row.history, reply=reply
        )
        self._buffer(row, states.FAILURE, failure)
        return "done"

    def _check(self, output: Any) -> SchemaError | None:
        """Check the reply against the spec: ``output["parsed"]`` becomes the validated object, or the error."""
        assert self.spec is not None
        if not isinstance(output, dict):
            return SchemaError(f"the kit returned {type(output).__name__}, not a chat response")
        try:
            output["parsed"] = self.spec.check(output.get("content"))
        except SchemaError as exc:
            return exc
        return None

    def _mark_started(self, row: _Row, attempt: int) -> int | None:
        """Store the row's STARTED state now (chunk ran before) or once the call outlives the grace; the mark."""
        info = {"attempt": attempt, "deliveries": row.deliveries, "hostname": self.hostname}
        value = encode_meta(self.backend, row.spec["id"], states.STARTED, info)
        if self.eager_start:
            self._write_now(row, states.STARTED, value)
            return None
        return start_marks.arm(lambda: self._send([_Write(row, states.STARTED, value)], START_MARK_BUDGET_S))

    def _wait_for_governor(self, tokens: int) -> bool:
        """Wait until the fleet's bucket grants the call; ``False`` if the batch was cancelled or paused meanwhile."""
        governor = self.governor
        assert governor is not None
        while True:
            wait = retrying(lambda: governor.acquire(tokens), budget_s=WRITE_BUDGET_S)
            if wait <= 0:
                return True
            self._flush()
            if self._is_cancelled() or self._paused is not None:
                return False
            time.sleep(min(wait, GOVERNOR_NAP_S))

    def _settle(
        self, tokens: int, usage: dict[str, Any] | None, reserved: float, output: dict[str, Any] | None
    ) -> None:
        """Tell the governor and the budget what the call really took."""
        if self.governor is not None:
            actual = int((usage or {}).get("total_tokens") or tokens)
            self.governor.settle(tokens, actual)
            headers = (output or {}).pop("rate_limits", None) or {}
            self.governor.hold(hold_from_headers(headers))
        elif output is not None:
            output.pop("rate_limits", None)
        if self.budget is not None:
            cost = self.spending.cost((output or {}).get("model"), usage) if usage else 0.0
            budget = self.budget
            retrying(lambda: budget.settle(reserved, cost or 0.0), budget_s=WRITE_BUDGET_S)

    def _pause(self, reason: str) -> None:
        """Pause the whole batch (every chunk of it stops starting rows) for ``reason``."""
        self._paused = reason
        retrying(lambda: self.store.set(pause_key(self.payload["batch"]), reason), budget_s=WRITE_BUDGET_S)

    def _work(self, row: _Row) -> Any:
        if row.config is None:
            rag = self.worker.rag
            if rag is None:
                raise TaskFailed("this worker process has no rag object configured", "RuntimeError")
            spec = row.spec
            return [_chunk_dict(chunk) for chunk in rag.ingest(spec["path"], **(spec.get("meta") or {}))]
        return run_chat(self.worker.kit, row.config)

    def _kit_slot(self) -> AbstractContextManager[Any]:
        slot = self.worker.kit_slot
        return slot if slot is not None else nullcontext()

    def _fail_lost(self, row: _Row) -> None:
        limit = self.worker.max_redeliveries
        attempt = row.attempts + 1
        self._buffer(
            row,
            states.FAILURE,
            TaskFailed(
                f"WorkerLost: the worker running attempt {attempt} died {row.deliveries - 1} times; "
                f"not redelivered again (max_redeliveries={limit})",
                "WorkerLost",
                None,
                attempt,
            ),
        )

    # ------------------------------------------------------------------ flags

    def _is_cancelled(self) -> bool:
        """Read the batch's cancel flags and its pause flag, at most every ``FLAG_EVERY_S``."""
        if self._cancelled or time.monotonic() - self._flags_at < FLAG_EVERY_S:
            return self._cancelled
        self._flags_at = time.monotonic()
        flags = [*self.payload["flags"], pause_key(self.payload["batch"])]
        found = retrying(lambda: self.store.mget(flags), budget_s=WRITE_BUDGET_S)
        self._cancelled = any(value is not None for value in found[:-1])
        if found[-1] is not None and self._paused is None:
            self._paused = found[-1].decode() if isinstance(found[-1], bytes) else str(found[-1])
        return self._cancelled

    # ------------------------------------------------------------------ writing

    def _buffer(self, row: _Row, state: str, result: Any) -> None:
        self._writes.append(_Write(row, state, encode_meta(self.backend, row.spec["id"], state, result)))

    def _write_now(self, row: _Row, state: str, value: str) -> None:
        self._send([_Write(row, state, value)])

    def _flush(self) -> None:
        writes, self._writes = self._writes, []
        remember, self._remember = self._remember, {}
        self._flushed_at = time.monotonic()
        if writes:
            self._send(writes)
        ledger = self.spending.ledger(self.store) if remember else None
        if ledger is not None:
            retrying(lambda: ledger.put_many(remember), budget_s=WRITE_BUDGET_S)

    def _send(self, writes: list[_Write], budget_s: float = WRITE_BUDGET_S) -> None:
        events = events_key(self.payload["batch"]) if self.payload["events"] else None

        def send() -> None:
            with self.store.batch() as batch:
                for write in writes:
                    batch.set(write.row.key, write.value, ttl_s=self._expires)
                    if write.state in states.READY_STATES:
                        batch.publish(write.row.key, write.value)  # AsyncResult.get() waits on this channel
                if events is not None:
                    entry = ",".join(f"{w.row.spec.get('p', 0)}:{EVENT_CODES[w.state]}" for w in writes)
                    batch.append(events, entry, maxlen=EVENTS_MAXLEN)
                    if self._expires:
                        batch.expire(events, self._expires)

        retrying(send, budget_s=budget_s)


def _final(meta: dict[str, Any]) -> bool:
    return meta.get("status") in states.READY_STATES


def _revoked() -> TaskRevokedError:
    return TaskRevokedError("batch cancelled")


def _chunk_dict(chunk: Any) -> Any:
    return chunk.model_dump(mode="json") if hasattr(chunk, "model_dump") else chunk


def _explain(exc: BaseException, *, with_cause: bool) -> str:
    """The message, plus the low-level cause SDKs hide behind "Connection error.", with keys blanked.

    Everything a row's error or history says is built here, so this is where
    a key echoed by a provider or put in an exception by an SDK is removed
    before it reaches the backend.
    """
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if with_cause and cause is not None and not (str(cause) and str(cause) in text):
        detail = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        text += f" (caused by {detail})"
    return redact(text)


# ---------------------------------------------------------------------------- the embedded worker stopping

#: Set on the app of an embedded (in-process) worker that is stopping: its queue goes with it.
_STOPPED = "_racto_embedded_stopped"


def mark_embedded_stopped(app: Any, stopped: bool = True) -> None:
    """The embedded worker of ``app`` is stopping (or, ``False``, starting again): while it is, rows its
    runners have not begun fail instead of waiting forever."""
    if stopped:
        app.__dict__[_STOPPED] = True
    else:
        app.__dict__.pop(_STOPPED, None)


def embedded_stopped(app: Any) -> bool:
    return bool(app.__dict__.get(_STOPPED))


def embedded_stopped_failure() -> TaskFailed:
    """What a row that an embedded worker could no longer run says (queued, or not yet begun in its chunk)."""
    return TaskFailed(
        "the embedded worker stopped before running this row; connect() again and retry the failed rows",
        "EmbeddedStopped",
    )
