"""The Python API behind the magics: one function per magic, usable without IPython.

* :func:`run_batch` fans a Series, a DataFrame (with a template) or a list of
  strings out as one task per row and gives back a DataFrame indexed like the
  input (blocking), or a :class:`~racto_nb.runs.BatchRun` (``wait=False``).
* :func:`attach` rebuilds a batch by id, e.g. after a kernel restart.
* :func:`generate` sends one prompt and follows it on a status line.
* :func:`get_result` reads one task's state now.

Every check on the input runs before anything is enqueued, and raises
``ValueError`` (``TemplateError`` for templates, ``LookupError`` for unknown
ids, ``TypeError`` for a source of the wrong kind) with a message that names
the fix. ``worker=None`` means the worker :func:`racto_nb.app.connect` made.

Decisions worth knowing:

* Missing values follow :mod:`racto_nb.templates`' rule: skipped rows stay in
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

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, overload

import pandas as pd

from racto_nb.batch import Batch
from racto_nb.display import (
    ProgressChoice,
    StatusView,
    check_progress,
    make_content_output,
    make_status_line,
    notice,
)
from racto_nb.models import TaskResult
from racto_nb.progress import ProgressView
from racto_nb.rows import Source, prepare_rows
from racto_nb.runs import DEFAULT_INTERVAL_S, BatchRun, TaskRun, wait_task
from racto_nb.templates import MissingRule

if TYPE_CHECKING:
    from racto_nb.worker import RactoCeleryWorker

__all__ = [
    "BatchRun",
    "TaskRun",
    "attach",
    "generate",
    "get_result",
    "prepare_rows",
    "resolve_worker",
    "run_batch",
]


def resolve_worker(worker: RactoCeleryWorker | None) -> RactoCeleryWorker:
    """``worker``, or the current one (``racto_nb.connect``; the first use connects as configured)."""
    if worker is not None:
        return worker
    try:
        from racto_nb.connection import current_worker
    except ImportError as exc:  # pragma: no cover - the app module ships with the package
        raise RuntimeError(f"no worker: pass worker=RactoCeleryWorker(...) ({exc})") from None
    found: RactoCeleryWorker | None = current_worker()
    if found is None:
        raise RuntimeError("no worker connected: run %racto_connect [URL] or racto_nb.connect(...) first")
    return found


# ---------------------------------------------------------------------------- options


def _check_options(temperature: float, max_tokens: int, timeout_s: float | None, progress: object) -> None:
    # Checked here so the message is one line naming the option, not a pydantic report.
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, not {temperature!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be a whole number > 0, not {max_tokens!r}")
    if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or timeout_s < 0):
        raise ValueError(
            f"timeout_s must be a number of seconds >= 0 (or None to wait until done), not {timeout_s!r}"
        )
    check_progress(progress)


# ---------------------------------------------------------------------------- batches


@overload
def run_batch(
    source: Source,
    template: str | None = ...,
    *,
    worker: RactoCeleryWorker | None = ...,
    temperature: float = ...,
    max_tokens: int = ...,
    custom_id: str | None = ...,
    on_missing: MissingRule = ...,
    wait: Literal[True] = ...,
    timeout_s: float | None = ...,
    progress: ProgressChoice | ProgressView = ...,
    write_back: str | None = ...,
    frame: pd.DataFrame | None = ...,
    on_done: Callable[[pd.DataFrame], object] | None = ...,
    title: str = ...,
    interval_s: float = ...,
) -> pd.DataFrame: ...


@overload
def run_batch(
    source: Source,
    template: str | None = ...,
    *,
    worker: RactoCeleryWorker | None = ...,
    temperature: float = ...,
    max_tokens: int = ...,
    custom_id: str | None = ...,
    on_missing: MissingRule = ...,
    wait: Literal[False],
    timeout_s: float | None = ...,
    progress: ProgressChoice | ProgressView = ...,
    write_back: str | None = ...,
    frame: pd.DataFrame | None = ...,
    on_done: Callable[[pd.DataFrame], object] | None = ...,
    title: str = ...,
    interval_s: float = ...,
) -> BatchRun: ...


def run_batch(
    source: Source,
    template: str | None = None,
    *,
    worker: RactoCeleryWorker | None = None,
    temperature: float = 0.0,
    max_tokens: int = 4096,
    custom_id: str | None = None,
    on_missing: MissingRule = "skip",
    wait: bool = True,
    timeout_s: float | None = None,
    progress: ProgressChoice | ProgressView = "auto",
    write_back: str | None = None,
    frame: pd.DataFrame | None = None,
    on_done: Callable[[pd.DataFrame], object] | None = None,
    title: str = "",
    interval_s: float = DEFAULT_INTERVAL_S,
) -> pd.DataFrame | BatchRun:
    """One task per row of ``source``; the result is a DataFrame indexed like it.

    Args:
        source: A DataFrame (``template`` required, naming its columns), a
            Series (template optional: the value itself; a template names the
            values by the Series' name), or a list of strings (``{value}``).
        template: ``"Classify: {review}"``; plain names only, ``{{``/``}}``
            for literal braces.
        custom_id: Column whose values become the items' ``custom_id``.
        on_missing: ``"skip"`` (default), ``"empty"`` or ``"error"``; see
            :mod:`racto_nb.templates`.
        wait: ``True`` blocks and returns the DataFrame; ``False`` returns a
            ``BatchRun`` at once, watched from a daemon thread.
        timeout_s: Stop waiting (or watching) after this long; the batch runs on.
        progress: ``"auto"`` (widgets in a kernel, text elsewhere), ``"widget"``,
            ``"text"``, ``"none"``, or a view object.
        write_back: Add the content as this new column of the source frame
            when the batch ends.
        frame: The DataFrame a Series source came from (for ``write_back``
            and ``custom_id``).
        on_done: Called with the result frame each time the batch ends.

    Raises:
        TemplateError, ValueError, TypeError: bad input; nothing was sent.
    """
    _check_options(temperature, max_tokens, timeout_s, progress)
    rows = prepare_rows(
        source, template, custom_id=custom_id, on_missing=on_missing, write_back=write_back, frame=frame
    )
    chosen = resolve_worker(worker)
    batch = Batch.submit(
        chosen,
        rows.prompts,
        index=rows.index,
        reasons=rows.reasons,
        temperature=temperature,
        max_tokens=max_tokens,
        background=True,
    )
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
def attach(
    batch_id: str,
    *,
    worker: RactoCeleryWorker | None = ...,
    wait: Literal[False] = ...,
    timeout_s: float | None = ...,
    progress: ProgressChoice | ProgressView = ...,
    on_done: Callable[[pd.DataFrame], object] | None = ...,
    title: str = ...,
    interval_s: float = ...,
    cancel: bool = ...,
) -> BatchRun: ...


@overload
def attach(
    batch_id: str,
    *,
    worker: RactoCeleryWorker | None = ...,
    wait: Literal[True],
    timeout_s: float | None = ...,
    progress: ProgressChoice | ProgressView = ...,
    on_done: Callable[[pd.DataFrame], object] | None = ...,
    title: str = ...,
    interval_s: float = ...,
    cancel: bool = ...,
) -> pd.DataFrame: ...


def attach(
    batch_id: str,
    *,
    worker: RactoCeleryWorker | None = None,
    wait: bool = False,
    timeout_s: float | None = None,
    progress: ProgressChoice | ProgressView = "auto",
    on_done: Callable[[pd.DataFrame], object] | None = None,
    title: str = "",
    interval_s: float = DEFAULT_INTERVAL_S,
    cancel: bool = False,
) -> pd.DataFrame | BatchRun:
    """Rebuild batch ``batch_id`` from the result backend, finished or still running.

    ``wait=False`` (default) returns a ``BatchRun`` watched in the background:
    ``run.frame()`` is the rows so far, ``run.result()`` the final frame,
    ``run.cancel()`` stops it. ``wait=True`` blocks like :func:`run_batch`.
    ``cancel=True`` revokes the tasks that have not started before following
    the batch to its end (what a kernel restart left no Cancel button for).

    Raises:
        LookupError: no such batch in this backend (wrong id, other backend, expired).
    """
    _check_options(0.0, 1, timeout_s, progress)
    if not isinstance(batch_id, str) or not batch_id.strip():
        raise ValueError("attach needs the batch id shown when the batch was submitted")
    batch = Batch.attach(resolve_worker(worker), batch_id.strip())
    if cancel:
        revoked = batch.cancel()
        notice(f"batch {batch.batch_id}: {revoked} waiting tasks revoked; tasks already running finish")
    run = BatchRun(
        batch, progress=progress, title=title, on_done=on_done, interval_s=interval_s, cancel_button=not wait
    )
    return _follow(run, wait, timeout_s)


def _follow(run: BatchRun, wait: bool, timeout_s: float | None) -> pd.DataFrame | BatchRun:
    run.show()
    if wait:
        return run.wait(timeout_s)
    run.watch_in_background(timeout_s)
    return run


# ---------------------------------------------------------------------------- one prompt


@overload
def generate(
    prompt: str,
    *,
    worker: RactoCeleryWorker | None = ...,
    temperature: float = ...,
    max_tokens: int = ...,
    system_prompt: str | None = ...,
    timeout_s: float | None = ...,
    wait: Literal[True] = ...,
    progress: ProgressChoice | StatusView = ...,
    on_done: Callable[[TaskResult], object] | None = ...,
) -> TaskResult: ...


@overload
def generate(
    prompt: str,
    *,
    worker: RactoCeleryWorker | None = ...,
    temperature: float = ...,
    max_tokens: int = ...,
    system_prompt: str | None = ...,
    timeout_s: float | None = ...,
    wait: Literal[False],
    progress: ProgressChoice | StatusView = ...,
    on_done: Callable[[TaskResult], object] | None = ...,
) -> TaskRun: ...


@overload
def generate(
    prompt: str,
    *,
    worker: RactoCeleryWorker | None = ...,
    temperature: float = ...,
    max_tokens: int = ...,
    system_prompt: str | None = ...,
    timeout_s: float | None = ...,
    wait: bool,
    progress: ProgressChoice | StatusView = ...,
    on_done: Callable[[TaskResult], object] | None = ...,
) -> TaskResult | TaskRun: ...


def generate(
    prompt: str,
    *,
    worker: RactoCeleryWorker | None = None,
    temperature: float = 0.0,
    max_tokens: int = 4096,
    system_prompt: str | None = None,
    timeout_s: float | None = None,
    wait: bool = True,
    progress: ProgressChoice | StatusView = "auto",
    on_done: Callable[[TaskResult], object] | None = None,
) -> TaskResult | TaskRun:
    """Send one prompt; show its state on one live line until it is final.

    The system prompt travels as a ``{"role": "system"}`` history message, so
    it reaches any kit. Blocking (default) returns the ``TaskResult``; a
    timeout returns the task's real state with ``error_type="WaitTimeout"``.
    ``wait=False`` returns a ``TaskRun`` whose thread keeps the line current
    and calls ``on_done(result)`` when the task is final.
    """
    _check_options(temperature, max_tokens, timeout_s, progress if isinstance(progress, str) else "auto")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty; write it in the cell body (or pass a non-empty string)")
    chosen = resolve_worker(worker)
    history = [{"role": "system", "content": system_prompt}] if system_prompt else None
    task_id = chosen.generate(prompt, temperature=temperature, max_tokens=max_tokens, history=history).id
    line = make_status_line(progress, max_retries=chosen.retry_config.max_retries)
    output = None if wait else make_content_output(line)
    line.display()
    if output is not None:
        output.display()
    if wait:
        return wait_task(chosen, task_id, line, timeout_s)
    run = TaskRun(chosen, task_id, line, output=output, on_done=on_done, timeout_s=timeout_s)
    run.start()
    return run


def get_result(task_id: str, *, worker: RactoCeleryWorker | None = None) -> TaskResult:
    """One task's state now (pending, started, retry, or final), without waiting."""
    return resolve_worker(worker).get_result(task_id)
