"""One place that says where tasks go and which model runs them.

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
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from racto_nb.models import RetryConfig

if TYPE_CHECKING:
    from celery import Celery

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "CONFIG_FILE_NAME",
    "ENV_PREFIX",
    "ConfigError",
    "RactoConfig",
    "build_celery",
    "build_kit",
    "build_rag",
    "build_retry",
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
#: An unreachable broker must fail a notebook cell in seconds, not hang it.
CONNECT_TIMEOUT_S = 2.0
EMBEDDED_BROKER_URL = "memory://"
EMBEDDED_TRANSPORT = "racto_nb.memory:Transport"
EMBEDDED_BACKEND = "racto_nb.memory:InProcessBackend"


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names the variable (or file key) to fix."""


def mask_url(url: str | None) -> str | None:
    """``url`` with any password replaced by ``***``, for logs, errors and status views."""
    return None if url is None else _PASSWORD_IN_URL.sub(r"\1***@", url)


def env_name(field: str) -> str:
    """The environment variable for a field: ``timeout_s`` -> ``RACTO_TIMEOUT_S``."""
    return ENV_PREFIX + field.upper()


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
    timeout_s: float = Field(default=60.0, gt=0, description="HTTP timeout of one model call.")
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
    visibility_timeout_s: float = Field(
        default=3600.0, gt=0, description="Redis/SQS redelivery time of an unacknowledged task."
    )

    @field_validator("broker_url", "result_backend", "base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(f"{value!r} is not a URL (expected scheme://..., e.g. redis://127.0.0.1:6379/0)")
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
        if not _WORKER_NAME.match(value):
            raise ValueError(f"{value!r} must be letters, digits, '-' or '_'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RactoConfig:
        if self.effective_provider == "openai" and not self.model:
            raise ValueError(
                f"{env_name('model')} is required for the openai provider, e.g. gpt-4o-mini "
                "(or the model name your OpenAI-compatible server serves)"
            )
        if self.max_delay_s is not None and self.max_delay_s >= self.visibility_timeout_s:
            raise ValueError(
                f"{env_name('max_delay_s')}={self.max_delay_s:g} must be below "
                f"{env_name('visibility_timeout_s')}={self.visibility_timeout_s:g}: a retry waiting that "
                "long is redelivered by Redis and runs twice"
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


# --------------------------------------------------------------------------- building


def build_retry(cfg: RactoConfig) -> RetryConfig:
    """The retry policy; fields not configured keep ``RetryConfig``'s defaults."""
    fields = ("max_retries", "initial_delay_s", "backoff_factor", "max_delay_s")
    given = {name: getattr(cfg, name) for name in fields if getattr(cfg, name) is not None}
    try:
        return RetryConfig(**given)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, given, {name: env_name(name) for name in given})) from None


def build_kit(cfg: RactoConfig) -> Any:
    """The kit the configuration names. Cheap: no model is loaded, no key read, no connection made."""
    if cfg.effective_provider == "openai":
        from racto_nb.kits.openai import OpenAIKit

        assert cfg.model is not None  # checked by the model validator
        return OpenAIKit(
            cfg.model,
            base_url=cfg.base_url,
            system_prompt=cfg.system_prompt,
            timeout_s=cfg.timeout_s,
            api_key_env=cfg.api_key_env,
        )
    from racto_nb.kits.local import SMOLLM2_MODEL, LocalKit

    model_path = cfg.model if cfg.model and cfg.model != SMOLLM2_MODEL else None
    try:
        return LocalKit(model_path=model_path, system_prompt=cfg.system_prompt)
    except ImportError as exc:
        raise ImportError(
            f"{exc}. Or use a hosted model instead: set {env_name('provider')}=openai and "
            f"{env_name('model')}=<model name> (plus {env_name('base_url')} for a non-OpenAI server)"
        ) from None


def build_rag(cfg: RactoConfig) -> Any | None:
    """The RAG object ``cfg.rag`` names (its factory called once), or ``None`` when unset."""
    if cfg.rag is None:
        return None
    import importlib

    module_name, _, attribute = cfg.rag.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{env_name('rag')}={cfg.rag!r} cannot be imported: {exc}") from None
    # A class or a factory is called; an object that already has ingest() is used as it is.
    rag = target() if isinstance(target, type) or not callable(getattr(target, "ingest", None)) else target
    if not callable(getattr(rag, "ingest", None)):
        raise ConfigError(f"{env_name('rag')}={cfg.rag!r} gave {type(rag).__name__}, which has no ingest(path)")
    return rag


def build_celery(cfg: RactoConfig, *, broker_url: str | None = None, result_backend: str | None = None) -> Celery:
    """A Celery app for ``cfg`` (``broker_url``/``result_backend`` override it).

    No broker means embedded: racto_nb's in-process transport (which wakes a
    waiting worker at once instead of polling every second) and an in-process
    result backend. Nothing connects here; Celery connects on first use.
    """
    from celery import Celery

    broker = broker_url or cfg.broker_url
    embedded = is_embedded_url(broker)
    if embedded:
        backend: str | None = EMBEDDED_BACKEND
    else:
        assert broker is not None
        backend = result_backend or cfg.result_backend or _default_backend(broker)
    # Not "current": building racto_nb's app must not change which app a notebook's own Celery code uses.
    app = Celery("racto_nb", broker=EMBEDDED_BROKER_URL if embedded else broker, backend=backend, set_as_current=False)
    transport_options: dict[str, Any] = {"visibility_timeout": cfg.visibility_timeout_s}
    if broker is not None and broker.startswith(("redis", "rediss", "sentinel")):
        transport_options.update(socket_connect_timeout=CONNECT_TIMEOUT_S)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # One message per free thread: a slow row never holds others hostage in a prefetch buffer.
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options,
        result_backend_transport_options={"visibility_timeout": cfg.visibility_timeout_s},
        result_expires=RESULT_EXPIRES_S,
        broker_connection_timeout=CONNECT_TIMEOUT_S,
        broker_connection_retry_on_startup=True,
        redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
        # Publishing to a dead broker gives up after about a second instead of retrying on.
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 0.5,
        },
    )
    if embedded:
        app.conf.broker_transport = EMBEDDED_TRANSPORT
        # The in-process queues are shared by the whole process: a queue of its
        # own keeps a later connect()'s worker (another kit) from running this
        # app's rows and writing their results where this app never looks.
        app.conf.task_default_queue = f"racto-embedded-{uuid.uuid4().hex[:12]}"
    return app


def _default_backend(broker: str) -> str:
    if broker.startswith(("redis://", "rediss://", "sentinel://")):
        return broker
    raise ConfigError(
        f"the broker {mask_url(broker)} cannot store results: set {env_name('result_backend')} "
        "(e.g. redis://127.0.0.1:6379/0), or use a Redis broker"
    )
