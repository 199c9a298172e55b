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

A row whose prompt comes out blank is skipped the same way, whatever the rule.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any, Literal

import pandas as pd

from racto_nb.errors import TemplateError

__all__ = ["MISSING_RULES", "MissingRule", "TemplateError", "interpolate", "placeholders", "render", "render_rows"]

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
            template, unknown columns, or a gap under ``on_missing="error"``.
    """
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
    missing_columns = [name for name in names if name not in frame.columns]
    if missing_columns:
        available = ", ".join(map(str, list(frame.columns)[:20]))
        raise TemplateError(f"template names unknown column(s) {missing_columns}; the frame has: {available}")
    if frame.columns.duplicated().any():
        raise TemplateError("the frame has duplicated column names; rename them first")
    columns = frame[names]
    is_missing = columns.isna().to_numpy()
    if on_missing == "error" and is_missing.any():
        row, col = _first_gap(frame.index, names, is_missing)
        raise TemplateError(
            f"column {col!r} is missing a value at index {row!r}; fill it, or pass on_missing='skip'"
        )
    prompts: list[str | None] = []
    reasons: list[str | None] = []
    for position, (values, missing) in enumerate(
        zip(columns.itertuples(index=False, name=None), is_missing, strict=True)
    ):
        if missing.any() and on_missing == "skip":
            gaps = [name for name, gap in zip(names, missing, strict=True) if gap]
            prompts.append(None)
            reasons.append(f"missing value in {', '.join(gaps)}; row not sent")
            continue
        row = {name: ("" if gap else value) for name, value, gap in zip(names, values, missing, strict=True)}
        try:
            text = render(template, row)
        except (ValueError, TypeError) as exc:
            raise TemplateError(
                f"row at index {frame.index[position]!r}: cannot fill the template: {exc}"
            ) from None
        if not text.strip():
            prompts.append(None)
            reasons.append("the prompt is empty for this row; row not sent")
            continue
        prompts.append(text)
        reasons.append(None)
    return prompts, reasons


def _first_column(frame: pd.DataFrame) -> str:
    for column in frame.columns:
        if isinstance(column, str) and column.isidentifier():
            return column
    return "column"


def _first_gap(index: pd.Index, names: list[str], is_missing: Any) -> tuple[Any, str]:
    rows, cols = is_missing.nonzero()
    return index[rows[0]], names[cols[0]]
