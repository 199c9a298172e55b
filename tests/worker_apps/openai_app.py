"""Celery app imported by BOTH the test process and the `celery worker` processes.

This is the seed's pattern: kits are captured by closure, so client and worker
import the same module. Everything that differs per run (broker, backend, fake
server URL, queue) comes from the environment. The API key is set only in the
worker's environment: the client never has it.

``register(app)`` builds the same workers on any app, so a test can make a
client-side app for another broker (RabbitMQ, a private Redis) whose task names
match what the worker processes run.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from celery import Celery

from racto_nb import RactoCeleryWorker, RetryConfig
from racto_nb.kits import OpenAIKit

OPENAI_URL = os.environ["RACTO_TEST_OPENAI_URL"]

#: Short delays keep the suite fast; the schedule's shape is what is under test.
RETRY = RetryConfig(max_retries=3, initial_delay_s=0.2, backoff_factor=2.0, max_delay_s=2.0)


def make_app(broker: str, backend: str, *, queue: str = "celery", visibility_s: float = 3600.0) -> Celery:
    app = Celery("racto_test", broker=broker, backend=backend)
    app.conf.update(
        # kombu sweeps for messages of dead workers every interval x throttle
        # seconds (10 x 10 by default); sweep every second so tests stay short.
        broker_transport_options={
            "visibility_timeout": visibility_s,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        task_default_queue=queue,
    )
    return app


class CrashKit:
    """Kills its own worker process mid-call: a stand-in for an OOM kill."""

    def chat(self, config: Any) -> str:
        os.kill(os.getpid(), signal.SIGKILL)
        return "unreachable"


def make_rag() -> Any:
    """RactoGateway's real RAG pipeline: in-memory store, OpenAI embedder on the fake server."""
    from ractogateway.rag import RactoRAG
    from ractogateway.rag.embedders import OpenAIEmbedder
    from ractogateway.rag.stores import InMemoryVectorStore

    return RactoRAG(vector_store=InMemoryVectorStore(), embedder=OpenAIEmbedder(base_url=OPENAI_URL))


def make_ractogateway_kit() -> Any:
    """RactoGateway's own OpenAI kit, unchanged, pointed at the fake server."""
    from ractogateway import openai_developer_kit as gpt
    from ractogateway.prompts.engine import RactoPrompt

    prompt = RactoPrompt(
        role="Tester", aim="Echo", constraints=["Be brief"], tone="plain", output_format="text"
    )
    return gpt.OpenAIDeveloperKit(model="rg-model", base_url=OPENAI_URL, default_prompt=prompt)


def register(app: Celery) -> dict[str, RactoCeleryWorker]:
    """The same workers on any app; each name's queue is under the app's own queue, so tests stay apart."""
    timeout_s = float(os.environ.get("RACTO_TEST_TIMEOUT_S", "2"))
    stale_s = float(os.environ.get("RACTO_TEST_STALE_S", "30"))
    kit_a = OpenAIKit("model-a", base_url=OPENAI_URL, timeout_s=timeout_s)
    kit_b = OpenAIKit("model-b", base_url=OPENAI_URL, system_prompt="You are kit B.", timeout_s=timeout_s)
    base = app.conf.task_default_queue

    def make(name: str, kit: Any, **options: Any) -> RactoCeleryWorker:
        return RactoCeleryWorker(
            app, kit=kit, name=name, queue=f"{base}.{name}", retry_config=RETRY, stale_after_s=stale_s, **options
        )

    return {
        "default": make("default", kit_a, rag=make_rag()),
        "b": make("b", kit_b),
        "rg": make("rg", make_ractogateway_kit()),
        "crash": make("crash", CrashKit(), max_redeliveries=1),
    }


app = make_app(
    os.environ["RACTO_TEST_BROKER"],
    os.environ["RACTO_TEST_BACKEND"],
    queue=os.environ.get("RACTO_TEST_QUEUE", "celery"),
    visibility_s=float(os.environ.get("RACTO_TEST_VISIBILITY_S", "3600")),
)
workers = register(app)
worker = workers["default"]
worker_b = workers["b"]
