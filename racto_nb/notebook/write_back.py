"""``--write-back``: the answers land in the source frame by index label, never by position.

A background batch can run for an hour while the notebook goes on: the user
sorts the frame, drops rows, adds some. Writing the answers back by position
would then give rows each other's answers without a word. So:

* the frame's index unchanged (same labels, same order; duplicates allowed):
  the answers go in as they are;
* changed, and the labels were unique when the batch was sent: each answer
  goes to the row with its label, rows that are new get ``<NA>``, and rows
  whose label is gone are counted in a note;
* changed, with duplicate labels: no row can be placed for sure, so nothing
  is written and the note says where the answers are.

Only the newest run that writes a column writes it (:mod:`racto_nb.notebook.claims`).

With structured output (``choices`` / ``schema``) the fields are written, typed
as in the result frame, instead of the raw content: the label into the column
itself for ``choices``; for a ``schema``, each field into ``COLUMN.FIELD``
(:func:`racto_nb.batch.columns.write_back_fields`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from racto_nb.batch.columns import FIELDS_ATTR, write_back_fields
from racto_nb.notebook.claims import Claim
from racto_nb.structured import OutputSpec

__all__ = ["WriteBack"]


@dataclass
class WriteBack:
    """Where one run writes its answers: ``target[column]``, placed by the labels of ``submitted``."""

    target: pd.DataFrame
    column: str
    submitted: pd.Index
    claim: Claim
    output: OutputSpec | None = None

    def targets(self, result: pd.DataFrame) -> dict[str, pd.Series]:
        """Target column → the result column written into it."""
        columns: dict[str, str] = result.attrs.get(FIELDS_ATTR, {})
        return {
            target: result["content"] if field is None else result[columns[field]]
            for target, field in write_back_fields(self.column, self.output).items()
        }

    def apply(self, result: pd.DataFrame) -> str | None:
        """Write the answers into the target; returns a note for the user when not every row fit."""
        if not self.claim.held():
            return (
                f"write-back: {self.column!r} was not written; a newer run of this cell writes that column "
                "(this run's answers are in its result frame)"
            )
        written = self.targets(result)
        target = self.target
        if target.index.equals(self.submitted):
            for name, values in written.items():
                target[name] = values.array
            return None
        if not self.submitted.is_unique:
            return (
                f"write-back: {self.column!r} was not written; the frame's rows changed since the batch was sent "
                "and its index has duplicate labels, so no answer can be placed for sure. The answers are in the "
                "result frame, in the order the rows were sent"
            )
        for name, values in written.items():
            target[name] = pd.Series(values.array, index=self.submitted).reindex(target.index).array
        gone = int((~self.submitted.isin(target.index)).sum())
        new = int((~target.index.isin(self.submitted)).sum())
        if not gone and not new:
            return None  # sorted or filtered in place: every answer found its row
        parts = []
        if gone:
            parts.append(f"{gone} answered rows are no longer in the frame (their answers are in the result frame)")
        if new:
            parts.append(f"{new} rows added since have no answer")
        return f"write-back {self.column!r}: written by index label; " + "; ".join(parts)
