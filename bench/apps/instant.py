"""racto_nb's worker with a kit that answers at once: the engine's own cost per row, no model, no HTTP.

Configured like :mod:`racto_nb.app` (``RACTO_BROKER_URL`` and the rest), so a
notebook's ``racto_nb.connect(url)`` sends it the same tasks.
"""

from __future__ import annotations

from racto_nb.config import build_retry, load_config
from racto_nb.engine.celery_app import build_celery
from racto_nb.engine.worker import RactoCeleryWorker
from racto_nb.models import ChatConfig


class InstantKit:
    """Answers every chat with ``ok`` in no time: a 0 ms model."""

    def chat(self, config: ChatConfig) -> str:
        return "ok"


config = load_config()
app = build_celery(config)
worker = RactoCeleryWorker(
    app,
    kit=InstantKit(),
    retry_config=build_retry(config),
    name=config.worker_name,
    stale_after_s=config.visibility_timeout_s,
)
