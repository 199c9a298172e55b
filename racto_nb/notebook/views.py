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
    TaskStatus.PAUSED,
    TaskStatus.SUCCESS,
    TaskStatus.FAILURE,
    TaskStatus.REVOKED,
)

#: The bar's segments, left to right, and their colours: what is done first, then what still moves.
SEGMENTS: tuple[tuple[TaskStatus, str], ...] = (
    (TaskStatus.SUCCESS, "#2e7d32"),
    (TaskStatus.FAILURE, "#c62828"),
    (TaskStatus.REVOKED, "#9e9e9e"),
    (TaskStatus.PAUSED, "#f9a825"),
    (TaskStatus.RETRY, "#ef6c00"),
    (TaskStatus.STARTED, "#64b5f6"),
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
    """The rate · elapsed · ETA · dollars line; parts the engine could not estimate are left out
    rather than shown as zeros that look like facts."""
    parts: list[str] = []
    if progress.rate_per_s is not None:
        parts.append(fmt_rate(progress.rate_per_s))
    parts.append(f"{fmt_duration(progress.elapsed_s)} elapsed")
    if not progress.finished and not progress.paused and progress.eta_s is not None:
        parts.append(f"ETA {fmt_duration(progress.eta_s)}")
    if progress.submitted is not None and progress.submitted < progress.total and not progress.settled:
        parts.append(f"submitted {progress.submitted}/{progress.total}")
    if progress.cost_usd:
        parts.append(f"{fmt_usd(progress.cost_usd)} spent")
    if progress.cached:
        saved = f", {fmt_usd(progress.saved_usd)} saved" if progress.saved_usd else ""
        parts.append(f"{progress.cached} cached{saved}")
    if progress.cancelled:
        parts.append("cancelled")
    return " · ".join(parts)


def fmt_usd(dollars: float) -> str:
    """Cents where they matter, fractions of a cent where a cheap model makes them the point."""
    return f"${dollars:,.2f}" if dollars >= 1 else f"${dollars:.4f}"


def fmt_state(progress: BatchProgress) -> str:
    """What the batch as a whole is doing, in a few words: how a glance reads the view."""
    revoked, failed = progress.count(TaskStatus.REVOKED), progress.count(TaskStatus.FAILURE)
    if progress.cancelled and (progress.finished or progress.settled):
        return f"Cancelled — {revoked} revoked"
    if progress.cancelled:
        return f"Cancelling — {revoked} revoked, running calls finish"
    if progress.paused:
        return f"Paused — {progress.pause_reason or 'waiting'}"
    if progress.finished:
        return f"Finished — {failed} failed" if failed else "Finished"
    return "Running"


def shares(progress: BatchProgress) -> dict[TaskStatus, float]:
    """Each state's share of the tasks, for the bar's segments (pending is what is left)."""
    total = max(progress.total, 1)
    return {status: progress.count(status) / total for status, _ in SEGMENTS}


def bar_html(progress: BatchProgress) -> str:
    """A bar with one segment per state, so a few failures show as a sliver of red, not a red bar."""
    parts = []
    for (status, colour), share in zip(SEGMENTS, shares(progress).values(), strict=True):
        if share > 0:
            title = f"{status.value}: {progress.count(status)}"
            parts.append(
                f"<div title='{title}' style='width:{share * 100:.3f}%;background:{colour};height:100%'></div>"
            )
    label = f"{progress.done}/{progress.total}"
    return (
        "<div style='position:relative;width:100%;height:1.2em;background:#eceff1;border-radius:3px;"
        f"overflow:hidden;display:flex'>{''.join(parts)}"
        "<span style='position:absolute;left:0;right:0;text-align:center;font-size:0.85em;line-height:1.2em'>"
        f"{label}</span></div>"
    )


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
    if progress.paused:
        parts.append(f"paused={progress.count(TaskStatus.PAUSED)}")
    if progress.skipped:
        parts.append(f"skipped={progress.skipped}")
    if progress.cached:
        parts.append(f"cached={progress.cached}")
    if progress.cost_usd:
        parts.append(fmt_usd(progress.cost_usd))
    if progress.cancelled:
        parts.append("cancelled")
    return " ".join(parts)


def bar_style(progress: BatchProgress) -> str:
    """The view's frame colour, for the batch as a whole. Cancelled wins over danger: a cancelled
    batch has revoked tasks by design, and red would report the user's own choice as a fault."""
    if progress.cancelled or progress.paused:
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
    """An ipywidgets panel: header with the batch id, the state, a bar of each state's share,
    per-state counts, stats with dollars, a note, and buttons.

    Updates may come from any thread (see :mod:`racto_nb.notebook.kernel`). Widgets are
    public attributes so tests assert their values without a browser. ``close`` keeps the
    widgets alive, because the final state and the "Retry failed" button are the point of
    looking at a finished batch; later ``update`` calls are ignored so a slow poller cannot
    paint an older snapshot over the final one.
    """

    #: The "Retry failed" and "Resume" buttons stay useful after the batch stops moving.
    interactive = True

    def __init__(
        self,
        *,
        on_cancel: Callable[[], object] | None = None,
        on_retry_failed: Callable[[], object] | None = None,
        on_resume: Callable[[], object] | None = None,
        title: str = "",
    ) -> None:
        import ipywidgets as widgets  # deferred: workers and text-only sessions never pay for it

        self._title = title
        self._lock = threading.Lock()
        self._ctx = CellContext()
        self._batch_id: str | None = None
        self._closed = False
        self._clicked: set[str] = set()
        #: The last snapshot drawn (tests and ``_repr_html_`` read it).
        self.last: BatchProgress | None = None

        self.header: Any = widgets.HTML(value=f"<b>{html.escape(title)}</b>" if title else "")
        self.state: Any = widgets.HTML(value="Starting")
        self.bar: Any = widgets.HTML(value="", layout=widgets.Layout(width="45%"))
        self.counts: dict[TaskStatus, Any] = {
            status: widgets.HTML(value=f"{status.value}: 0", layout=widgets.Layout(margin="0 1.2em 0 0"))
            for status in COUNT_ORDER
        }
        self.skipped: Any = widgets.HTML(value="", layout=widgets.Layout(margin="0 1.2em 0 0"))
        self.stats: Any = widgets.HTML(value="")
        self.note: Any = widgets.HTML(value="")
        self.cancel_button: Any = widgets.Button(description="Cancel", icon="stop", tooltip="Revoke tasks")
        self.retry_button: Any = widgets.Button(
            description="Retry failed", icon="redo", disabled=True, tooltip="Resubmit the failed rows"
        )
        self.resume_button: Any = widgets.Button(
            description="Resume", icon="play", disabled=True, tooltip="Send the paused rows"
        )
        self._callbacks = {"cancel": on_cancel, "retry": on_retry_failed, "resume": on_resume}
        for name, button in (
            ("cancel", self.cancel_button),
            ("retry", self.retry_button),
            ("resume", self.resume_button),
        ):
            if self._callbacks[name] is None:
                button.layout.display = "none"  # a button that cannot do anything is noise
            else:
                button.on_click(lambda _button, name=name: self._clicked_once(name))
        self.resume_button.layout.display = "none"  # shown while the batch is paused
        self.box: Any = widgets.VBox(
            [
                self.header,
                widgets.HBox([self.state]),
                widgets.HBox([self.bar, self.cancel_button, self.retry_button, self.resume_button]),
                widgets.HBox([*self.counts.values(), self.skipped]),
                self.stats,
                self.note,
            ]
        )
        # Names a page (and a test driving one in a browser) can find the parts by.
        self.box.add_class("racto-progress")
        self.state.add_class("racto-state")
        self.bar.add_class("racto-bar")

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
            self.last = progress
            if progress.batch_id != self._batch_id:
                self._batch_id = progress.batch_id
                self.header.value = _header_html(self._title, progress.batch_id)
            colour = {"success": "#2e7d32", "danger": "#c62828", "warning": "#ef6c00"}.get(bar_style(progress), "")
            state = html.escape(fmt_state(progress))
            self.state.value = f"<b style='color:{colour}'>{state}</b>" if colour else f"<b>{state}</b>"
            self.bar.value = bar_html(progress)
            for status, label in self.counts.items():
                label.value = f"{status.value}: {progress.count(status)}"
                label.layout.display = "none" if status is TaskStatus.PAUSED and not progress.count(status) else None
            failures = progress.count(TaskStatus.FAILURE)
            self.counts[TaskStatus.FAILURE].style.text_color = "#c62828" if failures else None
            self.skipped.value = f"skipped: {progress.skipped}" if progress.skipped else ""
            self.stats.value = html.escape(fmt_stats(progress))
            self.note.value = f"<i>{html.escape(progress.note)}</i>" if progress.note else ""
            settled = progress.settled or progress.cancelled
            self.cancel_button.disabled = progress.finished or progress.cancelled or "cancel" in self._clicked
            self.retry_button.disabled = not (settled and failures > 0) or "retry" in self._clicked
            if not self.retry_button.disabled:
                self.retry_button.description = "Retry failed"
            if self._callbacks["resume"] is not None:
                self.resume_button.layout.display = None if progress.paused else "none"
                self.resume_button.disabled = not progress.paused or "resume" in self._clicked
                if not self.resume_button.disabled:
                    self.resume_button.description = "Resume"

    def _clicked_once(self, name: str) -> None:
        """One click, one action: a second click on the same button does nothing."""
        callback = self._callbacks[name]
        if callback is None or name in self._clicked:
            return
        self._clicked.add(name)
        button = {"cancel": self.cancel_button, "retry": self.retry_button, "resume": self.resume_button}[name]
        button.disabled = True
        button.description = {"cancel": "Cancelling…", "retry": "Retry submitted", "resume": "Resumed"}[name]
        callback()

    def again(self) -> None:
        """A new round started (Retry failed, Resume): its buttons work once more."""
        self._clicked -= {"retry", "resume"}
        with self._lock:
            self._closed = False

    def _repr_html_(self) -> str:
        """The last state as static HTML: what a notebook saved by nbconvert, or read elsewhere, shows."""
        return progress_html(self.last, self._title) if self.last is not None else html.escape(self._title)


def progress_html(progress: BatchProgress, title: str = "") -> str:
    """A batch's state as one static block of HTML (the widget's look, without widgets)."""
    shown = [s for s in COUNT_ORDER if progress.count(s) or s in (TaskStatus.SUCCESS, TaskStatus.FAILURE)]
    counts = " · ".join(f"{s.value}: {progress.count(s)}" for s in shown)
    note = f"<div><i>{html.escape(progress.note)}</i></div>" if progress.note else ""
    return (
        f"<div>{_header_html(title, progress.batch_id)}</div><div><b>{html.escape(fmt_state(progress))}</b></div>"
        f"<div style='width:45%'>{bar_html(progress)}</div><div>{html.escape(counts)}</div>"
        f"<div>{html.escape(fmt_stats(progress))}</div>{note}"
    )


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
        #: What a watcher thread writes goes to the cell that showed the bar (ipykernel 7 routes a
        #: stream write by the writer's context), never into whichever cell runs later.
        self._ctx = CellContext()

    def display(self) -> None:
        """Adopt the displaying cell; tqdm draws on the first update."""
        self._ctx.capture()

    def announce(self, text: str) -> None:
        """Print it: a terminal or a log has no header to carry it."""
        self._ctx.run(lambda: notice(text))

    def update(self, progress: BatchProgress) -> None:
        """Move the bar; tqdm itself throttles redraws to ``mininterval``."""
        if not self._closed:
            self._ctx.run(lambda: self._move(progress))

    def _move(self, progress: BatchProgress) -> None:
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
        self._ctx.run(lambda: self._last_line(final))
        self._ctx.release()

    def _last_line(self, final: BatchProgress | None) -> None:
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
    on_resume: Callable[[], object] | None = None,
    title: str = "",
) -> ProgressView:
    """The batch view for ``prefer``; a ready-made view object is used as it is."""
    if not isinstance(prefer, str):
        return prefer
    chosen = front_end(prefer)
    if chosen == "widget":
        return WidgetProgressView(
            on_cancel=on_cancel, on_retry_failed=on_retry_failed, on_resume=on_resume, title=title
        )
    if chosen == "text":
        return TextProgressView(title=title)
    return NullView()
