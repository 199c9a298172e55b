"""Watching work that is out on the fleet: a batch (``BatchRun``) or one task (``TaskRun``).

A run owns the view and the thread (if any) that keeps it current, and the
moment the work ends: the result frame is built, written back, handed to
``on_done`` (the magics fill the user's variable there), and the thread exits.
Blocking and background modes are the same loop, run in the cell's thread or
in a daemon thread; the view's own ``CellContext`` makes widget updates from
that thread carry the cell's parent header under ipykernel 7 (ipywidgets
#4001/#4020).

No asyncio: Celery, redis-py and the views are synchronous, so a plain thread
is enough and nest-asyncio is never needed (it is for running an event loop
inside the kernel's own, which nothing here does).

Leaving nothing behind: a watcher thread ends when its batch ends, when it is
cancelled and the running tasks have finished, on :meth:`BatchRun.stop_watching`,
or when the wait times out. Reads are MGETs; nothing subscribes to pub/sub.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pandas as pd

from racto_nb.batch.batch import Batch
from racto_nb.engine.polling import poll
from racto_nb.engine.worker import timed_out
from racto_nb.errors import EmbeddedError, StillRunning
from racto_nb.fleet.connection import current_worker, embedded_gone
from racto_nb.models import BatchProgress, TaskResult, TaskStatus
from racto_nb.notebook.claims import claim
from racto_nb.notebook.display import (
    batch_ended_early,
    batch_paused,
    batch_started,
    callback_failed,
    task_ended_early,
)
from racto_nb.notebook.kernel import CellContext
from racto_nb.notebook.views import ProgressChoice, ProgressView, StatusView, make_view, notice, progress_html
from racto_nb.notebook.write_back import WriteBack

if TYPE_CHECKING:
    from racto_nb.engine.worker import RactoCeleryWorker

__all__ = ["BatchRun", "TaskRun", "wait_task"]

DEFAULT_INTERVAL_S = 0.25
#: How often a watcher looks at a paused batch, to see a resume from this kernel or another.
PAUSED_LOOK_S = 1.0


class BatchRun:
    """A batch plus the view and watcher that follow it until it ends.

    ``done`` is set when every task is final; :meth:`result` is then the
    DataFrame (the same object after a retry-failed round: it is updated in
    place, so a variable holding it sees the retried rows). ``on_done(frame)``
    runs each time the batch ends, from whichever thread saw it end.
    """

    def __init__(
        self,
        batch: Batch,
        *,
        progress: ProgressChoice | ProgressView = "auto",
        title: str = "",
        on_done: Callable[[pd.DataFrame], object] | None = None,
        write_back: tuple[pd.DataFrame, str] | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        cancel_button: bool = True,
    ) -> None:
        self.batch = batch
        self._title = title
        self.on_done = on_done
        #: Where the answers go when the batch ends: by index label, and only while this is the newest run.
        self.write_back = (
            WriteBack(write_back[0], write_back[1], batch.index, claim(write_back[0], write_back[1]), batch.output)
            if write_back is not None
            else None
        )
        self.interval_s = interval_s
        self.done = threading.Event()
        #: Why the watcher stopped following the batch (the backend went away), if it did.
        self.error: BaseException | None = None
        #: What ``on_done`` raised, if it did: reported, and never a failure of the batch.
        self.callback_error: BaseException | None = None
        #: The wait ran out before every row was final: ``done`` is set and the frame is the rows as they were.
        self.timed_out = False
        self._ended = False
        self._cell = CellContext()
        # A blocking cell keeps the kernel from handling a click until the batch
        # ends, so only background runs get a Cancel button (Ctrl-C stops a wait).
        self.view = make_view(
            progress,
            on_cancel=self.cancel if cancel_button else None,
            on_retry_failed=self.retry_failed,
            on_resume=self.resume,
            title=title,
        )
        self._frame: pd.DataFrame | None = None
        self._last: BatchProgress | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._rounds = 0
        self._view_closed = False

    def __repr__(self) -> str:
        last = self._last
        state = "done" if self.done.is_set() else "running"
        counts = f", {last.done}/{last.total} final" if last is not None else ""
        return f"<BatchRun {self.batch_id}: {state}{counts}>"

    def _repr_html_(self) -> str:
        """The batch as it is now, as static HTML: what a notebook saved by nbconvert (no widget state) shows."""
        last = self._last if self.done.is_set() and self._last is not None else self.batch.refresh()
        return progress_html(last, self._title)

    @property
    def batch_id(self) -> str:
        """The id to reattach with (``%racto_batch --attach ID``)."""
        return self.batch.batch_id

    @property
    def watching(self) -> bool:
        """A background watcher thread is following the batch."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    # ------------------------------------------------------------------ showing

    def show(self) -> None:
        """Display the view; call it in the cell's own thread, before watching starts."""
        self._cell.capture()
        self.view.display()
        self.view.announce(batch_started(self.batch_id, rows=len(self.batch.index), tasks=self.batch.total))

    def _draw_running(self, progress: BatchProgress) -> None:
        """Draw a snapshot while the batch runs; the final one is drawn once its frame exists (``_finish``)."""
        if progress.finished:
            self._last = progress
        else:
            self._draw(progress)

    def _draw(self, progress: BatchProgress) -> None:
        self._last = progress
        self.view.update(progress)

    def _close_view(self, progress: BatchProgress | None) -> None:
        if not self._view_closed:
            self._view_closed = True
            self.view.close(progress)

    # ------------------------------------------------------------------ waiting

    def wait(self, timeout_s: float | None = None) -> pd.DataFrame:
        """Follow the batch in this thread until it ends; returns the result frame.

        On timeout: the frame as it is (unfinished rows keep their real status)
        and a notice with the batch id. On KeyboardInterrupt: the view is
        closed, publishing is finished (so every row is in the broker and the
        batch can be reattached), a notice says how to reattach or cancel, and
        the interrupt is re-raised so the cells queued after this one do not
        run on a partial result. The batch itself keeps running.
        """
        try:
            progress = self.batch.wait(timeout_s=timeout_s, interval_s=self.interval_s, on_progress=self._draw_running)
        except KeyboardInterrupt:
            self._close_view(self._last)
            try:
                self.batch.join_publisher()
            finally:
                notice(batch_ended_early(self.batch_id, self._last, why="Interrupted"))
            raise
        if progress.finished:
            return self._finish(progress)
        if progress.paused:
            notice(batch_paused(self.batch_id, progress))
            self.watch_in_background()  # the view stays live, and sees a resume from here or another kernel
            return self.batch.to_frame()
        self._close_view(progress)
        notice(batch_ended_early(self.batch_id, progress, why=f"Timed out after {timeout_s:g} s"))
        return self.batch.to_frame()

    def watch_in_background(self, timeout_s: float | None = None) -> None:
        """Follow the batch from a daemon thread; returns at once. No-op while one is watching."""
        with self._lock:
            if self.watching:
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._watch, args=(timeout_s,), name=f"racto-watch-{self.batch_id[:8]}", daemon=True
            )
            self._thread.start()

    def _watch(self, timeout_s: float | None) -> None:
        try:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                progress = self.batch.wait(
                    timeout_s=left, interval_s=self.interval_s, on_progress=self._draw_running, stop=self._stop
                )
                if progress.finished:
                    self._finish(progress)
                elif progress.paused and self._wait_while_paused(progress, deadline):
                    continue  # resumed (here or from another kernel): follow it again
                elif self._stop.is_set():
                    self._close_view(progress)
                else:  # the wait ran out: end here with the rows as they are, as a blocking wait does
                    self._end_early(progress, why=f"Timed out after {timeout_s:g} s")
                return
        except Exception as exc:  # the backend went away: keep it for result(), never print from a thread
            self.error = exc
            self._close_view(self._last)
            self.done.set()

    def _wait_while_paused(self, progress: BatchProgress, deadline: float | None) -> bool:
        """Keep the paused view live, looking every :data:`PAUSED_LOOK_S`; ``True`` once the batch goes on."""
        self._draw(progress)  # the reason, and the Resume button
        while not self._stop.wait(PAUSED_LOOK_S):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            progress = self.batch.refresh()
            if not progress.paused or not progress.settled:
                return True
        return False

    def stop_watching(self, timeout_s: float | None = 10.0) -> None:
        """Stop the background watcher (the batch keeps running) and freeze the view."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        self._close_view(self._last)

    def _finish(self, progress: BatchProgress) -> pd.DataFrame:
        # In this order: the frame stored (and written back), the view says so, on_done has it (the
        # magics' --out), and only then done: whoever waits on done finds every one of them in place.
        with self._lock:
            result = self._store_frame()
            self._draw(progress)
            failures = progress.count(TaskStatus.FAILURE)
            if not (failures and self._rounds == 0 and self.view.interactive):
                self._close_view(progress)  # else stay live: the Retry-failed button may restart it
        self._hand_over(result)
        return result

    def _end_early(self, progress: BatchProgress, *, why: str) -> None:
        """A background wait ran out: the frame as it is goes to ``result()`` and ``on_done``; the batch runs on."""
        with self._lock:
            self.timed_out = True
            result = self._store_frame()
            self._close_view(progress)
        self._say(batch_ended_early(self.batch_id, progress, why=why))
        self._hand_over(result)

    def _store_frame(self) -> pd.DataFrame:
        frame = self.batch.to_frame()
        if self._frame is None:
            self._frame = frame
        else:  # a retry round ended: same object, so variables holding it see the new rows
            for column in frame.columns:
                self._frame[column] = frame[column].array
        if self.write_back is not None:
            note = self.write_back.apply(self._frame)
            if note:
                self._say(note)
        return self._frame

    def _hand_over(self, result: pd.DataFrame) -> None:
        self._ended = True  # result() answers from here on, on_done included
        try:
            self.callback_error = _call_back(self.on_done, result, f"batch {self.batch_id}", self._say)
        finally:
            self.done.set()

    def _say(self, text: str) -> None:
        """A notice from whichever thread, shown in the cell that started the run."""
        self._cell.run(lambda: notice(text))

    # ------------------------------------------------------------------ results and control

    def result(self) -> pd.DataFrame:
        """The final frame.

        Raises:
            RuntimeError: while the batch runs (naming what to call instead),
                or with the error that stopped the watcher.
        """
        if self.error is not None:
            raise RuntimeError(f"watching batch {self.batch_id} failed: {self.error!r}") from self.error
        if self._frame is None or not self._ended:
            raise StillRunning(
                f"batch {self.batch_id} is still running: wait with run.done.wait(), or look at the rows "
                "so far with run.frame()"
            )
        return self._frame

    def refresh(self) -> BatchProgress:
        """Look once at the batch and return its progress (counts per state), watched or not.

        The look reads what changed since the last one (the batch's event
        stream), so it costs the same with ten rows or a million outstanding.
        """
        if self.done.is_set() and self._last is not None:
            return self._last
        self._last = self.batch.refresh()
        return self._last

    def frame(self) -> pd.DataFrame:
        """The rows as they are now (refreshed first), finished or not."""
        if not self.done.is_set():
            self._last = self.batch.refresh()
        return self.batch.to_frame()

    def cancel(self) -> int:
        """Revoke every task that has not started; returns how many. Running ones finish.

        The batch then ends once the running tasks finish; a watcher follows it
        there (started if none is running) so ``on_done`` still fills the result.
        """
        revoked = self.batch.cancel()
        if not self.done.is_set():
            self.watch_in_background()
        return revoked

    def retry_failed(self) -> int:
        """Resubmit the failed rows into this same batch and follow them; returns how many."""
        return self._follow_again(self._live_batch().retry_failed())

    def resume(self, max_cost_usd: float | None = None) -> int:
        """Send the rows a pause held back (quota came back, or a higher ``max_cost_usd``); returns how many."""
        return self._follow_again(self._live_batch().resume(max_cost_usd=max_cost_usd), always=True)

    def _live_batch(self) -> Batch:
        """The batch, on a worker that can still run it.

        An embedded batch whose worker a later ``connect()`` replaced would send
        its new round into a queue nobody reads; it moves to the current
        embedded worker instead, the way a restarted kernel reattaches (from
        its checkpoint, which has every row).
        """
        with self._lock:
            if embedded_gone(self.batch.worker):
                current = current_worker()
                if embedded_gone(current):
                    raise EmbeddedError(
                        f"batch {self.batch_id} ran on an embedded worker that has stopped: racto_nb.connect() "
                        "again (embedded), then retry"
                    )
                self.batch = Batch.attach(current, self.batch_id)
            return self.batch

    def _follow_again(self, count: int, *, always: bool = False) -> int:
        if count or always:
            self._rounds += 1
            self._ended = False
            self.done.clear()
            self._view_closed = False
            again = getattr(self.view, "again", None)
            if callable(again):
                again()
            self.watch_in_background()
        return count


class TaskRun:
    """One ``generate`` task followed in the background; ``done`` is set when it is final."""

    def __init__(
        self,
        worker: RactoCeleryWorker,
        task_id: str,
        line: StatusView,
        *,
        on_done: Callable[[TaskResult], object] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.worker = worker
        self.task_id = task_id
        self.line = line
        self.on_done = on_done
        self.timeout_s = timeout_s
        self.done = threading.Event()
        #: Why the watcher stopped following the task (the backend went away), if it did.
        self.error: BaseException | None = None
        #: What ``on_done`` raised, if it did: reported, and never a failure of the task.
        self.callback_error: BaseException | None = None
        self._result: TaskResult | None = None
        self._ended = False
        self._stop = threading.Event()
        self._cell = CellContext()  # created in the cell that sent the task: notices go there
        self._thread = threading.Thread(target=self._watch, name=f"racto-task-{task_id[:8]}", daemon=True)

    def __repr__(self) -> str:
        state = self._result.status.value if self._result is not None else "pending"
        return f"<TaskRun {self.task_id}: {state}>"

    @property
    def watching(self) -> bool:
        """The watcher thread is alive."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start following the task from a daemon thread."""
        self._thread.start()

    def _watch(self) -> None:
        try:
            final = _poll_task(self.worker, self.task_id, self.line, self.timeout_s, self._stop)
        except Exception as exc:
            self.error = exc
            self.line.close(None)
            self.done.set()
            return
        self._result = final
        self.line.close(final)
        if self._stop.is_set() and not final.status.is_final:
            return  # stop_watching(): nothing ended
        # Final, or the wait ran out (the state as it is, error_type WaitTimeout): either way the run ends
        # here, and done is set once on_done has the result (as for a batch).
        self._ended = True
        if not final.status.is_final:
            self._say(task_ended_early(self.task_id, final, why=f"Timed out after {self.timeout_s:g} s"))
        try:
            self.callback_error = _call_back(self.on_done, final, f"task {self.task_id}", self._say)
        finally:
            self.done.set()

    def _say(self, text: str) -> None:
        self._cell.run(lambda: notice(text))

    def stop_watching(self, timeout_s: float | None = 10.0) -> None:
        """Stop following the task (it keeps running on the workers)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def result(self) -> TaskResult:
        """The final ``TaskResult``; raises while the task runs."""
        if self.error is not None:
            raise RuntimeError(f"watching task {self.task_id} failed: {self.error!r}") from self.error
        if self._result is None or not self._ended:
            raise StillRunning(
                f"task {self.task_id} is still running: wait with run.done.wait(), or read its state now "
                f"with racto_nb.api.get_result({self.task_id!r})"
            )
        return self._result


def wait_task(worker: RactoCeleryWorker, task_id: str, line: StatusView, timeout_s: float | None) -> TaskResult:
    """Follow one task in this thread, drawing ``line``; the ``wait`` half of ``generate``.

    A timeout returns the task's real state with ``error_type="WaitTimeout"``; an
    interrupt closes the line, says how to fetch the result later and re-raises.
    """
    seen: list[TaskResult] = []
    try:
        final = _poll_task(worker, task_id, line, timeout_s, None, seen)
    except KeyboardInterrupt:
        line.close(None)
        notice(task_ended_early(task_id, seen[-1] if seen else None, why="Interrupted"))
        raise
    line.close(final)
    if not final.status.is_final:
        notice(task_ended_early(task_id, final, why=f"Timed out after {timeout_s:g} s"))
    return final


def _poll_task(
    worker: RactoCeleryWorker,
    task_id: str,
    line: StatusView,
    timeout_s: float | None,
    stop: threading.Event | None,
    seen: list[TaskResult] | None = None,
) -> TaskResult:
    """One GET per look, drawn on ``line``; quick looks first so a fast answer is not held back."""

    def look() -> TaskResult:
        result = worker.get_result(task_id)
        if seen is not None:
            seen[:] = [result]  # the latest only: a long wait must not grow a list
        line.update(result)
        return result

    result, end = poll(look, lambda r: r.status.is_final, timeout_s=timeout_s, stop=stop, first_pause_s=0.02)
    return timed_out(result, timeout_s) if end == "timeout" else result


def _call_back(
    on_done: Callable[[Any], object] | None, value: Any, what: str, say: Callable[[str], None]
) -> BaseException | None:
    """Run ``on_done(value)``; an exception there is the callback's, not the work's: reported, and returned."""
    if on_done is None:
        return None
    try:
        on_done(value)
    except Exception as exc:
        say(callback_failed(what, exc))
        return exc
    return None
