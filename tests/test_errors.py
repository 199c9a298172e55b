"""Retry-or-fail classification against the real exception classes users meet."""

from __future__ import annotations

import email.utils
import time

import openai
import pytest
from pydantic import BaseModel, ValidationError
from ractogateway.exceptions import RactoGatewayAPIError, RactoGatewayAuthError, RactoGatewayTimeoutError

from racto_nb.engine.classify import classify, parse_retry_after
from racto_nb.errors import RetryScheduled, TaskFailed

try:  # openai >= 3 ships its own fork of httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

REQUEST = httpx.Request("POST", "http://test/v1/chat/completions")


def status_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    response = httpx.Response(status, headers=headers or {}, request=REQUEST)
    cls = {400: openai.BadRequestError, 401: openai.AuthenticationError, 429: openai.RateLimitError}.get(
        status, openai.InternalServerError if status >= 500 else openai.APIStatusError
    )
    return cls(f"HTTP {status}", response=response, body=None)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(status: int) -> None:
    verdict = classify(status_error(status))
    assert verdict.retryable and verdict.status_code == status


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_request_errors_fail_at_once(status: int) -> None:
    verdict = classify(status_error(status))
    assert not verdict.retryable and verdict.status_code == status


def test_timeouts_and_connection_errors_are_retried() -> None:
    assert classify(openai.APITimeoutError(request=REQUEST)).retryable
    assert classify(openai.APIConnectionError(request=REQUEST)).retryable
    assert classify(TimeoutError()).retryable
    assert classify(ConnectionResetError()).retryable


def test_validation_and_unknown_errors_are_not_retried() -> None:
    class Model(BaseModel):
        x: int

    with pytest.raises(ValidationError) as info:
        Model(x="nope")  # type: ignore[arg-type]
    assert not classify(info.value).retryable
    assert not classify(ValueError("bad prompt")).retryable
    assert not classify(KeyError("x")).retryable


def test_retry_after_is_read_on_429_and_503_only() -> None:
    assert classify(status_error(429, {"retry-after": "7"})).retry_after_s == 7.0
    assert classify(status_error(503, {"retry-after-ms": "1500"})).retry_after_s == 1.5
    assert classify(status_error(500, {"retry-after": "7"})).retry_after_s is None


def test_retry_after_http_date() -> None:
    now = time.time()
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(None, header, now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(None, "garbage") is None


def test_ractogateway_errors_are_judged_by_their_code_or_cause() -> None:
    assert classify(RactoGatewayTimeoutError("slow")).retryable
    assert classify(RactoGatewayAPIError("x", status_code=503)).retryable
    assert not classify(RactoGatewayAPIError("x", status_code=400)).retryable
    assert not classify(RactoGatewayAuthError("bad key")).retryable
    # RactoGateway wraps the SDK error; the cause carries the Retry-After header.
    try:
        try:
            raise status_error(429, {"retry-after": "2"})
        except openai.RateLimitError as exc:
            raise RactoGatewayAPIError("[openai] limited", status_code=None) from exc
    except RactoGatewayAPIError as wrapped:
        verdict = classify(wrapped)
    assert verdict.retryable and verdict.status_code == 429 and verdict.retry_after_s == 2.0
    assert verdict.error_type == "RactoGatewayAPIError"


def test_stored_errors_keep_their_fields_through_args() -> None:
    failed = TaskFailed("AuthenticationError (HTTP 401), not retried: no", "AuthenticationError", 401, 1)
    rebuilt = TaskFailed(*failed.args)
    assert (rebuilt.error_type, rebuilt.status_code, rebuilt.attempts) == ("AuthenticationError", 401, 1)
    assert str(rebuilt) == failed.message
    scheduled = RetryScheduled("m", "RateLimitError", 429, 2, 3, 123.0)
    assert RetryScheduled(*scheduled.args).retry_at == 123.0
