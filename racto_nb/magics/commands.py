"""What each magic does once its line is parsed: one call of :mod:`racto_nb.api`, then display.

Kept out of :mod:`racto_nb.magics.declarations` (which only declares arguments), as
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
from racto_nb.batch.templates import interpolate
from racto_nb.config import is_embedded_url, mask_url
from racto_nb.errors import EmbeddedBrokerError, WorkerStartError
from racto_nb.magics.parsing import check_name, evaluate, series_parent
from racto_nb.notebook.claims import claim
from racto_nb.notebook.display import show_content
from racto_nb.notebook.kernel import ipython_display
from racto_nb.notebook.views import ProgressChoice, notice
from racto_nb.structured import OutputSpec, output_spec

__all__ = ["batch", "batches", "connect", "generate", "status", "workers"]

#: A batch's title (in its view and in ``%racto_batches``) is the magic's line, this long at most.
TITLE_CHARS = 120

#: ``%racto_workers`` subcommands; no subcommand lists, as ``list`` does.
WORKER_ACTIONS = ("start", "stop", "list")


class _Slot:
    """A user variable filled from two threads: a handle now, the result when it ends.

    The watcher may finish before the cell stores the handle; the lock makes
    sure the handle never overwrites a result that already arrived. And the
    cell may have been run again meanwhile: only the newest run's slot for a
    name writes it (:mod:`racto_nb.notebook.claims`), so an older background
    run that ends later never replaces the newer run's result.
    """

    def __init__(self, namespace: dict[str, Any], name: str) -> None:
        self._ns = namespace
        self._name = name
        self._lock = threading.Lock()
        self._final = False
        self._claim = claim(namespace, name)

    def handle(self, value: object) -> None:
        with self._lock:
            if not self._final and self._claim.held():
                self._ns[self._name] = value

    def final(self, value: object) -> None:
        with self._lock:
            self._final = True
            if self._claim.held():
                self._ns[self._name] = value


def _worker() -> Any:
    return api.resolve_worker(None)


def connect(shell: Any, args: Any) -> None:
    """``%racto_connect [URL]``: build the worker (embedded when no URL) and say where it points."""
    worker = api.connect(args.url or None)
    broker = str(worker.app.conf.broker_url or "")
    where = "an embedded (in-process) worker" if is_embedded_url(broker) else mask_url(broker)
    notice(f"racto_nb: connected to {where}; kit {worker.kit!r}")


def generate(shell: Any, args: Any, cell: str, *, progress: ProgressChoice) -> None:
    """``%%racto_generate``: fill the body from the namespace, send it, render the answer as Markdown."""
    check_name(args.out, "--out")
    spec = _output(shell, args)
    prompt = interpolate(cell.strip(), shell.user_ns)
    worker = _worker()
    slot = _Slot(shell.user_ns, args.out) if args.out else None

    def store(result: Any) -> None:
        # With --choices / --schema, --out holds what the user asked for: the label, or the validated object.
        assert slot is not None
        slot.final(result if spec is None else api.structured_value(result, spec))

    outcome = api.generate(
        prompt,
        worker=worker,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        system_prompt=args.system,
        timeout_s=args.timeout,
        wait=not args.no_wait,
        progress=progress,
        on_done=store if slot and args.no_wait else None,
        schema=spec,
    )
    if isinstance(outcome, api.TaskRun):
        if slot is not None:
            slot.handle(outcome)
            notice(f"task {outcome.task_id} runs in the background; {args.out} holds its result when it ends")
        return
    if slot is not None:
        store(outcome)
        if spec is not None and not outcome.ok:
            notice(f"{args.out} is None: no valid answer ({outcome.error_type}: {outcome.error})")
    show_content(outcome)


def _output(shell: Any, args: Any) -> OutputSpec | None:
    """``--choices a,b,c`` / ``--schema NAME`` as a spec, checked before anything is sent."""
    schema = None
    if args.schema is not None:
        name = args.schema
        if not name.isidentifier() or name not in shell.user_ns:
            raise UsageError(
                f"--schema {name}: no such variable in the notebook; define it first, e.g. "
                f"class {name if name.isidentifier() else 'Review'}(BaseModel): label: Literal['pos', 'neg']"
            )
        schema = shell.user_ns[name]
    choices = None if args.choices is None else [label.strip() for label in args.choices.split(",")]
    if choices is not None and all(not label for label in choices):
        raise UsageError("--choices is empty: give the labels separated by commas, e.g. --choices positive,negative")
    return output_spec(choices, schema)


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
        "title": _first_line(getattr(args, "line", "") or "%racto_batch"),
    }
    if args.attach:
        structured = args.choices is not None or args.schema is not None
        if args.expr or template or args.write_back or args.custom_id or args.estimate or args.no_cache or structured:
            raise UsageError(
                "--attach ID rebuilds a batch that already exists: drop the expression, template, "
                "--write-back, --custom-id, --estimate, --no-cache, --choices and --schema"
            )
        if args.cancel and args.resume:
            raise UsageError("--cancel and --resume pull opposite ways: give one of them")
        if args.max_cost is not None and not args.resume:
            raise UsageError("--max-cost with --attach sets the cap of a resumed batch: add --resume")
        worker = _worker()
        outcome = api.attach(
            _batch_id(shell, args.attach),
            worker=worker,
            cancel=args.cancel,
            resume=args.resume,
            max_cost_usd=args.max_cost,
            **common,
        )
    else:
        if args.cancel or args.resume:
            flag, button = ("--cancel", "Cancel") if args.cancel else ("--resume", "Resume")
            raise UsageError(f"{flag} goes with --attach ID (or click {button} on the batch's progress view)")
        if not args.expr:
            raise UsageError(
                "name the rows: %racto_batch df['review'] --out labels, or %%racto_batch df with a template as the body"
            )
        spec = _output(shell, args)
        source = evaluate(shell, args.expr)
        frame = series_parent(shell, source) if isinstance(source, pd.Series) else None
        worker = _worker()
        shared: dict[str, Any] = {
            "worker": worker,
            "temperature": args.temperature,
            "max_tokens": args.max_tokens,
            "custom_id": args.custom_id,
            "on_missing": args.on_missing,
            "frame": frame,
            "cache": not args.no_cache,
        }
        if args.estimate:
            if args.background or args.write_back or args.max_cost is not None:
                raise UsageError("--estimate sends nothing: drop --background, --write-back and --max-cost")
            guess = api.estimate(source, template, **shared)
            notice(f"racto_nb estimate: {guess}")
            if args.out:
                shell.user_ns[args.out] = guess
            return None
        outcome = api.run_batch(
            source,
            template,
            write_back=args.write_back,
            max_cost_usd=args.max_cost,
            prompt_column=not args.no_prompt,
            schema=spec,
            **shared,
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


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def batches(shell: Any, args: Any) -> Any:
    """``%racto_batches [--limit N]``: the newest batches as a DataFrame (displayed as the cell's value)."""
    if args.limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {args.limit})")
    frame = api.batches(args.limit)
    if frame.empty:
        notice("no batches in this result backend yet (or they expired)")
        return None
    return frame


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
    raise UsageError(f"--attach {value}: that variable holds a {type(held).__name__}, not a batch id, run or result")


def _template(option: str | None, cell: str | None) -> str | None:
    if cell is None:
        return option
    if option is not None:
        raise UsageError("give the template once: as --template or as the cell body, not both")
    body = cell.strip()
    if not body:
        raise UsageError("the cell body is the template and it is empty; e.g. Classify: {review}")
    return body


def workers(shell: Any, args: Any) -> None:
    """``%racto_workers [start [N] | stop | list] [--concurrency C]``: local worker processes for this kernel."""
    action = args.action or "list"
    if action not in WORKER_ACTIONS:
        raise UsageError(
            f"unknown subcommand {action!r}: use %racto_workers start [N] [--concurrency C], "
            "%racto_workers stop, or %racto_workers [list]"
        )
    if action != "start" and (args.n is not None or args.concurrency is not None):
        raise UsageError(f"N and --concurrency go with start, not {action}: %racto_workers start 2 --concurrency 8")
    if action == "start":
        _start_workers(1 if args.n is None else args.n, args.concurrency)
    elif action == "stop":
        count = api.stop_workers()
        notice(f"stopped {_workers_word(count)}" + ("" if count else ": none started from this kernel was running"))
    else:
        running = api.running_workers()
        if not running:
            notice("no workers started from this kernel are running; start some: %racto_workers start 2")
        for process in running:
            notice(_worker_line(process))
        for record in api.orphan_workers():
            notice(
                f"{record.get('hostname')}  pid {record.get('pid')}  started by {record.get('started_by')}, "
                "a kernel that is gone; %racto_workers stop stops it"
            )


def _start_workers(n: int, concurrency: int | None) -> None:
    if n < 1:
        raise UsageError(f"N must be at least 1 (got {n}): %racto_workers start 2")
    if concurrency is not None and concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1 (got {concurrency})")
    try:
        # No --concurrency: fleet's default, so that it is written in one place.
        started = api.start_workers(n) if concurrency is None else api.start_workers(n, concurrency=concurrency)
    except EmbeddedBrokerError:
        # Name the magic to run, not the Python call fleet's message names.
        raise UsageError(
            "this kernel runs embedded (in-process), which worker processes cannot reach: "
            "%racto_connect redis://127.0.0.1:6379/0 first (start Redis with `redis-server --daemonize yes`)"
        ) from None
    except WorkerStartError as exc:
        # A worker died or never got ready: its log's tail, in the message, is
        # what the user needs, not a traceback through this module.
        raise UsageError(str(exc)) from None
    for process in started:
        notice(_worker_line(process))


def _worker_line(process: api.WorkerProcess) -> str:
    return f"{process.nodename or process.hostname}  pid {process.pid}  log {process.log_path}"


def _workers_word(count: int) -> str:
    return f"{count} worker" + ("" if count == 1 else "s")


def status(shell: Any, args: Any) -> None:
    """``%racto_status [URL] [--timeout S]``: display the fleet's state; an unreachable broker is shown, not raised."""
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be a number of seconds > 0 (got {args.timeout:g})")
    report = api.status(args.url or None, timeout_s=args.timeout)
    ipython_display(_TextAndHtml(str(report), report._repr_html_()))


class _TextAndHtml:
    """Both renderings in one display, so each front-end picks what it can show.

    A notebook shows the HTML table; a terminal, ``nbconvert --to script`` or a
    log keeps the text. Displaying the ``FleetStatus`` itself would give those
    the pydantic ``repr`` instead of the table.
    """

    def __init__(self, text: str, html: str) -> None:
        self._bundle = {"text/plain": text, "text/html": html}

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, str]:
        return dict(self._bundle)
