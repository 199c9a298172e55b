"""Embedded mode: ``racto_nb.connect()`` with no broker runs a real Celery worker in this process.

Real components throughout: Celery's WorkController with the threads pool,
racto_nb's in-process transport, the OpenAI SDK over HTTP to the fake server,
and (marked slow) SmolLM2 on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import racto_nb
from racto_nb import api
from racto_nb.fleet.connection import connected_worker
from racto_nb.kits import OpenAIKit
from racto_nb.models import ChatConfig, ChatResponse, TaskStatus
from racto_nb.testing import FakeOpenAIServer


class InstantKit:
    def chat(self, config: ChatConfig) -> ChatResponse:
        return ChatResponse(content=f"instant: {config.user_message}")


def embedded_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("racto-embedded")]


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No RACTO_* settings and no racto_nb.toml: 'nothing configured'; always disconnect after."""
    for name in list(os.environ):
        if name.startswith("RACTO_") and name != "RACTO_CHECKPOINT_DIR":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield
    racto_nb.disconnect()


@pytest.fixture
def fake_env(fake_openai: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Configure the kit through the environment, as a user would."""
    monkeypatch.setenv("RACTO_PROVIDER", "openai")
    monkeypatch.setenv("RACTO_MODEL", "fake-model")
    monkeypatch.setenv("RACTO_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("RACTO_TIMEOUT_S", "5")


@pytest.mark.usefixtures("fake_env")
def test_connect_runs_a_100_row_batch_in_process(fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    worker = racto_nb.connect()
    assert isinstance(worker.kit, OpenAIKit) and worker.kit.base_url == fake_openai.base_url
    assert str(worker.app.conf.broker_url).startswith("memory://")
    assert racto_nb.connect() is worker and racto_nb.current_worker() is worker  # idempotent
    assert len(embedded_threads()) == 1

    group = worker.parallel_batch([f"[case:{unique_case}] row {i}" for i in range(100)])
    results = worker.wait_parallel(group, timeout_s=60)

    assert [r.status for r in results] == [TaskStatus.SUCCESS] * 100
    assert results[42].content == f"echo: [case:{unique_case}] row 42"
    assert fake_openai.count(unique_case) == 100

    racto_nb.disconnect()
    assert embedded_threads() == [] and connected_worker() is None


@pytest.mark.usefixtures("fake_env")
def test_retry_countdown_runs_on_the_embedded_worker(
    fake_openai: FakeOpenAIServer, unique_case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RACTO_INITIAL_DELAY_S", "0.1")
    monkeypatch.setenv("RACTO_MAX_DELAY_S", "0.5")
    fake_openai.script(unique_case, ["500", "ok"])
    worker = racto_nb.connect()
    result = worker.wait(worker.generate(f"[case:{unique_case}] hi").id, timeout_s=20)
    assert result.status is TaskStatus.SUCCESS and result.attempts == 2
    assert [r.outcome for r in fake_openai.requests(unique_case)] == ["500", "ok"]


def test_overhead_of_100_instant_rows_is_well_under_a_second() -> None:
    worker = racto_nb.connect(kit=InstantKit())
    worker.wait_parallel(worker.parallel_batch(["warm-up"]), timeout_s=10)
    time.sleep(1.2)  # idle longer than kombu's 1 s poll: the next batch must not wait for it
    started = time.perf_counter()
    results = worker.wait_parallel(worker.parallel_batch([f"row {i}" for i in range(100)]), timeout_s=30)
    elapsed = time.perf_counter() - started
    assert all(r.ok for r in results)
    assert elapsed < 0.5, f"100 instant rows took {elapsed:.2f} s in embedded mode"


def test_reconnect_with_another_kit_replaces_the_worker_thread() -> None:
    first = racto_nb.connect(kit=InstantKit())
    second = racto_nb.connect(kit=InstantKit(), concurrency=2)
    assert second is not first and len(embedded_threads()) == 1
    assert second.wait(second.generate("x").id, timeout_s=10).content == "instant: x"


def test_connect_an_existing_worker_makes_it_current() -> None:
    mine = racto_nb.connect(kit=InstantKit())
    racto_nb.disconnect()
    assert embedded_threads() == []
    assert racto_nb.connect(mine) is mine and racto_nb.current_worker() is mine


def test_results_beyond_the_stock_5000_entry_cache_survive() -> None:
    worker = racto_nb.connect(kit=InstantKit())
    backend = worker.app.backend
    for i in range(6000):
        backend.set(f"k{i}", str(i))
    assert backend.get("k0") == "0" and backend.mget(["k1", "k5999"]) == ["1", "5999"]


def test_results_are_shared_across_threads() -> None:
    worker = racto_nb.connect(kit=InstantKit())
    seen: list[object] = []
    worker.app.backend.set("from-main", "1")
    thread = threading.Thread(target=lambda: seen.append(worker.app.backend.get("from-main")))
    thread.start()
    thread.join()
    assert seen == ["1"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs racto_nb[local]")
def test_default_kit_is_smollm2_on_the_cpu() -> None:
    from racto_nb.kits.local import LocalKit

    worker = racto_nb.connect()
    assert isinstance(worker.kit, LocalKit)
    result = worker.wait(worker.generate("Say hello.", max_tokens=8).id, timeout_s=120)
    assert result.status is TaskStatus.SUCCESS, result.error
    assert result.content and result.result is not None
    assert result.result["model"] == "SmolLM2-135M-Instruct"


def test_ingest_document_fills_the_notebooks_own_rag(tmp_path: Path) -> None:
    from racto_nb.rag import SimpleRAG

    doc = tmp_path / "faq.txt"
    doc.write_text("Shipping takes three days.\n\nReturns are free within thirty days.\n", encoding="utf-8")
    rag = SimpleRAG()
    worker = racto_nb.connect(kit=InstantKit(), rag=rag)
    result = worker.wait(worker.ingest_document(str(doc), topic="faq").id, timeout_s=20)
    assert result.ok and result.result is not None, result.error
    assert [chunk["metadata"]["extra"] for chunk in result.result] == [{"topic": "faq"}] * 2
    assert len(rag) == 2 and "Returns" in rag.search("free returns", k=1)[0]["content"]


def test_a_file_backed_rag_is_shared_between_instances(tmp_path: Path) -> None:
    from racto_nb.rag import SimpleRAG

    writer, reader = SimpleRAG(tmp_path / "store.jsonl"), SimpleRAG(tmp_path / "store.jsonl")
    writer.ingest_text("Kettles boil water.\n\nLamps give light.", source="t")
    assert len(reader) == 2 and reader.search("lamp light", k=1)[0]["content"] == "Lamps give light."
    reader.clear()
    assert len(writer) == 0


def test_plain_celery_get_still_works_in_the_kernel() -> None:
    """The embedded pool must not leave the process flagged as 'inside a task'."""
    worker = racto_nb.connect(kit=InstantKit())
    handle = worker.generate("via celery")
    assert handle.get(timeout=10)["output"]["content"] == "instant: via celery"


@pytest.mark.usefixtures("fake_env")
def test_retry_failed_after_a_new_connect_runs_on_the_new_embedded_worker(
    fake_openai: FakeOpenAIServer, unique_case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RACTO_MAX_RETRIES", "0")
    bad = f"{unique_case}-bad"
    fake_openai.script(bad, ["401"])
    racto_nb.connect()
    run = api.run_batch([f"ok [case:{unique_case}]", f"no [case:{bad}]"], wait=False, progress="none")
    assert run.done.wait(20) and list(run.result()["status"]) == ["success", "failure"]

    racto_nb.disconnect()
    racto_nb.connect()  # a new embedded worker: the old one's in-process queue is gone
    assert run.retry_failed() == 1

    assert run.done.wait(20), "the retried row never ran"
    assert list(run.result()["status"]) == ["success", "success"]


@pytest.mark.usefixtures("fake_env")
def test_a_stop_that_times_out_still_fails_the_queued_rows_and_does_not_hold_connect(
    fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, [], latency_s=3.0)
    worker = racto_nb.connect(concurrency=1)
    run = api.run_batch([f"{i} [case:{unique_case}]" for i in range(40)], wait=False, progress="none")
    deadline = time.monotonic() + 10
    while fake_openai.count(unique_case) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)

    started = time.monotonic()
    racto_nb.connect(kit=InstantKit())  # replaces the busy worker: waits a few seconds at most, not 30
    took = time.monotonic() - started

    assert took < 10, took
    assert run.done.wait(20)
    frame = run.result()
    assert (frame["error_type"] == "EmbeddedStopped").sum() >= 30  # queued rows failed, none left pending
    assert set(frame["status"]) <= {"success", "failure"}
    assert worker is not racto_nb.current_worker()
