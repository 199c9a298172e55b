"""Every exception racto_nb raises, under one root: :class:`RactoError`.

Catch ``RactoError`` to handle anything racto_nb refuses or reports. Each
class is also a subclass of the builtin that describes it (``ValueError`` for
a bad value, ``ConnectionError`` for an unreachable broker, ...), so code that
catches those keeps working.

Two kinds live here:

* **Mistakes the user can fix**, raised before anything is enqueued (or at
  once, when a broker does not answer). Their message is one line that names
  the fix; the magics show them without a traceback.
* **What a task ended as**, stored in the result backend by the worker
  (:class:`TaskFailed`, :class:`RetryScheduled`). Their ``args`` are JSON
  primitives, so Celery's JSON serializer round-trips them and the client
  rebuilds the same classes.

Anything else that escapes racto_nb is a bug, and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BatchNotFound",
    "BrokerUnreachable",
    "ConfigError",
    "EmbeddedBrokerError",
    "EmbeddedError",
    "InvalidArgument",
    "InvalidSource",
    "KitUnavailable",
    "LocalModelCrashed",
    "ModelNotFound",
    "RactoError",
    "RetryScheduled",
    "SchemaError",
    "StillRunning",
    "TaskFailed",
    "TemplateError",
    "Unsupported",
    "WorkerStartError",
]


class RactoError(Exception):
    """Root of every racto_nb exception."""


# ---------------------------------------------------------------------------- mistakes the user can fix


class ConfigError(RactoError, ValueError):
    """A setting is missing or wrong; the message names the variable (or file key) to fix."""


class InvalidArgument(RactoError, ValueError):
    """An argument has a value racto_nb cannot use; the message names the argument and what it accepts."""


class InvalidSource(RactoError, TypeError):
    """An argument is the wrong kind of object (a batch source, a kit without ``chat``, ...)."""


class TemplateError(RactoError, ValueError):
    """A template or its data cannot produce prompts; nothing was enqueued."""


class KitUnavailable(RactoError, ImportError):
    """A kit's packages are not installed here; the message names the ``pip install``."""


class ModelNotFound(RactoError, FileNotFoundError):
    """A local model file is missing; the message names the path or the package that should hold it."""


class LocalModelCrashed(RactoError, RuntimeError):
    """The process running a local model died (segfault, abort, killed, out of memory) during a call.

    The message is one line naming the signal or exit status and the fix; the
    kernel or worker that made the call is unharmed and the next call starts a
    fresh model process. ``returncode`` is the process's (negative: the signal
    number), ``stderr_tail`` its last lines of output, when known.
    """

    def __init__(self, message: str, *, returncode: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class BrokerUnreachable(RactoError, ConnectionError):
    """The broker (or result backend) did not answer in time; the message names the URL and the fix."""


class Unsupported(RactoError, RuntimeError):
    """What was asked needs something this worker or app lacks (a RAG object, a key-value result backend)."""


class BatchNotFound(RactoError, LookupError):
    """No batch with this id where this kernel looks for it."""


class StillRunning(RactoError, RuntimeError):
    """A final result was asked for while the work is still running."""


class EmbeddedError(RactoError, RuntimeError):
    """The embedded (in-kernel) worker could not start or stop."""


class EmbeddedBrokerError(EmbeddedError):
    """Worker processes were asked for while the kernel's broker lives in the kernel."""


class WorkerStartError(RactoError, RuntimeError):
    """A ``celery worker`` process exited or never got ready; the message carries its log's tail."""


# ---------------------------------------------------------------------------- what tasks end as


class TaskFailed(RactoError):
    """Final failure of a task, as stored in the result backend."""

    def __init__(
        self,
        message: str,
        error_type: str,
        status_code: int | None = None,
        attempts: int = 1,
        history: list[str] | None = None,
        reply: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, error_type, status_code, attempts, list(history or []), reply)
        self.message = message
        self.error_type = error_type
        self.status_code = status_code
        self.attempts = attempts
        #: What went wrong in each earlier attempt, oldest first (the last one is ``message``).
        self.history = list(history or [])
        #: The response the last attempt got, when there was one (a ``SchemaError``: the reply that did not fit).
        self.reply = reply

    def __str__(self) -> str:
        return self.message


class RetryScheduled(RactoError):
    """Stored while a task waits for its next attempt (Celery state RETRY)."""

    def __init__(
        self,
        message: str,
        error_type: str,
        status_code: int | None,
        attempts: int,
        max_retries: int,
        retry_at: float,
    ) -> None:
        super().__init__(message, error_type, status_code, attempts, max_retries, retry_at)
        self.message = message
        self.error_type = error_type
        self.status_code = status_code
        self.attempts = attempts
        self.max_retries = max_retries
        self.retry_at = retry_at

    def __str__(self) -> str:
        return self.message


class SchemaError(RactoError, ValueError):
    """A reply is not what the batch's ``choices`` or ``schema`` asked for.

    Raised in the worker after the call, by :mod:`racto_nb.structured`: it is
    retryable (the model is asked again, told what was wrong, within the retry
    budget), and a row that never gets a valid reply fails with
    ``error_type="SchemaError"``, its last reply kept in ``content``.
    ``reply`` is that reply's text.
    """

    def __init__(self, message: str, reply: str | None = None) -> None:
        super().__init__(message)
        self.reply = reply
