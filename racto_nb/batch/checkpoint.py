"""A batch's local checkpoint: its inputs, index and results as Parquet files beside the notebook.

The result backend holds what is in flight; the checkpoint holds the rest, so
neither Redis nor the kernel grows with the batch:

* ``inputs/part-NNNNN.parquet``: every row's prompt (or why it is not sent),
  custom id and own settings, written once when the batch starts. It is the
  kernel's copy a publisher sends from, and what a new kernel sends from when
  the old one died before every row was out, or Redis lost messages.
* ``index.parquet``: the source's index, restored exactly on attach.
* ``results/part-NNNNN.parquet``: final rows as they arrive, appended in row
  groups (one file per flush, so a killed kernel loses no written part). The
  final DataFrame is read from here; a reattach reads it first and asks the
  backend only for what is missing.
* ``rounds/round-K.parquet``: the rows each "Retry failed" round sent again.
* ``manifest.json``: the batch's manifest, as in the backend.

The folder is ``RACTO_CHECKPOINT_DIR`` (default ``./.racto``) plus the batch id.
pyarrow does the reading and writing; nothing here knows Celery.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["INPUT_PART_ROWS", "RESULT_SCHEMA", "SKIPPED_STATUS", "Checkpoint", "InputRows"]

#: Rows per inputs file: a publisher holds at most two of them in memory.
INPUT_PART_ROWS = 50_000

INPUT_SCHEMA = pa.schema(
    [
        ("position", pa.int64()),
        ("message", pa.string()),
        ("reason", pa.string()),
        ("custom_id", pa.string()),
        ("overrides", pa.string()),  # JSON of the row's own temperature / max_tokens / extra, if any
    ]
)

#: One final row as the checkpoint keeps it (``parsed`` as JSON text; the frame decodes it).
#: The status of a row that was never sent (a missing value), in frames and listings.
SKIPPED_STATUS = "skipped"

RESULT_SCHEMA = pa.schema(
    [
        ("position", pa.int64()),
        ("round", pa.int16()),
        ("task_id", pa.string()),
        ("status", pa.string()),
        ("content", pa.string()),
        ("parsed", pa.string()),
        ("error", pa.string()),
        ("error_type", pa.string()),
        ("status_code", pa.int64()),
        ("attempts", pa.int64()),
        ("latency_s", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("custom_id", pa.string()),
        ("deliveries", pa.int64()),
        ("cached", pa.bool_()),
        ("cost_usd", pa.float64()),
        ("saved_usd", pa.float64()),
        ("history", pa.list_(pa.string())),
    ]
)


class InputRows:
    """A slice of the inputs: parallel lists, one entry per position of ``[start, stop)``."""

    def __init__(self, table: pa.Table) -> None:
        self.positions: list[int] = table.column("position").to_pylist()
        self.messages: list[str | None] = table.column("message").to_pylist()
        self.reasons: list[str | None] = table.column("reason").to_pylist()
        self.custom_ids: list[str | None] = table.column("custom_id").to_pylist()
        self.overrides: list[dict[str, Any] | None] = [
            None if raw is None else json.loads(raw) for raw in table.column("overrides").to_pylist()
        ]


class Checkpoint:
    """The checkpoint folder of one batch (see the module docstring). Thread-safe for one writer per kind."""

    def __init__(self, root: Path, batch_id: str) -> None:
        self.path = Path(root).expanduser().resolve() / batch_id
        self._parts: dict[int, pa.Table] = {}
        self._lock = threading.Lock()
        self._result_part = len(list((self.path / "results").glob("part-*.parquet"))) if self.exists() else 0

    def exists(self) -> bool:
        """The folder has a manifest: the batch was checkpointed here."""
        return (self.path / "manifest.json").is_file()

    # ------------------------------------------------------------------ manifest and index

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / "manifest.json", json.dumps(manifest).encode())

    def read_manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / "manifest.json").read_text())
        return data

    def write_index(self, index: pd.Index) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(index=index)
        _atomic_write_table(self.path / "index.parquet", pa.Table.from_pandas(frame, preserve_index=True))

    def read_index(self) -> pd.Index:
        return pq.read_table(self.path / "index.parquet").to_pandas().index

    # ------------------------------------------------------------------ inputs

    def write_inputs(
        self,
        part: int,
        positions: Sequence[int],
        messages: Sequence[str | None],
        reasons: Sequence[str | None],
        custom_ids: Sequence[str | None],
        overrides: Sequence[dict[str, Any] | None],
    ) -> None:
        """Write inputs part ``part`` (positions ``part * INPUT_PART_ROWS`` onwards)."""
        table = pa.table(
            {
                "position": pa.array(positions, pa.int64()),
                "message": pa.array(messages, pa.string()),
                "reason": pa.array(reasons, pa.string()),
                "custom_id": pa.array(custom_ids, pa.string()),
                "overrides": pa.array([None if o is None else json.dumps(o) for o in overrides], pa.string()),
            },
            schema=INPUT_SCHEMA,
        )
        (self.path / "inputs").mkdir(parents=True, exist_ok=True)
        _atomic_write_table(self.path / "inputs" / f"part-{part:05d}.parquet", table)

    def mark_inputs_complete(self, parts: int) -> None:
        _atomic_write(self.path / "inputs" / "complete.json", json.dumps({"parts": parts}).encode())

    def inputs_complete(self) -> bool:
        return (self.path / "inputs" / "complete.json").is_file()

    def inputs(self, start: int, stop: int) -> InputRows:
        """The inputs of positions ``[start, stop)`` (reading at most the two parts they span)."""
        first, last = start // INPUT_PART_ROWS, (stop - 1) // INPUT_PART_ROWS
        tables = [self._part(part) for part in range(first, last + 1)]
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        offset = first * INPUT_PART_ROWS
        return InputRows(table.slice(start - offset, stop - start))

    def select(self, positions: Sequence[int]) -> InputRows:
        """The inputs of ``positions`` (any order; a chunk of a "Retry failed" round is scattered)."""
        if not positions:
            return InputRows(INPUT_SCHEMA.empty_table())
        lowest, highest = min(positions), max(positions)
        if highest - lowest + 1 == len(positions) and list(positions) == list(range(lowest, highest + 1)):
            return self.inputs(lowest, highest + 1)
        tables = []
        for position in positions:
            part = position // INPUT_PART_ROWS
            tables.append(self._part(part).slice(position - part * INPUT_PART_ROWS, 1))
        return InputRows(pa.concat_tables(tables))

    def spooled_parts(self) -> int:
        """How many inputs parts are written (all of them once :meth:`inputs_complete`)."""
        return len(list((self.path / "inputs").glob("part-*.parquet")))

    def _part(self, part: int) -> pa.Table:
        with self._lock:
            table = self._parts.get(part)
            if table is None:
                table = pq.read_table(self.path / "inputs" / f"part-{part:05d}.parquet")
                if len(self._parts) >= 2:
                    self._parts.pop(next(iter(self._parts)))
                self._parts[part] = table
            return table

    def messages(self) -> pa.Array:
        """Every position's rendered prompt (``None`` for rows not sent), in order, as far as spooled."""
        files = sorted((self.path / "inputs").glob("part-*.parquet"))
        if not files:
            return pa.array([], pa.string())
        return pa.concat_arrays(
            [pq.read_table(f, columns=["message"]).column("message").combine_chunks() for f in files]
        )

    def reasons(self) -> pa.Array:
        """Every position's reason for not being sent (``None`` for rows that were), in order."""
        files = sorted((self.path / "inputs").glob("part-*.parquet"))
        return pa.concat_arrays([pq.read_table(f, columns=["reason"]).column("reason").combine_chunks() for f in files])

    # ------------------------------------------------------------------ twins

    def write_twins(self, leader_of: Sequence[int]) -> None:
        """Each row's leader (``-1``: none), for a reattach to know which rows copy which."""
        table = pa.table({"leader": pa.array(leader_of, pa.int64())})
        _atomic_write_table(self.path / "twins.parquet", table)

    def read_twins(self) -> list[int] | None:
        path = self.path / "twins.parquet"
        if not path.is_file():
            return None
        leaders: list[int] = pq.read_table(path).column("leader").to_pylist()
        return leaders

    # ------------------------------------------------------------------ rounds

    def write_round(self, round_no: int, positions: Sequence[int]) -> None:
        (self.path / "rounds").mkdir(parents=True, exist_ok=True)
        table = pa.table({"position": pa.array(positions, pa.int64())})
        _atomic_write_table(self.path / "rounds" / f"round-{round_no:03d}.parquet", table)

    def read_round(self, round_no: int) -> list[int]:
        positions: list[int] = (
            pq.read_table(self.path / "rounds" / f"round-{round_no:03d}.parquet").column("position").to_pylist()
        )
        return positions

    # ------------------------------------------------------------------ results

    def append_results(self, rows: list[dict[str, Any]]) -> None:
        """Write ``rows`` (dicts with ``RESULT_SCHEMA``'s fields) as one more results file."""
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
        (self.path / "results").mkdir(parents=True, exist_ok=True)
        with self._lock:
            name = f"part-{self._result_part:05d}.parquet"
            self._result_part += 1
        _atomic_write_table(self.path / "results" / name, table)

    def final_statuses(self) -> list[str]:
        """The latest recorded status of each row that has one (two columns read, for listings)."""
        files = sorted((self.path / "results").glob("part-*.parquet"))
        if not files:
            return []
        table = pa.concat_tables([pq.read_table(f, columns=["position", "status"]) for f in files])
        latest: dict[int, str] = dict(zip(table["position"].to_pylist(), table["status"].to_pylist(), strict=True))
        return list(latest.values())

    def results(self) -> pa.Table:
        """Every result written so far, the latest per position last (files in the order they were written)."""
        files = sorted((self.path / "results").glob("part-*.parquet"))
        if not files:
            return RESULT_SCHEMA.empty_table()
        return pa.concat_tables([pq.read_table(f, schema=RESULT_SCHEMA) for f in files])


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_table(path: Path, table: pa.Table) -> None:
    # Written whole, then renamed: a kernel killed mid-write leaves a .tmp file, never half a part.
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
