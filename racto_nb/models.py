"""Data that crosses the broker, the result backend and the public API.

Everything here is pure pydantic: no Celery, no network. The chat models are
field-compatible with RactoGateway's (``ChatConfig``/``Message``/``LLMResponse``)
so a payload built here can be re-validated by a RactoGateway kit unchanged.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from racto_nb.structured import OutputSpec

DEFAULT_TEMPERATURE = 0.0
#: The sampling temperature providers accept (OpenAI: 0 to 2); above it a request is refused, after queueing.
MAX_TEMPERATURE = 2.0
DEFAULT_MAX_TOKENS = 4096


class TaskStatus(str, Enum):
    """Lifecycle state of a task; values are the seed's lower-case strings."""

    PENDING = "pending"
    STARTED = "started"
    SUCCESS = "success"
    FAILURE = "failure"
    RETRY = "retry"
    REVOKED = "revoked"
    #: Not run, not failed: waiting for quota or budget until the batch is resumed (racto_nb's own state).
    PAUSED = "paused"

    @property
    def is_final(self) -> bool:
        """``True`` once the task can no longer change state."""
        return self in _FINAL_STATES


_FINAL_STATES = frozenset({TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.REVOKED})


class TaskResult(BaseModel):
    """What one task is, or ended as, seen from the client.

    Beyond the seed's four fields it carries what a user needs to act on a
    failure without digging through worker logs: the error's type and HTTP
    status, how many attempts were made, and, for batch items, the item's own
    ``custom_id`` and position.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    task_id: str = Field(description="Celery task UUID.")
    status: TaskStatus
    result: Any | None = Field(
        default=None,
        description="On success: the response dict (generate) or list of chunk dicts (ingest); on a SchemaError "
        "failure: the reply that did not fit.",
    )
    error: str | None = Field(default=None, description="Why the task failed, or why waiting stopped.")
    error_type: str | None = Field(
        default=None,
        description="Exception class name (e.g. 'RateLimitError'); 'WaitTimeout' when a wait ran out.",
    )
    status_code: int | None = Field(default=None, description="HTTP status of the provider error, if any.")
    attempts: int = Field(default=0, ge=0, description="Calls made so far (1 + retries); 0 if not started.")
    max_retries: int | None = Field(default=None, description="The retry budget the worker applied.")
    retry_in_s: float | None = Field(
        default=None, description="While status is RETRY: seconds until the next attempt (at read time)."
    )
    latency_s: float | None = Field(default=None, description="Duration of the attempt that produced the result.")
    custom_id: str | None = Field(default=None, description="Batch item's own id, as given in BatchItem.")
    index: int | None = Field(default=None, description="Batch item's position in submission order.")
    deliveries: int | None = Field(
        default=None,
        description="Workers the last attempt was handed to: above 1, a worker died running it and the call "
        "may have reached the provider more than once.",
    )
    worker: str | None = Field(default=None, description="The worker (node name) that ran or is running it.")
    history: list[str] = Field(
        default_factory=list,
        description="What went wrong in each earlier attempt, oldest first ('attempt 1: RateLimit (HTTP 429): ...').",
    )
    cached: bool = Field(default=False, description="Answered from the ledger: not sent, not paid for again.")
    cost_usd: float | None = Field(default=None, description="What the call cost (0 when cached; None: no price).")
    saved_usd: float | None = Field(default=None, description="When cached: what the answer cost when it was paid.")

    @property
    def ok(self) -> bool:
        """``True`` when the task succeeded and produced a result."""
        return self.status is TaskStatus.SUCCESS and self.error is None

    @property
    def content(self) -> str | None:
        """The generated text, when the result is a chat response."""
        if isinstance(self.result, dict):
            value = self.result.get("content")
            return value if isinstance(value, str) else None
        return None


class RetryConfig(BaseModel):
    """Exponential-backoff retry policy.

    ``delay(n) = min(initial_delay_s * backoff_factor ** n, max_delay_s)`` for the
    n-th retry (0-based): 2 s, 4 s, 8 s with the defaults. No jitter is added, so
    the schedule a user reads here is the schedule the provider sees.
    """

    model_config = ConfigDict(frozen=True)

    max_retries: int = Field(default=3, ge=0, description="Retries after the first failure; 0 disables.")
    initial_delay_s: float = Field(default=2.0, gt=0, description="Countdown before the first retry.")
    backoff_factor: float = Field(default=2.0, gt=1.0, description="Multiplier per retry; must be > 1.")
    max_delay_s: float = Field(default=300.0, gt=0, description="Cap on any countdown, Retry-After included.")

    def delay_for(self, retry_number: int) -> float:
        """Backoff countdown before retry ``retry_number`` (0-based)."""
        try:
            raw = self.initial_delay_s * self.backoff_factor**retry_number
        except OverflowError:
            return self.max_delay_s
        return min(raw, self.max_delay_s) if math.isfinite(raw) else self.max_delay_s

    def countdown(self, retry_number: int, retry_after_s: float | None = None) -> float:
        """Countdown for the next retry: the provider's ``Retry-After`` when it
        gave one (a server knows its own recovery time better than our schedule),
        otherwise the backoff; either way capped at ``max_delay_s``."""
        if retry_after_s is not None and retry_after_s >= 0:
            return min(retry_after_s, self.max_delay_s)
        return self.delay_for(retry_number)


def finite_json(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` unchanged, or a ValueError naming the first NaN or infinity in it.

    JSON has no NaN: the broker's serializer would write a token the worker's
    parser (and the provider's) reads differently or refuses, after the row
    was already paid for or failed. Caught here, before anything is sent.
    """

    def walk(item: Any, where: str) -> None:
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where} is {item!r}; JSON has no such number: use a finite value or leave it out")
        if isinstance(item, dict):
            for key, inner in item.items():
                walk(inner, f"{where}[{key!r}]")
        elif isinstance(item, (list, tuple)):
            for i, inner in enumerate(item):
                walk(inner, f"{where}[{i}]")

    walk(value, "extra")
    return value


class BatchItem(BaseModel):
    """One row of a batch.

    A field left unset takes the batch default; a field set explicitly wins,
    ``0.0`` included (``model_fields_set`` tells the two apart, not truthiness).
    """

    model_config = ConfigDict(extra="forbid")

    user_message: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    max_tokens: int | None = Field(default=None, gt=0)
    extra: dict[str, Any] | None = None
    custom_id: str | None = None

    @field_validator("extra")
    @classmethod
    def _finite_extra(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else finite_json(value)


class Message(BaseModel):
    """One conversation turn (RactoGateway-compatible)."""

    role: Literal["system", "user", "assistant"]
    content: str


class ChatConfig(BaseModel):
    """Input of ``kit.chat(config)``, rebuilt inside the worker from JSON."""

    user_message: str = Field(min_length=1)
    temperature: float = Field(default=DEFAULT_TEMPERATURE, ge=0.0, le=MAX_TEMPERATURE)
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, gt=0)
    history: list[Message] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)
    #: What the reply must be (``choices`` / ``schema``), set by the worker from the batch's options. A kit that
    #: can constrain its output to it does (``OpenAIKit``, ``LocalKit``); any other may ignore it: the worker
    #: checks every reply either way. racto_nb's own field: RactoGateway kits never see it.
    output: OutputSpec | None = None

    @field_validator("extra")
    @classmethod
    def _finite_extra(cls, value: dict[str, Any]) -> dict[str, Any]:
        return finite_json(value)


class ChatResponse(BaseModel):
    """Output of ``kit.chat``: JSON only, never the provider's raw object."""

    content: str | None = None
    parsed: dict[str, Any] | list[Any] | None = None
    usage: dict[str, int] = Field(default_factory=dict)
    finish_reason: str | None = None
    model: str | None = None
    rate_limits: dict[str, str] | None = Field(
        default=None, description="The provider's x-ratelimit-* headers, read by the rate governor (not stored)."
    )


class BatchProgress(BaseModel):
    """One snapshot of a batch's state: everything a progress view draws.

    Computed by ``racto_nb.batch.batch`` from one read of the result backend; the
    views in ``racto_nb.notebook.views`` only render it (tqdm's core/front-end split).
    """

    model_config = ConfigDict(frozen=True)

    batch_id: str
    total: int = Field(ge=0)
    counts: dict[TaskStatus, int] = Field(description="Tasks per state; states absent count 0.")
    elapsed_s: float = Field(ge=0.0)
    rate_per_s: float | None = Field(default=None, description="Finished tasks per second so far.")
    eta_s: float | None = Field(default=None, description="Seconds left at the current rate.")
    finished: bool = Field(default=False, description="Every task is final (or the batch was cancelled).")
    cancelled: bool = False
    submitted: int | None = Field(default=None, description="Tasks handed to the broker so far.")
    skipped: int = Field(default=0, description="Rows not sent (missing values): part of the result, not tasks.")
    paused: bool = Field(default=False, description="Waiting for quota or budget: resume() sends the rest.")
    pause_reason: str | None = None
    cost_usd: float = Field(default=0.0, description="Dollars spent on the rows final so far (priced models only).")
    cached: int = Field(default=0, description="Rows answered from the ledger (or by a twin in the batch).")
    saved_usd: float = Field(default=0.0, description="What the cached rows cost when they were first paid for.")
    note: str | None = Field(
        default=None, description="What the batch is doing about a problem right now (a backend reconnecting, ...)."
    )

    def count(self, status: TaskStatus) -> int:
        """Tasks currently in ``status``."""
        return self.counts.get(status, 0)

    @property
    def done(self) -> int:
        """Tasks in a final state."""
        return sum(n for status, n in self.counts.items() if status.is_final)

    @property
    def settled(self) -> bool:
        """Nothing more happens by itself: every task is final, or the batch is paused and nothing runs."""
        running = self.count(TaskStatus.STARTED) + self.count(TaskStatus.RETRY)
        return self.finished or (self.paused and running == 0)
