"""Kits: objects with ``chat(config) -> response``.

The worker talks to every kit through :func:`run_chat`, which hands a kit the
config type it expects (ours, or RactoGateway's for RactoGateway kits) and turns
whatever comes back into a JSON dict, so no provider object ever reaches the
result backend. ``racto_nb.kits.local.LocalKit`` is imported on its own: it
needs the ``local`` extra.
"""

from racto_nb.kits.base import Kit, Rag, run_chat, to_response_dict
from racto_nb.kits.openai import OpenAIKit

__all__ = ["Kit", "OpenAIKit", "Rag", "run_chat", "to_response_dict"]
