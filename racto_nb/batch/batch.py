"""A batch: every row of a source, sent in chunks, followed through its events, none ever lost.

``Batch`` is what a notebook holds while its rows are out on the fleet:

* **Submit returns at once.** Checking the source is vectorised
  (:mod:`racto_nb.batch.rows`); rendering, the local checkpoint of the inputs
  (:mod:`racto_nb.batch.checkpoint`) and publishing happen in a daemon thread.
  A million rows hand control back in well under a second.
* **A window, not the batch, is in Redis.** The publisher keeps at most
  ``window`` rows sent and unfinished; the rest wait in the checkpoint. Rows
  travel several per message (:mod:`racto_nb.engine.chunks`).
* **A refresh reads what changed.** Workers append each row's state changes
  to the batch's event stream; a refresh reads the new entries and the
  results of the rows that just finished, never every unfinished row.
  Counts are kept as the events come in, so a refresh costs the same with
  ten rows or a million outstanding.
* **Results go to disk as they arrive**, in the checkpoint; their Redis keys
  then expire soon. The final DataFrame is read from there.
* **Nothing is lost.** A row whose worker died shows so and runs again
  (:mod:`racto_nb.engine.keepalive`); a chunk that left no trace is sent again
  with the same id (:mod:`racto_nb.engine.recovery`); a backend that restarts
  is waited for, and if it lost its data the manifest is saved again and the
  unfinished rows are sent again from the checkpoint; a kernel that died is
  replaced by :meth:`Batch.attach`, which reads the checkpoint first, asks the
  backend only for what is missing and publishes whatever was never sent.

Rows the source skipped (missing values) are part of the result, with status
``skipped``, but not of the progress: they are not tasks. Views never call
Celery: they receive the ``BatchProgress`` that :meth:`Batch.refresh` computes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from celery import states
from celery.exceptions import TaskRevokedError
from celery.utils import uuid

from racto_nb.batch.catalog import remember
from racto_nb.batch.checkpoint import INPUT_PART_ROWS, SKIPPED_STATUS, Checkpoint
from racto_nb.batch.columns import with_fields
from racto_nb.batch.rows import Rows
from racto_nb.batch.twins import Twins, request_hashes
from racto_nb.config import DEFAULT_PUBLISH_WINDOW, load_config
from racto_nb.costs.governor import Budget
from racto_nb.engine.chunks import ChunkPayload, RowSpec, chunk_spans, rows_per_chunk
from racto_nb.engine.keys import (
    batch_key,
    cancel_key,
    chunk_task_id,
    events_key,
    pause_key,
    published_key,
    publisher_key,
    row_id,
)
from racto_nb.engine.polling import poll
from racto_nb.engine.recovery import LiveWorkers, find_vanished
from racto_nb.engine.results import encode_meta, meta_key, to_task_result
from racto_nb.engine.store import Store, backend_unreachable, connection_errors, retrying, store_for
from racto_nb.errors import BatchNotFound, InvalidArgument, TaskFailed
from racto_nb.models import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    BatchItem,
    BatchProgress,
    ChatConfig,
    Message,
    TaskResult,
    TaskStatus,
)
from racto_nb.structured import OutputSpec

if TYPE_CHECKING:
    from racto_nb.engine.worker import RactoCeleryWorker

__all__ = ["FRAME_COLUMNS", "SKIPPED_ERROR_TYPE", "SKIPPED_STATUS", "Batch"]

#: ``error_type`` of rows that were never sent (their frame status is ``skipped``).
SKIPPED_ERROR_TYPE = "NotSent"
MANIFEST_VERSION = 2
FRAME_COLUMNS = [
    "task_id",
    "status",
    "content",
    "parsed",
    "error",
    "error_type",
    "status_code",
    "attempts",
    "latency_s",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "custom_id",
    "deliveries",
    "cached",
    "cost_usd",
    "history",
]

# Row states as the batch keeps them, one byte per row.
PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED, SKIPPED, PAUSED = range(8)
_FINAL = (SUCCESS, FAILURE, REVOKED)
_STATUS_OF_CODE = {
    PENDING: TaskStatus.PENDING,
    STARTED: TaskStatus.STARTED,
    RETRY: TaskStatus.RETRY,
    SUCCESS: TaskStatus.SUCCESS,
    FAILURE: TaskStatus.FAILURE,
    REVOKED: TaskStatus.REVOKED,
    PAUSED: TaskStatus.PAUSED,
}
_CODE_OF_STATUS = {status: code for code, status in _STATUS_OF_CODE.items()}
_CODE_OF_EVENT = {"S": STARTED, "R": RETRY, "D": SUCCESS, "F": FAILURE, "V": REVOKED, "P": PAUSED}

#: Messages per publishing round trip.
PUBLISH_GROUP = 100
#: How long publishing keeps trying while the broker is down before failing the rows it could not send.
PUBLISH_BUDGET_S = 60.0
#: Event entries read per refresh, and rows confirmed per refresh (the rest: next refresh).
EVENTS_PER_REFRESH = 500
CONFIRMS_PER_REFRESH = 2_000
#: One look confirms finished rows for about this long; the rest wait for the next look, which comes at once.
LOOK_BUDGET_S = 0.008
CONFIRM_SLICE = 200
#: The flusher thread ends after this long with nothing to write (the next result starts it again).
FLUSHER_IDLE_S = 5.0
#: Final rows are written to the checkpoint this often, or when this many are waiting.
FLUSH_EVERY_S = 2.0
FLUSH_ROWS = 5_000
#: Once in the checkpoint, a row's result stays in the backend this long (for other followers), then expires.
COLLECTED_TTL_S = 3_600.0
#: How often the slower checks run: workers that died, chunks that vanished, the manifest still there.
ORPHANS_EVERY_S = 3.0
#: Rows out, none running, no event for this long: the progress says the batch stands still.
STANDSTILL_S = 60.0
VANISHED_EVERY_S = 10.0
VANISHED_AFTER_S = 15.0
MANIFEST_EVERY_S = 5.0
#: The publisher lease: renewed by the kernel that publishes, so only one kernel ever does.
PUBLISHER_LEASE_S = 30.0
#: An attach waits for the submitting kernel's checkpoint while a new input part appears at least this often.
SPOOL_STALL_S = 3.0


@dataclass(eq=False)
class _Round:
    """The rows one publishing round sends (round 0: the batch; then one per "Retry failed")."""

    number: int
    positions: np.ndarray
    spans: list[tuple[int, int]]
    published: int = 0  # chunks handed to the broker so far
    sent_at: dict[int, float] = field(default_factory=dict)  # chunk -> when (monotonic), for the vanished check


class Batch:
    """A submitted batch and its live state. Thread-safe.

    Build one with :meth:`submit` or :meth:`attach`; read it with
    :meth:`refresh`, :meth:`wait`, :meth:`to_frame` and :meth:`results`.
    """

    #: How long publishing keeps trying while the broker does not answer.
    publish_budget_s = PUBLISH_BUDGET_S

    def __init__(
        self,
        worker: RactoCeleryWorker,
        *,
        batch_id: str,
        manifest: dict[str, Any],
        checkpoint: Checkpoint,
        index: pd.Index,
        skipped: np.ndarray,
    ) -> None:
        self.worker = worker
        self.batch_id = batch_id
        self.manifest = manifest
        self.checkpoint = checkpoint
        self.index = index
        self.store: Store = store_for(worker.app.backend)
        self.backend = worker.app.backend
        self.created_at = float(manifest["created_at"])
        self.window = int(manifest.get("window", DEFAULT_PUBLISH_WINDOW))
        self.size = int(manifest["rows_per_chunk"])
        n = len(index)
        self.status = np.where(skipped, SKIPPED, PENDING).astype(np.int8)
        self.round_of = np.zeros(n, dtype=np.int16)
        self.counts = dict.fromkeys(range(8), 0)
        self.counts[SKIPPED] = int(skipped.sum())
        self.counts[PENDING] = n - self.counts[SKIPPED]
        sendable = np.flatnonzero(~skipped)
        self.rounds = [_Round(0, sendable, chunk_spans(len(sendable), self.size))]
        self.cancelled = False
        self.publish_error: BaseException | None = None
        self.note: str | None = None
        #: When a row last changed state (monotonic): a batch that stands still says so (see :meth:`_standstill`).
        self._moved_at = time.monotonic()
        opts = manifest.get("opts") or {}
        #: Answer rows from the pay-once ledger and send twins once (``cache=False`` turns both off).
        self.cache = bool(opts.get("cache", True))
        self.max_cost_usd: float | None = opts.get("max_cost_usd")
        #: The result frame carries each row's rendered ``prompt`` (``prompt_column=False`` leaves it out).
        self.prompt_column: bool = bool(opts.get("prompt_column", True))
        #: What every reply must be (``choices``/``schema``): its fields become typed columns of the frame.
        self.output = OutputSpec.model_validate(opts["output"]) if opts.get("output") else None
        self.twins = Twins.none(n)
        self.pause_reason: str | None = None
        self.spent = {"cost_usd": 0.0, "saved_usd": 0.0, "cached": 0}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop_publishing = threading.Event()
        self._publisher: threading.Thread | None = None
        self._publisher_token = uuid()
        self._cursor = "0"
        self._buffer: list[dict[str, Any]] = []
        self._flushed_at = time.monotonic()
        self._to_confirm: set[int] = set()
        #: Rows a PAUSED event named, to be checked against their current round (see _take_paused_rows).
        self._paused_rows: set[int] = set()
        self._finished_at: float | None = None
        self._workers = LiveWorkers(self.store)
        self._orphans = 0
        #: Rows whose worker died (position -> its node name), until a live worker takes them.
        self._lost_to: dict[int, str] = {}
        self._last: dict[str, float] = {"orphans": 0.0, "vanished": time.monotonic(), "manifest": time.monotonic()}
        self._backend_down_until = 0.0
        #: The last look left events or finished rows unread: the next one should come at once.
        self.behind = False
        self._flush_lock = threading.Lock()
        self._flush_due = threading.Event()
        self._flusher: threading.Thread | None = None
        self._outage = 0
        self._rows: Rows | None = None
        self._spooled = threading.Event()
        self._resend: list[list[tuple[_Round, int]]] = []
        self._pause_read_at = 0.0

    def __repr__(self) -> str:
        return f"<Batch {self.batch_id} rows={len(self.index)} tasks={self.total}>"

    # ------------------------------------------------------------------ creation

    @classmethod
    def submit(
        cls,
        worker: RactoCeleryWorker,
        rows: Rows | Sequence[str | BatchItem | None],
        *,
        index: pd.Index | None = None,
        reasons: Sequence[str | None] | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        background: bool = True,
        window: int | None = None,
        checkpoint_dir: str | Path | None = None,
        title: str = "",
        cache: bool = True,
        max_cost_usd: float | None = None,
        prompt_column: bool = True,
        output: OutputSpec | None = None,
    ) -> Batch:
        """Save the manifest, then checkpoint the inputs and publish them (in a daemon thread by default).

        ``rows`` is a checked source (:func:`~racto_nb.batch.rows.prepare_rows`),
        or prompts given one by one: ``None`` marks a row that is not sent,
        ``reasons[i]`` says why. Nothing is enqueued when any of it is invalid.
        ``output`` (:func:`racto_nb.structured.output_spec`) travels to the
        workers in the batch's options: replies are constrained or checked
        against it, and its fields become typed columns.
        """
        if not isinstance(rows, Rows):
            rows = Rows.of_items(rows, index=index, reasons=reasons)
        elif index is not None or reasons is not None:
            raise InvalidArgument("index= and reasons= go with prompts given one by one, not with prepared rows")
        _require_storable(rows.index)
        defaults = worker.defaults(ChatConfig(user_message="-", temperature=temperature, max_tokens=max_tokens))
        settings = load_config()
        batch_id = uuid()
        checkpoint = Checkpoint(Path(checkpoint_dir or settings.checkpoint_dir), batch_id)
        n = len(rows)
        manifest = {
            "version": MANIFEST_VERSION,
            "batch": batch_id,
            "worker": worker.name,
            "rows": n,
            "rows_per_chunk": rows_per_chunk(n),
            "rounds": 1,
            "created_at": time.time(),
            "defaults": defaults,
            "window": settings.publish_window if window is None else window,
            "checkpoint": str(checkpoint.path),
            "host": socket.gethostname(),
            "title": title,
            "opts": {"cache": cache, "max_cost_usd": max_cost_usd, "prompt_column": prompt_column},
        }
        if output is not None:
            manifest["opts"]["output"] = output.description()
        batch = cls(
            worker, batch_id=batch_id, manifest=manifest, checkpoint=checkpoint, index=rows.index, skipped=rows.skipped
        )
        batch._rows = rows
        try:
            # One try: a backend that is down before anything was sent is a one-line error now, not a minute
            # of retries (those are for a backend that restarts while the batch runs).
            batch.save_manifest(budget_s=0.0)
            remember(worker, batch_id, manifest["created_at"])
        except connection_errors() as exc:
            raise backend_unreachable(worker.app, exc) from None
        if max_cost_usd is not None:
            batch._budget().set_cap(float(max_cost_usd))
        checkpoint.write_index(rows.index)
        batch._start_publisher(background=background)
        return batch

    @classmethod
    def attach(cls, worker: RactoCeleryWorker, batch_id: str, *, checkpoint_dir: str | Path | None = None) -> Batch:
        """Rebuild a batch, e.g. after a kernel restart: its checkpoint first, then the backend for what is missing.

        Works while the batch is still running, and publishes whatever the old
        kernel had not sent yet.
        """
        store = store_for(worker.app.backend)
        raw = store.get(batch_key(batch_id))
        local = Checkpoint(Path(checkpoint_dir or load_config().checkpoint_dir), batch_id)
        lost = False
        if raw is not None:
            manifest = json.loads(raw)
        elif local.exists():
            manifest, lost = local.read_manifest(), True  # the backend lost it (restarted without persistence)
        else:
            raise BatchNotFound(
                f"no batch {batch_id!r} in the result backend and no checkpoint of it in {local.path.parent}: check "
                "the id, and that this kernel is connected to the same result backend and runs in the notebook's "
                "folder. If Redis was restarted without persistence and no kernel kept the batch, it is gone: "
                "submit it again"
            )
        owner = manifest.get("worker", worker.name)
        if owner != worker.name:
            raise BatchNotFound(
                f"batch {batch_id!r} was submitted through the worker named {owner!r}, not {worker.name!r}; "
                f"attach with that worker (its retries must run the same kit)"
            )
        checkpoint = Checkpoint(Path(manifest["checkpoint"]).parent, batch_id)
        if not checkpoint.exists():
            raise BatchNotFound(
                f"batch {batch_id!r} keeps its inputs and results in {manifest['checkpoint']} on "
                f"{manifest.get('host', 'another machine')}, which is not here: attach from that machine, "
                "or copy that folder to the same path here"
            )
        index = checkpoint.read_index()
        skipped = np.zeros(len(index), dtype=bool)
        if checkpoint.spooled_parts():
            reasons = checkpoint.reasons()
            skipped[: len(reasons)] = ~pc.is_null(reasons).to_numpy(zero_copy_only=False)
        batch = cls(worker, batch_id=batch_id, manifest=manifest, checkpoint=checkpoint, index=index, skipped=skipped)
        batch._restore(lost)
        batch._start_publisher(background=True)
        return batch

    def _restore(self, lost: bool) -> None:
        """State after an attach: rounds, what was sent, final rows from the checkpoint, the rest from the backend."""
        leaders = self.checkpoint.read_twins()
        if leaders is not None:
            self._adopt_twins(Twins(np.asarray(leaders, dtype=np.int64)))
        self._adopt_rounds(int(self.manifest.get("rounds", 1)))
        self.cancelled = self.store.exists(cancel_key(self.batch_id))
        self._read_pause()
        if not lost:
            self._read_published_marks()
        done = self.checkpoint.results()
        if done.num_rows:
            frame = done.select(["position", "round", "status"]).to_pandas().drop_duplicates("position", keep="last")
            for position, round_no, status in frame.itertuples(index=False, name=None):
                if int(round_no) == int(self.round_of[position]) and self.status[position] != SKIPPED:
                    self._set(int(position), _CODE_OF_STATUS[TaskStatus(status)])
        self._fail_unrecorded()
        if lost:
            self.save_manifest()
            self._resend_unfinished("the result backend lost this batch")
        self._rescan()

    def _adopt_rounds(self, count: int) -> list[int]:
        """Take in rounds ``len(self.rounds)`` to ``count - 1`` from the checkpoint; returns their positions.

        At attach, these are the rounds the batch already had; while following,
        the ones another kernel added (its "Retry failed" or resume), so this
        kernel's view does not wait forever on rows now sent under new ids.
        """
        adopted: list[int] = []
        for number in range(len(self.rounds), count):
            positions = np.asarray(self.checkpoint.read_round(number), dtype=np.int64)
            sent = positions[~self.twins.is_twin(positions)]
            self.rounds.append(_Round(number, sent, chunk_spans(len(sent), self.size)))
            self.round_of[positions] = number
            adopted.extend(positions.tolist())
        return adopted

    def _read_published_marks(self) -> None:
        """What every kernel has handed to the broker so far (a kernel taking over sending must not resend it)."""
        marks = self.store.hgetall(published_key(self.batch_id))
        for round_ in self.rounds:
            seen = min(int(marks.get(str(round_.number), 0)), len(round_.spans))
            for chunk in range(round_.published, seen):
                round_.sent_at[chunk] = time.monotonic() - VANISHED_AFTER_S  # old enough to be checked at once
            round_.published = max(round_.published, seen)

    def _follow_manifest(self) -> None:
        """Read the manifest again: rounds and a cap another kernel added, or a backend that lost the batch."""
        raw = self.store.get(batch_key(self.batch_id))
        if raw is None:
            self._back_online()
            return
        manifest = json.loads(raw)
        count = int(manifest.get("rounds", 1))
        if count > len(self.rounds):
            adopted = self._adopt_rounds(count)
            for position in adopted:
                self._set(position, PENDING)
            self._to_confirm.update(adopted)  # their events may have gone by while this kernel read old ids
            self.manifest["rounds"] = count
            self._finished_at = None
            self._read_published_marks()
            self._start_publisher(background=True)  # it follows the other kernel's sending, and takes over if it stops
        cap = (manifest.get("opts") or {}).get("max_cost_usd")
        if cap != self.max_cost_usd:
            self.max_cost_usd = cap
            self.manifest.setdefault("opts", {})["max_cost_usd"] = cap

    def _wait_for_inputs(self) -> None:
        """Attached while the submitting kernel still checkpoints the inputs: wait while it makes progress.

        It holds the publisher lease while it spools; parts appear every few
        hundred milliseconds. A lease with no new part for
        :data:`SPOOL_STALL_S` is a kernel that died (its lease has not expired yet).
        """
        parts, changed = self.checkpoint.spooled_parts(), time.monotonic()
        while not self.checkpoint.inputs_complete() and self.store.exists(publisher_key(self.batch_id)):
            now = time.monotonic()
            current = self.checkpoint.spooled_parts()
            if current != parts:
                parts, changed = current, now
            elif now - changed >= SPOOL_STALL_S:
                return
            time.sleep(0.05)

    def _fail_unrecorded(self) -> None:
        """Rows the submitting kernel never checkpointed (it died within its first seconds) cannot be sent."""
        self._wait_for_inputs()
        if self.checkpoint.inputs_complete():
            return
        recorded = self.checkpoint.spooled_parts() * INPUT_PART_ROWS
        for round_ in self.rounds:
            if round_.number == 0:
                for position in round_.positions[round_.positions >= recorded].tolist():
                    self._record(
                        position,
                        TaskResult(
                            task_id=row_id(self.batch_id, position),
                            status=TaskStatus.FAILURE,
                            error="never recorded: the kernel that submitted the batch stopped before "
                            "checkpointing this row; run the cell again for these rows",
                            error_type="NotRecorded",
                            index=position,
                        ),
                    )
                round_.positions = round_.positions[round_.positions < recorded]
                round_.spans = chunk_spans(len(round_.positions), self.size)
                round_.published = min(round_.published, len(round_.spans))

    # ------------------------------------------------------------------ manifest

    def save_manifest(self, budget_s: float | None = None) -> None:
        """Write the manifest to the backend (expiring with the results) and to the checkpoint.

        ``budget_s``: how long to keep trying a backend that does not answer (default: the publish budget).
        """
        text = json.dumps(self.manifest)
        ttl = float(self.backend.expires) if self.backend.expires else None
        budget = self.publish_budget_s if budget_s is None else budget_s
        retrying(lambda: self.store.set(batch_key(self.batch_id), text, ttl_s=ttl), budget_s=budget)
        self.checkpoint.write_manifest(self.manifest)

    # ------------------------------------------------------------------ publishing

    def _start_publisher(self, *, background: bool) -> None:
        if not background:
            self._publish_all(foreground=True)
        with self._lock:
            if self._publisher is not None and self._publisher.is_alive():
                self._wake.set()
                return
            if not self._has_work():
                return
            self._stop_publishing.clear()
            self._publisher = threading.Thread(
                target=self._publish_all, name=f"racto-publish-{self.batch_id[:8]}", daemon=True
            )
            self._publisher.start()

    def _has_work(self) -> bool:
        return self._rows is not None or bool(self._resend) or any(r.published < len(r.spans) for r in self.rounds)

    def _publish_all(self, foreground: bool = False) -> None:
        """Checkpoint the inputs, then send chunk after chunk within the window until every one is out.

        In the foreground (``background=False``) it returns once the window
        is full, and a background publisher sends the rest.
        """
        try:
            if self._rows is not None:
                # Held while the inputs are checkpointed, so a kernel attaching meanwhile waits for them.
                self._hold_publisher_lease()
                self._spool()
            while not self._stop_publishing.is_set():
                if not self._hold_publisher_lease():
                    self.note = "another kernel is sending this batch's rows; this one follows it"
                    if foreground or self._stop_publishing.wait(2.0):
                        return
                    continue
                if self._paused_now():
                    if foreground or self._stop_publishing.wait(1.0):
                        return
                    continue
                with self._lock:
                    chunks = self._resend.pop(0) if self._resend else self._next_chunks()
                if chunks is None:
                    return
                if not chunks:
                    if foreground:
                        return
                    self._wake.wait(0.2)
                    self._wake.clear()
                    continue
                self._send(chunks)
        except Exception as exc:  # the broker stayed down: say so for every row that could not go out
            self.publish_error = exc
            self._fail_unsent(exc)
        finally:
            if not foreground or not self._has_work():
                self._release_publisher_lease()

    def _paused_now(self) -> bool:
        """The pause flag, read at most once a second by the publisher."""
        now = time.monotonic()
        if now - self._pause_read_at >= 1.0:
            self._pause_read_at = now
            self._read_pause()
        return self.pause_reason is not None

    def _hold_publisher_lease(self) -> bool:
        key = publisher_key(self.batch_id)
        if self.store.renew(key, self._publisher_token, PUBLISHER_LEASE_S):
            return True
        if not self.store.set(key, self._publisher_token, ttl_s=PUBLISHER_LEASE_S, only_new=True):
            return False
        with self._lock:  # taking over from another kernel: start where it stopped
            self._read_published_marks()
        return True

    def _release_publisher_lease(self) -> None:
        try:
            self.store.release(publisher_key(self.batch_id), self._publisher_token)
        except connection_errors():
            pass  # it expires on its own

    def _next_chunks(self) -> list[tuple[_Round, int]] | None:
        """The next chunks to send, ``[]`` while the window is full, ``None`` once every chunk is out."""
        with self._lock:
            final = self.counts[SUCCESS] + self.counts[FAILURE] + self.counts[REVOKED]
            outstanding = self._published_rows() - final
            room = (self.window - outstanding) if self.window > 0 else 1 << 62
            left = [r for r in self.rounds if r.published < len(r.spans)]
            if not left:
                return None
            if room <= 0:
                return []
            chosen: list[tuple[_Round, int]] = []
            for round_ in left:
                chunk = round_.published
                while chunk < len(round_.spans) and len(chosen) < PUBLISH_GROUP and room > 0:
                    start, stop = round_.spans[chunk]
                    chosen.append((round_, chunk))
                    room -= stop - start
                    chunk += 1
                if len(chosen) >= PUBLISH_GROUP or room <= 0:
                    break
            return chosen

    def _published_rows(self) -> int:
        rows = 0
        for round_ in self.rounds:
            if round_.published:
                rows += round_.spans[round_.published - 1][1]
        return rows

    def _payload(self, round_: _Round, chunk: int) -> ChunkPayload:
        start, stop = round_.spans[chunk]
        positions = round_.positions[start:stop].tolist()
        inputs = self.checkpoint.select(positions)
        rows: list[RowSpec] = []
        for position, message, custom, own in zip(
            positions, inputs.messages, inputs.custom_ids, inputs.overrides, strict=True
        ):
            row: RowSpec = {"id": row_id(self.batch_id, position, round_.number), "p": position, "m": message or ""}
            if custom is not None:
                row["c"] = custom
            if own:
                for key, short in (("temperature", "t"), ("max_tokens", "k"), ("extra", "x")):
                    if key in own:
                        row[short] = own[key]  # type: ignore[literal-required]
            rows.append(row)
        flags = [cancel_key(self.batch_id), cancel_key(f"{self.batch_id}:{round_.number}")]
        opts = {"cache": self.cache, "max_cost_usd": self.max_cost_usd, **(self.manifest.get("opts") or {})}
        return self.worker.chunk(
            self.batch_id, "chat", self.manifest["defaults"], rows, events=True, flags=flags, opts=opts
        )

    def _budget(self) -> Budget:
        return self.worker.spending.budget(self.store, self.batch_id, float(self.max_cost_usd or 0.0))

    def _send(self, chunks: list[tuple[_Round, int]]) -> None:
        messages = [(chunk_task_id(self.batch_id, r.number, c), self._payload(r, c)) for r, c in chunks]
        messages = [(chunk_id, payload) for chunk_id, payload in self._answer_known(messages) if payload["rows"]]

        def note(attempt: int, pause: float, exc: BaseException) -> None:
            self.note = f"the broker is not answering ({type(exc).__name__}); sending again in {pause:.0f} s"

        if messages:
            retrying(
                lambda: self.worker.publish(messages),
                budget_s=self.publish_budget_s,
                on_retry=note,
                stop=self._stop_publishing,
            )
        self.note = None
        with self._lock:
            now = time.monotonic()
            touched = set()
            for round_, chunk in chunks:
                round_.published = max(round_.published, chunk + 1)
                round_.sent_at[chunk] = now
                touched.add(round_)
        marks = {str(r.number): str(r.published) for r in touched}

        def mark() -> None:
            with self.store.batch() as batch:
                for number, count in marks.items():
                    batch.hset(published_key(self.batch_id), number, count)
                if self.backend.expires:
                    batch.expire(published_key(self.batch_id), float(self.backend.expires))

        retrying(mark, budget_s=self.publish_budget_s)

    def _answer_known(self, messages: list[tuple[str, ChunkPayload]]) -> list[tuple[str, ChunkPayload]]:
        """Rows the ledger already answers are recorded here and not sent (the worker would skip them anyway)."""
        spending = self.worker.spending
        ledger = spending.ledger(self.store) if self.cache else None
        if ledger is None or not messages:
            return messages
        defaults = self.manifest["defaults"]
        keyed: list[tuple[RowSpec, str]] = []
        for _, payload in messages:
            for row in payload["rows"]:
                config = ChatConfig.model_construct(
                    user_message=row["m"],
                    temperature=row.get("t", defaults["temperature"]),
                    max_tokens=row.get("k", defaults["max_tokens"]),
                    history=[Message(**m) for m in defaults.get("history") or []],
                    extra=row.get("x", defaults.get("extra") or {}),
                )
                fp = spending.fingerprint(config, (self.manifest.get("opts") or {}).get("output"))
                if fp is not None:
                    keyed.append((row, fp))
        found = retrying(lambda: ledger.get_many([fp for _, fp in keyed]), budget_s=self.publish_budget_s)
        answered: set[str] = set()
        with self._lock:
            for (row, _), entry in zip(keyed, found, strict=True):
                if entry is None:
                    continue
                output = entry["output"]
                self._record(
                    int(row["p"]),
                    TaskResult(
                        task_id=row["id"],
                        status=TaskStatus.SUCCESS,
                        result=output,
                        attempts=0,
                        latency_s=0.0,
                        custom_id=row.get("c"),
                        index=row["p"],
                        cached=True,
                        cost_usd=0.0,
                        saved_usd=entry.get("cost_usd"),
                    ),
                )
                answered.add(row["id"])
        if not answered:
            return messages
        return [
            (chunk_id, {**payload, "rows": [r for r in payload["rows"] if r["id"] not in answered]})
            for chunk_id, payload in messages
        ]

    def _fail_unsent(self, exc: BaseException) -> None:
        """Rows the broker never took fail (locally, and in the backend if it answers): "Retry failed" sends them."""
        message = f"not submitted: the broker failed ({exc}); retry the failed rows"
        failure = TaskFailed(message, "SubmitError")
        with self._lock:
            unsent = [
                (round_, int(p))
                for round_ in self.rounds
                for chunk in range(round_.published, len(round_.spans))
                for p in round_.positions[slice(*round_.spans[chunk])]
            ]
            for round_, position in unsent:
                if self.status[position] not in _FINAL:
                    self._record(
                        position,
                        TaskResult(
                            task_id=row_id(self.batch_id, position, round_.number),
                            status=TaskStatus.FAILURE,
                            error=message,
                            error_type="SubmitError",
                            index=position,
                        ),
                    )
            for round_ in self.rounds:
                round_.published = len(round_.spans)  # nothing left to send; "Retry failed" starts a new round
        try:
            with self.store.batch() as batch:
                for round_, position in unsent:
                    task_id = row_id(self.batch_id, position, round_.number)
                    value = encode_meta(self.backend, task_id, states.FAILURE, failure)
                    batch.set(meta_key(self.backend, task_id), value)
        except connection_errors():
            pass  # the backend is down too: the failures recorded here stand

    def join_publisher(self, timeout_s: float | None = None) -> bool:
        """Wait until the publisher has nothing to do now (all sent, or the window full); ``False`` if still busy."""
        thread = self._publisher
        if thread is None:
            return True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while thread.is_alive():
            with self._lock:
                if self._next_chunks() == [] and self._spooled.is_set():
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            thread.join(0.05)
        return True

    # ------------------------------------------------------------------ the inputs checkpoint

    def _spool(self) -> None:
        """Render and checkpoint every row: the kernel's copy a publisher sends from (see the module docstring)."""
        rows = self._rows
        assert rows is not None
        n = len(rows)
        parts = max(1, -(-n // INPUT_PART_ROWS))
        high = np.zeros(n, dtype=np.uint64)
        low = np.zeros(n, dtype=np.uint64)
        for part in range(parts):
            start, stop = part * INPUT_PART_ROWS, min((part + 1) * INPUT_PART_ROWS, n)
            rendered = rows.render(start, stop)
            found = np.array([m is None for m in rendered.messages], dtype=bool) & ~rows.skipped[start:stop]
            if found.any():
                with self._lock:
                    self._skip(np.flatnonzero(found) + start)
            self.checkpoint.write_inputs(
                part, range(start, stop), rendered.messages, rendered.reasons, rendered.custom_ids, rendered.overrides
            )
            if self.cache:
                high[start:stop], low[start:stop] = request_hashes(rendered.messages, rendered.overrides)
        if self.cache:
            twins = Twins.of(high, low)
            self.checkpoint.write_twins(twins.leader_of.tolist())
            with self._lock:
                self._adopt_twins(twins)
        self.checkpoint.mark_inputs_complete(parts)
        self._rows = None  # the checkpoint is the copy now
        self._spooled.set()

    def _adopt_twins(self, twins: Twins) -> None:
        """Twins are not sent: they copy their leader's answer (see :mod:`racto_nb.batch.twins`)."""
        self.twins = twins
        for round_ in self.rounds:
            if round_.published == 0:
                keep = ~twins.is_twin(round_.positions)
                round_.positions = round_.positions[keep]
                round_.spans = chunk_spans(len(round_.positions), self.size)

    def _skip(self, positions: np.ndarray) -> None:
        """Rows found unsendable while rendering (after the first part): not tasks, and not sent."""
        if not len(positions):
            return
        for position in positions.tolist():
            self._set(position, SKIPPED)
        keep = ~np.isin(self.rounds[0].positions, positions)
        round0 = self.rounds[0]
        round0.positions = round0.positions[keep]
        round0.spans = chunk_spans(len(round0.positions), self.size)

    # ------------------------------------------------------------------ state

    @property
    def task_ids(self) -> list[str | None]:
        """Each row's current task id (``None`` for a skipped row), in row order."""
        with self._lock:
            states_and_rounds = zip(self.status.tolist(), self.round_of.tolist(), strict=True)
            return [
                None if code == SKIPPED else row_id(self.batch_id, position, round_no)
                for position, (code, round_no) in enumerate(states_and_rounds)
            ]

    @property
    def total(self) -> int:
        """Tasks in the batch: rows that are sent (skipped rows are not tasks)."""
        return len(self.index) - self.counts[SKIPPED]

    @property
    def finished(self) -> bool:
        """Every task is final, as of the last refresh."""
        with self._lock:
            return self._done() == self.total

    def _done(self) -> int:
        return self.counts[SUCCESS] + self.counts[FAILURE] + self.counts[REVOKED]

    def _set(self, position: int, code: int) -> None:
        old = int(self.status[position])
        if old != code:
            self.counts[old] -= 1
            self.counts[code] += 1
            self.status[position] = code
            if code in _FINAL:
                self._wake.set()  # room in the window

    def refresh(self) -> BatchProgress:
        """Read what changed since the last refresh (new events, newly final rows) and summarise.

        While the backend does not answer, the progress says so (``note``) and
        the next refresh tries again after a growing pause; when it answers
        again having lost the batch, the unfinished rows are sent again.
        """
        if not self._lock.acquire(blocking=False):
            with self._lock:  # another thread is looking right now: its look is this one's
                return self._progress()
        try:
            if time.monotonic() >= self._backend_down_until:
                try:
                    self._read_changes()
                    if self._outage:
                        self._back_online()
                except connection_errors() as exc:
                    self._outage += 1
                    pause = min(0.5 * 2 ** (self._outage - 1), 5.0)
                    self._backend_down_until = time.monotonic() + pause
                    self.note = (
                        f"the result backend is not answering ({type(exc).__name__}); reconnecting "
                        f"(attempt {self._outage}, next in {pause:.1f} s); the batch keeps its rows"
                    )
            return self._progress()
        finally:
            self._lock.release()

    def _read_changes(self) -> None:
        stream = events_key(self.batch_id)
        if self._cursor != "0":
            first = self.store.first_id(stream)
            if first is not None and _stream_id(first) > _stream_id(self._cursor):
                self._rescan()  # the stream was trimmed past us: what we missed is read from the rows
        entries = self.store.read(stream, self._cursor, EVENTS_PER_REFRESH)
        look_began = time.perf_counter()
        paused_seen = False
        if entries:
            self._moved_at = time.monotonic()
        for entry_id, entry in entries:
            self._cursor = entry_id
            for item in entry.split(","):
                position_text, _, code = item.partition(":")
                position = int(position_text)
                new = _CODE_OF_EVENT.get(code)
                if new is None or self.status[position] == SKIPPED:
                    continue
                if new in _FINAL or self.status[position] in _FINAL:
                    self._to_confirm.add(position)  # a final state is read from the row itself
                elif new == PAUSED:
                    paused_seen = True
                    self._paused_rows.add(position)  # which round it paused is read from the row itself
                else:
                    self._set(position, new)
        self._confirm(look_began + LOOK_BUDGET_S)
        self.behind = bool(self._to_confirm) or len(entries) >= EVENTS_PER_REFRESH
        now = time.monotonic()
        if now - self._last["orphans"] >= ORPHANS_EVERY_S:
            self._last["orphans"] = now
            self._check_orphans()
        if now - self._last["vanished"] >= VANISHED_EVERY_S:
            self._last["vanished"] = now
            self._resend_vanished()
        if now - self._last["manifest"] >= MANIFEST_EVERY_S or (paused_seen and self.pause_reason is None):
            self._last["manifest"] = now
            self._follow_manifest()
            self._read_pause()
        if self._paused_rows:
            self._take_paused_rows()
        if self._buffer and (len(self._buffer) >= FLUSH_ROWS or now - self._flushed_at >= FLUSH_EVERY_S):
            self._flush_soon()

    def _take_paused_rows(self) -> None:
        """Show the rows a worker paused in their current round; send their chunks again if the batch goes on.

        A worker that read the pause flag just before :meth:`resume` deleted it
        pauses its rows after resume collected the paused ones: without this
        they would stay paused for good. Their chunks go out again under the same
        ids, as a vanished chunk does: a worker runs only the rows not final, so
        nothing is paid twice even when two kernels watching the batch both
        resend. An event left from an earlier round (the row sent again since)
        finds the current round's row not paused and changes nothing.
        """
        positions = sorted(self._paused_rows)
        self._paused_rows.clear()
        results = self._results_of([row_id(self.batch_id, p, int(self.round_of[p])) for p in positions])
        paused = np.array(
            [p for p, result in zip(positions, results, strict=True) if result.status is TaskStatus.PAUSED],
            dtype=np.int64,
        )
        if not len(paused):
            return
        for position in paused.tolist():
            self._set(position, PAUSED)
        self._read_pause()
        if self.pause_reason is not None:
            return  # still paused: resume() sends them
        chunks: list[tuple[_Round, int]] = []
        for round_ in self.rounds:
            mine = paused[self.round_of[paused] == round_.number]
            if not len(mine) or not round_.published:
                continue
            starts = np.fromiter((start for start, _ in round_.spans[: round_.published]), dtype=np.int64)
            where = np.flatnonzero(np.isin(round_.positions[: round_.spans[round_.published - 1][1]], mine))
            chunks.extend((round_, int(c)) for c in np.unique(np.searchsorted(starts, where, side="right") - 1))
        if chunks:
            for position in paused.tolist():
                self._set(position, PENDING)
            self.note = f"{len(paused)} rows were paused as the batch resumed; sent again"
            self._queue_resend(chunks)

    def _confirm(self, until: float) -> None:
        """Read the rows whose events said they moved to (or from) a final state, and record the truth.

        In slices, until ``until`` (``perf_counter``): a look stays short however
        many rows just finished, and :attr:`behind` tells the poll loop to look
        again at once for the rest.
        """
        while self._to_confirm and time.perf_counter() < until:
            positions = sorted(self._to_confirm)[:CONFIRM_SLICE]
            self._to_confirm.difference_update(positions)
            self._apply_metas(positions)

    def _apply_metas(self, positions: Sequence[int]) -> None:
        ids = [row_id(self.batch_id, p, int(self.round_of[p])) for p in positions]
        for start in range(0, len(ids), CONFIRMS_PER_REFRESH):
            part_ids = ids[start : start + CONFIRMS_PER_REFRESH]
            raws = self.store.mget([meta_key(self.backend, task_id) for task_id in part_ids])
            now = time.time()
            for position, task_id, raw in zip(positions[start:], part_ids, raws, strict=False):
                meta = None if raw is None else self.backend.decode_result(raw)
                result = to_task_result(task_id, meta, now=now)
                code = _CODE_OF_STATUS[result.status]
                if code in _FINAL:
                    self._record(position, result)
                elif code == PAUSED:
                    self._paused_rows.add(position)  # after an attach, the batch may have been resumed since
                else:
                    self._set(position, code)

    def _rescan(self) -> None:
        """Read every sent, unfinished row (after an attach, or when the event stream was trimmed past us)."""
        sent = self._sent_positions()
        open_ = [p for p in sent if self.status[p] not in _FINAL]
        self._apply_metas(open_)

    def _sent_positions(self) -> list[int]:
        positions: list[int] = []
        for round_ in self.rounds:
            if round_.published:
                stop = round_.spans[round_.published - 1][1]
                positions.extend(int(p) for p in round_.positions[:stop] if self.round_of[p] == round_.number)
        return positions

    def _record(self, position: int, result: TaskResult) -> None:
        """A final row: into the checkpoint buffer and the counts; its twins get a copy (paid once)."""
        self._buffer_result(position, result)
        for twin in self.twins.followers(position):
            if self.round_of[twin] == self.round_of[position] or self.status[twin] not in _FINAL:
                copy = result.model_copy(
                    update={
                        "task_id": row_id(self.batch_id, twin, int(self.round_of[twin])),
                        "index": twin,
                        "custom_id": self._custom_id(twin),
                        "cached": result.status is TaskStatus.SUCCESS,
                        "saved_usd": result.cost_usd if result.status is TaskStatus.SUCCESS else None,
                        "cost_usd": 0.0 if result.status is TaskStatus.SUCCESS else None,
                    }
                )
                self._buffer_result(twin, copy)

    def _custom_id(self, position: int) -> str | None:
        return self.checkpoint.inputs(position, position + 1).custom_ids[0] if self._spooled.is_set() else None

    def _buffer_result(self, position: int, result: TaskResult) -> None:
        response = result.result if isinstance(result.result, dict) else {}
        usage = response.get("usage") or {}
        parsed = response.get("parsed")
        self._buffer.append(
            {
                "position": position,
                "round": int(self.round_of[position]),
                "task_id": result.task_id,
                "status": result.status.value,
                "content": result.content,
                "parsed": None if parsed is None else json.dumps(parsed),
                "error": result.error,
                "error_type": result.error_type,
                "status_code": result.status_code,
                "attempts": result.attempts,
                "latency_s": result.latency_s,
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "total_tokens": usage.get("total_tokens"),
                "custom_id": result.custom_id,
                "deliveries": result.deliveries,
                "cached": result.cached,
                "cost_usd": result.cost_usd,
                "saved_usd": result.saved_usd,
                "history": result.history,
            }
        )
        if result.status is TaskStatus.SUCCESS:
            self.spent["cost_usd"] += result.cost_usd or 0.0
            self.spent["saved_usd"] += result.saved_usd or 0.0
            self.spent["cached"] += int(result.cached)
        self._set(position, _CODE_OF_STATUS[result.status])

    def flush(self) -> None:
        """Write the final rows collected so far to the checkpoint; their backend keys then expire soon."""
        with self._flush_lock:  # one flush at a time: the checkpoint's files keep the order rows were final in
            with self._lock:
                rows, self._buffer = self._buffer, []
                self._flushed_at = time.monotonic()
            if not rows:
                return
            self.checkpoint.append_results(rows)
            try:
                with self.store.batch() as batch:
                    for row in rows:
                        if row["task_id"]:
                            batch.expire(meta_key(self.backend, row["task_id"]), COLLECTED_TTL_S)
            except connection_errors():
                pass  # they expire with result_expires anyway

    def _flush_soon(self) -> None:
        """Have the flusher thread write the buffer, so no refresh waits for a Parquet file."""
        self._flushed_at = time.monotonic()
        self._flush_due.set()
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush_loop, name=f"racto-flush-{self.batch_id}", daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        while self._flush_due.wait(FLUSHER_IDLE_S):
            self._flush_due.clear()
            self.flush()

    # ------------------------------------------------------------------ recovery

    def _check_orphans(self) -> None:
        """Rows STARTED by a worker without a heartbeat: shown as waiting to run again."""
        if not self._workers.applies:
            return
        running = np.flatnonzero(self.status == STARTED)[:5_000].tolist()
        if not running:
            self._lost_to = {p: h for p, h in self._lost_to.items() if self.status[p] == RETRY}
            self._orphans = len(self._lost_to)
            return
        ids = [row_id(self.batch_id, p, int(self.round_of[p])) for p in running]
        raws = self.store.mget([meta_key(self.backend, task_id) for task_id in ids])
        hosts: dict[int, str] = {}
        for position, raw in zip(running, raws, strict=True):
            meta = None if raw is None else self.backend.decode_result(raw)
            value = (meta or {}).get("result")
            if (meta or {}).get("status") == states.STARTED and isinstance(value, dict) and value.get("hostname"):
                hosts[position] = str(value["hostname"])
        alive = self._workers.alive(list(hosts.values()))
        lost = {p: host for p, host in hosts.items() if host not in alive}
        for position in lost:
            self._set(position, RETRY)
        # Rows marked before stay marked until a live worker takes them (their state moves on).
        self._lost_to = {p: h for p, h in self._lost_to.items() if self.status[p] == RETRY} | lost
        self._orphans = len(self._lost_to)

    def _resend_vanished(self) -> None:
        """Send again, with the same id, chunks that left no trace (see :mod:`racto_nb.engine.recovery`)."""
        now = time.monotonic()
        candidates: dict[str, tuple[_Round, int]] = {}
        for round_ in self.rounds:
            touched, untouched = self._chunk_states(round_)
            taken = np.flatnonzero(touched)
            if not len(taken):
                continue
            for chunk in np.flatnonzero(untouched[: taken[-1]]).tolist():  # older than a chunk already taken
                if now - round_.sent_at.get(chunk, now) >= VANISHED_AFTER_S:
                    candidates[chunk_task_id(self.batch_id, round_.number, chunk)] = (round_, chunk)
        if not candidates:
            return
        lost = find_vanished(self.worker.app, self.store, list(candidates))
        if lost:
            self.note = f"{len(lost)} chunks of rows left no trace (a worker died taking them); sent again"
            self._queue_resend([candidates[c] for c in lost])

    def _chunk_states(self, round_: _Round) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Per published chunk of ``round_``: some row of it moved on (touched); all still pending (untouched).

        Only the rows the round still owns count (a row retried in a later round
        belongs to that one). Vectorised: a million-row batch has 50,000 chunks,
        and a loop over them in Python held the kernel for half a second.
        """
        if not round_.published:
            empty = np.zeros(0, dtype=bool)
            return empty, empty
        end = round_.spans[round_.published - 1][1]
        positions = round_.positions[:end]
        starts = np.fromiter((start for start, _ in round_.spans[: round_.published]), dtype=np.int64)
        mine = self.round_of[positions] == round_.number
        pending = self.status[positions] == PENDING
        owned = np.add.reduceat(mine.astype(np.int64), starts)
        moved = np.add.reduceat((mine & ~pending).astype(np.int64), starts)
        return moved > 0, (owned > 0) & (moved == 0)

    def _rows_of(self, round_: _Round, chunk: int) -> npt.NDArray[np.int64]:
        positions = round_.positions[slice(*round_.spans[chunk])]
        mine: npt.NDArray[np.int64] = positions[self.round_of[positions] == round_.number]
        return mine

    def _back_online(self) -> None:
        """The backend answers again: if it lost the batch (no persistence), save the manifest and resend."""
        self._outage = 0
        self._backend_down_until = 0.0
        self.note = None
        if not self.store.exists(batch_key(self.batch_id)):
            self.save_manifest()
            self._resend_unfinished("the result backend came back without this batch's data")

    def _resend_unfinished(self, why: str) -> None:
        """Every sent chunk with a row not final goes out again; published marks are written anew."""
        self._cursor = "0"
        chunks = []
        for round_ in self.rounds:
            for chunk in range(round_.published):
                rows = self._rows_of(round_, chunk)
                if len(rows) and not np.isin(self.status[rows], _FINAL).all():
                    chunks.append((round_, chunk))
                    for position in rows.tolist():
                        if self.status[position] not in _FINAL:
                            self._set(position, PENDING)
        self.note = f"{why}: {len(chunks)} chunks of unfinished rows sent again"
        self._queue_resend(chunks)

    def _queue_resend(self, chunks: list[tuple[_Round, int]]) -> None:
        """Hand chunks to send again to the publisher thread (never from a refresh: it must stay quick)."""
        for start in range(0, len(chunks), PUBLISH_GROUP):
            self._resend.append(chunks[start : start + PUBLISH_GROUP])
        self._start_publisher(background=True)

    # ------------------------------------------------------------------ progress and waiting

    def _standstill(self, finished: bool) -> str | None:
        """Say so when rows wait in the queue and nothing has moved for ``STANDSTILL_S``.

        Nothing runs (no row started or waiting to retry) yet rows are out:
        no worker is consuming this queue, or its workers are busy elsewhere,
        or a worker stays up but takes nothing (Celery's consumer can go quiet
        after repeated broker disconnects). The rows are not lost; the note
        names where to look.
        """
        if finished or self.cancelled or self.pause_reason is not None:
            return None
        if self.counts[STARTED] or self.counts[RETRY]:
            return None
        waiting = min(self._published_rows(), self.total) - self._done()
        still = time.monotonic() - self._moved_at
        if waiting <= 0 or still < STANDSTILL_S:
            return None
        return (
            f"nothing has moved for {still:.0f} s while {waiting} rows wait in the queue: "
            "%racto_status shows its workers and depth; start a worker, or restart one that is up but takes nothing"
        )

    def _progress(self) -> BatchProgress:
        counts = {status: self.counts[code] for code, status in _STATUS_OF_CODE.items()}
        total = self.total
        done = self._done()
        finished = done == total
        now = time.time()
        if finished and self._finished_at is None:
            self._finished_at = now
        end = self._finished_at if finished and self._finished_at is not None else now
        elapsed = max(0.0, end - self.created_at)
        rate = done / elapsed if elapsed > 0 and done else None
        eta = (total - done) / rate if rate else None
        note = self.note
        if self._orphans:
            lost = f"{self._orphans} rows: their worker stopped answering; they run again on a live worker"
            note = f"{note}; {lost}" if note else lost
        standstill = self._standstill(finished)
        if standstill:
            note = f"{note}; {standstill}" if note else standstill
        paused = self.pause_reason is not None
        if paused:  # rows not run yet wait for resume(): they are paused, not pending
            counts[TaskStatus.PAUSED] += counts[TaskStatus.PENDING]
            counts[TaskStatus.PENDING] = 0
        return BatchProgress(
            batch_id=self.batch_id,
            total=total,
            counts=counts,
            elapsed_s=elapsed,
            rate_per_s=rate,
            eta_s=eta,
            finished=finished,
            cancelled=self.cancelled,
            submitted=min(self._published_rows(), total),
            note=note,
            skipped=self.counts[SKIPPED],
            paused=paused,
            pause_reason=self.pause_reason,
            cost_usd=self.spent["cost_usd"],
            cached=int(self.spent["cached"]),
            saved_usd=self.spent["saved_usd"],
        )

    def wait(
        self,
        *,
        timeout_s: float | None = None,
        interval_s: float = 0.2,
        on_progress: Callable[[BatchProgress], None] | None = None,
        stop: threading.Event | None = None,
    ) -> BatchProgress:
        """Refresh until every task is final, ``timeout_s`` passes or ``stop`` is set.

        The shared poll loop (:func:`~racto_nb.engine.polling.poll`) paces the
        refreshes: at most every ``interval_s``, and never more often than three
        times the cost of one.
        """

        def look() -> BatchProgress:
            progress = self.refresh()
            if on_progress is not None:
                on_progress(progress)
            return progress

        progress, _ = poll(
            look,
            lambda p: p.settled,
            timeout_s=timeout_s,
            stop=stop,
            max_pause_s=interval_s,
            hurry=lambda _: self.behind,
        )
        if progress.finished:
            self.flush()
        return progress

    # ------------------------------------------------------------------ results

    def to_frame(self) -> pd.DataFrame:
        """The results as a DataFrame indexed like the source, one row per row.

        Final rows come from the checkpoint; the others say what they are now.
        ``frame.attrs["racto_batch_id"]`` names the batch, so a frame is enough to reattach.
        """
        self.flush()
        with self._lock:
            status = self.status.copy()
            rounds = self.round_of.copy()
            lost_to = dict(self._lost_to)
        n = len(status)
        table = self.checkpoint.results()
        every = table.to_pandas(types_mapper=_types)
        done = every.drop_duplicates("position", keep="last").set_index("position")
        done = done[done["round"].to_numpy() == rounds[done.index.to_numpy()]] if len(done) else done
        frame = done.reindex(pd.RangeIndex(n))
        frame = frame[FRAME_COLUMNS].copy()
        open_ = np.flatnonzero(~np.isin(status, (*_FINAL, SKIPPED)))
        open_ = open_[~np.isin(open_, done.index.to_numpy())] if len(done) else open_
        if len(open_):
            waiting = TaskStatus.PAUSED if self.pause_reason is not None else TaskStatus.PENDING
            frame.loc[open_, "status"] = [
                (waiting if c == PENDING else _STATUS_OF_CODE[int(c)]).value for c in status[open_]
            ]
            frame.loc[open_, "task_id"] = [row_id(self.batch_id, int(p), int(rounds[p])) for p in open_]
            frame.loc[open_, "attempts"] = 0
            lost = [p for p in lost_to if status[p] == RETRY]
            if lost:
                frame.loc[lost, "error_type"] = "WorkerLost"
                frame.loc[lost, "error"] = [
                    f"its worker {lost_to[p]} stopped answering; it runs again on a live worker" for p in lost
                ]
        skipped = np.flatnonzero(status == SKIPPED)
        if len(skipped):
            reasons = self.checkpoint.reasons() if self.checkpoint.inputs_complete() else None
            frame.loc[skipped, "status"] = SKIPPED_STATUS
            frame.loc[skipped, "error_type"] = SKIPPED_ERROR_TYPE
            frame.loc[skipped, "attempts"] = 0
            frame.loc[skipped, "error"] = (
                [reasons[int(p)].as_py() for p in skipped] if reasons is not None else "row not sent"
            )
        frame["parsed"] = [None if v is None or v is pd.NA else json.loads(v) for v in frame["parsed"].tolist()]
        frame["history"] = _histories(every, frame["history"], rounds)
        for column in ("status_code", "prompt_tokens", "completion_tokens", "total_tokens", "deliveries"):
            frame[column] = frame[column].astype("Int64")
        frame["attempts"] = frame["attempts"].fillna(0).astype("int64")
        frame["latency_s"] = frame["latency_s"].astype("float64")
        frame["cached"] = frame["cached"].fillna(False).astype(bool)
        frame["cost_usd"] = frame["cost_usd"].astype("float64")
        if self.prompt_column:
            frame["prompt"] = self._prompts(n)
        if self.output is not None:
            frame = with_fields(frame, self.output)
        frame.index = self.index
        frame.attrs["racto_batch_id"] = self.batch_id
        return frame

    def _prompts(self, n: int) -> pd.Series:
        """The rendered prompt of each row, from the checkpoint (what was sent is what the answer answers)."""
        messages = self.checkpoint.messages().to_pandas(types_mapper=_types)
        if len(messages) < n:  # still being checkpointed: the rest is not known yet
            messages = messages.reindex(pd.RangeIndex(n))
        return messages.astype("string").set_axis(pd.RangeIndex(n))

    def results(self) -> list[TaskResult]:
        """One ``TaskResult`` per row, in row order (skipped rows: FAILURE ``NotSent``)."""
        frame = self.to_frame()
        out = []
        for position, row in enumerate(frame.itertuples(index=False)):
            status = row.status
            skipped = status == SKIPPED_STATUS
            out.append(
                TaskResult(
                    task_id=row.task_id or "",
                    status=TaskStatus.FAILURE if skipped else TaskStatus(status),
                    error=_value(row.error),
                    error_type=_value(row.error_type),
                    attempts=int(row.attempts),
                    custom_id=_value(row.custom_id),
                    index=position,
                    result={"content": _value(row.content), "parsed": row.parsed} if status == "success" else None,
                )
            )
        return out

    # ------------------------------------------------------------------ control

    def cancel(self) -> int:
        """Stop what has not started: returns how many rows are now revoked.

        A flag in the backend tells every chunk of this batch not to start
        another row (it scales past Celery's in-memory revoke list and reaches
        rows waiting in a retry countdown); the publisher stops; rows never
        sent are revoked here, and rows sent but not started are marked
        REVOKED now so the view shows it at once. Running calls finish: the
        threads pool cannot interrupt them.
        """
        flags = [cancel_key(self.batch_id)] + [cancel_key(f"{self.batch_id}:{r.number}") for r in self.rounds]

        def set_flags() -> None:
            with self.store.batch() as batch:
                for flag in flags:
                    batch.set(flag, "1", ttl_s=float(self.backend.expires) if self.backend.expires else None)

        retrying(set_flags, budget_s=self.publish_budget_s)
        with self._lock:
            self.cancelled = True
        self._stop_publishing.set()
        thread = self._publisher
        if thread is not None and thread is not threading.current_thread():
            thread.join(30.0)
        with self._lock:
            revoked = self._revoke_unsent() + self._revoke_waiting()
        self.refresh()
        return revoked

    def _revoke_unsent(self) -> int:
        count = 0
        for round_ in self.rounds:
            for chunk in range(round_.published, len(round_.spans)):
                for position in self._rows_of(round_, chunk).tolist():
                    if self.status[position] not in _FINAL:
                        self._record(
                            position,
                            TaskResult(
                                task_id=row_id(self.batch_id, position, round_.number),
                                status=TaskStatus.REVOKED,
                                error="batch cancelled before this row was sent",
                                error_type="TaskRevokedError",
                                index=position,
                            ),
                        )
                        count += 1
            round_.published = len(round_.spans)
        return count

    def _revoke_waiting(self) -> int:
        """Mark REVOKED (only where nothing is stored yet) the sent rows no worker has started."""
        waiting = [p for p in self._sent_positions() if self.status[p] == PENDING]
        if not waiting:
            return 0
        revoked = TaskRevokedError("batch cancelled")
        ids = [row_id(self.batch_id, p, int(self.round_of[p])) for p in waiting]
        marked = 0
        for start in range(0, len(ids), CONFIRMS_PER_REFRESH):
            stop = start + CONFIRMS_PER_REFRESH
            part = list(zip(waiting[start:stop], ids[start:stop], strict=True))
            with self.store.batch() as batch:
                for _, task_id in part:
                    value = encode_meta(self.backend, task_id, states.REVOKED, revoked)
                    batch.set(meta_key(self.backend, task_id), value, only_new=True)
            results = self._results_of([task_id for _, task_id in part])
            for (position, _), result in zip(part, results, strict=True):
                if result.status is TaskStatus.REVOKED:
                    self._record(position, result)
                    marked += 1
        return marked

    def _results_of(self, ids: list[str]) -> list[TaskResult]:
        raws = self.store.mget([meta_key(self.backend, task_id) for task_id in ids])
        decode = self.backend.decode_result
        return [to_task_result(t, None if r is None else decode(r)) for t, r in zip(ids, raws, strict=True)]

    def retry_failed(self, *, background: bool = True) -> int:
        """Send the rows that failed again, as a new round of this same batch; returns how many.

        Skipped and revoked rows stay as they are. The new round has its own
        task ids and cancel flag, so a cancel of an earlier round keeps its
        revoked rows from ever starting.
        """
        with self._lock:
            positions = np.flatnonzero(self.status == FAILURE)
            if not len(positions):
                return 0
            self._new_round(positions)
            self.cancelled = False
            self.publish_error = None
        self.save_manifest()
        self._start_publisher(background=background)
        return len(positions)

    def resume(self, *, max_cost_usd: float | None = None, background: bool = True) -> int:
        """Send the paused rows (and the rest) again after quota came back or with a higher cap; returns how many.

        ``max_cost_usd`` replaces the batch's cap (it must be above what is spent).
        """
        with self._lock:
            if max_cost_usd is not None:
                spent = retrying(lambda: self._budget().spent(), budget_s=self.publish_budget_s)
                if max_cost_usd <= spent:
                    raise InvalidArgument(
                        f"batch {self.batch_id} has already spent ${spent:,.4f}: "
                        f"give a max_cost_usd above that (got {max_cost_usd:g})"
                    )
                self.max_cost_usd = float(max_cost_usd)
                self.manifest.setdefault("opts", {})["max_cost_usd"] = self.max_cost_usd
                self._budget().set_cap(self.max_cost_usd)
            retrying(lambda: self.store.delete(pause_key(self.batch_id)), budget_s=self.publish_budget_s)
            self.pause_reason = None
            positions = np.flatnonzero(self.status == PAUSED)
            if len(positions):
                self._new_round(positions)
        self.save_manifest()
        self._start_publisher(background=background)
        return len(positions)

    def _new_round(self, positions: npt.NDArray[np.int64]) -> None:
        """Send ``positions`` again under fresh task ids (a "Retry failed" or a resume); twins follow their leader."""
        number = len(self.rounds)
        self.checkpoint.write_round(number, positions.tolist())
        self.round_of[positions] = number
        for position in positions.tolist():
            self._set(position, PENDING)
        sent = positions[~self.twins.is_twin(positions)].astype(np.int64)
        self.rounds.append(_Round(number, sent, chunk_spans(len(sent), self.size)))
        self.manifest["rounds"] = number + 1
        self._finished_at = None

    def _read_pause(self) -> None:
        raw = self.store.get(pause_key(self.batch_id))
        self.pause_reason = None if raw is None else raw.decode()


def _histories(every: pd.DataFrame, current: pd.Series, rounds: npt.NDArray[Any]) -> list[list[str]]:
    """Each row's attempt history: earlier rounds (a Retry failed) first, then its current round's.

    Most rows have one record and no history; only positions recorded more
    than once are looked at row by row.
    """
    out = [list(h) if isinstance(h, (list, np.ndarray)) else [] for h in current.tolist()]
    if not len(every):
        return out
    repeated = every[every["position"].duplicated(keep=False)]
    for position, records in repeated.groupby("position", sort=False):
        earlier: list[str] = []
        for record in records.itertuples(index=False):
            if int(record.round) >= int(rounds[int(position)]):
                continue
            lines = record.history if record.history is not None else []
            earlier.extend(f"round {record.round}, {line}" for line in lines)
            earlier.append(f"round {record.round}: {record.status} after {record.attempts} attempts: {record.error}")
        out[int(position)] = earlier + out[int(position)]
    return out


def _require_storable(index: pd.Index) -> None:
    """Refuse, before anything is sent, an index that would come back different on attach."""
    levels = [index.get_level_values(level) for level in range(index.nlevels)]
    for level in levels:
        kind = level.dtype
        unsure = isinstance(kind, (pd.IntervalDtype, pd.PeriodDtype)) or (
            kind == np.dtype(object)
            and len(level) > 0
            and not all(isinstance(v, (str, int, float, bool)) for v in level[:1000])
        )
        if unsure:
            raise InvalidArgument(
                f"this index ({type(index).__name__}, dtype {index.dtype}) cannot be stored for reattaching "
                "unchanged; use df.reset_index() (keeping it as a column) before sending the rows"
            )


def _types(arrow_type: pa.DataType) -> Any:
    return pd.StringDtype() if pa.types.is_string(arrow_type) else None


def _value(value: Any) -> Any:
    return None if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) else value


def _stream_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<seq>``) as a comparable pair."""
    head, _, tail = entry_id.partition("-")
    return int(head or 0), int(tail or 0)
