"""Turning a magic's line into arguments, and bad input into one-line ``UsageError``s.

The one piece of syntax of our own: a line magic may start with a Python
expression (``%racto_batch df["review"] --out labels``). The expression is
the longest prefix before an option that compiles, so brackets, quotes and
spaces inside it need no escaping. Everything after it is split like a shell
line (quotes group words and are removed) and read by the magic's
``magic_arguments`` parser. IPython's own ``{var}`` expansion is off for
these magics (``@no_var_expand``): braces belong to templates.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import shlex
from collections.abc import Iterator
from typing import Any

from IPython.core.error import UsageError
from pydantic import ValidationError

from racto_nb.errors import RactoError

__all__ = ["check_name", "evaluate", "parse_line", "series_parent", "split_expr", "usage_errors"]

_OPTION_START = re.compile(r"(?:^|(?<=\s))--?[A-Za-z]")


def split_expr(line: str) -> tuple[str, str]:
    """``(expression, options)``: the expression ends where an option starts and it compiles."""
    for match in _OPTION_START.finditer(line):
        head = line[: match.start()].strip()
        if not head or _compiles(head):
            return head, line[match.start() :]
    return line.strip(), ""


def _compiles(code: str) -> bool:
    try:
        compile(code, "<racto expression>", "eval")
    except SyntaxError:
        return False
    return True


def parse_line(magic: Any, line: str, *, with_expr: bool) -> Any:
    """Parse ``line`` with ``magic``'s ``magic_arguments`` parser; ``args.expr`` holds the expression.

    Stricter than argparse's defaults, because a magic line is typed by hand
    and a silently misread option costs a batch: options are never
    abbreviated (``--templ`` is not ``--template``), a single-dash long name
    (``-template``, which argparse reads as ``-t emplate``) or an unknown
    option gets "did you mean", and a stray word is an error. ``-h`` /
    ``--help`` prints the magic's help and returns ``None``.
    """
    expr, options = split_expr(line) if with_expr else ("", line)
    try:
        argv = shlex.split(options, posix=True)
    except ValueError as exc:
        raise UsageError(f"cannot read the options: {exc} (check the quotes)") from None
    parser = magic.parser
    parser.allow_abbrev = False
    if "-h" in argv or "--help" in argv:
        print(parser.format_help())
        return None
    known = sorted(parser._option_string_actions)
    for word in argv:
        if re.fullmatch(r"-[A-Za-z][\w-]+", word) and f"-{word}" in known:
            raise UsageError(f"{word} is not an option: did you mean -{word}?")
    try:
        args = parser.parse_args(argv)  # its error() raises UsageError
    except UsageError as exc:
        raise UsageError(_with_suggestion(str(exc), known)) from None
    if with_expr:
        if getattr(args, "expr", None) is not None:
            raise UsageError(
                f"unexpected word {args.expr!r} after the options: quote a value that has spaces, "
                "and put the rows' expression first"
            )
        args.expr = expr
    return args


def _with_suggestion(message: str, options: list[str]) -> str:
    """argparse's "unrecognized arguments: --templ" plus the option that was probably meant."""
    found = re.search(r"unrecognized arguments: (\S+)", message)
    if found is None:
        return message
    word = found.group(1)
    if not word.startswith("-"):
        return f"unexpected word {word!r}: quote a value that has spaces (--template \"Classify: {{review}}\")"
    close = difflib.get_close_matches(word.split("=", 1)[0], options, n=1, cutoff=0.6)
    longs = ", ".join(o for o in options if o.startswith("--"))
    hint = f"; did you mean {close[0]}?" if close else f"; the options are {longs} (and --help)"
    return f"unknown option {word}{hint}"


def evaluate(shell: Any, expr: str) -> Any:
    """The value of ``expr`` in the user's namespace."""
    try:
        return shell.ev(expr)
    except Exception as exc:
        raise UsageError(f"cannot evaluate {expr!r}: {type(exc).__name__}: {exc}") from None


def series_parent(shell: Any, series: Any) -> Any:
    """The DataFrame in the user's namespace that ``series`` is a column of, or ``None``.

    Found by what the Series *is*, not by how the line spells it: a frame whose
    column of that name holds the very same data (``df["col"]``, ``df.col``,
    ``df.loc[:, "col"]``), on the same index. A derived Series (filtered,
    copied, ``.str.lower()``) has no parent, and neither has one that two
    different frames share.
    """
    import numpy as np
    import pandas as pd

    name = series.name
    found: dict[int, Any] = {}
    for var, value in shell.user_ns.items():
        if var.startswith("_") or not isinstance(value, pd.DataFrame) or name not in value.columns:
            continue
        column = value[name]
        if not isinstance(column, pd.Series) or not column.index.equals(series.index):
            continue
        same = column.array is series.array
        if not same:  # numpy-backed columns: a new wrapper around the same buffer
            same = bool(np.shares_memory(column.to_numpy(copy=False), series.to_numpy(copy=False)))
        if same:
            found[id(value)] = value
    return next(iter(found.values())) if len(found) == 1 else None


def check_name(name: str | None, option: str) -> None:
    """A variable name given with ``--out`` must be one Python accepts."""
    if name is not None and not name.isidentifier():
        raise UsageError(f"{option} needs a variable name, e.g. {option} labels (got {name!r})")


@contextlib.contextmanager
def usage_errors(short: bool = True) -> Iterator[None]:
    """A user's mistake becomes a one-line ``UsageError`` (shown without a traceback), as jupysql does.

    Only mistakes count: racto_nb's own errors (each names its fix) and
    pydantic's validation of an option. Anything else is a bug, in racto_nb
    or below it, and keeps its traceback. ``short=False``
    (``%config RactoMagics.short_errors = False``) keeps every traceback.
    """
    try:
        yield
    except (RactoError, ValidationError) as exc:
        if not short:
            raise
        text = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        raise UsageError(text or type(exc).__name__) from None
