"""``with thing:`` for anything racto_nb starts and stops (worker pools, throwaway servers).

One mixin instead of the same ``__enter__``/``__exit__`` pair in every class:
entering starts, leaving stops, whatever happened inside. Standard library
only, so the test servers in :mod:`racto_nb.testing` can use it too.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from typing_extensions import Self

__all__ = ["StartStop"]


class StartStop:
    """Mixin: ``start()`` on ``__enter__`` (returning what it returns), ``stop()`` on ``__exit__``."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> Any:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
