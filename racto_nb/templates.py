"""Prompt templates over DataFrame rows: ``"Classify: {review}"``.

Only plain column names are accepted as placeholders. ``str.format`` would
happily evaluate ``{x.__class__}`` or ``{x[0]}``; a template written in a
notebook should never reach into objects, so those are rejected up front.
Doubled braces (``{{`` and ``}}``) stand for literal braces, as in
``str.format`` and IPython's own variable expansion.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pandas as pd

MissingRule = Literal["skip", "empty", "error"]
_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    """A template or its data cannot produce prompts; nothing was enqueued."""


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
            hint = " (use {{ and }} for literal braces)" if not field else ""
            raise TemplateError(
                f"placeholder {{{field}}} is not a plain column name{hint}; templates accept {{name}} only"
            )
        if spec and "{" in spec:
            raise TemplateError(f"placeholder {{{field}:{spec}}}: nested fields in a format spec are not allowed")
        if conversion:
            raise TemplateError(f"placeholder {{{field}!{conversion}}}: conversions are not allowed")
        if field not in names:
            names.append(field)
    return names


def render(template: str, values: Mapping[str, Any]) -> str:
    """Fill ``template`` from ``values`` (already validated names)."""
    return template.format_map(values)


def render_rows(
    template: str,
    frame: pd.DataFrame,
    *,
    on_missing: MissingRule = "skip",
) -> tuple[list[str | None], list[str | None]]:
    """One prompt per row, in row order, and why a row got none.

    The missing-value rule (NaN, None, NA, NaT in a placeholder's column):
    ``"skip"`` (default) sends nothing for that row and reports it, because
    "Classify: nan" costs money and means nothing; ``"empty"`` renders an
    empty string; ``"error"`` raises before anything is enqueued.

    Returns:
        ``(prompts, reasons)``: ``prompts[i]`` is ``None`` exactly when
        ``reasons[i]`` says why row ``i`` was not sent.
    """
    if frame.empty:
        raise TemplateError("the frame has no rows; nothing to send")
    names = placeholders(template)
    if not names:
        raise TemplateError("the template names no column; every row would get the same prompt")
    missing_columns = [name for name in names if name not in frame.columns]
    if missing_columns:
        available = ", ".join(map(str, frame.columns[:20]))
        raise TemplateError(f"template names unknown column(s) {missing_columns}; the frame has: {available}")
    if frame.columns.duplicated().any():
        raise TemplateError("the frame has duplicated column names; rename them first")
    columns = frame[names]
    is_missing = columns.isna()
    if on_missing == "error" and is_missing.to_numpy().any():
        row, col = _first_missing(is_missing)
        raise TemplateError(f"column {col!r} is missing a value at index {row!r}; fill it or use on_missing='skip'")
    prompts: list[str | None] = []
    reasons: list[str | None] = []
    records: Sequence[tuple[Any, ...]] = list(columns.itertuples(index=False, name=None))
    missing_rows = is_missing.to_numpy()
    for values, missing in zip(records, missing_rows, strict=True):
        if missing.any() and on_missing == "skip":
            gaps = [name for name, gap in zip(names, missing, strict=True) if gap]
            prompts.append(None)
            reasons.append(f"missing value in {', '.join(gaps)}; row not sent")
            continue
        row = {name: ("" if gap else value) for name, value, gap in zip(names, values, missing, strict=True)}
        text = render(template, row)
        if not text.strip():
            prompts.append(None)
            reasons.append("the prompt is empty for this row; row not sent")
            continue
        prompts.append(text)
        reasons.append(None)
    return prompts, reasons


def _first_missing(is_missing: pd.DataFrame) -> tuple[Any, str]:
    stacked = is_missing.stack()
    row, col = stacked[stacked].index[0]
    return row, str(col)
