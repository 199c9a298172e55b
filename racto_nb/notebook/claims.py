"""The newest run owns what it writes into the user's namespace.

Re-running a ``--background`` cell starts a second run while the first one
may still be going. Both would fill the same ``--out`` variable and the same
``--write-back`` column when they end, and whichever ended last would win:
often the *older* run, since the newer one was started later. Here each
target (a variable in a namespace, a column of a frame) is claimed by the run
that was started last; an older run that ends afterwards leaves it alone.

Targets are told apart by the identity of the namespace or frame they live in
and by the name. (A new frame that reuses a dead frame's ``id`` only takes
the claim over, which is what a new run does anyway.)
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

__all__ = ["Claim", "claim"]

_lock = threading.Lock()
#: One entry per target ever claimed (a variable name, a frame's column): small, and kept, because a
#: finished run still writes again when its Retry-failed round ends.
_newest: dict[tuple[int, str], int] = {}
_tickets = itertools.count(1)


class Claim:
    """A run's hold on one target; :meth:`held` says whether it is still the newest."""

    def __init__(self, key: tuple[int, str], ticket: int) -> None:
        self._key = key
        self._ticket = ticket

    def held(self) -> bool:
        with _lock:
            return _newest.get(self._key) == self._ticket


def claim(container: Any, name: str) -> Claim:
    """Make the caller the newest owner of ``container[name]`` (a namespace dict, or a DataFrame's column)."""
    key = (id(container), name)
    with _lock:
        ticket = next(_tickets)
        _newest[key] = ticket
    return Claim(key, ticket)
