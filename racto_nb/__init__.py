"""racto_nb: a DataFrame column fanned out to a Celery worker fleet, one LLM call per row."""

from racto_nb.models import BatchItem, RetryConfig, TaskResult, TaskStatus

__all__ = ["BatchItem", "RactoCeleryWorker", "RetryConfig", "TaskResult", "TaskStatus"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The worker imports Celery; keep `import racto_nb` cheap for the models alone.
    if name == "RactoCeleryWorker":
        from racto_nb.worker import RactoCeleryWorker

        return RactoCeleryWorker
    raise AttributeError(f"module 'racto_nb' has no attribute {name!r}")
