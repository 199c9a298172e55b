"""The generic worker app: ``celery -A racto_nb.app worker --pool threads -c 32``.

A notebook cannot be imported by a worker, so its kit cannot reach one by
closure. This module builds the app and the kit from configuration
(``RACTO_*`` variables or ``racto_nb.toml``, see :mod:`racto_nb.config`)
instead: any machine with the same configuration runs the same tasks
(``racto_nb.<RACTO_WORKER_NAME>.generate``), each reading its API key from
its own environment.

Importing is cheap and connects nowhere: Celery connects on first use and
the local model loads on its first call.

``connect``, ``current_worker`` and ``disconnect`` are re-exported for
``from racto_nb.app import connect``; they live in :mod:`racto_nb.fleet.connection`
so that ``import racto_nb`` works even where this module's default kit could
not be built.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import celeryd_init, worker_ready

from racto_nb.config import build_retry, env_name, load_config, mask_url
from racto_nb.engine.celery_app import build_celery
from racto_nb.engine.spending import SpendSettings
from racto_nb.engine.worker import RactoCeleryWorker
from racto_nb.fleet.connection import connect, current_worker, disconnect
from racto_nb.kits.factory import build_kit, build_rag

__all__ = ["app", "config", "connect", "current_worker", "disconnect", "worker"]

logger = logging.getLogger(__name__)

config = load_config()
app = build_celery(config)
worker = RactoCeleryWorker(
    app,
    kit=build_kit(config),
    rag=build_rag(config),
    retry_config=build_retry(config),
    name=config.worker_name,
    stale_after_s=config.visibility_timeout_s,
    spending=SpendSettings.from_config(config),
)


@celeryd_init.connect  # type: ignore[untyped-decorator]
def _refuse_embedded_cli_worker(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """A CLI worker on the in-process transport would wait forever for tasks nobody can send it."""
    if getattr(instance, "app", None) is app and config.embedded:
        # SystemExit, not an exception: Celery logs and swallows exceptions from signal handlers.
        raise SystemExit(
            f"racto_nb.app: no broker is configured, so this worker could never receive a task. Set "
            f"{env_name('broker_url')}=redis://HOST:6379/0 (the same value the notebook uses) and "
            "start the worker again"
        )


@worker_ready.connect  # type: ignore[untyped-decorator]
def _log_kit(sender: Any = None, **kwargs: Any) -> None:
    if sender is not None and getattr(sender, "app", None) is app:
        logger.info(
            "racto_nb worker %r ready: broker %s, kit %r",
            config.worker_name,
            mask_url(config.broker_url),
            worker.kit,
        )
