"""What each magic does once its line is parsed: one call of :mod:`racto_nb.api`, then display.

Kept out of :mod:`racto_nb.magics` (which only declares arguments), as
jupysql keeps ``cmd/`` apart from its magic class. Every function takes the
shell and the parsed arguments, so a new magic is one declaration there and
one function here.
"""

from __future__ import annotations

import threading
from typing import Any

import pandas as pd
from IPython.core.error import UsageError

from racto_nb import api
from racto_nb.display import ProgressChoice, notice, show_content
from racto_nb.magic_parse import check_name, evaluate, series_parent, usage_errors
from racto_nb.templates import interpolate

__all__ = ["batch", "connect", "generate"]


class _Slot:
    """A user variable filled from two threads: a handle now, the result when it ends.

    The watcher may finish before the cell stores the handle; the lock makes
    sure the handle never overwrites a result that already arrived.
    """

    def __init__(self, namespace: dict[str, Any], name: str) -> None:
        self._ns = namespace
        self._name = name
        self._lock = threading.Lock()
        self._final = False

    def handle(self, value: object) -> None:
        with self._lock:
            if not self._final:
                self._ns[self._name] = value

    def final(self, value: object) -> None:
        with self._lock:
            self._final = True
            self._ns[self._name] = value


def _worker() -> Any:
    try:
        return api.resolve_worker(None)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None


def connect(shell: Any, args: Any) -> None:
    """``%racto_connect [URL]``: build the worker (embedded when no URL) and say where it points."""
    from racto_nb.config import mask_url
    from racto_nb.connection import connect as connect_app

    with usage_errors():
        worker = connect_app(args.url or None)
    where = mask_url(str(worker.app.conf.broker_url or "")) or "embedded (in-process) worker"
    notice(f"racto_nb: connected to {where}; kit {worker.kit!r}")


def generate(shell: Any, args: Any, cell: str, *, progress: ProgressChoice) -> None:
    """``%%racto_generate``: fill the body from the namespace, send it, render the answer as Markdown."""
    check_name(args.out, "--out")
    with usage_errors():
        prompt = interpolate(cell.strip(), shell.user_ns)
    worker = _worker()
    slot = _Slot(shell.user_ns, args.out) if args.out else None
    with usage_errors():
        if args.no_wait:
            run = api.generate(
                prompt,
                worker=worker,
                temperature=args.temperature,
                max_tokens=args.max_tokens,
                system_prompt=args.system,
                timeout_s=args.timeout,
                wait=False,
                progress=progress,
                on_done=slot.final if slot else None,
            )
        else:
            result = api.generate(
                prompt,
                worker=worker,
                temperature=args.temperature,
                max_tokens=args.max_tokens,
                system_prompt=args.system,
                timeout_s=args.timeout,
                progress=progress,
            )
    if args.no_wait:
        if slot is not None:
            slot.handle(run)
            notice(f"task {run.task_id} runs in the background; {args.out} holds its result when it ends")
        return
    if slot is not None:
        slot.final(result)
    show_content(result)


def batch(shell: Any, args: Any, cell: str | None, *, progress: ProgressChoice) -> Any:
    """``%racto_batch`` / ``%%racto_batch``: submit (or ``--attach``), wait or watch, store the frame."""
    check_name(args.out, "--out")
    template = _template(args.template, cell)
    slot = _Slot(shell.user_ns, args.out) if args.out else None
    common: dict[str, Any] = {
        "wait": not args.background,
        "timeout_s": args.timeout,
        "progress": progress,
        "on_done": slot.final if slot else None,
        "title": f"racto_batch → {args.out}" if args.out else "racto_batch",
    }
    if args.attach:
        if args.expr or template or args.write_back or args.custom_id:
            raise UsageError(
                "--attach ID rebuilds a batch that already exists: drop the expression, template, "
                "--write-back and --custom-id"
            )
        worker = _worker()
        with usage_errors():
            outcome = api.attach(_batch_id(shell, args.attach), worker=worker, cancel=args.cancel, **common)
    else:
        if args.cancel:
            raise UsageError("--cancel goes with --attach ID (or click Cancel on the batch's progress view)")
        if not args.expr:
            raise UsageError(
                "name the rows: %racto_batch df['review'] --out labels, "
                "or %%racto_batch df with a template as the body"
            )
        source = evaluate(shell, args.expr)
        frame = series_parent(shell, args.expr) if isinstance(source, pd.Series) else None
        worker = _worker()
        with usage_errors():
            outcome = api.run_batch(
                source,
                template,
                worker=worker,
                temperature=args.temperature,
                max_tokens=args.max_tokens,
                custom_id=args.custom_id,
                on_missing=args.on_missing,
                write_back=args.write_back,
                frame=frame,
                **common,
            )
    if args.background:
        notice(
            f"batch {outcome.batch_id} runs in the background"
            + (f"; {args.out} holds the result frame when it ends" if args.out else "")
        )
    if slot is None:
        return outcome
    if args.background:
        slot.handle(outcome)
    else:
        slot.final(outcome)
    return None


def _batch_id(shell: Any, value: str) -> str:
    """``--attach`` takes the id, or a variable holding it: a str, a BatchRun, or a result frame."""
    if not value.isidentifier() or value not in shell.user_ns:
        return value
    held = shell.user_ns[value]
    if isinstance(held, str):
        return held
    if isinstance(held, pd.DataFrame) and "racto_batch_id" in held.attrs:
        return str(held.attrs["racto_batch_id"])
    if isinstance(getattr(held, "batch_id", None), str):
        return str(held.batch_id)
    raise UsageError(
        f"--attach {value}: that variable holds a {type(held).__name__}, not a batch id, run or result"
    )


def _template(option: str | None, cell: str | None) -> str | None:
    if cell is None:
        return option
    if option is not None:
        raise UsageError("give the template once: as --template or as the cell body, not both")
    body = cell.strip()
    if not body:
        raise UsageError("the cell body is the template and it is empty; e.g. Classify: {review}")
    return body
