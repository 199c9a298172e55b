"""racto_nb: a DataFrame column fanned out to a Celery worker fleet, one LLM call per row.

``racto_nb.connect()`` picks where tasks run (an embedded worker by default);
``racto_nb.current_worker()`` is the worker the notebook layer uses.
"""

from racto_nb.connection import connect, current_worker, disconnect
from racto_nb.models import BatchItem, RetryConfig, TaskResult, TaskStatus
from racto_nb.worker import RactoCeleryWorker

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


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext racto_nb``: the magics (see :mod:`racto_nb.magics`)."""
    from racto_nb.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext racto_nb``."""
    from racto_nb.magics import unload_ipython_extension as unload

    unload(ipython)
