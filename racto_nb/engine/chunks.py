"""A chunk: several rows in one Celery message, each row still its own task with its own result.

One message per row costs more than a 0 ms model call (plain no-op Celery
tasks run at about 500 a second on one worker here), so rows travel in
chunks. Everything a user relies on stays per row: each row has its own task
id and result key, its own retries and backoff, its own ``TaskResult``.

The message is JSON (see :class:`ChunkPayload`): the batch defaults once, then
one short dict per row. A chunk's Celery task id is fixed
(:func:`~racto_nb.engine.keys.chunk_task_id`), so sending it again, after a
worker or a broker lost it, is the same message, and the worker that runs it
skips the rows that already have a final result.
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypedDict

__all__ = [
    "MAX_ROWS_PER_CHUNK",
    "PAYLOAD_VERSION",
    "ChunkPayload",
    "RowSpec",
    "chunk_spans",
    "rows_per_chunk",
]

PAYLOAD_VERSION = 1
#: Rows per message at most: enough to amortise the message, few enough that a dead worker's chunk is cheap to redo.
MAX_ROWS_PER_CHUNK = 20
#: Below this many messages a batch is split row by row, so small batches spread over every free thread.
TARGET_CHUNKS = 1024


class RowSpec(TypedDict, total=False):
    """One row in a chunk. Short keys: a million rows of them cross the broker."""

    id: str  # the row's task id
    p: int  # its position in the batch (index, for seed batches)
    m: str  # chat: the user message
    c: str | None  # custom_id
    t: float  # temperature, when the row sets its own
    k: int  # max_tokens, when the row sets its own
    x: dict[str, Any]  # extra, when the row sets its own
    path: str  # ingest: the document
    meta: dict[str, Any]  # ingest: its metadata


class ChunkPayload(TypedDict):
    """The one argument of the rows task."""

    v: int
    batch: str
    kind: Literal["chat", "ingest"]
    defaults: dict[str, Any]  # temperature, max_tokens, history, extra
    rows: list[RowSpec]
    events: bool  # write row events for a kernel that follows the batch
    flags: list[str]  # cancel flags to honour (the batch's, the round's)
    opts: dict[str, Any]  # cache (bool), max_cost_usd (float), output (the schema, once structured output is asked)


def rows_per_chunk(n_rows: int) -> int:
    """How many rows a batch of ``n_rows`` puts in one message.

    One row per message up to ``TARGET_CHUNKS`` rows (a small batch spreads
    over every free thread of the fleet), then more, up to ``MAX_ROWS_PER_CHUNK``.
    """
    return max(1, min(MAX_ROWS_PER_CHUNK, math.ceil(n_rows / TARGET_CHUNKS)))


def chunk_spans(n_rows: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` positions of each chunk, in order."""
    return [(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]
