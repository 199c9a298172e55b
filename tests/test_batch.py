"""``Batch`` against real components: Redis, a `celery worker --pool threads`, the fake OpenAI server."""

from __future__ import annotations

import gc
import json
import time
from typing import Any

import pandas as pd
import pytest

from racto_nb.batch.batch import Batch
from racto_nb.batch.templates import render_rows
from racto_nb.engine.chunks import rows_per_chunk
from racto_nb.engine.keys import batch_key
from racto_nb.engine.worker import RactoCeleryWorker
from racto_nb.models import TaskStatus
from racto_nb.testing import FakeOpenAIServer, RedisServer
from tests.batch_support import idle_worker, sent_messages, settle_threads, task_meta_channels, worker

__all__ = ["idle_worker", "worker"]  # fixtures, imported for pytest

pytestmark = pytest.mark.slow


def _run(batch: Batch, timeout_s: float = 30.0) -> pd.DataFrame:
    progress = batch.wait(timeout_s=timeout_s, interval_s=0.05)
    assert progress.finished, progress
    return batch.to_frame()


def test_result_frame_is_aligned_to_an_index_with_duplicates(worker: RactoCeleryWorker, unique_case: str) -> None:
    frame = pd.DataFrame({"review": ["good", "bad", "fine", "good"]}, index=[7, 7, 3, 7])
    prompts, reasons = render_rows(f"Rate {{review}} [case:{unique_case}]", frame)
    batch = Batch.submit(worker, prompts, index=frame.index, reasons=reasons)

    result = _run(batch)

    assert result.index.equals(frame.index)
    assert list(result["content"]) == [f"echo: Rate {r} [case:{unique_case}]" for r in frame["review"]]
    assert list(result["status"]) == ["success"] * 4
    assert result["task_id"].is_unique
    assert (result["attempts"] == 1).all()
    assert (result["latency_s"] > 0).all()
    assert (result["total_tokens"] > 0).all() and str(result["total_tokens"].dtype) == "Int64"
    assert list(result.columns[:6]) == ["task_id", "status", "content", "parsed", "error", "error_type"]


def test_multiindex_and_custom_ids_survive(worker: RactoCeleryWorker, unique_case: str) -> None:
    from racto_nb.models import BatchItem

    index = pd.MultiIndex.from_tuples([("a", 1), ("a", 1), ("b", 2)], names=["shop", "day"])
    items = [BatchItem(user_message=f"row {i} [case:{unique_case}]", custom_id=f"id-{i}") for i in range(3)]
    batch = Batch.submit(worker, items, index=index)

    result = _run(batch)

    assert result.index.equals(index) and result.index.names == ["shop", "day"]
    assert list(result["custom_id"]) == ["id-0", "id-1", "id-2"]
    assert result["content"].iloc[2] == f"echo: row 2 [case:{unique_case}]"


def test_skipped_rows_stay_in_the_result_and_are_never_sent(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    frame = pd.DataFrame({"review": ["good", None, float("nan"), "bad"]}, index=list("wxyz"))
    prompts, reasons = render_rows(f"{{review}} [case:{unique_case}]", frame)
    batch = Batch.submit(worker, prompts, index=frame.index, reasons=reasons)

    result = _run(batch)
    progress = batch.refresh()

    assert list(result["status"]) == ["success", "skipped", "skipped", "success"]
    assert result.loc["x", "error"] == "missing value in review; row not sent"
    assert result.loc["x", "error_type"] == "NotSent" and pd.isna(result.loc["x", "task_id"])
    assert progress.total == 2 and progress.count(TaskStatus.SUCCESS) == 2  # skipped rows are not tasks
    sent = sorted(sent_messages(fake_openai, unique_case))
    assert sent == [f"bad [case:{unique_case}]", f"good [case:{unique_case}]"]


def test_cancel_revokes_waiting_tasks_which_then_never_reach_the_server(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, redis_server: RedisServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, [], latency_s=0.8)
    prompts = [f"row {i} [case:{unique_case}]" for i in range(40)]
    batch = Batch.submit(worker, prompts)
    deadline = time.monotonic() + 10
    while batch.refresh().count(TaskStatus.STARTED) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)

    revoked = batch.cancel()
    result = _run(batch)
    time.sleep(1.0)  # long enough for any wrongly started task to reach the server

    assert revoked > 0
    statuses = result["status"].value_counts().to_dict()
    assert 0 < statuses.get("revoked", 0) <= revoked, statuses  # fewer only if a race let one run
    assert set(statuses) <= {"success", "revoked"}
    arrived = set(sent_messages(fake_openai, unique_case))
    revoked_prompts = {prompts[i] for i in range(40) if result["status"].iloc[i] == "revoked"}
    assert not arrived & revoked_prompts, [
        (p, result["status"].iloc[prompts.index(p)], result["error"].iloc[prompts.index(p)]) for p in arrived
    ]
    assert len(arrived) == statuses.get("success", 0)
    assert batch.refresh().cancelled
    assert settle_threads() == [] and task_meta_channels(redis_server) == []


def test_retry_failed_resubmits_into_the_same_result(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    bad = f"{unique_case}-bad"
    fake_openai.script(bad, ["401"])  # 401 is not retried by the worker: the row fails once
    prompts = [f"ok 0 [case:{unique_case}]", f"bad [case:{bad}]", f"ok 2 [case:{unique_case}]"]
    batch = Batch.submit(worker, prompts, index=pd.Index(["a", "b", "c"]))

    first = _run(batch)
    assert list(first["status"]) == ["success", "failure", "success"]
    assert first.loc["b", "status_code"] == 401 and first.loc["b", "error_type"] == "AuthenticationError"
    assert first.loc["b", "attempts"] == 1

    assert batch.retry_failed() == 1
    second = _run(batch)

    assert list(second["status"]) == ["success"] * 3
    assert second.loc["b", "content"] == f"echo: bad [case:{bad}]"
    assert second.loc["b", "task_id"] != first.loc["b", "task_id"]
    assert second.loc["a", "task_id"] == first.loc["a", "task_id"]
    assert fake_openai.count(bad) == 2
    assert batch.retry_failed() == 0
    reattached = Batch.attach(worker, batch.batch_id)  # the manifest follows the new task ids
    assert list(_run(reattached)["task_id"]) == list(second["task_id"])


def test_attach_after_dropping_the_batch_while_it_runs(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, [], latency_s=0.4)
    index = pd.MultiIndex.from_tuples([("x", 1), ("x", 1), ("y", 2), ("z", 3)])
    batch = Batch.submit(worker, [f"row {i} [case:{unique_case}]" for i in range(4)], index=index)
    batch_id, task_ids = batch.batch_id, list(batch.task_ids)
    del batch
    gc.collect()

    running = Batch.attach(worker, batch_id)
    early = running.refresh()
    assert not early.finished and early.total == 4
    final = _run(running)
    later = Batch.attach(worker, batch_id).to_frame()  # a fresh attach, after the end

    assert list(final["task_id"]) == task_ids
    assert final.index.equals(index)
    assert list(final["status"]) == ["success"] * 4
    assert Batch.attach(worker, batch_id).refresh().finished
    assert list(later["task_id"]) == task_ids


def test_attach_unknown_or_foreign_batches_say_what_to_check(
    worker: RactoCeleryWorker, openai_app: Any, unique_case: str
) -> None:
    with pytest.raises(LookupError, match=r"no batch 'nope'.*same result backend"):
        Batch.attach(worker, "nope")
    batch = Batch.submit(worker, [f"x [case:{unique_case}]"])
    with pytest.raises(LookupError, match="worker named 'default', not 'b'"):
        Batch.attach(openai_app.worker_b, batch.batch_id)
    batch.join_publisher()


def test_refresh_reads_what_changed_and_cancel_reaches_unsent_rows(
    idle_worker: RactoCeleryWorker, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = Batch.submit(idle_worker, [f"row {i}" for i in range(2500)])
    assert batch.join_publisher(timeout_s=30)
    backend = idle_worker.app.backend
    store = batch.store
    calls: list[int] = []
    real_mget = store.mget

    def counting_mget(keys: list[Any]) -> Any:
        calls.append(len(keys))
        return real_mget(keys)

    monkeypatch.setattr(store, "mget", counting_mget)

    progress = batch.refresh()

    assert calls == []  # nothing changed: no row is read, however many wait
    assert progress.count(TaskStatus.PENDING) == 2500 and progress.submitted == 2500
    assert batch.cancel() == 2500
    after = batch.wait(timeout_s=5, interval_s=0.05)
    assert after.finished and after.count(TaskStatus.REVOKED) == 2500
    calls.clear()
    batch.refresh()
    assert calls == []  # final rows are never read again
    assert task_meta_channels(redis_server) == []
    del backend


def test_submit_validates_everything_before_sending(idle_worker: RactoCeleryWorker, redis_server: RedisServer) -> None:
    client = redis_server.client()
    before = set(client.keys("racto:batch:*"))
    with pytest.raises(ValueError, match="no rows"):
        Batch.submit(idle_worker, [])
    with pytest.raises(ValueError, match="nothing to send"):
        Batch.submit(idle_worker, [None, None], reasons=["gap", "gap"])
    with pytest.raises(ValueError):
        Batch.submit(idle_worker, ["fine", ""])  # an empty message is invalid: nothing is sent
    with pytest.raises(ValueError, match="index has 1 entries for 2 prompts"):
        Batch.submit(idle_worker, ["a", "b"], index=pd.Index([1]))
    assert set(client.keys("racto:batch:*")) == before
    client.close()


def test_manifest_is_small_json_and_holds_what_attach_needs(idle_worker: RactoCeleryWorker) -> None:
    index = pd.date_range("2026-01-01", periods=2, tz="UTC", name="when")
    batch = Batch.submit(idle_worker, ["a", None], index=index, reasons=[None, "gap"], background=False)
    raw = idle_worker.app.backend.get(batch_key(batch.batch_id))
    manifest = json.loads(raw)

    assert manifest["worker"] == "default" and manifest["rows"] == 2 and manifest["rounds"] == 1
    assert manifest["checkpoint"] == str(batch.checkpoint.path) and len(raw) < 2_000
    again = Batch.attach(idle_worker, batch.batch_id)
    assert again.index.equals(index) and again.index.name == "when"
    frame = again.to_frame()
    assert list(frame["status"]) == ["pending", "skipped"] and frame["error"].iloc[1] == "gap"
    batch.cancel()


def test_rows_the_broker_never_took_fail_and_can_be_retried(
    worker: RactoCeleryWorker, unique_case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import racto_nb.engine.publish as publish_module
    import racto_nb.engine.worker as worker_module

    real_publish = publish_module.publish_many

    def broker_down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Error 111 connecting to the broker")

    monkeypatch.setattr(worker_module, "publish_many", broker_down)
    monkeypatch.setattr(Batch, "publish_budget_s", 0.5)
    batch = Batch.submit(worker, [f"row {i} [case:{unique_case}]" for i in range(3)], background=False)
    first = _run(batch, timeout_s=5)  # ends: never sent is failed, not pending forever
    assert set(first["error_type"]) == {"SubmitError"}
    assert isinstance(batch.publish_error, ConnectionError)

    monkeypatch.setattr(worker_module, "publish_many", real_publish)
    assert batch.retry_failed(background=False) == 3
    assert set(_run(batch)["status"]) == {"success"}


def test_an_index_that_cannot_come_back_unchanged_is_refused_before_sending(
    worker: RactoCeleryWorker, redis_server: RedisServer
) -> None:
    queued = redis_server.client().llen(worker.queue)
    with pytest.raises(ValueError, match="reset_index"):
        Batch.submit(worker, ["a", "b", "c"], index=pd.interval_range(0, 3))
    assert redis_server.client().llen(worker.queue) == queued


def test_a_window_bounds_what_is_out_and_the_publisher_refills_it(
    idle_worker: RactoCeleryWorker,
    worker: RactoCeleryWorker,
    redis_server: RedisServer,
    fake_openai: FakeOpenAIServer,
    unique_case: str,
) -> None:
    """Redis holds the window, not the batch: what a million-row batch relies on, at 3,000 rows and a window of 300."""
    waiting = Batch.submit(idle_worker, [f"row {i}" for i in range(3000)], window=300)
    assert waiting.join_publisher(timeout_s=30)  # the window is full: the publisher rests
    client = redis_server.client()
    assert waiting.refresh().submitted == 300
    assert client.llen(unique_case) == 100  # 3 rows per message, nothing more in the queue
    waiting.cancel()

    batch = Batch.submit(worker, [f"row {i} [case:{unique_case}]" for i in range(3000)], window=300)
    most_out = 0
    while not (progress := batch.refresh()).finished:
        most_out = max(most_out, (progress.submitted or 0) - progress.done)
        time.sleep(0.01)
    frame = batch.to_frame()

    assert 0 < most_out <= 300 + rows_per_chunk(3000) - 1  # a chunk is sent whole once there is room for a row
    assert (frame["status"] == "success").all() and len(frame) == 3000
    assert list(frame["content"]) == [f"echo: row {i} [case:{unique_case}]" for i in range(3000)]
    assert len(sent_messages(fake_openai, unique_case)) == 3000  # each row sent once
    client.close()


def test_a_batch_that_stands_still_says_so_and_a_running_one_does_not(
    idle_worker: RactoCeleryWorker,
    worker: RactoCeleryWorker,
    fake_openai: FakeOpenAIServer,
    unique_case: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows waiting in a queue nobody takes from look like a slow batch; after a while the note tells them apart."""
    monkeypatch.setattr("racto_nb.batch.batch.STANDSTILL_S", 0.5)
    waiting = Batch.submit(idle_worker, [f"row {i}" for i in range(10)])
    assert waiting.join_publisher(timeout_s=30)
    assert waiting.refresh().note is None
    time.sleep(0.6)
    note = waiting.refresh().note
    assert note is not None and "nothing has moved" in note and "10 rows wait" in note and "%racto_status" in note
    waiting.cancel()
    assert waiting.wait(timeout_s=5, interval_s=0.05).note is None  # cancelled: nothing is expected to move

    monkeypatch.setattr("racto_nb.batch.batch.STANDSTILL_S", 3.0)  # far above how long a free worker takes a row
    fake_openai.script(unique_case, [], latency_s=1.0)
    running = Batch.submit(worker, [f"slow {i} [case:{unique_case}]" for i in range(12)])
    notes = []
    while not (progress := running.refresh()).finished:
        notes.append(progress.note)
        time.sleep(0.05)
    assert notes and all(n is None for n in notes)  # 1 s calls, then 1 s more of them: never a standstill
