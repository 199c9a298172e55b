"""Test helpers for racto_nb, shipped with the package so users can use them too.

Like ``celery.contrib.testing``, these exist so that tests of code *built on*
racto_nb can run against real processes and real HTTP instead of mocks:

* :class:`FakeOpenAIServer` / :class:`FakeOpenAIControl`: an OpenAI-compatible
  HTTP server with scripted faults (500s, 429s with ``Retry-After``, hangs,
  dropped connections), reached by the real ``openai`` SDK.
* :class:`RedisServer`: a throwaway ``redis-server`` for broker and backend.
* :func:`free_port`: a TCP port for anything else that needs one.

Exports are loaded lazily so that ``python -m racto_nb.testing.openai_server``
does not import its own module twice (and so ``redis`` is only imported by
those who ask for :class:`RedisServer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from racto_nb.lazy import lazy_attributes
from racto_nb.testing._net import free_port

if TYPE_CHECKING:
    from racto_nb.testing.openai_server import (
        FakeOpenAIControl,
        FakeOpenAIServer,
        Fault,
        RecordedRequest,
    )
    from racto_nb.testing.redis_server import RedisServer

__all__ = [
    "FakeOpenAIControl",
    "FakeOpenAIServer",
    "Fault",
    "RecordedRequest",
    "RedisServer",
    "free_port",
]

__getattr__, __dir__ = lazy_attributes(__name__, {
    "FakeOpenAIControl": "racto_nb.testing.openai_server",
    "FakeOpenAIServer": "racto_nb.testing.openai_server",
    "Fault": "racto_nb.testing.openai_server",
    "RecordedRequest": "racto_nb.testing.openai_server",
    "RedisServer": "racto_nb.testing.redis_server",
})
