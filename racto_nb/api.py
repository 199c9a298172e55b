"""The Python API behind the magics: one function per magic, usable without IPython.

* :func:`run_batch` fans a Series, a DataFrame (with a template) or a list of
  strings out as one task per row and gives back a DataFrame indexed like the
  input (blocking), or a :class:`~racto_nb.notebook.runs.BatchRun` (``wait=False``).
* :func:`attach` rebuilds a batch by id (or ``"latest"``), e.g. after a kernel restart;
  :func:`batches` lists the recent ones, for an id lost with a kernel's output.
* :func:`generate` sends one prompt and follows it on a status line.
* :func:`get_result` reads one task's state now.
* :func:`connect`, :func:`start_workers`, :func:`stop_workers`,
  :func:`running_workers` and :func:`status`: where tasks run (from
  :mod:`racto_nb.fleet`), so a magic never reaches past this module.

Every check on the input runs before anything is enqueued, and raises a
:class:`~racto_nb.errors.RactoError` (``TemplateError`` for templates,
``BatchNotFound`` for unknown ids, ``InvalidSource`` for a source of the wrong
kind, ``InvalidArgument`` for a bad option) with a message that names the fix.
``worker=None`` means the worker :func:`connect` made (the first use connects
as configured).

Decisions worth knowing:

* Missing values follow :mod:`racto_nb.batch.templates`' rule: skipped rows stay in
  the result with status ``skipped`` and are not sent.
* ``write_back="label"`` adds the content as column ``label`` of the source
  DataFrame when the batch ends (and again after a retry-failed round). A
  Series knows no parent frame, so for ``df["review"]`` pass ``frame=df``
  (the ``%racto_batch df["review"]`` magic does it for you).
* Blocking mode and Ctrl-C: waiting stops, the batch keeps running, a notice
  says how to reattach or cancel, and ``KeyboardInterrupt`` is re-raised (a
  partial frame returned as if complete would feed the next cells).
* A wait that times out returns the frame as it is; unfinished rows keep
  their real status.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict, overload

import pandas as pd
from typing_extensions import Unpack

from racto_nb.batch.batch import Batch
from racto_nb.batch.catalog import LATEST, latest_batch_id, recent_batches
from racto_nb.batch.checkpoint import SKIPPED_STATUS
from racto_nb.batch.estimate import estimate_rows
from racto_nb.batch.rows import Source, prepare_rows
from racto_nb.batch.templates import MissingRule
from racto_nb.costs.estimate import Estimate
from racto_nb.errors import InvalidArgument
from racto_nb.fleet.connection import connect, current_worker, disconnect
from racto_nb.fleet.processes import WorkerProcess, orphan_workers, running_workers, start_workers, stop_workers
from racto_nb.fleet.status import FleetStatus, status, worker_heartbeats
from racto_nb.models import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, MAX_TEMPERATURE, TaskResult, TaskStatus
from racto_nb.notebook.runs import DEFAULT_INTERVAL_S, BatchRun, TaskRun, wait_task
from racto_nb.notebook.status_line import make_status_line
from racto_nb.notebook.views import ProgressChoice, ProgressView, StatusView, check_progress, notice
from racto_nb.structured import OutputSpec, SchemaLike, output_spec

if TYPE_CHECKING:
    from racto_nb.engine.worker import RactoCeleryWorker

__all__ = [
    "BatchRun",
    "FleetStatus",
    "TaskRun",
    "WorkerProcess",
    "attach",
    "batches",
    "clear_cache",
    "connect",
    "disconnect",
    "estimate",
    "generate",
    "get_result",
    "orphan_workers",
    "prepare_rows",
    "resolve_worker",
    "run_batch",
    "running_workers",
    "start_workers",
    "status",
    "stop_workers",
    "structured_value",
    "worker_heartbeats",
]


def resolve_worker(worker: RactoCeleryWorker | None) -> RactoCeleryWorker:
    """``worker``, or the current one (``racto_nb.connect``; the first use connects as configured)."""
    return worker if worker is not None else current_worker()


# ---------------------------------------------------------------------------- options


def _check_options(temperature: float, max_tokens: int, timeout_s: float | None, progress: object) -> None:
    # Checked here so the message is one line naming the option, not a pydantic report.
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidArgument(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}, not {temperature!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise InvalidArgument(f"max_tokens must be a whole number > 0, not {max_tokens!r}")
    if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or timeout_s < 0):
        raise InvalidArgument(
            f"timeout_s must be a number of seconds >= 0 (or None to wait until done), not {timeout_s!r}"
        )
    check_progress(progress)


class _FollowOptions(TypedDict, total=False):
    """How a batch is followed, by :func:`run_batch` and :func:`attach` alike."""

    worker: RactoCeleryWorker | None
    timeout_s: float | None
    progress: ProgressChoice | ProgressView
    on_done: Callable[[pd.DataFrame], object] | None
    title: str
    interval_s: float


class BatchOptions(_FollowOptions, total=False):
    """The options of :func:`run_batch` besides ``source``, ``template`` and ``wait``."""

    temperature: float
    max_tokens: int
    custom_id: str | None
    on_missing: MissingRule
    write_back: str | None
    frame: pd.DataFrame | None
    cache: bool
    max_cost_usd: float | None
    prompt_column: bool
    choices: Sequence[str] | None
    schema: SchemaLike | None


class AttachOptions(_FollowOptions, total=False):
    """The options of :func:`attach` besides ``batch_id`` and ``wait``."""

    cancel: bool
    resume: bool
    max_cost_usd: float | None


class GenerateOptions(TypedDict, total=False):
    """The options of :func:`generate` besides ``prompt`` and ``wait``."""

    worker: RactoCeleryWorker | None
    cache: bool
    temperature: float
    max_tokens: int
    system_prompt: str | None
    timeout_s: float | None
    progress: ProgressChoice | StatusView
    on_done: Callable[[TaskResult], object] | None
    choices: Sequence[str] | None
    schema: SchemaLike | None


# ---------------------------------------------------------------------------- batches


@overload
def run_batch(
    source: Source, template: str | None = ..., *, wait: Literal[True] = ..., **options: Unpack[BatchOptions]
) -> pd.DataFrame: ...
@overload
def run_batch(
    source: Source, template: str | None = ..., *, wait: Literal[False], **options: Unpack[BatchOptions]
) -> BatchRun: ...
def run_batch(
    source: Source, template: str | None = None, *, wait: bool = True, **options: Unpack[BatchOptions]
) -> pd.DataFrame | BatchRun:
    """One task per row of ``source``; the result is a DataFrame indexed like it.

    Args:
        source: A DataFrame (``template`` required, naming its columns), a
            Series (template optional: the value itself; a template names the
            values by the Series' name), or a list of strings (``{value}``).
        template: ``"Classify: {review}"``; plain names only, ``{{``/``}}``
            for literal braces.
        wait: ``True`` blocks and returns the DataFrame; ``False`` returns a
            ``BatchRun`` at once, watched from a daemon thread.
        **options: See :class:`BatchOptions`: ``worker``, ``temperature``
            (default 0), ``max_tokens`` (default 4096), ``custom_id`` (column
            whose values become the items' ``custom_id``), ``on_missing``
            (``"skip"``, ``"empty"`` or ``"error"``; see
            :mod:`racto_nb.batch.templates`), ``timeout_s`` (stop waiting or
            watching; the batch runs on), ``progress`` (``"auto"``,
            ``"widget"``, ``"text"``, ``"none"`` or a view object),
            ``write_back`` (add the content as this new column of the source
            frame when the batch ends), ``frame`` (the DataFrame a Series
            source came from), ``on_done`` (called with the result frame each
            time the batch ends), ``title``, ``interval_s``; ``choices``
            (one label per row, a ``category`` column ``label``) or ``schema``
            (a pydantic model class or a JSON-schema dict of an object: one
            typed column per field), see :mod:`racto_nb.structured` and
            :mod:`racto_nb.batch.columns`.

    Raises:
        TemplateError, InvalidArgument, InvalidSource: bad input; nothing was sent.
    """
    return _run_batch(source, template, wait=wait, **options)


def _run_batch(
    source: Source,
    template: str | None,
    *,
    wait: bool,
    worker: RactoCeleryWorker | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    custom_id: str | None = None,
    on_missing: MissingRule = "skip",
    timeout_s: float | None = None,
    progress: ProgressChoice | ProgressView = "auto",
    write_back: str | None = None,
    frame: pd.DataFrame | None = None,
    on_done: Callable[[pd.DataFrame], object] | None = None,
    title: str = "",
    interval_s: float = DEFAULT_INTERVAL_S,
    cache: bool = True,
    max_cost_usd: float | None = None,
    prompt_column: bool = True,
    choices: Sequence[str] | None = None,
    schema: SchemaLike | None = None,
) -> pd.DataFrame | BatchRun:
    _check_options(temperature, max_tokens, timeout_s, progress)
    _check_cost(max_cost_usd)
    output = output_spec(choices, schema)
    chosen = resolve_worker(worker)
    _check_priced(chosen, max_cost_usd)
    rows = prepare_rows(
        source,
        template,
        custom_id=custom_id,
        on_missing=on_missing,
        write_back=write_back,
        frame=frame,
        output=output,
    )
    batch = Batch.submit(
        chosen,
        rows,
        temperature=temperature,
        max_tokens=max_tokens,
        background=True,
        title=title,
        cache=cache,
        max_cost_usd=max_cost_usd,
        prompt_column=prompt_column,
        output=output,
    )
    _say_if_no_worker(chosen, batch)
    run = BatchRun(
        batch,
        progress=progress,
        title=title,
        on_done=on_done,
        write_back=rows.write_back,
        interval_s=interval_s,
        cancel_button=not wait,
    )
    return _follow(run, wait, timeout_s)


@overload
def attach(batch_id: str, *, wait: Literal[False] = ..., **options: Unpack[AttachOptions]) -> BatchRun: ...
@overload
def attach(batch_id: str, *, wait: Literal[True], **options: Unpack[AttachOptions]) -> pd.DataFrame: ...
def attach(batch_id: str, *, wait: bool = False, **options: Unpack[AttachOptions]) -> pd.DataFrame | BatchRun:
    """Rebuild batch ``batch_id`` from the result backend, finished or still running.

    ``wait=False`` (default) returns a ``BatchRun`` watched in the background:
    ``run.frame()`` is the rows so far, ``run.result()`` the final frame,
    ``run.cancel()`` stops it. ``wait=True`` blocks like :func:`run_batch`.
    ``cancel=True`` revokes the tasks that have not started before following
    the batch to its end (what a kernel restart left no Cancel button for).
    The other options are :func:`run_batch`'s following options.

    Raises:
        BatchNotFound: no such batch in this backend (wrong id, other backend, expired).
    """
    return _attach(batch_id, wait=wait, **options)


def _attach(
    batch_id: str,
    *,
    wait: bool,
    worker: RactoCeleryWorker | None = None,
    timeout_s: float | None = None,
    progress: ProgressChoice | ProgressView = "auto",
    on_done: Callable[[pd.DataFrame], object] | None = None,
    title: str = "",
    interval_s: float = DEFAULT_INTERVAL_S,
    cancel: bool = False,
    resume: bool = False,
    max_cost_usd: float | None = None,
) -> pd.DataFrame | BatchRun:
    _check_options(DEFAULT_TEMPERATURE, DEFAULT_MAX_TOKENS, timeout_s, progress)
    _check_cost(max_cost_usd)
    if not isinstance(batch_id, str) or not batch_id.strip():
        raise InvalidArgument("attach needs the batch id shown when the batch was submitted")
    chosen = resolve_worker(worker)
    _check_priced(chosen, max_cost_usd)
    wanted = batch_id.strip()
    batch = Batch.attach(chosen, latest_batch_id(chosen) if wanted == LATEST else wanted)
    run = BatchRun(
        batch, progress=progress, title=title, on_done=on_done, interval_s=interval_s, cancel_button=not wait
    )
    if cancel:
        revoked = batch.cancel()
        notice(f"batch {batch.batch_id}: {revoked} waiting tasks revoked; tasks already running finish")
    if resume or max_cost_usd is not None:
        resumed = batch.resume(max_cost_usd=max_cost_usd)
        notice(f"batch {batch.batch_id}: resumed; {resumed} paused rows sent again")
    if not batch.refresh().finished:
        _say_if_no_worker(chosen, batch)
    return _follow(run, wait, timeout_s)


def _say_if_no_worker(worker: RactoCeleryWorker, batch: Batch) -> None:
    """No worker serves the queue (after a restart the fleet may be gone too): say so at once and how to
    start one, rather than let the view sit at "pending"."""
    online = worker_heartbeats(worker)
    if online is not None and not any(worker.queue in record.get("queues", ()) for record in online):
        notice(
            f"batch {batch.batch_id}: no worker is online for queue {worker.queue!r}; its rows wait until one is. "
            "Start one: %racto_workers start 2 (or racto_nb.api.start_workers(2), or "
            "`celery -A racto_nb.app worker` on any machine with the same RACTO_* settings)"
        )


def batches(limit: int = 20, *, worker: RactoCeleryWorker | None = None) -> pd.DataFrame:
    """The ``limit`` newest batches in the result backend, newest first, one row each.

    Columns: ``submitted_at`` (UTC), ``rows``, one count per final state
    (from the checkpoint on this machine), ``unfinished`` (``<NA>`` when the
    checkpoint is on another machine), ``title`` (the magic's line) and
    ``host``; the index is the batch id, ready for :func:`attach`.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidArgument(f"limit must be a whole number >= 1 (got {limit!r})")
    found = recent_batches(resolve_worker(worker), limit)
    states = [s.value for s in TaskStatus if s.is_final] + [SKIPPED_STATUS]
    records = [
        {
            "batch_id": b.batch_id,
            "submitted_at": b.submitted_at,
            "rows": b.rows,
            **{state: b.counts.get(state, 0) for state in states},
            "unfinished": b.unfinished,
            "title": b.title,
            "host": b.host,
        }
        for b in found
    ]
    columns = ["batch_id", "submitted_at", "rows", *states, "unfinished", "title", "host"]
    frame = pd.DataFrame.from_records(records, columns=columns).set_index("batch_id")
    frame["unfinished"] = frame["unfinished"].astype("Int64")
    return frame


def _follow(run: BatchRun, wait: bool, timeout_s: float | None) -> pd.DataFrame | BatchRun:
    run.show()
    if wait:
        return run.wait(timeout_s)
    run.watch_in_background(timeout_s)
    return run


# ---------------------------------------------------------------------------- one prompt


@overload
def generate(prompt: str, *, wait: Literal[True] = ..., **options: Unpack[GenerateOptions]) -> TaskResult: ...
@overload
def generate(prompt: str, *, wait: Literal[False], **options: Unpack[GenerateOptions]) -> TaskRun: ...
@overload
def generate(prompt: str, *, wait: bool, **options: Unpack[GenerateOptions]) -> TaskResult | TaskRun: ...
def generate(prompt: str, *, wait: bool = True, **options: Unpack[GenerateOptions]) -> TaskResult | TaskRun:
    """Send one prompt; show its state on one live line until it is final.

    The system prompt (``system_prompt=``) travels as a ``{"role": "system"}``
    history message, so it reaches any kit. Blocking (default) returns the
    ``TaskResult``; a timeout returns the task's real state with
    ``error_type="WaitTimeout"``. ``wait=False`` returns a ``TaskRun`` whose
    thread keeps the line current (and renders the answer under it, in a
    notebook) and calls ``on_done(result)`` when the task is final. The other
    options: ``worker``, ``temperature``, ``max_tokens``, ``timeout_s``,
    ``progress`` (see :class:`GenerateOptions`), and ``choices`` / ``schema``
    as for :func:`run_batch`: ``result.result["parsed"]`` is then the
    validated object, and :func:`structured_value` turns it into the model
    instance (or the label).
    """
    return _generate(prompt, wait=wait, **options)


def _generate(
    prompt: str,
    *,
    wait: bool,
    worker: RactoCeleryWorker | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    system_prompt: str | None = None,
    timeout_s: float | None = None,
    progress: ProgressChoice | StatusView = "auto",
    on_done: Callable[[TaskResult], object] | None = None,
    cache: bool = True,
    choices: Sequence[str] | None = None,
    schema: SchemaLike | None = None,
) -> TaskResult | TaskRun:
    _check_options(temperature, max_tokens, timeout_s, progress)
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidArgument("the prompt is empty; write it in the cell body (or pass a non-empty string)")
    output = output_spec(choices, schema)
    chosen = resolve_worker(worker)
    history = [{"role": "system", "content": system_prompt}] if system_prompt else None
    task_id = chosen.generate(
        prompt, temperature=temperature, max_tokens=max_tokens, history=history, cache=cache, output=output
    ).id
    line = make_status_line(progress, max_retries=chosen.retry_config.max_retries, show_answer=not wait)
    line.display()
    if wait:
        return wait_task(chosen, task_id, line, timeout_s)
    run = TaskRun(chosen, task_id, line, on_done=on_done, timeout_s=timeout_s)
    run.start()
    return run


def structured_value(result: TaskResult, spec: OutputSpec) -> Any:
    """The validated object of a successful structured task (model instance, dict or label); ``None`` otherwise."""
    if not result.ok or not isinstance(result.result, dict):
        return None
    return spec.value(result.result.get("parsed"))


def get_result(task_id: str, *, worker: RactoCeleryWorker | None = None) -> TaskResult:
    """One task's state now (pending, started, retry, or final), without waiting."""
    return resolve_worker(worker).get_result(task_id)


# ---------------------------------------------------------------------------- cost


def estimate(
    source: Source,
    template: str | None = None,
    *,
    worker: RactoCeleryWorker | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    custom_id: str | None = None,
    on_missing: MissingRule = "skip",
    frame: pd.DataFrame | None = None,
    cache: bool = True,
) -> Estimate:
    """What :func:`run_batch` with these arguments would cost, before anything is sent.

    ``rows``, the rows that would really be sent (skipped rows, twins and rows
    the ledger already answers left out), ``prompt_tokens`` (counted by a real
    tokenizer where one is available; ``approximate`` says when not), and
    ``cost_usd_low`` (every answer empty) to ``cost_usd_high`` (every answer
    ``max_tokens`` long) at the price table's prices (``prices_as_of``).
    """
    _check_options(temperature, max_tokens, None, "none")
    rows = prepare_rows(source, template, custom_id=custom_id, on_missing=on_missing, frame=frame)
    return estimate_rows(resolve_worker(worker), rows, temperature=temperature, max_tokens=max_tokens, cache=cache)


def clear_cache(*, worker: RactoCeleryWorker | None = None) -> int:
    """Forget every answer in the pay-once ledger of ``worker``'s deployment; returns how many there were."""
    chosen = resolve_worker(worker)
    ledger = chosen.spending.ledger(chosen.store)
    return 0 if ledger is None else ledger.clear()


def _check_priced(worker: RactoCeleryWorker, max_cost_usd: float | None) -> None:
    """A cap needs a price: without one every call would count as free and the cap would never bind."""
    if max_cost_usd is not None and not worker.spending.priced:
        model = getattr(worker.kit, "model", None)
        raise InvalidArgument(
            f"max_cost_usd needs a price for model {model!r}, which the price table does not list: "
            "set RACTO_PRICE_IN_PER_MTOK and RACTO_PRICE_OUT_PER_MTOK (dollars per million tokens)"
        )


def _check_cost(max_cost_usd: float | None) -> None:
    if max_cost_usd is not None and (
        isinstance(max_cost_usd, bool) or not isinstance(max_cost_usd, (int, float)) or not max_cost_usd > 0
    ):
        raise InvalidArgument(f"max_cost_usd must be a number of dollars > 0, not {max_cost_usd!r}")
