"""A batch's source (a DataFrame, a Series or a list of str) turned into one prompt per row.

Everything here runs before anything is enqueued, so every mistake surfaces as
an exception naming the fix while the broker has seen nothing: a DataFrame
without a template, a template naming what the source does not have, a
write-back column that would overwrite what the prompts are made of.

Where results can be written back: a DataFrame source is its own target; a
Series knows no parent frame, so ``frame=df`` names it (the magic passes it
for ``df["col"]`` and ``df.col``); a list has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import pandas as pd

from racto_nb.batch.templates import MissingRule, placeholders, render_rows
from racto_nb.errors import InvalidArgument, InvalidSource, TemplateError
from racto_nb.models import BatchItem

__all__ = ["Rows", "Source", "prepare_rows"]

#: What a batch can run over.
Source: TypeAlias = pd.DataFrame | pd.Series | Sequence[str]


@dataclass
class Rows:
    """A source turned into prompts, before anything is sent."""

    prompts: list[str | BatchItem | None]
    reasons: list[str | None]
    index: pd.Index
    write_back: tuple[pd.DataFrame, str] | None


def prepare_rows(
    source: Source,
    template: str | None = None,
    *,
    custom_id: str | None = None,
    on_missing: MissingRule = "skip",
    write_back: str | None = None,
    frame: pd.DataFrame | None = None,
) -> Rows:
    """Validate ``source`` and render one prompt per row (see :func:`run_batch`)."""
    table, template, owner = _as_table(source, template, frame)
    prompts, reasons = render_rows(template, table, on_missing=on_missing)
    if all(prompt is None for prompt in prompts):
        raise TemplateError(
            f"nothing to send: every row was skipped ({reasons[0]}); "
            "fill the gaps, or pass on_missing='empty'"
        )
    items: list[str | BatchItem | None] = list(prompts)
    if custom_id is not None:
        items = _with_custom_ids(prompts, owner, custom_id)
    target = None
    if write_back is not None:
        target = (_write_back_target(owner, write_back, placeholders(template), source), write_back)
    return Rows(items, reasons, table.index, target)


def _as_table(
    source: Source, template: str | None, frame: pd.DataFrame | None
) -> tuple[pd.DataFrame, str, pd.DataFrame | None]:
    """(the rows as a frame, the template, the frame results may be written back to)."""
    if frame is not None and not isinstance(frame, pd.DataFrame):
        raise InvalidSource(f"frame must be the DataFrame the Series came from, not {type(frame).__name__}")
    if isinstance(source, pd.DataFrame):
        if template is None:
            raise TemplateError(
                "a DataFrame needs a template naming its columns, e.g. 'Classify: {review}' "
                "(or send one column as it is: df['review'])"
            )
        if frame is not None:
            raise InvalidArgument("frame= is for a Series source; the DataFrame itself is the frame here")
        return source, template, source
    if isinstance(source, pd.Series):
        name = source.name
        column = name if isinstance(name, str) and name.isidentifier() else "value"
        template = "{" + column + "}" if template is None else template
        unknown = [n for n in placeholders(template) if n != column]
        if unknown:
            raise TemplateError(
                f"a template over a Series can name only its values, as {{{column}}}; it names {unknown}. "
                "For several columns run over the DataFrame (%%racto_batch df)"
            )
        if frame is not None and not frame.index.equals(source.index):
            raise InvalidArgument(
                "frame's index differs from the Series' index; pass the frame the Series came from"
            )
        return source.to_frame(name=column), template, frame
    if isinstance(source, (list, tuple)):
        bad = [type(v).__name__ for v in source if v is not None and not isinstance(v, str)][:3]
        if bad:
            raise InvalidSource(f"a list source must hold strings (or None); found {', '.join(bad)}")
        if frame is not None:
            raise InvalidArgument("frame= is for a Series source, not a list")
        return pd.DataFrame({"value": list(source)}), template or "{value}", None
    raise InvalidSource(
        f"source must be a DataFrame (with a template), a Series such as df['review'], or a list of str; "
        f"got {type(source).__name__}"
    )


def _with_custom_ids(
    prompts: list[str | None], owner: pd.DataFrame | None, column: str
) -> list[str | BatchItem | None]:
    if owner is None:
        raise InvalidArgument(
            "custom_id names a column of the source DataFrame; pass frame=df with a Series source"
        )
    if column not in owner.columns:
        raise InvalidArgument(
            f"custom_id column {column!r} is not in the frame; it has: {', '.join(map(str, owner.columns))}"
        )
    ids = [None if _missing(v) else str(v) for v in owner[column].tolist()]
    return [
        None if p is None else BatchItem(user_message=p, custom_id=i)
        for p, i in zip(prompts, ids, strict=True)
    ]


def _write_back_target(
    owner: pd.DataFrame | None, column: str, reads: list[str], source: Source
) -> pd.DataFrame:
    if not isinstance(column, str) or not column:
        raise InvalidArgument("write_back must be the name of the new column, e.g. write_back='label'")
    if owner is None:
        raise InvalidArgument(
            "write_back adds a column to a DataFrame: run over the DataFrame with a template, or pass "
            "frame=df along with the Series df['col']"
        )
    read = set(reads) | ({source.name} if isinstance(source, pd.Series) else set())
    if column in read:
        raise InvalidArgument(
            f"write_back={column!r} would overwrite the column the prompts are made from; pick a new name"
        )
    return owner


def _missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False
