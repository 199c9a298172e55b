"""A batch's source (a DataFrame, a Series or a list of str) checked and ready to become one prompt per row.

Every check that can run without rendering runs here, before anything is
enqueued, so every mistake surfaces as an exception naming the fix while the
broker has seen nothing: a DataFrame without a template, a template naming
what the source does not have, a Series of numbers sent as prompts, a
write-back column that would overwrite what the prompts are made of, a row
too long to send. Rendering waits for :meth:`Rows.render`: a million rows
hand control back at once and are rendered while they are published.

The rows are a snapshot: the columns the template reads and the index are
taken when the batch is submitted, so sorting, filtering or editing the frame
while the batch runs changes nothing about what is sent or how results line up.

Where results can be written back: a DataFrame source is its own target; a
Series knows no parent frame, so ``frame=df`` names it (the magic finds it
for ``df["col"]`` and ``df.col``); a list has none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import pandas as pd

from racto_nb.batch.columns import write_back_fields
from racto_nb.batch.templates import MAX_PROMPT_CHARS, MissingRule, TemplateRows, placeholders
from racto_nb.errors import InvalidArgument, InvalidSource, TemplateError
from racto_nb.models import BatchItem
from racto_nb.structured import OutputSpec

__all__ = ["Rendered", "Rows", "Source", "prepare_rows"]

#: What a batch can run over.
Source: TypeAlias = pd.DataFrame | pd.Series | Sequence[str]
#: Rows rendered at once to catch a template that fits no row before anything is sent.
CHECKED_UP_FRONT = 100


@dataclass
class Rendered:
    """Rows ``[start, stop)`` rendered: parallel lists, ``messages[i] is None`` exactly when ``reasons[i]`` says why."""

    messages: list[str | None]
    reasons: list[str | None]
    custom_ids: list[str | None]
    overrides: list[dict[str, Any] | None]


@dataclass
class Rows:
    """A source checked and ready to render, before anything is sent."""

    index: pd.Index
    write_back: tuple[pd.DataFrame, str] | None
    #: Rows known not to be sent before rendering (missing values); rendering may find a few more.
    skipped: np.ndarray
    _render: Callable[[int, int], tuple[list[str | None], list[str | None]]]
    _custom_ids: list[str | None] | None = None
    _overrides: list[dict[str, Any] | None] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def render(self, start: int, stop: int) -> Rendered:
        """Rows ``[start, stop)``: their prompts, why a row got none, their custom ids and own settings."""
        messages, reasons = self._render(start, stop)
        span = stop - start
        nothing: list[None] = [None] * span
        custom_ids: list[str | None] = self._custom_ids[start:stop] if self._custom_ids is not None else [*nothing]
        overrides: list[dict[str, Any] | None] = (
            self._overrides[start:stop] if self._overrides is not None else [*nothing]
        )
        return Rendered(messages, reasons, custom_ids, overrides)

    @classmethod
    def of_items(
        cls,
        items: Sequence[str | BatchItem | None],
        *,
        index: pd.Index | None = None,
        reasons: Sequence[str | None] | None = None,
    ) -> Rows:
        """Rows from prompts given one by one (``None``: not sent, ``reasons[i]`` says why)."""
        if len(items) == 0:
            raise InvalidArgument("nothing to send: the batch has no rows")
        index = pd.RangeIndex(len(items)) if index is None else index
        if len(index) != len(items):
            raise InvalidArgument(f"index has {len(index)} entries for {len(items)} prompts")
        given = list(reasons) if reasons is not None else [None] * len(items)
        if len(given) != len(items):
            raise InvalidArgument(f"reasons has {len(given)} entries for {len(items)} prompts")
        checked = [None if item is None else _as_item(item) for item in items]
        messages: list[str | None] = [None if item is None else item.user_message for item in checked]
        why = [
            None if m is not None else (r or "no prompt for this row; row not sent")
            for m, r in zip(messages, given, strict=True)
        ]
        skipped = np.array([m is None for m in messages], dtype=bool)
        if skipped.all():
            raise InvalidArgument(f"nothing to send: no row has a prompt ({why[0]})")
        custom_ids = [None if item is None else item.custom_id for item in checked]
        overrides = [None if item is None else _overrides(item) for item in checked]
        return cls(index, None, skipped, lambda a, b: (messages[a:b], why[a:b]), custom_ids, overrides)


def prepare_rows(
    source: Source,
    template: str | None = None,
    *,
    custom_id: str | None = None,
    on_missing: MissingRule = "skip",
    write_back: str | None = None,
    frame: pd.DataFrame | None = None,
    max_chars: int = MAX_PROMPT_CHARS,
    output: OutputSpec | None = None,
) -> Rows:
    """Check ``source`` and snapshot what its prompts are made of (see :func:`racto_nb.api.run_batch`)."""
    table, template, owner = _as_table(source, template, frame)
    rows = TemplateRows(template, table, on_missing=on_missing, max_chars=max_chars)
    if rows.skipped.all():
        reason = rows.render(0, 1)[1][0]
        raise TemplateError(
            f"nothing to send: every row was skipped ({reason}); fill the gaps, or pass on_missing='empty'"
        )
    rows.render(0, min(len(rows), CHECKED_UP_FRONT), strict=True)  # a template that fits no row fails now
    custom_ids = _custom_ids(owner, custom_id) if custom_id is not None else None
    target = None
    if write_back is not None:
        target = (_write_back_target(owner, write_back, placeholders(template), source, output), write_back)
    return Rows(rows.index, target, rows.skipped.copy(), rows.render, custom_ids)


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
        if template is None:
            if not (source.dtype == object or pd.api.types.is_string_dtype(source.dtype)):
                raise InvalidSource(
                    f"the Series {name!r} holds {source.dtype} values, not text: each would be sent as a prompt "
                    f"on its own; give a template that uses them, e.g. template='Rate this score: {{{column}}}'"
                )
            template = "{" + column + "}"
        unknown = [n for n in placeholders(template) if n != column]
        if unknown:
            raise TemplateError(
                f"a template over a Series can name only its values, as {{{column}}}; it names {unknown}. "
                "For several columns run over the DataFrame (%%racto_batch df)"
            )
        if frame is not None and not frame.index.equals(source.index):
            raise InvalidArgument("frame's index differs from the Series' index; pass the frame the Series came from")
        return source.to_frame(name=column), template, frame
    if isinstance(source, (list, tuple)):
        bad = [type(v).__name__ for v in source if v is not None and not isinstance(v, str)][:3]
        if bad:
            raise InvalidSource(f"a list source must hold strings (or None); found {', '.join(bad)}")
        if frame is not None:
            raise InvalidArgument("frame= is for a Series source, not a list")
        return pd.DataFrame({"value": list(source)}, dtype=object), template or "{value}", None
    raise InvalidSource(
        f"source must be a DataFrame (with a template), a Series such as df['review'], or a list of str; "
        f"got {type(source).__name__}"
    )


def _custom_ids(owner: pd.DataFrame | None, column: str) -> list[str | None]:
    if owner is None:
        raise InvalidArgument("custom_id names a column of the source DataFrame; pass frame=df with a Series source")
    if column not in owner.columns:
        raise InvalidArgument(
            f"custom_id column {column!r} is not in the frame; it has: {', '.join(map(str, owner.columns))}"
        )
    values = owner[column]
    missing = values.isna().to_numpy()
    return [None if gap else str(v) for v, gap in zip(values.tolist(), missing, strict=True)]


def _write_back_target(
    owner: pd.DataFrame | None, column: str, reads: list[str], source: Source, output: OutputSpec | None
) -> pd.DataFrame:
    if not isinstance(column, str) or not column:
        raise InvalidArgument("write_back must be the name of the new column, e.g. write_back='label'")
    if owner is None:
        raise InvalidArgument(
            "write_back adds a column to a DataFrame: run over the DataFrame with a template, or pass "
            "frame=df along with the Series df['col']"
        )
    read = set(reads) | ({source.name} if isinstance(source, pd.Series) else set())
    for name in write_back_fields(column, output):
        if name in read:
            raise InvalidArgument(
                f"write_back={column!r} would overwrite the column {name!r} the prompts are made from; pick a new name"
            )
    return owner


def _as_item(item: str | BatchItem) -> BatchItem:
    return BatchItem(user_message=item) if isinstance(item, str) else BatchItem.model_validate(item)


def _overrides(item: BatchItem) -> dict[str, Any] | None:
    own = {key: getattr(item, key) for key in ("temperature", "max_tokens", "extra") if getattr(item, key) is not None}
    return own or None
