"""Views: front-ends that draw state computed elsewhere, and the protocol they share.

``racto_nb.batch.batch`` reads the result backend, folds it into a frozen
``BatchProgress`` and calls ``view.update(progress)``; a task's follower does
the same with a ``TaskResult``. Views only turn a snapshot into pixels or
characters (tqdm's core/front-end split), so they are tested by handing them
snapshots, with no Celery and no browser. Threads that draw: see
:mod:`racto_nb.notebook.kernel`.

Every view, batch or task, widget or text, is a :class:`View`: it declares what
it can do (``interactive``: buttons that stay useful after the work ends) and
decides itself how to show a one-off message (:meth:`View.announce`), so the
code that drives a view never asks which class it got.
"""

from __future__ import annotations

import html
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol, TextIO, TypeVar, runtime_checkable

from racto_nb.errors import InvalidArgument
from racto_nb.models import BatchProgress, TaskResult, TaskStatus
from racto_nb.notebook.kernel import CellContext, ipython_display, widgets_available

__all__ = [
    "COUNT_ORDER",
    "PROGRESS_CHOICES",
    "NullView",
    "ProgressChoice",
    "ProgressView",
    "StatusView",
    "TextProgressView",
    "View",
    "WidgetProgressView",
    "bar_style",
    "check_progress",
    "fmt_counts",
    "fmt_duration",
    "fmt_rate",
    "fmt_stats",
    "front_end",
    "make_view",
    "notice",
]

S = TypeVar("S", contravariant=True)


@runtime_checkable
class View(Protocol[S]):
    """What the notebook layer draws through; it never needs to know which front-end it got."""

    #: The view has controls (buttons) that stay useful after the work ends, so it is kept live.
    interactive: bool

    def display(self) -> None:
        """Show the view; called once, in the cell's own thread, before any update."""

    def update(self, state: S) -> None:
        """Draw ``state``; safe from any thread."""

    def close(self, final: S | None = None) -> None:
        """Draw ``final`` (if given) and stop drawing."""

    def announce(self, text: str) -> None:
        """Show a one-off message the way this view's audience reads it (or not at all)."""


#: A batch's view draws ``BatchProgress`` snapshots; a task's status line draws ``TaskResult``s.
ProgressView = View[BatchProgress]
StatusView = View[TaskResult]


def notice(text: str) -> None:
    """A message for the person at the notebook (stdout: stderr reads as an error)."""
    print(text, file=sys.stdout, flush=True)


class NullView:
    """``progress="none"``: the behaviour without any output, for scripts and tests."""

    interactive = False

    def display(self) -> None:
        """Nothing to show."""

    def update(self, state: object) -> None:
        """Draw nothing."""

    def close(self, final: object = None) -> None:
        """Nothing to release."""

    def announce(self, text: str) -> None:
        """Say nothing."""

#: The order count labels appear in: the order a task moves through them.
COUNT_ORDER: tuple[TaskStatus, ...] = (
    TaskStatus.PENDING,
    TaskStatus.STARTED,
    TaskStatus.RETRY,
    TaskStatus.SUCCESS,
    TaskStatus.FAILURE,
    TaskStatus.REVOKED,
)


# --- formatting (pure, shared by every front-end) -------------------------------------------------------


def fmt_duration(seconds: float) -> str:
    """``0:07``, ``1:02:03``: clock style, because ETAs are read at a glance, not parsed."""
    if not math.isfinite(seconds):
        return "?"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def fmt_rate(per_s: float) -> str:
    """One decimal below 100/s and none above, where the decimal is noise; per minute when a
    rate would otherwise round to ``0.0/s`` (slow local models are real)."""
    if not math.isfinite(per_s) or per_s < 0:
        return "?/s"
    if 0 < per_s < 0.05:
        return f"{per_s * 60:.1f}/min"
    return f"{per_s:.1f}/s" if per_s < 100 else f"{per_s:.0f}/s"


def fmt_stats(progress: BatchProgress) -> str:
    """The rate · elapsed · ETA line; parts the engine could not estimate are left out rather
    than shown as zeros that look like facts."""
    parts: list[str] = []
    if progress.rate_per_s is not None:
        parts.append(fmt_rate(progress.rate_per_s))
    parts.append(f"{fmt_duration(progress.elapsed_s)} elapsed")
    if not progress.finished and progress.eta_s is not None:
        parts.append(f"ETA {fmt_duration(progress.eta_s)}")
    if progress.submitted is not None and progress.submitted < progress.total and not progress.finished:
        parts.append(f"submitted {progress.submitted}/{progress.total}")
    if progress.cancelled:
        parts.append("cancelled")
    return " · ".join(parts)


def fmt_counts(progress: BatchProgress) -> str:
    """Short ``ok=12 fail=1 retry=2 run=8`` postfix for one-line bars; revoked only once it
    happens, since it is rare and a batch that has none should not say so."""
    parts = [
        f"ok={progress.count(TaskStatus.SUCCESS)}",
        f"fail={progress.count(TaskStatus.FAILURE)}",
        f"retry={progress.count(TaskStatus.RETRY)}",
        f"run={progress.count(TaskStatus.STARTED)}",
    ]
    if progress.count(TaskStatus.REVOKED):
        parts.append(f"revoked={progress.count(TaskStatus.REVOKED)}")
    if progress.cancelled:
        parts.append("cancelled")
    return " ".join(parts)


def bar_style(progress: BatchProgress) -> str:
    """Colour of the bar. Cancelled wins over danger: a cancelled batch has revoked tasks by
    design, and red would report the user's own choice as a fault."""
    if progress.cancelled:
        return "warning"
    if not progress.finished:
        return ""
    if progress.count(TaskStatus.FAILURE) or progress.count(TaskStatus.REVOKED):
        return "danger"
    return "success"


def _short_id(batch_id: str) -> str:
    return batch_id if len(batch_id) <= 8 else f"{batch_id[:8]}…"


def _header_html(title: str, batch_id: str) -> str:
    # The full id is printed because it is what a user copies after a kernel restart.
    lead = f"<b>{html.escape(title)}</b> · " if title else ""
    return (
        f"{lead}batch <code>{html.escape(_short_id(batch_id))}</code> — reattach with "
        f"<code>%racto_batch --attach {html.escape(batch_id)}</code>"
    )


# --- views ----------------------------------------------------------------------------------------------


class WidgetProgressView:
    """An ipywidgets panel: header with the batch id, bar, per-state counts, stats, buttons.

    Updates may come from any thread (see the module docstring). Widgets are public
    attributes so tests assert their values without a browser. ``close`` keeps the
    widgets alive, because the final state and the "Retry failed" button are the point
    of looking at a finished batch; later ``update`` calls are ignored so a slow poller
    cannot paint an older snapshot over the final one.
    """

    #: The "Retry failed" button stays useful after the batch ends.
    interactive = True

    def __init__(
        self,
        *,
        on_cancel: Callable[[], object] | None = None,
        on_retry_failed: Callable[[], object] | None = None,
        title: str = "",
    ) -> None:
        import ipywidgets as widgets  # deferred: workers and text-only sessions never pay for it

        self._title = title
        self._on_cancel = on_cancel
        self._on_retry_failed = on_retry_failed
        self._lock = threading.Lock()
        self._ctx = CellContext()
        self._batch_id: str | None = None
        self._closed = False
        self._cancel_requested = False
        self._retry_requested = False

        self.header: Any = widgets.HTML(value=f"<b>{html.escape(title)}</b>" if title else "")
        self.bar: Any = widgets.IntProgress(
            value=0, min=0, max=1, bar_style="", description="0/0", layout=widgets.Layout(width="45%")
        )
        self.counts: dict[TaskStatus, Any] = {
            status: widgets.HTML(value=f"{status.value}: 0", layout=widgets.Layout(margin="0 1.2em 0 0"))
            for status in COUNT_ORDER
        }
        self.stats: Any = widgets.HTML(value="")
        self.cancel_button: Any = widgets.Button(description="Cancel", icon="stop", tooltip="Revoke tasks")
        self.retry_button: Any = widgets.Button(
            description="Retry failed", icon="redo", disabled=True, tooltip="Resubmit the failed rows"
        )
        for button, callback, handler in (
            (self.cancel_button, on_cancel, self._cancel_clicked),
            (self.retry_button, on_retry_failed, self._retry_clicked),
        ):
            if callback is None:
                button.layout.display = "none"  # a button that cannot do anything is noise
            else:
                button.on_click(handler)
        self.box: Any = widgets.VBox(
            [
                self.header,
                widgets.HBox([self.bar, self.cancel_button, self.retry_button]),
                widgets.HBox(list(self.counts.values())),
                self.stats,
            ]
        )

    def display(self) -> None:
        """Show the panel and adopt the displaying cell as the one updates are sent for."""
        self._ctx.capture()
        ipython_display(self.box)

    def announce(self, text: str) -> None:
        """Nothing to add: the header already names the batch and how to reattach."""

    def update(self, progress: BatchProgress) -> None:
        """Draw ``progress``; safe from any thread, serialised so snapshots never interleave."""
        if not self._closed:
            self._ctx.run(lambda: self._draw(progress))

    def close(self, final: BatchProgress | None = None) -> None:
        """Draw ``final``, freeze the view and release the captured cell context."""
        if final is not None:
            self._ctx.run(lambda: self._draw(final, last=True))
        with self._lock:  # under the lock, so no update can slip in between the final draw and this
            self._closed = True
        self._ctx.release()

    def _draw(self, progress: BatchProgress, *, last: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = last
            if progress.batch_id != self._batch_id:
                self._batch_id = progress.batch_id
                self.header.value = _header_html(self._title, progress.batch_id)
            done, total = progress.done, progress.total
            with self.bar.hold_sync():  # one message, so the front-end never sees value > max
                self.bar.max = max(total, 1)
                self.bar.value = min(done, total) if total else int(progress.finished)
                self.bar.bar_style = bar_style(progress)
                self.bar.description = f"{done}/{total}"
            for status, label in self.counts.items():
                label.value = f"{status.value}: {progress.count(status)}"
            failures = progress.count(TaskStatus.FAILURE)
            self.counts[TaskStatus.FAILURE].style.text_color = "#c62828" if failures else None
            self.stats.value = html.escape(fmt_stats(progress))
            ended = progress.finished or progress.cancelled
            self.cancel_button.disabled = ended or self._cancel_requested
            self.retry_button.disabled = not (ended and failures > 0) or self._retry_requested

    def _cancel_clicked(self, _button: Any) -> None:
        if self._on_cancel is None or self._cancel_requested:
            return
        self._cancel_requested = True  # a second click must not revoke twice
        self.cancel_button.disabled = True
        self.cancel_button.description = "Cancelling…"
        self._on_cancel()

    def _retry_clicked(self, _button: Any) -> None:
        if self._on_retry_failed is None or self._retry_requested:
            return
        self._retry_requested = True  # one click, one resubmission
        self.retry_button.disabled = True
        self.retry_button.description = "Retry submitted"
        self._on_retry_failed()


class TextProgressView:
    """A tqdm bar for terminal IPython and nbconvert, where widget views render as nothing.

    Built on the first snapshot because only then is the total known. ``file`` defaults
    to ``sys.stderr`` as it is at construction, not import, so a kernel's or pytest's
    replacement stream is honoured.
    """

    interactive = False

    def __init__(self, file: TextIO | None = None, *, title: str = "", mininterval: float = 0.5) -> None:
        self._file = file if file is not None else sys.stderr
        self._title = title
        self._mininterval = mininterval
        self._bar: Any = None
        self._closed = False

    def display(self) -> None:
        """Nothing to do: tqdm draws on the first update."""

    def announce(self, text: str) -> None:
        """Print it: a terminal or a log has no header to carry it."""
        notice(text)

    def update(self, progress: BatchProgress) -> None:
        """Move the bar; tqdm itself throttles redraws to ``mininterval``."""
        if self._closed:
            return
        bar = self._sync(progress)
        if bar.total != progress.total:
            bar.total = progress.total
        delta = progress.done - bar.n
        if delta >= 0:
            bar.update(delta)  # update(0) still redraws once mininterval passed: counts move too
        else:
            bar.n = progress.done
            bar.refresh()

    def close(self, final: BatchProgress | None = None) -> None:
        """Draw ``final`` unthrottled (the last line is the one people read) and close the bar."""
        if self._closed:
            return
        self._closed = True
        if final is not None:
            bar = self._sync(final)
            bar.total = final.total
            bar.n = final.done
            bar.refresh()
        if self._bar is not None:
            self._bar.close()

    def _sync(self, progress: BatchProgress) -> Any:
        """The bar, created on first use, with the engine's counts and clock: elapsed counts from
        submission, not from when this view appeared (a reattach after a kernel restart)."""
        if self._bar is None:
            from tqdm.std import tqdm

            # miniters=0 turns off tqdm's dynamic miniters, which would otherwise skip redraws
            # where only the counts changed; mininterval still bounds the redraw rate.
            # smoothing=0 makes tqdm's rate done/elapsed, the engine's definition: a smoothed
            # rate reads the jump of a first snapshot (reattach) as thousands of tasks per second.
            self._bar = tqdm(
                total=progress.total,
                desc=self._title or f"batch {_short_id(progress.batch_id)}",
                unit="task",
                file=self._file,
                mininterval=self._mininterval,
                miniters=0,
                smoothing=0,
                leave=True,
            )
        self._bar.start_t = time.time() - progress.elapsed_s  # tqdm's own clock is time.time
        self._bar.set_postfix_str(fmt_counts(progress), refresh=False)
        return self._bar


# --- choosing a view ------------------------------------------------------------------------------------

#: ``auto``: widgets in a kernel, text elsewhere; ``none``: no output at all.
ProgressChoice = Literal["auto", "widget", "text", "none"]
PROGRESS_CHOICES: tuple[ProgressChoice, ...] = ("auto", "widget", "text", "none")


def check_progress(progress: object) -> None:
    """Reject an unknown progress choice before anything is sent."""
    if isinstance(progress, str) and progress not in PROGRESS_CHOICES:
        raise InvalidArgument(f"progress must be one of {', '.join(PROGRESS_CHOICES)}, not {progress!r}")


def front_end(prefer: ProgressChoice) -> Literal["widget", "text", "none"]:
    """Which front-end can actually be seen where the code runs; ``prefer`` overrides the guess
    (nbconvert runs a real kernel but keeps no widget state, so it needs ``"text"``)."""
    check_progress(prefer)
    if prefer == "auto":
        return "widget" if widgets_available() else "text"
    return prefer


def make_view(
    prefer: ProgressChoice | ProgressView = "auto",
    *,
    on_cancel: Callable[[], object] | None = None,
    on_retry_failed: Callable[[], object] | None = None,
    title: str = "",
) -> ProgressView:
    """The batch view for ``prefer``; a ready-made view object is used as it is."""
    if not isinstance(prefer, str):
        return prefer
    chosen = front_end(prefer)
    if chosen == "widget":
        return WidgetProgressView(on_cancel=on_cancel, on_retry_failed=on_retry_failed, title=title)
    if chosen == "text":
        return TextProgressView(title=title)
    return NullView()
