"""The Celery app racto_nb builds from its settings (``racto_nb.app`` and ``connect()`` use it).

Your own app works too (``RactoCeleryWorker(app, kit=...)``); this is the app
racto_nb builds when it chooses: JSON only, results kept a week, one message
per free thread, and deadlines on every connection so a dead broker fails a
cell in seconds.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery

from racto_nb.config import (
    ANSWER_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    DEFAULT_WORKER_CONCURRENCY,
    RESULT_EXPIRES_S,
    ConfigError,
    RactoConfig,
    env_name,
    is_embedded_url,
    mask_url,
)

__all__ = ["EMBEDDED_BACKEND", "EMBEDDED_BROKER_URL", "EMBEDDED_TRANSPORT", "build_celery"]

EMBEDDED_BROKER_URL = "memory://"
EMBEDDED_TRANSPORT = "racto_nb.embedded.transport:Transport"
EMBEDDED_BACKEND = "racto_nb.embedded.transport:InProcessBackend"


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
    transport_options: dict[str, Any] = {}
    if broker is not None and broker.startswith(("redis", "rediss", "sentinel")):
        # A refusing broker fails in CONNECT_TIMEOUT_S, a silent one in ANSWER_TIMEOUT_S.
        transport_options.update(socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=ANSWER_TIMEOUT_S)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # One message per free thread: a slow row never holds others hostage in a prefetch buffer.
        worker_prefetch_multiplier=1,
        # `celery -A racto_nb.app worker` with no flags is fit for I/O: LLM calls wait on the network,
        # so a thread each, many per process (--pool / -c still override).
        worker_pool="threads",
        worker_concurrency=DEFAULT_WORKER_CONCURRENCY,
        broker_transport_options=transport_options,
        result_expires=RESULT_EXPIRES_S,
        broker_connection_timeout=CONNECT_TIMEOUT_S,
        broker_connection_retry_on_startup=True,
        redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
        redis_socket_timeout=ANSWER_TIMEOUT_S,
        # Each fleet (RACTO_WORKER_NAME) its own queue: two fleets on one broker never take each other's tasks.
        task_default_queue=f"racto_nb.{cfg.worker_name}",
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
