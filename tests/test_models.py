"""Pure logic of the public models: no server needed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from racto_nb import BatchItem, RetryConfig, TaskResult, TaskStatus


def test_status_values_are_the_seeds_strings() -> None:
    seeds = ["pending", "started", "success", "failure", "retry", "revoked"]
    assert [s.value for s in TaskStatus][:6] == seeds
    assert [s.value for s in TaskStatus][6:] == ["paused"]  # ours: a batch waiting for quota or a higher cap
    assert TaskStatus("retry") is TaskStatus.RETRY
    assert {s for s in TaskStatus if s.is_final} == {
        TaskStatus.SUCCESS,
        TaskStatus.FAILURE,
        TaskStatus.REVOKED,
    }


def test_backoff_schedule_matches_the_formula() -> None:
    cfg = RetryConfig()
    assert [cfg.delay_for(n) for n in range(4)] == [2.0, 4.0, 8.0, 16.0]
    capped = RetryConfig(initial_delay_s=1.0, backoff_factor=3.0, max_delay_s=5.0)
    assert [capped.delay_for(n) for n in range(4)] == [1.0, 3.0, 5.0, 5.0]
    assert capped.delay_for(10_000) == 5.0  # no overflow on absurd attempt numbers


def test_retry_after_wins_over_backoff_but_is_capped() -> None:
    cfg = RetryConfig(initial_delay_s=1.0, max_delay_s=10.0)
    assert cfg.countdown(0, retry_after_s=3.5) == 3.5
    assert cfg.countdown(0, retry_after_s=120.0) == 10.0
    assert cfg.countdown(2, retry_after_s=None) == 4.0
    assert cfg.countdown(0, retry_after_s=0.0) == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_retries", -1), ("initial_delay_s", 0), ("backoff_factor", 1.0), ("max_delay_s", 0)],
)
def test_invalid_retry_config_names_the_field(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as info:
        RetryConfig(**{field: value})  # type: ignore[arg-type]  # bad values on purpose
    errors = info.value.errors()
    assert errors[0]["loc"] == (field,)
    assert "greater than" in errors[0]["msg"]


def test_batch_item_tells_unset_from_explicit_zero() -> None:
    unset = BatchItem(user_message="hi")
    zero = BatchItem(user_message="hi", temperature=0.0, custom_id="row-7")
    assert unset.temperature is None
    assert zero.temperature == 0.0 and "temperature" in zero.model_fields_set
    assert zero.custom_id == "row-7"
    with pytest.raises(ValidationError):
        BatchItem(user_message="")
    with pytest.raises(ValidationError):
        BatchItem(user_message="hi", temprature=0.5)  # type: ignore[call-arg]  # typo is caught


def test_task_result_ok_and_content() -> None:
    done = TaskResult(task_id="t", status=TaskStatus.SUCCESS, result={"content": "hello"})
    assert done.ok and done.content == "hello"
    failed = TaskResult(task_id="t", status=TaskStatus.FAILURE, error="boom", error_type="X", status_code=500)
    assert not failed.ok and failed.content is None
    stored = TaskResult(task_id="t", status="started")  # type: ignore[arg-type]  # a status string as stored
    assert stored.status is TaskStatus.STARTED
