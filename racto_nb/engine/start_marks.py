"""A row's STARTED state, written only once its call has outlived a few milliseconds.

Writing STARTED before every call is one Redis round trip per row: at a fast
model that is half of what a worker does. A row that is answered within
:data:`GRACE_S` goes straight to its result (written with its neighbours in
one pipeline); a row still running then has STARTED written by one thread per
process, which is what the notebook's ``started`` count, the dead-worker check
(a STARTED row names its worker) and ``deliveries`` read.

A mark is written at most once and never after its row's result: :meth:`StartMarks.disarm`
waits for a write in progress, and the runner buffers the result only after
disarming. Rows that may kill their worker are not deferred (see
:class:`~racto_nb.engine.runner.ChunkRunner`): those rows' STARTED must be stored
before the call, or a row that crashes the process at once would never be
counted and would run forever.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["GRACE_S", "StartMarks", "start_marks"]

logger = logging.getLogger(__name__)

#: A call answered within this is never marked STARTED.
GRACE_S = 0.05


class StartMarks:
    """Deferred writes, each run once when it falls due unless disarmed first."""

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.grace_s = grace_s
        self._due: list[tuple[float, int]] = []
        self._writes: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self._wake = threading.Condition()
        #: Held while a write runs, so a disarm that comes meanwhile waits for it to be stored.
        self._writing = threading.Lock()
        self._thread: threading.Thread | None = None

    def arm(self, write: Callable[[], None]) -> int:
        """Run ``write`` in ``grace_s`` unless :meth:`disarm` comes first; returns the mark's id."""
        mark = next(self._ids)
        with self._wake:
            self._writes[mark] = write
            heapq.heappush(self._due, (time.monotonic() + self.grace_s, mark))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="racto-start-marks", daemon=True)
                self._thread.start()
            self._wake.notify()
        return mark

    def disarm(self, mark: int) -> None:
        """The row is done: drop its mark, or wait until a write already under way is stored."""
        with self._writing, self._wake:
            self._writes.pop(mark, None)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._wake.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, mark = heapq.heappop(self._due)
            with self._writing:
                with self._wake:
                    write = self._writes.pop(mark, None)
                if write is not None:
                    try:
                        write()
                    except Exception:  # the row runs on; its result is written either way
                        logger.warning("could not write a row's STARTED state", exc_info=True)


#: The process's one set of marks (one thread, started on first use).
start_marks = StartMarks()
