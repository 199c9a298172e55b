"""Helpers shared by the batch, API and magics tests (fixtures are re-exported by importing them)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from racto_nb.engine.worker import RactoCeleryWorker
from racto_nb.kits import OpenAIKit
from racto_nb.testing import FakeOpenAIServer, RedisServer

#: Threads racto_nb's notebook layer starts; none may outlive its batch.
RACTO_THREADS = ("racto-watch-", "racto-publish-", "racto-task-")


def racto_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(RACTO_THREADS)]


def settle_threads(timeout_s: float = 5.0) -> list[str]:
    """The racto threads still alive after giving finishing ones ``timeout_s`` to exit."""
    deadline = time.monotonic() + timeout_s
    while racto_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    return racto_threads()


def sent_messages(server: FakeOpenAIServer, case: str) -> list[str]:
    """The user messages the fake server received for ``case``, in arrival order."""
    texts = []
    for request in server.requests(case):
        messages = request.body.get("messages") or []
        texts.append(str(messages[-1]["content"]) if messages else "")
    return texts


def stored_values(server: RedisServer) -> Iterator[tuple[bytes, bytes]]:
    """``(key, value)`` for every value in ``server``: strings, list items, hash values, stream entries."""
    client = server.client()
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            values: list[bytes]
            if kind == b"string":
                values = [cast(bytes, client.get(key) or b"")]
            elif kind == b"list":
                values = cast(list[bytes], client.lrange(key, 0, -1))
            elif kind == b"hash":
                values = list(cast(dict[bytes, bytes], client.hgetall(key)).values())
            elif kind == b"stream":
                values = [str(entry).encode() for entry in client.xrange(key) or []]
            else:
                values = []
            for value in values:
                yield key, value
    finally:
        client.close()


def task_meta_channels(redis_server: RedisServer) -> list[bytes]:
    """Pub/sub channels of result keys: one would mean a per-task subscription was left behind."""
    client = redis_server.client()
    try:
        return cast(list[bytes], client.pubsub_channels("celery-task-meta-*"))
    finally:
        client.close()


@pytest.fixture
def worker(openai_app: Any, engine_worker: Any) -> RactoCeleryWorker:
    """The client side of the session's real `celery worker --pool threads` process."""
    live: RactoCeleryWorker = openai_app.worker
    return live


@pytest.fixture
def idle_worker(
    redis_server: RedisServer, fake_openai: FakeOpenAIServer, openai_app: Any, unique_case: str
) -> Iterator[Any]:
    """A worker whose queue nobody consumes: its tasks stay PENDING until revoked.

    ``openai_app`` is the app module, imported once its environment is set (no worker process starts).
    """
    app = openai_app.make_app(redis_server.url, redis_server.url, queue=unique_case)
    yield RactoCeleryWorker(app, kit=OpenAIKit("idle-model", base_url=fake_openai.base_url), queue=unique_case)
    client = redis_server.client()
    client.delete(unique_case)
    client.close()
    app.close()
