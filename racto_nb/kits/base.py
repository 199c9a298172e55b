"""The kit and RAG protocols, and the bridge from a worker's JSON payload to a kit call."""

from __future__ import annotations

import enum
import json
from typing import Any, Protocol, runtime_checkable

from racto_nb.errors import InvalidSource
from racto_nb.models import ChatConfig, ChatResponse


@runtime_checkable
class Kit(Protocol):
    """Anything that answers a chat: racto_nb kits, RactoGateway kits, your own.

    ``config`` is a :class:`~racto_nb.models.ChatConfig` (or RactoGateway's own,
    for its kits); the answer may be a ``ChatResponse``, any pydantic model with
    its fields, a dict or a plain string (see :func:`to_response_dict`).
    """

    def chat(self, config: Any) -> Any: ...


@runtime_checkable
class Rag(Protocol):
    """Anything that ingests a document for retrieval: ``ingest(path, **metadata)`` returns its chunks."""

    def ingest(self, path: str, **metadata: Any) -> Any: ...


def require_kit(kit: object, what: str = "kit") -> Kit:
    """``kit`` if it has ``chat(config)``, else a one-line error naming what it is instead."""
    if not isinstance(kit, Kit):
        raise InvalidSource(f"{what} must have a chat(config) method; got {type(kit).__name__}")
    return kit


def require_rag(rag: object | None) -> Rag | None:
    """``rag`` (or ``None``) if it has ``ingest(path, **metadata)``, else a one-line error."""
    if rag is not None and not isinstance(rag, Rag):
        raise InvalidSource(f"rag must have an ingest(path, **metadata) method; got {type(rag).__name__}")
    return rag


def chat_messages(system_prompt: str | None, config: ChatConfig) -> list[dict[str, str]]:
    """System prompt, then history, then the user's message, as role/content dicts.

    A history that opens with its own system message (a per-call system
    prompt) replaces the kit's: many chat templates reject two.
    """
    history = [{"role": m.role, "content": m.content} for m in config.history]
    own_system = bool(history) and history[0]["role"] == "system"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt and not own_system else []
    return [*messages, *history, {"role": "user", "content": config.user_message}]


def run_chat(kit: Kit, config: ChatConfig) -> dict[str, Any]:
    """Call ``kit.chat`` with the config type it understands and return JSON.

    With structured output asked for (``config.output``) and a kit that does
    not say it constrains its replies (``constrains_output = True``, as
    ``OpenAIKit`` and ``LocalKit`` do), the prompt is told what to reply with;
    the reply is checked by the caller either way.
    """
    if config.output is not None and not getattr(kit, "constrains_output", False):
        told = f"{config.user_message}\n\n{config.output.instruction()}"
        config = config.model_copy(update={"user_message": told})
    return to_response_dict(kit.chat(_config_for(kit, config)))


def _config_for(kit: Kit, config: ChatConfig) -> Any:
    # RactoGateway kits type-check their input against their own ChatConfig;
    # ours is field-compatible, so re-validating its dump is a faithful copy.
    if type(kit).__module__.startswith("ractogateway."):
        from ractogateway._models.chat import ChatConfig as RGChatConfig

        return RGChatConfig.model_validate(config.model_dump(exclude={"output"}))
    return config


_RESPONSE_FIELDS = tuple(ChatResponse.model_fields)


def to_response_dict(response: Any) -> dict[str, Any]:
    """Keep the response's JSON fields; drop the raw provider object.

    Accepts our ``ChatResponse``, RactoGateway's ``LLMResponse``, any pydantic
    model, a dict, or a bare string.
    """
    if isinstance(response, str):
        data: dict[str, Any] = {"content": response}
    elif isinstance(response, dict):
        data = dict(response)
    elif hasattr(response, "model_dump"):
        data = response.model_dump(mode="json", exclude={"raw"})
    else:
        raise TypeError(f"kit.chat() returned {type(response).__name__}; return a ChatResponse, a dict or a str")
    out = {name: _jsonable(data.get(name)) for name in _RESPONSE_FIELDS}
    if out["parsed"] is None and isinstance(out["content"], str):
        out["parsed"] = parse_json_content(out["content"])
    if not isinstance(out["usage"], dict):
        out["usage"] = {}
    if not out["rate_limits"]:
        del out["rate_limits"]  # only for the governor, and only when the provider sent them
    return out


def parse_json_content(content: str) -> dict[str, Any] | list[Any] | None:
    """The content as JSON when it is a JSON object or array, else ``None``."""
    text = content.strip()
    if not text or text[0] not in "[{":
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    return value
