"""The IPython magics. This class only declares arguments and calls :mod:`racto_nb.magics.commands`.

``%load_ext racto_nb`` registers:

* ``%racto_connect [URL]``: connect to a broker (no URL: an embedded worker).
* ``%%racto_generate [options]``: the body is one prompt, ``{name}`` filled from
  the notebook's variables.
* ``%racto_batch EXPR [options]`` and ``%%racto_batch EXPR [options]`` (the
  body is the template): one task per row, a DataFrame back; ``--estimate``
  sends nothing and says what it would cost.
* ``%racto_workers start [N] [--concurrency C]``, ``%racto_workers stop``,
  ``%racto_workers``: local ``celery -A racto_nb.app worker`` processes on the
  broker this kernel is connected to (start, stop, list).
* ``%racto_status [URL] [--timeout S]``: broker reachable, workers online with
  their concurrency, queue depth; a dead broker is shown within the timeout.
* ``%racto_batches [--limit N]``: the newest batches in the result backend, to
  find an id a restarted kernel's output took with it.

Every magic answers ``--help``. Options are never abbreviated.

To add a magic: declare it here with its ``@argument``s and write one
function in :mod:`racto_nb.magics.commands`, which calls :mod:`racto_nb.api`.

Settings: ``%config RactoMagics.progress = "text"`` picks the progress view
when ``--progress`` is not given (``"text"`` suits nbconvert, where widgets
keep no state); ``%config RactoMagics.short_errors = False`` shows every
error with its traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from IPython.core import magic, magic_arguments
from IPython.core.magic import Magics
from traitlets import Bool, Enum

from racto_nb.batch.templates import MISSING_RULES
from racto_nb.config import BROKER_ANSWER_TIMEOUT_S, DEFAULT_WORKER_CONCURRENCY
from racto_nb.magics import commands
from racto_nb.magics.parsing import parse_line, usage_errors
from racto_nb.models import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE
from racto_nb.notebook.views import PROGRESS_CHOICES, ProgressChoice

__all__ = ["RactoMagics", "load_ipython_extension", "unload_ipython_extension"]

F = TypeVar("F", bound=Callable[..., Any])


def _typed(decorator: Any) -> Callable[[F], F]:
    # IPython's magic decorators are untyped; each returns the function, or a wrapper with its signature.
    return cast("Callable[[F], F]", decorator)


def argument(*names: str, **options: Any) -> Callable[[F], F]:
    """``magic_arguments.argument``, typed."""
    make: Any = magic_arguments.argument
    return _typed(make(*names, **options))


def arguments() -> Callable[[F], F]:
    """``magic_arguments.magic_arguments()``, typed: builds the parser from the ``@argument``s below it."""
    make: Any = magic_arguments.magic_arguments
    return _typed(make())


no_var_expand = _typed(magic.no_var_expand)
line_magic = _typed(magic.line_magic)
cell_magic = _typed(magic.cell_magic)
line_cell_magic = _typed(magic.line_cell_magic)


@_typed(magic.magics_class)
class RactoMagics(Magics):
    """Fan LLM calls out to a Celery fleet from a notebook."""

    progress = Enum(
        list(PROGRESS_CHOICES),
        default_value="auto",
        help="Progress view when --progress is not given: auto (widgets in a kernel), widget, text, none.",
    ).tag(config=True)

    short_errors = Bool(
        True,
        help="Show a user's mistakes (bad option, unknown column, unknown batch) as one line without a "
        "traceback. False: every error keeps its traceback. Real bugs always keep theirs.",
    ).tag(config=True)

    def _progress(self, chosen: str | None) -> ProgressChoice:
        return cast(ProgressChoice, chosen or str(self.progress))

    def _run(self, command: Callable[..., Any], *args: Any, **options: Any) -> Any:
        """Run one command with this shell's error policy (:func:`~racto_nb.magics.parsing.usage_errors`)."""
        with usage_errors(bool(self.short_errors)):
            return command(self.shell, *args, **options)

    @no_var_expand
    @arguments()
    @argument("url", nargs="?", help="Broker URL, e.g. redis://127.0.0.1:6379/0; none for an embedded worker.")
    @line_magic
    def racto_connect(self, line: str) -> None:
        """Connect the magics (and racto_nb's API) to a worker fleet."""
        args = parse_line(self.racto_connect, line, with_expr=False)
        if args is not None:
            self._run(commands.connect, args)

    @no_var_expand
    @arguments()
    @argument("--out", "-o", help="Store the TaskResult in this variable.")
    @argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="Sampling temperature (default %(default)s)."
    )
    @argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="Token budget of the answer (default %(default)s)."
    )
    @argument("--system", help="System prompt, sent as a system message.")
    @argument("--timeout", type=float, help="Stop waiting after this many seconds (the task runs on).")
    @argument("--no-wait", action="store_true", help="Return at once; --out is filled when the task ends.")
    @argument("--progress", choices=PROGRESS_CHOICES, help="Status view: auto, widget, text or none.")
    @argument(
        "--choices",
        metavar="A,B,C",
        help="The answer is exactly one of these labels; --out holds the label.",
    )
    @argument(
        "--schema",
        metavar="NAME",
        help="The answer fits this pydantic model (or JSON-schema dict) of your namespace; --out holds the object.",
    )
    @cell_magic
    def racto_generate(self, line: str, cell: str) -> None:
        """The cell body is the prompt; {name} is filled from your variables ({{ }} for braces)."""
        args = parse_line(self.racto_generate, line, with_expr=False)
        if args is not None:
            self._run(commands.generate, args, cell, progress=self._progress(args.progress))

    @no_var_expand
    @arguments()
    @argument("expr", nargs="?", help="A Series (df['review']), a DataFrame, or a list of str.")
    @argument("--template", "-t", help="Prompt template naming columns, e.g. 'Classify: {review}'.")
    @argument("--out", "-o", help="Store the result DataFrame in this variable.")
    @argument("--write-back", metavar="COL", help="Add the content as column COL of the source frame.")
    @argument("--custom-id", metavar="COL", help="Column whose values become the items' custom ids.")
    @argument(
        "--on-missing",
        choices=MISSING_RULES,
        default="skip",
        help="A missing value: skip the row (default), render it empty, or raise.",
    )
    @argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="Sampling temperature (default %(default)s)."
    )
    @argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="Token budget per answer (default %(default)s)."
    )
    @argument(
        "--no-cache",
        action="store_true",
        help="Send every row, even one the ledger already answered (twins are sent too).",
    )
    @argument(
        "--max-cost",
        type=float,
        metavar="USD",
        help="Pause the batch before its spend (calls in flight included) would pass USD.",
    )
    @argument("--no-prompt", action="store_true", help="Leave the rendered prompt column out of the result.")
    @argument(
        "--estimate",
        action="store_true",
        help="Send nothing: print rows, prompt tokens and the cost range (into --out as an Estimate).",
    )
    @argument("--background", action="store_true", help="Return at once; --out is filled when it ends.")
    @argument("--timeout", type=float, help="Stop waiting after this many seconds (the batch runs on).")
    @argument("--attach", metavar="ID", help="Rebuild batch ID from the result backend.")
    @argument("--cancel", action="store_true", help="With --attach: revoke what has not started.")
    @argument(
        "--resume",
        action="store_true",
        help="With --attach: go on with a paused batch (out of quota, or --max-cost reached; give a new --max-cost).",
    )
    @argument("--progress", choices=PROGRESS_CHOICES, help="Progress view: auto, widget, text or none.")
    @argument(
        "--choices",
        metavar="A,B,C",
        help="One of these labels per row, in a category column 'label' (--write-back COL writes it to COL).",
    )
    @argument(
        "--schema",
        metavar="NAME",
        help="Each answer fits this pydantic model (or JSON-schema dict) of your namespace: one typed column "
        "per field (--write-back COL writes COL.FIELD).",
    )
    @line_cell_magic
    def racto_batch(self, line: str, cell: str | None = None) -> Any:
        """One LLM call per row; a DataFrame indexed like the input comes back."""
        args = parse_line(self.racto_batch, line, with_expr=True)
        if args is None:
            return None
        args.line = f"%%racto_batch {line}".strip() if cell is not None else f"%racto_batch {line}".strip()
        return self._run(commands.batch, args, cell, progress=self._progress(args.progress))

    @no_var_expand
    @arguments()
    @argument(
        "action",
        nargs="?",
        metavar="start|stop|list",
        help="start N workers, stop the ones this kernel started, or list them (the default).",
    )
    @argument("n", nargs="?", type=int, metavar="N", help="With start: how many workers (default 1).")
    @argument(
        "--concurrency", "-c", type=int, help=f"With start: threads per worker (default {DEFAULT_WORKER_CONCURRENCY})."
    )
    @line_magic
    def racto_workers(self, line: str) -> None:
        """Start, stop or list local worker processes on the broker this kernel is connected to."""
        args = parse_line(self.racto_workers, line, with_expr=False)
        if args is not None:
            self._run(commands.workers, args)

    @no_var_expand
    @arguments()
    @argument("url", nargs="?", help="Broker to check instead of the current connection (or configured broker).")
    @argument(
        "--timeout",
        type=float,
        default=BROKER_ANSWER_TIMEOUT_S,
        help="Answer within this many seconds (default %(default)s).",
    )
    @line_magic
    def racto_status(self, line: str) -> None:
        """Show whether the broker answers, which workers are online and how many tasks wait."""
        args = parse_line(self.racto_status, line, with_expr=False)
        if args is not None:
            self._run(commands.status, args)

    @no_var_expand
    @arguments()
    @argument("--limit", "-n", type=int, default=20, help="How many of the newest batches (default %(default)s).")
    @line_magic
    def racto_batches(self, line: str) -> Any:
        """List the newest batches in the result backend (id, submitted, rows, counts, the magic's line)."""
        args = parse_line(self.racto_batches, line, with_expr=False)
        return None if args is None else self._run(commands.batches, args)


_MAGIC_NAMES = {
    "line": ("racto_connect", "racto_batch", "racto_batches", "racto_workers", "racto_status"),
    "cell": ("racto_generate", "racto_batch"),
}


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext racto_nb``: register the magics and make them ``%config``-urable."""
    magics = cast(Any, RactoMagics)(shell=ipython)
    ipython.register_magics(magics)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext racto_nb``: remove what :func:`load_ipython_extension` registered."""
    table = ipython.magics_manager.magics
    for kind, names in _MAGIC_NAMES.items():
        for name in names:
            table[kind].pop(name, None)
    ipython.magics_manager.registry.pop(RactoMagics.__name__, None)
    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, RactoMagics)]
