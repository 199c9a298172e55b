"""``connect()``: which workers this kernel's tasks go to.

Three modes, one code path (see DESIGN.md):

* **embedded** (nothing configured): a thread-pool Celery worker inside this
  process on racto_nb's in-process transport, running the configured kit, or
  SmolLM2 on the CPU when none is. A fresh notebook needs no Redis and no key.
* **local / fleet** (``connect("redis://...")`` or ``RACTO_BROKER_URL``): tasks
  go to a broker; ``celery -A racto_nb.app worker`` processes, here or on other
  machines, run them with the kit *their* configuration names. Nothing is
  started here, but the broker is checked: a dead one fails in seconds.
* **your own worker** (``connect(worker)``): any ``RactoCeleryWorker``, e.g.
  one built on your Celery app with a kit captured by closure.

The functions are plain so the magics (and scripts) can call them; state is
one module-level "current worker", guarded by a lock.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from racto_nb.config import (
    BROKER_ANSWER_TIMEOUT_S,
    DEFAULT_EMBEDDED_CONCURRENCY,
    RactoConfig,
    build_retry,
    check_broker_url,
    is_embedded_url,
    load_config,
)
from racto_nb.embedded.worker import EmbeddedWorker
from racto_nb.engine.celery_app import EMBEDDED_BROKER_URL, build_celery
from racto_nb.engine.spending import SpendSettings
from racto_nb.engine.worker import RactoCeleryWorker
from racto_nb.errors import EmbeddedError, InvalidSource, KitUnavailable
from racto_nb.fleet.probe import check_broker
from racto_nb.kits.base import Kit, Rag
from racto_nb.kits.factory import build_kit, build_rag
from racto_nb.models import RetryConfig

__all__ = ["ClientOnlyKit", "connect", "connected_worker", "current_worker", "disconnect", "embedded_gone"]

logger = logging.getLogger(__name__)

#: How long a replaced embedded worker may take to finish its running calls before connect() goes on.
EMBEDDED_STOP_S = 5.0

_lock = threading.RLock()
_current: RactoCeleryWorker | None = None
_current_key: tuple[Any, ...] | None = None
_embedded: EmbeddedWorker | None = None


class ClientOnlyKit:
    """Placeholder kit for a notebook that only sends tasks to remote workers.

    Used when the configured kit cannot be built here (e.g. the local model's
    packages are installed on the workers only). Workers never see it: each
    builds its own kit from its own configuration.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return "ClientOnlyKit(workers build their kit from their own configuration)"

    def chat(self, config: Any) -> Any:
        raise RuntimeError(
            f"this process only sends tasks; it could not build the configured kit ({self.reason}). "
            "Run tasks on `celery -A racto_nb.app worker` processes, or install the kit's packages here"
        )


def connect(
    target: str | RactoCeleryWorker | None = None,
    *,
    kit: Kit | None = None,
    rag: Rag | None = None,
    retry_config: RetryConfig | None = None,
    concurrency: int = DEFAULT_EMBEDDED_CONCURRENCY,
    timeout_s: float = BROKER_ANSWER_TIMEOUT_S,
    result_backend: str | None = None,
) -> RactoCeleryWorker:
    """Make a worker current for this kernel and return it.

    Args:
        target: ``None`` (use the configuration: embedded when no broker is
            set), a broker URL (``redis://...``, ``amqp://...``, ``memory://``
            for embedded), or a ``RactoCeleryWorker`` to use as it is.
        kit: Kit for the new worker (default: the configured kit). In broker
            mode the remote workers still run *their* configured kit.
        rag: Object with ``ingest(path, **metadata)`` for ``ingest_document``
            (default: the one ``RACTO_RAG`` names, if any). In embedded mode
            the chunks land in this very object; remote workers use their own
            ``RACTO_RAG``.
        retry_config: Retry policy (default: the configured one).
        concurrency: Threads of the embedded worker.
        timeout_s: How long the broker may take to answer before
            ``ConnectionError``.
        result_backend: Where results live, for a broker URL that cannot
            hold them (``amqp://``); default ``RACTO_RESULT_BACKEND``, else the
            broker URL itself when it is Redis.

    Calling it again with the same target and no ``kit``/``rag``/``retry_config``
    returns the same running worker. Switching targets stops the embedded
    worker this module started, if any.

    Raises:
        ConnectionError: the broker did not answer within ``timeout_s``.
        racto_nb.config.ConfigError: a ``RACTO_*`` setting is invalid.
        ImportError: the default local kit needs ``pip install 'racto_nb[local]'``.
    """
    with _lock:
        if isinstance(target, RactoCeleryWorker):
            _replace(target, ("worker", id(target)), None)
            return target
        if target is not None and not isinstance(target, str):
            raise InvalidSource(f"connect() takes a broker URL or a RactoCeleryWorker, not {type(target).__name__}")
        if target:
            check_broker_url(target)
        cfg = load_config()
        url = target or cfg.broker_url
        embedded = is_embedded_url(url)
        # The settings are part of the key: a changed RACTO_MODEL (or config file) means a new kit, not the old one.
        settings = cfg.model_dump_json()
        key: tuple[Any, ...] = (
            ("embedded", concurrency, settings) if embedded else ("broker", url, result_backend, settings)
        )
        overrides = kit is not None or rag is not None or retry_config is not None
        reusable = _current is not None and _current_key == key and not overrides
        if reusable and (_embedded is None or _embedded.is_alive()):
            assert _current is not None
            return _current
        if embedded:
            # Stop the old embedded worker first: both would consume the same in-process queue.
            _drop_embedded()
            worker, runner = _start_embedded(cfg, kit, rag, retry_config, concurrency)
        else:
            assert url is not None
            worker = _connect_broker(cfg, url, result_backend, kit, rag, retry_config, timeout_s)
            runner = None
        _replace(worker, key, runner)
        return worker


def current_worker() -> RactoCeleryWorker:
    """The current worker; the first call connects as ``connect()`` would."""
    with _lock:
        return _current if _current is not None else connect()


def embedded_gone(worker: RactoCeleryWorker) -> bool:
    """``worker`` ran on an embedded worker that has since stopped (a later ``connect()`` replaced it).

    Its in-process queue went with it: work sent through it now would never run.
    """
    if not is_embedded_url(str(worker.app.conf.broker_url or "") or None):
        return False
    with _lock:
        return _embedded is None or _embedded.app is not worker.app or not _embedded.is_alive()


def connected_worker() -> RactoCeleryWorker | None:
    """The current worker, or ``None`` when nothing is connected yet (never connects)."""
    return _current


def disconnect(timeout_s: float = 30.0) -> None:
    """Forget the current worker; stop the embedded worker thread if this module started one.

    Tasks already running finish first (warm shutdown). Safe to call when not connected.
    """
    global _current, _current_key, _embedded
    with _lock:
        runner, _embedded = _embedded, None
        _current, _current_key = None, None
    if runner is not None:
        runner.stop(timeout_s=timeout_s)  # outside the lock: connect() elsewhere need not wait for it


def _replace(worker: RactoCeleryWorker, key: tuple[Any, ...], runner: EmbeddedWorker | None) -> None:
    global _current, _current_key, _embedded
    if _embedded is not None and _embedded is not runner:
        _stop_quietly(_embedded)
    _current, _current_key, _embedded = worker, key, runner


def _drop_embedded() -> None:
    global _current, _current_key, _embedded
    old, _embedded, _current, _current_key = _embedded, None, None, None
    if old is not None:
        _stop_quietly(old)


def _stop_quietly(runner: EmbeddedWorker) -> None:
    """Stop a replaced embedded worker without holding the kernel: a call still running finishes on its own."""
    try:
        runner.stop(timeout_s=EMBEDDED_STOP_S)
    except EmbeddedError as exc:
        logger.warning("racto_nb: %s", exc)


def _start_embedded(
    cfg: RactoConfig, kit: Kit | None, rag: Rag | None, retry_config: RetryConfig | None, concurrency: int
) -> tuple[RactoCeleryWorker, EmbeddedWorker]:
    app = build_celery(cfg, broker_url=EMBEDDED_BROKER_URL)
    worker = RactoCeleryWorker(
        app,
        kit=build_kit(cfg) if kit is None else kit,
        rag=build_rag(cfg) if rag is None else rag,
        retry_config=retry_config or build_retry(cfg),
        name=cfg.worker_name,
        queue=str(app.conf.task_default_queue),  # this app's own in-process queue
        spending=SpendSettings.from_config(cfg),
    )
    runner = EmbeddedWorker(app, concurrency=concurrency).start()
    return worker, runner


def _connect_broker(
    cfg: RactoConfig,
    url: str,
    result_backend: str | None,
    kit: Kit | None,
    rag: Rag | None,
    retry_config: RetryConfig | None,
    timeout_s: float,
) -> RactoCeleryWorker:
    backend = result_backend or cfg.result_backend
    if not result_backend and url != cfg.broker_url and url.startswith(("redis://", "rediss://")):
        backend = None  # another Redis than configured: keep results next to its tasks
    app = build_celery(cfg, broker_url=url, result_backend=backend)
    check_broker(app, timeout_s)
    if kit is None:
        try:
            kit = build_kit(cfg)
        except KitUnavailable as exc:
            kit = ClientOnlyKit(str(exc).split(".")[0])
    retry = retry_config or build_retry(cfg)
    rag = build_rag(cfg) if rag is None else rag
    return RactoCeleryWorker(
        app,
        kit=kit,
        rag=rag,
        retry_config=retry,
        name=cfg.worker_name,
        stale_after_s=cfg.visibility_timeout_s,
        spending=SpendSettings.from_config(cfg),
    )
