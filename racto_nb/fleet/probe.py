"""Is the broker there? Answer within a deadline, whatever the network does.

A notebook cell that hangs on a dead broker is worse than one that fails:
the user cannot tell "slow" from "never". Connection timeouts cover refused
and unroutable connections, but not a peer that accepts TCP and then says
nothing (a half-dead server, a proxy, a firewall). So every probe also runs in
a daemon thread with a hard deadline; a probe that overruns is abandoned and
reported, and its thread ends on its own socket timeout.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery

from racto_nb.config import BROKER_ANSWER_TIMEOUT_S, is_embedded_url
from racto_nb.engine.store import broker_unreachable_message
from racto_nb.errors import BrokerUnreachable

__all__ = [
    "broker_unreachable_message",
    "call_with_deadline",
    "check_broker",
    "connect_once",
    "queue_depth",
]

T = TypeVar("T")


def call_with_deadline(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """``fn()``, or ``TimeoutError`` naming ``what`` if it takes longer than ``timeout_s``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"racto-probe:{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def connect_once(app: Celery) -> float:
    """Open a connection and a channel once, no retries; return the seconds it took."""
    started = time.perf_counter()
    with app.connection_for_write() as conn:
        # One try, no back-off: Celery's default retries would turn a refused
        # connection into seconds of silence.
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, interval_max=0)
        conn.default_channel  # noqa: B018 - opening a channel is the real round trip on Redis
    return time.perf_counter() - started


def check_broker(app: Celery, timeout_s: float = BROKER_ANSWER_TIMEOUT_S) -> float:
    """Connect to ``app``'s broker once; return the latency in seconds.

    Raises:
        ConnectionError: within ``timeout_s``, naming the URL (password masked) and the fix.
    """
    url = str(app.conf.broker_url)
    if is_embedded_url(url):
        return 0.0
    try:
        return call_with_deadline(lambda: connect_once(app), timeout_s, "the broker")
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        raise BrokerUnreachable(broker_unreachable_message(url, reason)) from None


def queue_depth(app: Celery, queue: str | None = None) -> int:
    """Messages waiting in ``queue`` (default: the app's default queue), not yet taken by a worker.

    A passive declare works on every transport: Redis and the in-process
    transport count their lists, RabbitMQ answers with ``message_count``. A
    queue nobody declared yet has no messages.
    """
    name = queue or str(app.conf.task_default_queue)
    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, interval_max=0)
        channel = conn.channel()
        try:
            return int(channel.queue_declare(queue=name, passive=True).message_count)
        except conn.channel_errors:
            return 0
        finally:
            # After a 404 the channel is already closed by the broker.
            with contextlib.suppress(Exception):
                channel.close()
