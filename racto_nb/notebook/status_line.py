"""One line of status for one task, as ``%%racto_generate`` shows while it waits.

``StatusLine.render`` is pure so the wording is tested once and shared by the
widget and the terminal front-ends, which only decide how the line is replaced.
Both are views (:class:`~racto_nb.notebook.views.View`) of a ``TaskResult``.
"""

from __future__ import annotations

import html
import math
import sys
from typing import Any, TextIO

from racto_nb.models import TaskResult, TaskStatus
from racto_nb.notebook.kernel import CellContext, ipython_display, markdown
from racto_nb.notebook.views import NullView, ProgressChoice, StatusView, fmt_duration, front_end, notice

__all__ = ["StatusLine", "TextStatusLine", "WidgetStatusLine", "make_status_line"]

_MAX_ERROR_CHARS = 200


def _seconds(s: float) -> str:
    # Short waits read better as "4 s" than "0:04"; ceil so a pending retry never says "0 s".
    if not math.isfinite(s):
        return "?"
    return f"{math.ceil(max(s, 0.0))} s" if s < 60 else fmt_duration(s)


def _latency(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else fmt_duration(s)


def _cause(result: TaskResult) -> str:
    return " ".join(part for part in (result.error_type, _code(result)) if part)


def _code(result: TaskResult) -> str:
    return str(result.status_code) if result.status_code is not None else ""


class StatusLine:
    """The wording of a task's state; a namespace, so callers need not build anything."""

    @staticmethod
    def render(result: TaskResult, *, max_retries: int | None = None) -> str:
        """E.g. ``retry 1 of 3, next try in 4 s (RateLimitError 429)``.

        ``max_retries`` is the budget the caller configured, used when the result does not
        carry the one the worker applied (a task still pending has not met a worker yet).
        """
        budget = result.max_retries if result.max_retries is not None else max_retries
        status = result.status
        if status is TaskStatus.PENDING:
            return "pending"
        if status is TaskStatus.STARTED:
            return f"started (attempt {result.attempts})" if result.attempts > 1 else "started"
        if status is TaskStatus.RETRY:
            # attempts counts calls made so far, so after the n-th failed call the next is retry n.
            text = f"retry {max(result.attempts, 1)}" + (f" of {budget}" if budget is not None else "")
            if result.retry_in_s is not None:
                text += f", next try in {_seconds(result.retry_in_s)}"
            cause = _cause(result)
            return f"{text} ({cause})" if cause else text
        if status is TaskStatus.SUCCESS:
            text = "success" + (f" in {_latency(result.latency_s)}" if result.latency_s is not None else "")
            return f"{text} (attempt {result.attempts})" if result.attempts > 1 else text
        if status is TaskStatus.FAILURE:
            head = " ".join(part for part in (_code(result), result.error_type) if part)
            message = (result.error or "").strip().splitlines()[0] if result.error else ""
            if len(message) > _MAX_ERROR_CHARS:
                message = message[: _MAX_ERROR_CHARS - 1] + "…"
            detail = ": ".join(part for part in (head, message) if part)
            text = f"failure: {detail}" if detail else "failure"
            return f"{text} (after {result.attempts} attempts)" if result.attempts > 1 else text
        return f"revoked: {result.error}" if result.error else "revoked"


class WidgetStatusLine:
    """An ``HTML`` widget rewritten in place; thread-safe like ``WidgetProgressView``.

    With ``show_answer`` it also renders the final answer as Markdown, below the
    line. That is how a background task's answer reaches its cell: a thread
    cannot ``display()`` into a cell that has finished (front-ends drop outputs
    for a finished request), but an ``Output`` widget's ``outputs`` is widget
    state, synced by comm like any trait.
    """

    interactive = False

    def __init__(self, *, max_retries: int | None = None, show_answer: bool = False) -> None:
        import ipywidgets as widgets

        self._max_retries = max_retries
        self._ctx = CellContext()
        self.html: Any = widgets.HTML(value="")
        self.answer: Any = widgets.Output() if show_answer else None

    def display(self) -> None:
        """Show the line and adopt the displaying cell for updates from threads."""
        self._ctx.capture()
        ipython_display(self.html)
        if self.answer is not None:
            ipython_display(self.answer)

    def announce(self, text: str) -> None:
        """Nothing to add beside the line itself."""

    def update(self, result: TaskResult) -> None:
        """Replace the text with ``result``'s status."""
        text = html.escape(StatusLine.render(result, max_retries=self._max_retries))

        def draw() -> None:
            self.html.value = text

        self._ctx.run(draw)

    def close(self, final: TaskResult | None = None) -> None:
        """Draw ``final`` (and its answer, with ``show_answer``) and let go of the captured cell context."""
        if final is not None:
            self.update(final)
            content = final.content
            if self.answer is not None and final.status.is_final and content is not None:
                self._ctx.run(lambda: self.answer.append_display_data(markdown(content)))
        self._ctx.release()


class TextStatusLine:
    """Rewrites one line with ``\\r`` on a terminal; elsewhere (logs, nbconvert) prints a line
    only when the state changes, because a log full of countdowns hides what happened."""

    interactive = False

    def __init__(self, file: TextIO | None = None, *, max_retries: int | None = None) -> None:
        self._file = file if file is not None else sys.stderr
        self._max_retries = max_retries
        try:
            self._tty = self._file.isatty()
        except (AttributeError, ValueError):
            self._tty = False
        self._width = 0
        self._last_key: tuple[TaskStatus, int] | None = None
        #: Lines written from a watcher thread go to the cell that showed this line, not the latest cell.
        self._ctx = CellContext()

    def display(self) -> None:
        """Adopt the displaying cell; the first update writes the line."""
        self._ctx.capture()

    def announce(self, text: str) -> None:
        """Print it on its own line."""
        self._ctx.run(lambda: notice(text))

    def update(self, result: TaskResult) -> None:
        """Write ``result``'s status the way this stream can show it."""
        self._ctx.run(lambda: self._write(result))

    def _write(self, result: TaskResult) -> None:
        text = StatusLine.render(result, max_retries=self._max_retries)
        if self._tty:
            self._file.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            key = (result.status, result.attempts)
            if key == self._last_key:
                return
            self._last_key = key
            self._file.write(text + "\n")
        self._file.flush()

    def _end_line(self) -> None:
        self._file.write("\n")
        self._file.flush()

    def close(self, final: TaskResult | None = None) -> None:
        """Draw ``final`` and end the rewritten line so the next output starts clean."""
        if final is not None:
            self.update(final)
        if self._tty and self._width:
            self._ctx.run(self._end_line)
            self._width = 0
        self._ctx.release()


def make_status_line(
    progress: ProgressChoice | StatusView, *, max_retries: int | None, show_answer: bool = False
) -> StatusView:
    """The one-line status view for ``progress`` (widget in a kernel, text elsewhere)."""
    if not isinstance(progress, str):
        return progress
    chosen = front_end(progress)
    if chosen == "widget":
        return WidgetStatusLine(max_retries=max_retries, show_answer=show_answer)
    if chosen == "text":
        return TextStatusLine(max_retries=max_retries)
    return NullView()
