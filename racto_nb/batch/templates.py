"""Prompt templates over DataFrame rows (``"Classify: {review}"``) and over a namespace.

Only plain names are accepted as placeholders. ``str.format`` would happily
evaluate ``{x.__class__}`` or ``{x[0]}``; a template written in a notebook
should never reach into objects, so those are rejected up front. Doubled
braces (``{{`` and ``}}``) stand for literal braces, as in ``str.format`` and
IPython's own variable expansion. A format spec is allowed (``{price:.2f}``).

The missing-value rule, one for the whole package (``on_missing``):

* ``"skip"`` (default): a row with a missing value (None, NaN, NA, NaT) in a
  column its template names is not sent. It stays in the result, with status
  ``skipped``, no task id, and an error naming the column. "Classify: nan"
  costs money and means nothing.
* ``"empty"``: the missing value renders as an empty string.
* ``"error"``: raise before anything is enqueued, naming the first gap.

Blank or whitespace-only cells count as missing. A row whose prompt comes out
blank is skipped the same way, whatever the rule.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from racto_nb.config import DEFAULT_MAX_PROMPT_CHARS
from racto_nb.errors import TemplateError

__all__ = [
    "MAX_PROMPT_CHARS",
    "MISSING_RULES",
    "MissingRule",
    "TemplateError",
    "TemplateRows",
    "interpolate",
    "placeholders",
    "render",
    "render_rows",
]

MissingRule = Literal["skip", "empty", "error"]
MISSING_RULES: tuple[MissingRule, ...] = ("skip", "empty", "error")
_FORMATTER = string.Formatter()


def placeholders(template: str) -> list[str]:
    """The names a template uses, in order of first use.

    Raises:
        TemplateError: for attribute or item access, conversions, positional
            ``{}`` fields, or unbalanced braces.
    """
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise TemplateError(f"{exc} in template; write literal braces as {{{{ and }}}}") from None
    names: list[str] = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise TemplateError(
                f"placeholder {{{field}}} is not a plain name; templates accept {{name}} only "
                "(write literal braces, e.g. in JSON, as {{ and }})"
            )
        if spec and "{" in spec:
            raise TemplateError(
                f"placeholder {{{field}:{spec}}}: nested fields in a format spec are not allowed"
            )
        if conversion:
            raise TemplateError(f"placeholder {{{field}!{conversion}}}: conversions are not allowed")
        if field not in names:
            names.append(field)
    return names


def render(template: str, values: Mapping[str, Any]) -> str:
    """Fill ``template`` from ``values`` (names already validated)."""
    return template.format_map(values)


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Fill ``{name}`` from ``namespace`` (e.g. a notebook's variables).

    Raises:
        TemplateError: listing every name ``namespace`` lacks, or when a value
            does not fit its format spec.
    """
    names = placeholders(text)
    unknown = [name for name in names if name not in namespace]
    if unknown:
        listed = ", ".join("{" + name + "}" for name in unknown)
        raise TemplateError(
            f"{listed} not defined: assign {'them' if len(unknown) > 1 else 'it'} in a cell first, "
            "or write literal braces as {{ and }}"
        )
    try:
        return render(text, {name: namespace[name] for name in names})
    except (ValueError, TypeError) as exc:
        raise TemplateError(f"cannot fill the prompt: {exc}") from None


MAX_PROMPT_CHARS = DEFAULT_MAX_PROMPT_CHARS


class TemplateRows:
    """A template checked against a frame, rendering any range of its rows on demand.

    Everything that can be checked without rendering runs here, on whole
    columns at once (a million rows in a fraction of a second): the template,
    unknown columns, missing and blank values, rows that would exceed
    ``max_chars``. Rendering itself waits for :meth:`render`, so a batch can
    hand control back before its millionth prompt exists.
    """

    def __init__(
        self,
        template: str,
        frame: pd.DataFrame,
        *,
        on_missing: MissingRule = "skip",
        max_chars: int = MAX_PROMPT_CHARS,
    ) -> None:
        if on_missing not in MISSING_RULES:
            raise TemplateError(f"on_missing must be one of {', '.join(MISSING_RULES)}, not {on_missing!r}")
        if len(frame) == 0:
            raise TemplateError("the frame has no rows; nothing to send")
        names = placeholders(template)
        if not names:
            raise TemplateError(
                "the template names no column, so every row would get the same prompt; "
                "add a placeholder such as {" + _first_column(frame) + "}"
            )
        unknown = [name for name in names if name not in frame.columns]
        if unknown:
            available = ", ".join(map(str, list(frame.columns)[:20]))
            raise TemplateError(f"template names unknown column(s) {unknown}; the frame has: {available}")
        if frame.columns.duplicated().any():
            raise TemplateError("the frame has duplicated column names; rename them first")
        self.template = template
        self.names = names
        self.on_missing = on_missing
        # A snapshot: later edits, sorts or filters of the frame change nothing about what is sent.
        self.index = frame.index.copy()
        self.columns = [frame[name].copy() for name in names]
        self.missing: npt.NDArray[np.bool_] = np.column_stack([_gaps(frame[name]) for name in names])
        if on_missing == "error" and self.missing.any():
            row, col = _first_gap(frame.index, names, self.missing)
            raise TemplateError(
                f"column {col!r} is missing a value at index {row!r}; fill it, or pass on_missing='skip'"
            )
        self.skipped: npt.NDArray[np.bool_] = np.zeros(len(frame), dtype=bool)
        if on_missing == "skip":
            self.skipped |= self.missing.any(axis=1)
        _check_sizes(template, frame, names, max_chars)

    def __len__(self) -> int:
        return len(self.index)

    def render(self, start: int, stop: int, *, strict: bool = False) -> tuple[list[str | None], list[str | None]]:
        """Prompts of rows ``[start, stop)`` and why a row got none (see the module's rule).

        A row the template cannot fill (a format spec its value does not fit)
        raises with ``strict``; otherwise it is not sent, and its reason says why.
        """
        prompts: list[str | None] = []
        reasons: list[str | None] = []
        template, names = self.template, self.names
        values = [column.iloc[start:stop].tolist() for column in self.columns]
        for offset, position in enumerate(range(start, stop)):
            gaps = self.missing[position]
            if self.skipped[position]:
                missing = [name for name, gap in zip(names, gaps, strict=True) if gap]
                prompts.append(None)
                reasons.append(f"missing value in {', '.join(missing)}; row not sent")
                continue
            row = {
                name: ("" if gap else column[offset]) for name, column, gap in zip(names, values, gaps, strict=True)
            }
            try:
                text = render(template, row)
            except (ValueError, TypeError) as exc:
                problem = f"row at index {self.index[position]!r}: cannot fill the template: {exc}"
                if strict:
                    raise TemplateError(problem) from None
                prompts.append(None)
                reasons.append(f"{problem}; row not sent")
                continue
            if not text.strip():
                prompts.append(None)
                reasons.append("the prompt is empty for this row; row not sent")
                continue
            prompts.append(text)
            reasons.append(None)
        return prompts, reasons


def render_rows(
    template: str,
    frame: pd.DataFrame,
    *,
    on_missing: MissingRule = "skip",
) -> tuple[list[str | None], list[str | None]]:
    """One prompt per row, in row order, and why a row got none (see the module's rule).

    Returns:
        ``(prompts, reasons)``: ``prompts[i]`` is ``None`` exactly when
        ``reasons[i]`` says why row ``i`` is not sent.

    Raises:
        TemplateError: before anything is sent, for an empty frame, a bad
            template, unknown columns, a gap under ``on_missing="error"``, or a
            row the template cannot fill.
    """
    rows = TemplateRows(template, frame, on_missing=on_missing)
    return rows.render(0, len(rows), strict=True)


def _gaps(column: pd.Series) -> npt.NDArray[np.bool_]:
    """Missing cells (None, NaN, NA, NaT) and blank strings: neither says anything worth paying for."""
    gaps: npt.NDArray[np.bool_] = column.isna().to_numpy(dtype=bool, copy=True)
    if _is_text(column):
        gaps |= column.astype("string").str.strip().eq("").fillna(False).to_numpy(dtype=bool)
    return gaps


def _is_text(column: pd.Series) -> bool:
    return bool(column.dtype == object or pd.api.types.is_string_dtype(column.dtype))


def _check_sizes(template: str, frame: pd.DataFrame, names: list[str], max_chars: int) -> None:
    """Refuse, naming the row, a prompt that would exceed ``max_chars`` (only text columns can be that long)."""
    texts = [frame[name] for name in names if _is_text(frame[name])]
    if not texts:
        return
    sizes = sum(column.astype("string").str.len().fillna(0).to_numpy(dtype=np.int64) for column in texts)
    sizes = np.asarray(sizes) + len(template)
    worst = int(np.argmax(sizes))
    if sizes[worst] > max_chars:
        raise TemplateError(
            f"the prompt for the row at index {frame.index[worst]!r} is about {int(sizes[worst]):,} characters, "
            f"above the limit of {max_chars:,}; shorten it, or raise RACTO_MAX_PROMPT_CHARS"
        )


def _first_column(frame: pd.DataFrame) -> str:
    for column in frame.columns:
        if isinstance(column, str) and column.isidentifier():
            return column
    return "column"


def _first_gap(index: pd.Index, names: list[str], is_missing: Any) -> tuple[Any, str]:
    rows, cols = is_missing.nonzero()
    return index[rows[0]], names[cols[0]]
