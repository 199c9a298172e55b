"""Settings: where tasks go, which model runs them, and the defaults every layer shares.

The notebook and every ``celery -A racto_nb.app worker`` read the same
settings, so a fleet of machines runs the kit the notebook expects without
any code shipped to it. Settings come from, lowest precedence first:

1. the defaults below;
2. a TOML file: the one named by ``RACTO_CONFIG``, else ``./racto_nb.toml``
   if it exists (top-level keys named like the fields, e.g. ``model = "..."``);
3. ``RACTO_*`` environment variables (``RACTO_MODEL``, ``RACTO_TIMEOUT_S``, ...).

Secrets are never configuration. The API key stays in the environment of the
process that makes the call, under the variable ``api_key_env`` names
(``OPENAI_API_KEY`` by default); what travels, in this object or through the
broker, is only that variable's *name*. There is deliberately no
``RACTO_API_KEY``: a key in a config file ends up in git, and a key in a task
ends up in Redis.

Only settings live here: :mod:`racto_nb.engine.celery_app` builds the Celery
app from them and :mod:`racto_nb.kits.factory` the kit and the RAG object.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from racto_nb.errors import ConfigError
from racto_nb.models import RetryConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ANSWER_TIMEOUT_S",
    "BROKER_ANSWER_TIMEOUT_S",
    "BROKER_SCHEMES",
    "CONFIG_FILE_NAME",
    "DEFAULT_CACHE_MAX_ENTRIES",
    "DEFAULT_CACHE_TTL_S",
    "DEFAULT_CALL_TIMEOUT_S",
    "DEFAULT_CHECKPOINT_DIR",
    "DEFAULT_EMBEDDED_CONCURRENCY",
    "DEFAULT_MAX_PROMPT_CHARS",
    "DEFAULT_PUBLISH_WINDOW",
    "DEFAULT_STALE_AFTER_S",
    "DEFAULT_WORKER_CONCURRENCY",
    "ENV_PREFIX",
    "ConfigError",
    "RactoConfig",
    "build_retry",
    "check_broker_url",
    "check_worker_name",
    "env_name",
    "is_embedded_url",
    "load_config",
    "mask_url",
]

ENV_PREFIX = "RACTO_"
CONFIG_ENV = "RACTO_CONFIG"
CONFIG_FILE_NAME = "racto_nb.toml"
#: Variables that look like settings but would hold a secret: refused with a pointer to the right place.
_SECRET_ENV_NAMES = ("RACTO_API_KEY", "RACTO_OPENAI_API_KEY", "RACTO_KEY")
_SECRET_FILE_KEYS = ("api_key", "key", "openai_api_key", "secret")
_ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WORKER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_PASSWORD_IN_URL = re.compile(r"(://[^:/@;]*:)[^@;]*@")

#: Seven days: ``PENDING`` means "unknown id" as well as "waiting", so results
#: must outlive any batch a user might come back to (Celery's default is 1 day).
RESULT_EXPIRES_S = 7 * 24 * 3600
#: An unreachable broker must fail a notebook cell in seconds, not hang it: a refusing one within this...
CONNECT_TIMEOUT_S = 2.0
#: ...and one that accepts the connection and then says nothing, within this.
ANSWER_TIMEOUT_S = 5.0
#: A worker that stopped renewing its claim on a task for this long is dead: the task goes to a live worker.
#: Live workers renew every third of it, however long their calls or retry countdowns take.
DEFAULT_STALE_AFTER_S = 30.0
#: How long a broker may take to answer a probe before ``connect()`` or ``status()`` says it is unreachable.
BROKER_ANSWER_TIMEOUT_S = 5.0
#: HTTP timeout of one model call (``OpenAIKit``, ``RACTO_TIMEOUT_S``).
DEFAULT_CALL_TIMEOUT_S = 60.0
#: Where batches keep their local checkpoint: beside the notebook (the kernel's working directory).
DEFAULT_CHECKPOINT_DIR = ".racto"
#: Rows a batch keeps sent and unfinished at most: Redis holds a window, not the batch.
DEFAULT_PUBLISH_WINDOW = 100_000
#: A prompt longer than this is refused before anything is sent.
DEFAULT_MAX_PROMPT_CHARS = 1_000_000
#: How long the pay-once ledger keeps an answer, and how many answers it keeps at most (oldest dropped first).
DEFAULT_CACHE_TTL_S = 30 * 24 * 3600.0
DEFAULT_CACHE_MAX_ENTRIES = 250_000
#: Threads of the embedded (in-kernel) worker: calls in flight inside the kernel.
DEFAULT_EMBEDDED_CONCURRENCY = 32
#: Threads of each worker process (``celery -A racto_nb.app worker``, ``%racto_workers start``): calls in flight.
DEFAULT_WORKER_CONCURRENCY = 256


def check_worker_name(name: str, what: str = "name") -> str:
    """A worker name becomes part of task names (``racto_nb.<name>.generate``): letters, digits, ``-``, ``_``."""
    if not isinstance(name, str) or not _WORKER_NAME.match(name):
        raise ConfigError(f"{what} must be letters, digits, '-' or '_' (got {name!r})")
    return name


def mask_url(url: str | None) -> str | None:
    """``url`` with any password replaced by ``***``, for logs, errors and status views."""
    return None if url is None else _PASSWORD_IN_URL.sub(r"\1***@", url)


def env_name(field: str) -> str:
    """The environment variable for a field: ``timeout_s`` -> ``RACTO_TIMEOUT_S``."""
    return ENV_PREFIX + field.upper()


#: The broker schemes racto_nb works with (Celery's names): Redis, RabbitMQ, and the embedded ``memory://``.
BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel", "amqp", "amqps", "pyamqp", "memory")


def check_broker_url(url: str, what: str = "broker URL") -> str:
    """``url``, or a one-line ``ConfigError`` that says what is wrong with it and the URL probably meant."""
    shown = mask_url(url) or ""
    scheme, sep, rest = url.partition("://")
    if not sep:
        near = re.match(r"^([A-Za-z+]+):?/{0,2}(.*)$", url)
        fixed = f"{near.group(1)}://{near.group(2)}" if near and near.group(1) in BROKER_SCHEMES else None
        hint = f"did you mean {mask_url(fixed)}?" if fixed else "e.g. redis://127.0.0.1:6379/0"
        raise ConfigError(f"{what} {shown!r} is not a URL (scheme://host:port/...): {hint}")
    if scheme.lower() in ("http", "https"):
        raise ConfigError(
            f"{what} {shown!r} is a web address, not a broker: use redis://HOST:6379/0 or amqp://HOST:5672//"
        )
    if scheme.lower() not in BROKER_SCHEMES:
        close = difflib.get_close_matches(scheme.lower(), BROKER_SCHEMES, n=1, cutoff=0.5)
        hint = f"did you mean {mask_url(close[0] + '://' + rest)}?" if close else "use redis:// or amqp://"
        raise ConfigError(f"{what} {shown!r}: unknown scheme {scheme!r}; {hint}")
    return url


def is_embedded_url(url: str | None) -> bool:
    """No broker, or ``memory://``: tasks run in a worker thread inside this process."""
    return url is None or url.startswith("memory://")


class RactoConfig(BaseModel):
    """Broker, result backend, kit and retry policy; never a secret.

    Optional retry fields left unset take :class:`~racto_nb.RetryConfig`'s
    defaults, so there is one source of truth for the schedule.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    broker_url: str | None = Field(
        default=None, description="redis://, amqp://, ...; unset means embedded (in-process) mode."
    )
    result_backend: str | None = Field(
        default=None, description="Where results live; defaults to the broker URL when it is Redis."
    )
    provider: Literal["local", "openai"] | None = Field(
        default=None,
        description="'local' (SmolLM2 on the CPU) or 'openai' (any OpenAI-compatible server). "
        "Unset: 'openai' when base_url is set, else 'local'.",
    )
    model: str | None = Field(
        default=None, description="Model name (openai) or path of a GGUF file (local; default SmolLM2)."
    )
    base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint, e.g. http://host/v1.")
    api_key_env: str = Field(
        default="OPENAI_API_KEY", description="NAME of the env var holding the key, read on each worker."
    )
    system_prompt: str | None = None
    timeout_s: float = Field(default=DEFAULT_CALL_TIMEOUT_S, gt=0, description="HTTP timeout of one model call.")
    max_retries: int | None = Field(default=None, ge=0)
    initial_delay_s: float | None = Field(default=None, gt=0)
    backoff_factor: float | None = Field(default=None, gt=1.0)
    max_delay_s: float | None = Field(default=None, gt=0)
    worker_name: str = Field(default="default", description="Task names are racto_nb.<worker_name>.*")
    rag: str | None = Field(
        default=None,
        description="'module:callable' returning the RAG object workers use for ingest_document, "
        "e.g. racto_nb.rag:from_config; unset means ingest_document is refused.",
    )
    rag_path: str | None = Field(
        default=None, description="File racto_nb.rag.from_config() stores chunks in (shared on one machine)."
    )
    checkpoint_dir: str = Field(
        default=DEFAULT_CHECKPOINT_DIR,
        description="Folder of the batches' local checkpoints (inputs, index, results as Parquet).",
    )
    publish_window: int = Field(
        default=DEFAULT_PUBLISH_WINDOW, ge=0, description="Rows a batch keeps sent and unfinished at most; 0: all."
    )
    max_prompt_chars: int = Field(default=DEFAULT_MAX_PROMPT_CHARS, gt=0, description="Longest prompt sent.")
    rpm: float | None = Field(default=None, gt=0, description="Requests per minute the whole fleet may send.")
    tpm: float | None = Field(default=None, gt=0, description="Tokens per minute the whole fleet may send.")
    price_in_per_mtok: float | None = Field(default=None, ge=0, description="Dollars per million input tokens.")
    price_out_per_mtok: float | None = Field(default=None, ge=0, description="Dollars per million output tokens.")
    cache_ttl_s: float = Field(default=DEFAULT_CACHE_TTL_S, gt=0, description="How long the ledger keeps an answer.")
    cache_max_entries: int = Field(default=DEFAULT_CACHE_MAX_ENTRIES, gt=0, description="Answers the ledger keeps.")
    visibility_timeout_s: float = Field(
        default=DEFAULT_STALE_AFTER_S,
        gt=0,
        description="Seconds after which a task held by a worker that stopped answering runs on a live worker.",
    )

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_broker_url(value, "URL")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(f"{value!r} is not a URL (expected scheme://..., e.g. http://127.0.0.1:8000/v1)")
        return value

    @field_validator("rag")
    @classmethod
    def _import_path(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[\w.]+:[\w.]+$", value):
            raise ValueError(f"{value!r} must be 'module:callable', e.g. racto_nb.rag:from_config")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _key_name(cls, value: str) -> str:
        if not _ENV_VAR_NAME.match(value):
            # Most likely the key itself was pasted here; do not echo it back.
            raise ValueError(
                "must be the NAME of an environment variable (e.g. OPENAI_API_KEY), not the key itself; "
                "put the key in that variable on each worker"
            )
        return value

    @field_validator("worker_name")
    @classmethod
    def _worker_name(cls, value: str) -> str:
        try:
            return check_worker_name(value, repr(value))
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _consistent(self) -> RactoConfig:
        if self.effective_provider == "openai" and not self.model:
            raise ValueError(
                f"{env_name('model')} is required for the openai provider, e.g. gpt-4o-mini "
                "(or the model name your OpenAI-compatible server serves)"
            )
        return self

    @property
    def effective_provider(self) -> Literal["local", "openai"]:
        """The provider in use: explicit, else ``openai`` if a base URL is set, else ``local``."""
        if self.provider is not None:
            return self.provider
        return "openai" if self.base_url else "local"

    @property
    def embedded(self) -> bool:
        """``True`` when no broker is configured: tasks run inside this process."""
        return is_embedded_url(self.broker_url)

    def describe(self) -> dict[str, Any]:
        """Settings for display, URLs with passwords masked."""
        data = self.model_dump()
        data["broker_url"] = mask_url(self.broker_url)
        data["result_backend"] = mask_url(self.result_backend)
        data["provider"] = self.effective_provider
        return data

    def __repr_args__(self) -> Any:
        # The repr is what lands in tracebacks and notebook outputs: mask passwords.
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if name in ("broker_url", "result_backend") else value


# --------------------------------------------------------------------------- loading


def load_config(environ: Mapping[str, str] | None = None, *, path: str | Path | None = None) -> RactoConfig:
    """Read the TOML file (if any) and ``RACTO_*`` variables; env wins.

    Args:
        environ: Variables to read (default ``os.environ``); tests pass a dict.
        path: TOML file to read instead of ``RACTO_CONFIG`` / ``./racto_nb.toml``.

    Raises:
        ConfigError: naming the variable or file key that is wrong.
    """
    env = os.environ if environ is None else environ
    for name in _SECRET_ENV_NAMES:
        if env.get(name):
            raise ConfigError(
                f"{name} is set, but racto_nb never reads a key from its own settings (it would travel "
                f"with the configuration). Put the key in OPENAI_API_KEY, or in the variable "
                f"{env_name('api_key_env')} names, on each worker, and unset {name}"
            )
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    file_path = _config_path(env, path)
    if file_path is not None:
        for key, value in _read_toml(file_path).items():
            values[key] = value
            sources[key] = f"{file_path}: {key}"
    for field in RactoConfig.model_fields:
        raw = env.get(env_name(field))
        if raw is not None and raw.strip() != "":
            values[field] = raw.strip() if field != "system_prompt" else raw
            sources[field] = env_name(field)
    try:
        return RactoConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, values, sources)) from None


def _config_path(env: Mapping[str, str], path: str | Path | None) -> Path | None:
    if path is not None:
        named, why = Path(path), "path="
    elif env.get(CONFIG_ENV):
        named, why = Path(env[CONFIG_ENV]), CONFIG_ENV
    else:
        default = Path.cwd() / CONFIG_FILE_NAME
        return default if default.is_file() else None
    if not named.expanduser().is_file():
        raise ConfigError(f"{why} names {str(named)!r}, which is not a file; fix the path or unset {why}")
    return named.expanduser()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    table = data.get("racto_nb", data)  # a [racto_nb] table or top-level keys
    secret = [key for key in table if key.lower() in _SECRET_FILE_KEYS]
    if secret:
        raise ConfigError(
            f"{path}: {secret[0]!r} looks like a secret; keys never go in the config file. Set "
            "api_key_env to the NAME of an environment variable and put the key in that variable"
        )
    unknown = sorted(set(table) - set(RactoConfig.model_fields))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known keys: {sorted(RactoConfig.model_fields)}")
    return dict(table)


def _explain(exc: ValidationError, values: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if field in sources:
            shown = "" if field == "api_key_env" else f"={values[field]!r}"
            lines.append(f"{sources[field]}{shown}: {message}")
        elif field:
            lines.append(f"{env_name(field)}: {message}")
        else:
            lines.append(message)
    return "invalid racto_nb configuration:\n  " + "\n  ".join(lines)


def build_retry(cfg: RactoConfig) -> RetryConfig:
    """The retry policy; fields not configured keep ``RetryConfig``'s defaults."""
    fields = ("max_retries", "initial_delay_s", "backoff_factor", "max_delay_s")
    given = {name: getattr(cfg, name) for name in fields if getattr(cfg, name) is not None}
    try:
        return RetryConfig(**given)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, given, {name: env_name(name) for name in given})) from None
