"""Which failures are worth another try.

``classify(exc)`` is the single place that decides retry-or-fail. It reads the
exception (and its ``__cause__`` chain, so a RactoGateway error wrapping an
``openai`` error is judged by the original) without importing any provider
SDK: classification must work for kits we have never heard of.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

from racto_nb.errors import SchemaError

#: HTTP statuses that describe the provider's state, not the request's.
RETRYABLE_STATUS = frozenset({408, 409, 429})
#: Statuses whose ``Retry-After`` header we honour.
RETRY_AFTER_STATUS = frozenset({429, 503})

_TIMEOUT_NAMES = ("Timeout", "TimedOut", "DeadlineExceeded")
_CONNECTION_NAMES = ("ConnectionError", "ConnectError", "APIConnectionError", "RemoteProtocolError")


@dataclass(frozen=True)
class Classification:
    """The verdict on one exception."""

    retryable: bool
    error_type: str
    status_code: int | None = None
    retry_after_s: float | None = None
    #: The account is out of quota (HTTP 402, or OpenAI's ``insufficient_quota``): pause, do not fail.
    out_of_quota: bool = False


def classify(exc: BaseException) -> Classification:
    """Decide whether ``exc`` is transient.

    Retried: timeouts, connection failures, HTTP 408/409/429 and 5xx.
    Not retried: everything else, notably 400/401/403/404/422 and validation
    errors; an unknown exception is a bug or bad input until proven otherwise,
    and retrying it only multiplies the bill. A reply that is not what the
    batch's ``choices``/``schema`` asked for (:class:`SchemaError`) is asked
    again at once: the provider is fine, the answer was not. Out of quota (402, or a 429 whose
    code is ``insufficient_quota``) is neither: no retry helps until someone
    pays, so the batch pauses.
    """
    error_type = type(exc).__name__
    if isinstance(exc, SchemaError):
        return Classification(True, "SchemaError", None, retry_after_s=0.0)
    for link in _cause_chain(exc):
        status = _status_code(link)
        if status is not None:
            if status == 402 or getattr(link, "code", None) == "insufficient_quota":
                return Classification(False, "QuotaExhausted", status, None, out_of_quota=True)
            retryable = status in RETRYABLE_STATUS or 500 <= status <= 599
            retry_after = _retry_after(link) if status in RETRY_AFTER_STATUS else None
            return Classification(retryable, error_type, status, retry_after)
        if _is_timeout_or_connection(link):
            return Classification(True, error_type)
    return Classification(False, error_type)


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain and len(chain) < 8:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


def _status_code(exc: BaseException) -> int | None:
    for attr in ("status_code", "status", "http_status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) and 100 <= value <= 599 else None


def _is_timeout_or_connection(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    names = [cls.__name__ for cls in type(exc).__mro__]
    return any(marker in name for name in names for marker in _TIMEOUT_NAMES + _CONNECTION_NAMES)


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    return parse_retry_after(headers.get("retry-after-ms"), headers.get("retry-after"))


def parse_retry_after(retry_after_ms: str | None, retry_after: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After-Ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if retry_after_ms:
        try:
            return max(float(retry_after_ms) / 1000.0, 0.0)
        except ValueError:
            pass
    if not retry_after:
        return None
    try:
        return max(float(retry_after), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(retry_after)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)
