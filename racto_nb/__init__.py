"""racto_nb: a DataFrame column fanned out to a Celery worker fleet, one LLM call per row.

``racto_nb.connect()`` picks where tasks run (an embedded worker by default);
``racto_nb.current_worker()`` is the worker the notebook layer uses.

Names are imported on first use, so ``import racto_nb.models`` (or any light
module) does not pay for Celery, and ``%load_ext racto_nb`` only loads IPython's
side when it is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from racto_nb.lazy import lazy_attributes

if TYPE_CHECKING:
    from racto_nb.engine.worker import RactoCeleryWorker
    from racto_nb.fleet.connection import connect, current_worker, disconnect
    from racto_nb.models import BatchItem, RetryConfig, TaskResult, TaskStatus

__all__ = [
    "BatchItem",
    "RactoCeleryWorker",
    "RetryConfig",
    "TaskResult",
    "TaskStatus",
    "connect",
    "current_worker",
    "disconnect",
]
__version__ = "0.1.0"

__getattr__, __dir__ = lazy_attributes(__name__, {
    "BatchItem": "racto_nb.models",
    "RetryConfig": "racto_nb.models",
    "TaskResult": "racto_nb.models",
    "TaskStatus": "racto_nb.models",
    "RactoCeleryWorker": "racto_nb.engine.worker",
    "connect": "racto_nb.fleet.connection",
    "current_worker": "racto_nb.fleet.connection",
    "disconnect": "racto_nb.fleet.connection",
})


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext racto_nb``: the magics (see :mod:`racto_nb.magics`)."""
    from racto_nb.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext racto_nb``."""
    from racto_nb.magics import unload_ipython_extension as unload

    unload(ipython)
