"""Every message a user reads when work starts or ends early, and the rendered answer.

The wording, and the command to copy, is written once here: the views, the
runs and the magics all take their text from these functions.
"""

from __future__ import annotations

import traceback

from racto_nb.models import BatchProgress, TaskResult, TaskStatus
from racto_nb.notebook.kernel import ipython_display, markdown

__all__ = [
    "batch_ended_early",
    "batch_paused",
    "batch_started",
    "callback_failed",
    "show_content",
    "task_ended_early",
]


def show_content(result: TaskResult) -> None:
    """Render a finished task's content as Markdown (nothing when it has none)."""
    if result.content is not None:
        ipython_display(markdown(result.content))


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


def batch_paused(batch_id: str, progress: BatchProgress) -> str:
    """A batch that stopped sending: why, and how to go on."""
    waiting = progress.count(TaskStatus.PAUSED)
    return (
        f"Paused: batch {batch_id} ({progress.pause_reason}); {waiting} rows wait.\n"
        f"  go on: %racto_batch --attach {batch_id} --resume [--max-cost USD]"
        f"  (or racto_nb.api.attach({batch_id!r}).resume(max_cost_usd=...))"
    )


def task_ended_early(task_id: str, result: TaskResult | None, *, why: str) -> str:
    """After a timeout or an interrupt on one task."""
    state = f" (still {result.status.value})" if result is not None and result.status is not TaskStatus.PENDING else ""
    return (
        f"{why}: stopped waiting for task {task_id}{state}; it keeps running on the workers.\n"
        f"  get it later:  racto_nb.api.get_result({task_id!r})"
    )


def callback_failed(what: str, exc: BaseException) -> str:
    """An ``on_done`` callback raised: the work itself is complete, and says so."""
    where = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]).rstrip()
    return (
        f"{what} is complete, but its on_done callback raised {type(exc).__name__}: {exc}\n"
        f"  the result is intact: run.result(); the callback's error: run.callback_error\n{where}"
    )
