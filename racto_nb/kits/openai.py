"""``OpenAIKit``: OpenAI and every OpenAI-compatible server through the official SDK."""

from __future__ import annotations

import hashlib
import os
import threading
from typing import TYPE_CHECKING, Any

from racto_nb.config import DEFAULT_CALL_TIMEOUT_S
from racto_nb.errors import InvalidArgument
from racto_nb.kits.base import chat_messages
from racto_nb.models import ChatConfig, ChatResponse
from racto_nb.redact import checked_key

if TYPE_CHECKING:
    import openai

#: Sent when a base URL is given and no key is: local servers (vLLM, Ollama,
#: llama.cpp) ignore the key, but the SDK refuses to start without one.
NO_KEY_PLACEHOLDER = "not-needed"
#: Where the SDK sends calls when no base URL is given.
DEFAULT_ENDPOINT = "https://api.openai.com/v1"


class OpenAIKit:
    """Chat completions over ``openai.OpenAI``.

    One client per kit, created on first use and shared by every thread of a
    worker, so connections (and their TLS handshakes) are reused across calls.
    The SDK's own retries are off: the worker's :class:`~racto_nb.RetryConfig`
    is the only retry policy, so one 500 costs one request, not three.

    The key is read when the client is first built, in the process that makes
    the call (a worker reads its own ``OPENAI_API_KEY``); it is never part of a
    task message.

    Kits compare equal when their settings are equal (model, base URL, system
    prompt, timeout, key variable, and an explicit ``api_key`` by its SHA-256,
    which is never shown), never by their client: re-running a notebook cell
    that builds ``RactoCeleryWorker(app, kit=OpenAIKit(...))`` with the same
    settings finds the same kit.

    Structured output (``config.output``) is sent as a strict ``json_schema``
    ``response_format``, which replaces one given in ``extra``: the provider
    then decodes only replies that fit.
    """

    #: Replies are held to ``config.output`` by the provider (strict JSON schema), not only checked afterwards.
    constrains_output = True

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        system_prompt: str | None = None,
        timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        api_key_env: str = "OPENAI_API_KEY",
    ) -> None:
        if not model:
            raise InvalidArgument("OpenAIKit needs a model name, e.g. OpenAIKit('gpt-4o-mini')")
        if timeout_s <= 0:
            raise InvalidArgument(f"timeout_s must be > 0 (got {timeout_s}); it bounds every HTTP call")
        self.model = model
        self.base_url = base_url
        self.system_prompt = system_prompt
        self.timeout_s = timeout_s
        self.api_key_env = api_key_env
        # A broken key fails here, at once and without being shown, not as a retried connection error.
        api_key = checked_key(api_key, "api_key=") if api_key is not None else None
        if api_key is None and os.environ.get(api_key_env) is not None:
            checked_key(os.environ[api_key_env], api_key_env)
        self._api_key = api_key
        self._api_key_sha256 = hashlib.sha256(api_key.encode()).hexdigest() if api_key else None
        self._client: openai.OpenAI | None = None
        self._lock = threading.Lock()

    def _settings(self) -> tuple[Any, ...]:
        return (self.model, self.base_url, self.system_prompt, self.timeout_s, self.api_key_env, self._api_key_sha256)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, OpenAIKit)
        return self._settings() == other._settings()

    def __hash__(self) -> int:
        return hash((type(self).__qualname__, self._settings()))

    def __repr__(self) -> str:
        where = f", base_url={self.base_url!r}" if self.base_url else ""
        return f"OpenAIKit({self.model!r}{where}, timeout_s={self.timeout_s})"

    @property
    def client(self) -> openai.OpenAI:
        """The shared SDK client (built once, thread-safely)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._build_client()
        return self._client

    def _build_client(self) -> openai.OpenAI:
        import openai

        key = self._api_key
        if key is None and os.environ.get(self.api_key_env) is not None:
            key = checked_key(os.environ[self.api_key_env], self.api_key_env)  # read where the call is made
        if not key:
            if not self.base_url:
                raise openai.OpenAIError(
                    f"no API key: set the {self.api_key_env} environment variable where the worker "
                    "runs, or pass api_key= to OpenAIKit"
                )
            key = NO_KEY_PLACEHOLDER
        return openai.OpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout_s, max_retries=0)

    @property
    def endpoint(self) -> str:
        """Where calls go: the base URL, or OpenAI's own."""
        return self.base_url or DEFAULT_ENDPOINT

    def cache_identity(self) -> dict[str, Any]:
        """Who answers: what the pay-once ledger keys answers by, besides the request itself."""
        return {"provider": "openai", "endpoint": self.endpoint, "model": self.model, "system": self.system_prompt}

    def rate_key(self) -> tuple[str, str]:
        """``(endpoint, key name)``: calls sharing these share one rate limit at the provider."""
        return self.endpoint, self.api_key_env

    def messages_for(self, config: ChatConfig) -> list[dict[str, str]]:
        """System prompt, then history, then the user's message."""
        return chat_messages(self.system_prompt, config)

    def chat(self, config: ChatConfig) -> ChatResponse:
        """One chat completion; provider errors propagate for the worker to classify.

        The raw response is read for its ``x-ratelimit-*`` headers, which the
        fleet's rate governor uses to slow down before the provider says 429.
        """
        body = dict(config.extra)
        if config.output is not None:
            body["response_format"] = config.output.openai_response_format()
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.model,
            messages=self.messages_for(config),  # type: ignore[arg-type]
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            # Provider-specific keys (top_p, seed, response_format, ...) go in
            # the body as given: the SDK would reject unknown keyword arguments.
            extra_body=body or None,
        )
        completion = raw.parse()
        choice = completion.choices[0] if completion.choices else None
        usage = completion.usage.model_dump() if completion.usage else {}
        limits = {k.lower(): v for k, v in raw.headers.items() if k.lower().startswith("x-ratelimit-")}
        return ChatResponse(
            content=choice.message.content if choice else None,
            usage={k: v for k, v in usage.items() if isinstance(v, int)},
            finish_reason=choice.finish_reason if choice else None,
            model=completion.model,
            rate_limits=limits or None,
        )
