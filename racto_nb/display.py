"""What the notebook layer shows: picking a view, rendering content, and the one-line notices.

The progress and status-line front-ends live in :mod:`racto_nb.progress` and
:mod:`racto_nb.status_line`; this module chooses between them and holds every
message a user reads when something ends early (a timeout, an interrupt), so
the wording, and the command to copy, is written once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Literal, Protocol

from racto_nb.models import BatchProgress, TaskResult, TaskStatus
from racto_nb.progress import CellContext, ProgressView, ipython_display, make_view, widgets_available
from racto_nb.status_line import TextStatusLine, WidgetStatusLine

ProgressChoice = Literal["auto", "widget", "text", "none"]
PROGRESS_CHOICES: tuple[ProgressChoice, ...] = ("auto", "widget", "text", "none")

__all__ = [
    "PROGRESS_CHOICES",
    "ContentOutput",
    "NullStatusLine",
    "ProgressChoice",
    "StatusView",
    "batch_ended_early",
    "batch_started",
    "check_progress",
    "make_batch_view",
    "make_content_output",
    "make_status_line",
    "notice",
    "show_content",
    "task_ended_early",
]


class StatusView(Protocol):
    """What ``generate`` draws one task's state through."""

    def update(self, result: TaskResult) -> None: ...

    def close(self, final: TaskResult | None = None) -> None: ...

    def display(self) -> None: ...


class NullStatusLine:
    """``progress="none"``: no output at all."""

    def update(self, result: TaskResult) -> None:
        """Draw nothing."""

    def close(self, final: TaskResult | None = None) -> None:
        """Nothing to release."""

    def display(self) -> None:
        """Nothing to show."""


def check_progress(progress: object) -> None:
    """Reject an unknown progress choice before anything is sent."""
    if isinstance(progress, str) and progress not in PROGRESS_CHOICES:
        raise ValueError(f"progress must be one of {', '.join(PROGRESS_CHOICES)}, not {progress!r}")


def make_batch_view(
    progress: ProgressChoice | ProgressView,
    *,
    on_cancel: Callable[[], object] | None,
    on_retry_failed: Callable[[], object],
    title: str,
) -> ProgressView:
    """The batch view for ``progress``; a ready-made view object is used as it is."""
    if not isinstance(progress, str):
        return progress
    check_progress(progress)
    return make_view(
        on_cancel=None if on_cancel is None else lambda: _discard(on_cancel()),
        on_retry_failed=lambda: _discard(on_retry_failed()),
        prefer=progress,
        title=title,
    )


def make_status_line(progress: ProgressChoice | StatusView, *, max_retries: int | None) -> StatusView:
    """The one-line status view for ``progress`` (widget in a kernel, text elsewhere)."""
    if not isinstance(progress, str):
        return progress
    check_progress(progress)
    if progress == "none":
        return NullStatusLine()
    if progress == "widget" or (progress == "auto" and widgets_available()):
        return WidgetStatusLine(max_retries=max_retries)
    return TextStatusLine(max_retries=max_retries)


class ContentOutput:
    """Where a background ``generate`` puts its answer once it arrives.

    A thread cannot ``display()`` into a cell that has finished (front-ends
    drop outputs for a finished request), but an ``Output`` widget's
    ``outputs`` is widget state, synced by comm like any trait, so
    ``append_display_data`` from the watcher thread reaches the right cell.
    """

    def __init__(self) -> None:
        import ipywidgets as widgets

        self._ctx = CellContext()
        self.out: Any = widgets.Output()

    def display(self) -> None:
        """Show the (empty) output area under the status line."""
        self._ctx.capture()
        ipython_display(self.out)

    def show(self, result: TaskResult) -> None:
        """Render ``result``'s content as Markdown inside the output area."""
        content = result.content
        if content is None:
            return
        self._ctx.run(lambda: self.out.append_display_data(_markdown(content)))
        self._ctx.release()


def make_content_output(status: StatusView) -> ContentOutput | None:
    """An output area for a background answer, only where the status line is a widget."""
    return ContentOutput() if isinstance(status, WidgetStatusLine) else None


def show_content(result: TaskResult) -> None:
    """Render a finished task's content as Markdown (nothing when it has none)."""
    if result.content is None:
        return
    ipython_display(_markdown(result.content))


def notice(text: str) -> None:
    """A message for the person at the notebook (stdout: stderr reads as an error)."""
    print(text, file=sys.stdout, flush=True)


def batch_started(batch_id: str, *, rows: int, tasks: int) -> str:
    """Shown once per batch where no widget header carries the id."""
    skipped = rows - tasks
    extra = f" ({skipped} skipped)" if skipped else ""
    return f"batch {batch_id}: {tasks} tasks, {rows} rows{extra}; reattach: %racto_batch --attach {batch_id}"


def batch_ended_early(batch_id: str, progress: BatchProgress | None, *, why: str) -> str:
    """After a timeout or an interrupt: the batch runs on; how to get back to it or stop it."""
    state = f" ({progress.done} of {progress.total} tasks final)" if progress is not None else ""
    quoted = repr(batch_id)
    return (
        f"{why}: stopped waiting for batch {batch_id}{state}; it keeps running on the workers.\n"
        f"  follow it: %racto_batch --attach {batch_id} --out NAME  (or racto_nb.api.attach({quoted}))\n"
        f"  cancel it: %racto_batch --attach {batch_id} --cancel  (or racto_nb.api.attach({quoted}).cancel())"
    )


def task_ended_early(task_id: str, result: TaskResult | None, *, why: str) -> str:
    """After a timeout or an interrupt on one task."""
    state = (
        f" (still {result.status.value})"
        if result is not None and result.status is not TaskStatus.PENDING
        else ""
    )
    return (
        f"{why}: stopped waiting for task {task_id}{state}; it keeps running on the workers.\n"
        f"  get it later:  racto_nb.api.get_result({task_id!r})"
    )


def _markdown(text: str) -> object:
    from IPython.core import display as ipython_core_display

    markdown: Any = ipython_core_display.Markdown  # untyped in IPython
    result: object = markdown(text)
    return result


def _discard(_value: object) -> None:
    """Button handlers want ``None``; ``cancel()`` and ``retry_failed()`` return counts."""
