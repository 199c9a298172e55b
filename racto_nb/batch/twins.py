"""Twins: rows of one batch that would send the very same request, sent once.

Every row of a batch goes to the same kit with the same defaults, so two rows
with the same prompt and the same own settings are the same request. The
first of them (the *leader*) is sent; the others wait for its answer and get
a copy, marked ``cached`` (they cost nothing). A million rows are hashed as
they are checkpointed, 128 bits a row in two numpy arrays, and grouped with
``numpy.unique``: no dict of a million prompts in the kernel.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Twins", "request_hashes"]


def request_hashes(
    messages: Sequence[str | None], overrides: Sequence[dict[str, Any] | None]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Two 64-bit halves of each row's request hash (rows not sent hash to zero and are never twins)."""
    high = np.zeros(len(messages), dtype=np.uint64)
    low = np.zeros(len(messages), dtype=np.uint64)
    for i, (message, own) in enumerate(zip(messages, overrides, strict=True)):
        if message is None:
            continue
        text = message if not own else message + "\0" + json.dumps(own, sort_keys=True)
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        high[i] = int.from_bytes(digest[:8], "little")
        low[i] = int.from_bytes(digest[8:], "little") | 1  # never 0: 0 marks "not sent"
    return high, low


class Twins:
    """For each row, the leader whose answer it copies (``-1``: it is sent itself)."""

    def __init__(self, leader_of: npt.NDArray[np.int64]) -> None:
        self.leader_of = leader_of
        positions = np.flatnonzero(leader_of >= 0)
        self._followers: dict[int, list[int]] = {}
        for position in positions.tolist():
            self._followers.setdefault(int(leader_of[position]), []).append(position)

    @classmethod
    def of(cls, high: npt.NDArray[np.uint64], low: npt.NDArray[np.uint64]) -> Twins:
        """Group equal hashes; the first row of each group leads it."""
        leader_of = np.full(len(high), -1, dtype=np.int64)
        sent = np.flatnonzero(low != 0)
        if len(sent):
            keys = np.column_stack([high[sent], low[sent]])
            _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
            leaders = sent[first[inverse.ravel()]]
            twin = leaders != sent
            leader_of[sent[twin]] = leaders[twin]
        return cls(leader_of)

    @classmethod
    def none(cls, n: int) -> Twins:
        return cls(np.full(n, -1, dtype=np.int64))

    @property
    def count(self) -> int:
        """Rows that copy another's answer."""
        return int((self.leader_of >= 0).sum())

    def followers(self, leader: int) -> list[int]:
        """The rows that copy ``leader``'s answer."""
        return self._followers.get(leader, [])

    def is_twin(self, positions: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        mask: npt.NDArray[np.bool_] = self.leader_of[positions] >= 0
        return mask
