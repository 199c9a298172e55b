"""The kit and the RAG object that racto_nb's settings name.

``racto_nb.app`` (every worker process) and ``connect()`` (the notebook) build
them here from the same :class:`~racto_nb.config.RactoConfig`, so a fleet runs
the kit the notebook expects. Building is cheap: no model is loaded, no key is
read and nothing connects until the first call.
"""

from __future__ import annotations

import importlib
from typing import Any

from racto_nb.config import RactoConfig, env_name
from racto_nb.errors import ConfigError, KitUnavailable
from racto_nb.kits.base import Kit, Rag

__all__ = ["build_kit", "build_rag"]


def build_kit(cfg: RactoConfig) -> Kit:
    """The kit the configuration names: ``OpenAIKit`` for ``openai``, ``LocalKit`` for ``local``."""
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
    except KitUnavailable as exc:
        raise KitUnavailable(
            f"{exc}. Or use a hosted model instead: set {env_name('provider')}=openai and "
            f"{env_name('model')}=<model name> (plus {env_name('base_url')} for a non-OpenAI server)"
        ) from None


def build_rag(cfg: RactoConfig) -> Rag | None:
    """The RAG object ``cfg.rag`` names (its factory called once), or ``None`` when unset."""
    if cfg.rag is None:
        return None
    module_name, _, attribute = cfg.rag.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{env_name('rag')}={cfg.rag!r} cannot be imported: {exc}") from None
    # A class or a factory is called; an object that already has ingest() is used as it is.
    rag = target() if isinstance(target, type) or not callable(getattr(target, "ingest", None)) else target
    if not isinstance(rag, Rag):
        raise ConfigError(f"{env_name('rag')}={cfg.rag!r} gave {type(rag).__name__}, which has no ingest(path)")
    return rag
