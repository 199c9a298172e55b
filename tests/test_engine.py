"""The engine against real components: Redis, `celery worker` processes, the OpenAI SDK.

Every test here pins a behaviour the first implementation we measured got
wrong (see shared/DESIGN.md); each would fail on that behaviour.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, cast
from uuid import uuid4

import pytest
from celery import Celery

from racto_nb import BatchItem, RactoCeleryWorker, RetryConfig, TaskResult, TaskStatus
from racto_nb.fleet.processes import WorkerProcess
from racto_nb.kits import OpenAIKit
from racto_nb.models import ChatConfig
from racto_nb.testing import FakeOpenAIServer, RedisServer
from tests.batch_support import stored_values
from tests.conftest import WORKER_API_KEY

pytestmark = pytest.mark.usefixtures("engine_worker")


def poll_until(worker: RactoCeleryWorker, task_id: str, wanted: TaskStatus, timeout_s: float = 10) -> TaskResult:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = worker.get_result(task_id)
        if result.status is wanted:
            return result
        time.sleep(0.01)
    raise AssertionError(f"{task_id} never reached {wanted}; last {worker.get_result(task_id)}")


# ---------------------------------------------------------------- generate


def test_generate_returns_json_response(openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    handle = openai_app.worker.generate(f"hello [case:{unique_case}]", temperature=0.3, max_tokens=50)
    result = openai_app.worker.wait(handle.id, timeout_s=10)

    assert result.ok and result.status is TaskStatus.SUCCESS
    assert result.result["content"] == f"echo: hello [case:{unique_case}]"
    assert result.result["usage"]["total_tokens"] > 0
    assert result.result["model"] == "model-a" and result.result["finish_reason"] == "stop"
    assert set(result.result) == {"content", "parsed", "usage", "finish_reason", "model"}  # no raw object
    assert result.attempts == 1 and result.latency_s is not None
    (request,) = fake_openai.requests(unique_case)
    assert request.body["temperature"] == 0.3 and request.body["max_tokens"] == 50
    assert request.authorization == f"Bearer {WORKER_API_KEY}"  # the worker's own key


def test_json_content_is_parsed(openai_app: Any, unique_case: str) -> None:
    result = openai_app.worker.wait(openai_app.worker.generate(f"[json] [case:{unique_case}]").id, timeout_s=10)
    assert result.result["parsed"] == {"echo": f"[json] [case:{unique_case}]"}


def test_history_and_extra_reach_the_provider(openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    handle = openai_app.worker.generate(f"now [case:{unique_case}]", history=history, extra={"top_p": 0.5})
    assert openai_app.worker.wait(handle.id, timeout_s=10).ok
    body = fake_openai.requests(unique_case)[0].body
    assert [m["content"] for m in body["messages"]] == ["earlier", "reply", f"now [case:{unique_case}]"]
    assert body["top_p"] == 0.5


def test_bad_input_fails_before_enqueue(openai_app: Any) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        openai_app.worker.generate("")
    with pytest.raises(ValidationError):
        openai_app.worker.generate("hi", temperature=-1)
    with pytest.raises(ValidationError):
        openai_app.worker.generate("hi", history=[{"role": "wizard", "content": "x"}])
    with pytest.raises(TypeError, match="JSON-serialisable"):
        openai_app.worker.generate("hi", extra={"when": object()})


# ---------------------------------------------------------------- retries


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_request_errors_are_not_retried(
    openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str, status: int
) -> None:
    fake_openai.script(unique_case, [str(status)])
    result = openai_app.worker.wait(openai_app.worker.generate(f"x [case:{unique_case}]").id, timeout_s=10)

    assert result.status is TaskStatus.FAILURE
    assert result.status_code == status and result.attempts == 1
    assert "not retried" in (result.error or "")
    assert fake_openai.count(unique_case) == 1


@pytest.mark.parametrize(("failures", "expected_requests"), [(1, 2), (3, 4), (6, 4)])
def test_transient_errors_cost_exactly_min_n_max_retries_plus_one(
    openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str, failures: int, expected_requests: int
) -> None:
    fake_openai.script(unique_case, ["500"] * failures)
    result = openai_app.worker.wait(openai_app.worker.generate(f"x [case:{unique_case}]").id, timeout_s=20)

    assert fake_openai.count(unique_case) == expected_requests  # no SDK retries multiplied in
    assert result.attempts == expected_requests
    if failures <= 3:
        assert result.ok
    else:
        assert result.status is TaskStatus.FAILURE and result.status_code == 500
        assert result.error_type == "InternalServerError" and "gave up after 4 attempts" in (result.error or "")


def test_backoff_schedule_is_followed(openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    fake_openai.script(unique_case, ["503", "502", "504"])
    assert openai_app.worker.wait(openai_app.worker.generate(f"x [case:{unique_case}]").id, timeout_s=20).ok
    times = [r.arrived_at for r in fake_openai.requests(unique_case)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.2 s, 0.4 s, 0.8 s (RETRY in tests/worker_apps/openai_app.py), never less.
    for gap, planned in zip(gaps, [0.2, 0.4, 0.8], strict=True):
        assert planned - 0.02 <= gap < planned + 1.0


def test_retry_after_is_honoured(openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    fake_openai.script(unique_case, ["429:1.5"])
    assert openai_app.worker.wait(openai_app.worker.generate(f"x [case:{unique_case}]").id, timeout_s=20).ok
    first, second = (r.arrived_at for r in fake_openai.requests(unique_case))
    assert second - first >= 1.45  # the backoff alone would have waited 0.2 s


def test_retry_after_is_capped_at_max_delay(openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    fake_openai.script(unique_case, ["503:600"])
    assert openai_app.worker.wait(openai_app.worker.generate(f"x [case:{unique_case}]").id, timeout_s=20).ok
    first, second = (r.arrived_at for r in fake_openai.requests(unique_case))
    assert 1.9 <= second - first < 4.0  # max_delay_s=2, not ten minutes


def test_timeouts_are_retried(openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    fake_openai.script(unique_case, ["hang:5"])  # past the kit's 2 s HTTP timeout
    result = openai_app.worker.wait(openai_app.worker.generate(f"x [case:{unique_case}]").id, timeout_s=20)
    assert result.ok and result.attempts == 2
    assert fake_openai.count(unique_case) == 2


# ---------------------------------------------------------------- states and waiting


def test_started_and_retry_are_reported(openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    fake_openai.script(unique_case, ["500"], latency_s=0.5)
    handle = openai_app.worker.generate(f"x [case:{unique_case}]")

    started = poll_until(openai_app.worker, handle.id, TaskStatus.STARTED)
    assert started.attempts == 1
    retrying = poll_until(openai_app.worker, handle.id, TaskStatus.RETRY)
    assert retrying.attempts == 1 and retrying.max_retries == 3
    assert retrying.status_code == 500 and retrying.error_type == "InternalServerError"
    assert retrying.retry_in_s is not None and 0 <= retrying.retry_in_s <= 0.2
    again = poll_until(openai_app.worker, handle.id, TaskStatus.STARTED)
    assert again.attempts == 2
    assert openai_app.worker.wait(handle.id, timeout_s=10).ok


def test_wait_timeout_keeps_the_real_status(openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    fake_openai.script(unique_case, [], latency_s=1.5)  # under the kit's 2 s HTTP timeout
    handle = openai_app.worker.generate(f"x [case:{unique_case}]")
    poll_until(openai_app.worker, handle.id, TaskStatus.STARTED)

    began = time.monotonic()
    result = openai_app.worker.wait(handle.id, timeout_s=0.5)
    waited = time.monotonic() - began

    assert 0.5 <= waited < 0.6
    assert result.status is TaskStatus.STARTED  # not FAILURE: the task is running
    assert result.error_type == "WaitTimeout" and "still started" in (result.error or "")
    assert openai_app.worker.wait(handle.id, timeout_s=10).ok


def test_wait_on_an_unknown_id_is_pending_not_failure(openai_app: Any) -> None:
    result = openai_app.worker.wait("no-such-task", timeout_s=0.2)
    assert result.status is TaskStatus.PENDING and result.error_type == "WaitTimeout"


# ---------------------------------------------------------------- batches


def test_one_failure_never_hides_the_others(openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    fake_openai.script(f"{unique_case}-7", ["401"])
    items = [BatchItem(user_message=f"row {i} [case:{unique_case}-{i}]", custom_id=f"id-{i}") for i in range(20)]
    group = openai_app.worker.parallel_batch(items)
    results = openai_app.worker.wait_parallel(group, timeout_s=20)

    assert [r.index for r in results] == list(range(20))
    assert [r.custom_id for r in results] == [f"id-{i}" for i in range(20)]
    assert [r.status for r in results].count(TaskStatus.SUCCESS) == 19
    assert results[7].status is TaskStatus.FAILURE and results[7].status_code == 401
    for i, result in enumerate(results):
        if i != 7:
            assert result.result["content"] == f"echo: row {i} [case:{unique_case}-{i}]"


def test_wait_parallel_timeout_marks_only_the_cut_off_items(
    openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    fake_openai.script(f"{unique_case}-slow", [], latency_s=1.8)
    items = [f"fast {i} [case:{unique_case}-fast]" for i in range(5)] + [f"slow [case:{unique_case}-slow]"]
    group = openai_app.worker.parallel_batch(items)

    began = time.monotonic()
    results = openai_app.worker.wait_parallel(group, timeout_s=1.0)
    assert time.monotonic() - began < 1.15

    assert all(r.ok for r in results[:5])
    assert results[5].status in (TaskStatus.STARTED, TaskStatus.PENDING)
    assert results[5].error_type == "WaitTimeout"


def test_item_settings_win_over_batch_defaults(
    openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    items = [
        BatchItem(user_message=f"a [case:{unique_case}-a]", temperature=0.0, max_tokens=7, custom_id="zero"),
        BatchItem(user_message=f"b [case:{unique_case}-b]"),
        f"c [case:{unique_case}-c]",
    ]
    group = openai_app.worker.parallel_batch(items, temperature=0.9, max_tokens=99)
    assert all(r.ok for r in openai_app.worker.wait_parallel(group, timeout_s=10))

    body_a, body_b, body_c = (fake_openai.requests(f"{unique_case}-{k}")[0].body for k in "abc")
    assert (body_a["temperature"], body_a["max_tokens"]) == (0.0, 7)  # explicit 0.0 wins
    assert (body_b["temperature"], body_b["max_tokens"]) == (0.9, 99)
    assert (body_c["temperature"], body_c["max_tokens"]) == (0.9, 99)


def test_a_bad_item_enqueues_nothing(openai_app: Any, redis_server: RedisServer) -> None:
    queue_length = redis_server.client().llen("celery")
    with pytest.raises(Exception, match="user_message"):
        openai_app.worker.parallel_batch(["fine", "", "also fine"])
    assert redis_server.client().llen("celery") == queue_length


def test_batch_leaves_no_pubsub_subscription(openai_app: Any, redis_server: RedisServer, unique_case: str) -> None:
    group = openai_app.worker.parallel_batch([f"{i} [case:{unique_case}]" for i in range(50)])
    assert all(r.ok for r in openai_app.worker.wait_parallel(group, timeout_s=10))
    assert redis_server.client().pubsub_channels("celery-task-meta-*") == []


# ---------------------------------------------------------------- kits and workers


def test_two_workers_on_one_app_keep_their_own_kits(
    openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    a = openai_app.worker.wait(openai_app.worker.generate(f"a [case:{unique_case}-a]").id, timeout_s=10)
    b = openai_app.worker_b.wait(openai_app.worker_b.generate(f"b [case:{unique_case}-b]").id, timeout_s=10)
    assert a.result["model"] == "model-a" and not a.result["content"].startswith("[system")
    assert b.result["model"] == "model-b" and b.result["content"].startswith("[system: You are kit B.]")


def test_a_second_kit_under_a_taken_name_is_refused() -> None:
    app = Celery(broker="memory://", backend="cache+memory://")
    first = RactoCeleryWorker(app, kit=OpenAIKit("one"))
    with pytest.raises(ValueError, match="name="):
        RactoCeleryWorker(app, kit=OpenAIKit("two"))
    other = RactoCeleryWorker(app, kit=OpenAIKit("two"), name="two")
    assert first.task.name != other.task.name


def test_ractogateway_kit_works_unchanged(openai_app: Any, unique_case: str) -> None:
    rg = openai_app.workers["rg"]
    result = rg.wait(rg.generate(f"hi [case:{unique_case}]").id, timeout_s=10)
    assert result.ok, result.error
    assert result.result["content"].endswith(f"echo: hi [case:{unique_case}]")
    assert result.result["finish_reason"] == "stop"


def test_ingest_document_with_ractorag(
    openai_app: Any, fake_openai: FakeOpenAIServer, tmp_path: Any, unique_case: str
) -> None:
    document = tmp_path / "notes.txt"
    document.write_text(f"Celery runs tasks. [case:{unique_case}]\n\nRedis stores results.\n")
    result = openai_app.worker.wait(openai_app.worker.ingest_document(str(document), source="t").id, timeout_s=15)

    assert result.ok, result.error
    assert isinstance(result.result, list) and result.result
    chunk = result.result[0]
    assert "Celery runs tasks" in chunk["content"] and chunk["metadata"]["extra"]["source"] == "t"
    assert fake_openai.count(unique_case) >= 1  # embeddings went to the test server


def test_ingest_without_rag_fails_at_once() -> None:
    app = Celery(broker="memory://", backend="cache+memory://")
    worker = RactoCeleryWorker(app, kit=OpenAIKit("m"))
    with pytest.raises(RuntimeError, match="rag="):
        worker.ingest_document("notes.txt")


def test_no_secret_in_the_broker_or_backend(openai_app: Any, redis_server: RedisServer, unique_case: str) -> None:
    group = openai_app.worker.parallel_batch([f"{i} [case:{unique_case}]" for i in range(5)])
    openai_app.worker.wait_parallel(group, timeout_s=10)
    for key, value in stored_values(redis_server):
        assert WORKER_API_KEY.encode() not in value, key


# ---------------------------------------------------------------- crashes and other brokers


@pytest.fixture
def private_redis() -> Any:
    with RedisServer() as server:
        yield server


def private_worker(app_env: dict[str, str], repo_root: Any, **kwargs: Any) -> WorkerProcess:
    return WorkerProcess(
        "tests.worker_apps.openai_app:app",
        concurrency=kwargs.pop("concurrency", 1),
        env={**app_env, "OPENAI_API_KEY": WORKER_API_KEY},
        cwd=repo_root,
        **kwargs,
    )


@pytest.mark.slow
def test_a_task_survives_a_sigkilled_worker(
    openai_app: Any,
    private_redis: RedisServer,
    fake_openai: FakeOpenAIServer,
    worker_env: dict[str, str],
    repo_root: Any,
    unique_case: str,
) -> None:
    """Late acknowledgement: the message stays in Redis's unacked set and the sweep of a live worker hands it back.

    It waits for the dead worker's claim to go stale (3 s here; 30 s by default).
    """
    env = {
        **worker_env,
        "RACTO_TEST_BROKER": private_redis.url,
        "RACTO_TEST_BACKEND": private_redis.url,
        "RACTO_TEST_STALE_S": "3",
        "RACTO_TEST_TIMEOUT_S": "10",  # the 2 s call must not also time out (the apps' default is 2 s: a race)
    }
    client_app = openai_app.make_app(private_redis.url, private_redis.url, visibility_s=3)
    client = openai_app.register(client_app)["default"]
    fake_openai.script(unique_case, [], latency_s=2)

    doomed = private_worker(env, repo_root).start()
    handle = client.generate(f"x [case:{unique_case}]")
    poll_until(client, handle.id, TaskStatus.STARTED)
    deadline = time.monotonic() + 10
    while fake_openai.count(unique_case) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the call is in flight at the provider: now kill its worker
    doomed.kill()

    with private_worker(env, repo_root):
        result = client.wait(handle.id, timeout_s=30)
    assert result.ok, result
    assert fake_openai.count(unique_case) == 2  # the killed call, then the redelivered one


@pytest.mark.slow
def test_redelivery_is_bounded(
    openai_app: Any, private_redis: RedisServer, worker_env: dict[str, str], repo_root: Any
) -> None:
    """A task that kills every worker that runs it fails after max_redeliveries, not never."""
    env = {
        **worker_env,
        "RACTO_TEST_BROKER": private_redis.url,
        "RACTO_TEST_BACKEND": private_redis.url,
        "RACTO_TEST_STALE_S": "3",
    }
    client_app = openai_app.make_app(private_redis.url, private_redis.url, visibility_s=3)
    crash = openai_app.register(client_app)["crash"]  # max_redeliveries=1
    handle = crash.generate("poison")

    deadline = time.monotonic() + 60
    while not crash.get_result(handle.id).status.is_final and time.monotonic() < deadline:
        process = private_worker(env, repo_root).start()
        while process.is_alive() and not crash.get_result(handle.id).status.is_final:
            time.sleep(0.1)
        process.stop()
    result = crash.get_result(handle.id)
    assert result.status is TaskStatus.FAILURE and result.error_type == "WorkerLost", result


@pytest.mark.slow
def test_rabbitmq_broker(
    openai_app: Any, redis_server: RedisServer, worker_env: dict[str, str], repo_root: Any, unique_case: str
) -> None:
    broker = "amqp://guest:guest@127.0.0.1:5672//"
    queue = f"racto-test-{unique_case}"
    env = {**worker_env, "RACTO_TEST_BROKER": broker, "RACTO_TEST_QUEUE": queue}
    client_app = openai_app.make_app(broker, redis_server.url, queue=queue)
    client = openai_app.register(client_app)["default"]
    with private_worker(env, repo_root, concurrency=4):
        group = client.parallel_batch([f"{i} [case:{unique_case}]" for i in range(10)])
        results = client.wait_parallel(group, timeout_s=20)
    assert [r.status for r in results] == [TaskStatus.SUCCESS] * 10
    with client_app.connection_for_write() as connection:
        connection.default_channel.queue_delete(queue)


class EchoKit:
    def __init__(self, tag: str, fail_with: int | None = None) -> None:
        self.tag = tag
        self.fail_with = fail_with

    def chat(self, config: Any) -> str:
        if self.fail_with is not None:
            raise ConnectionError(f"{self.tag} is down")
        return f"{self.tag}: {config.user_message}"


IN_PROCESS = "racto_nb.embedded.transport:InProcessBackend"


def run_locally(worker: RactoCeleryWorker, message: str) -> TaskResult:
    """Execute the registered task on one row in this process (Celery's ``Task.apply``)."""
    row = f"local-{uuid4().hex}"
    payload = worker.chunk(row, "chat", worker.defaults(ChatConfig(user_message="-")), [{"id": row, "m": message}])
    worker.task.apply(args=(payload,), task_id=f"{row}:c")
    return worker.get_result(row)


def test_replace_true_runs_the_new_kit() -> None:
    app = Celery(broker="memory://", backend=IN_PROCESS)
    RactoCeleryWorker(app, kit=EchoKit("old"))
    new = RactoCeleryWorker(app, kit=EchoKit("new"), replace=True)
    assert run_locally(new, "hi").content == "new: hi"


def test_a_rerun_cell_gets_its_new_retry_policy() -> None:
    app = Celery(broker="memory://", backend=IN_PROCESS)
    kit = EchoKit("flaky", fail_with=503)
    RactoCeleryWorker(app, kit=kit, retry_config=RetryConfig(max_retries=3))
    rerun = RactoCeleryWorker(app, kit=kit, retry_config=RetryConfig(max_retries=0))
    outcome = run_locally(rerun, "hi")
    assert outcome.status is TaskStatus.FAILURE
    assert outcome.attempts == 1 and "gave up after 1 attempts" in str(outcome.error)


def test_retried_items_keep_their_custom_id(openai_app: Any, fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    fake_openai.script(f"{unique_case}-a", ["503"])
    items = [BatchItem(user_message=f"a [case:{unique_case}-a]", custom_id="A"), f"b [case:{unique_case}-b]"]
    group = openai_app.worker.parallel_batch(items)
    openai_app.worker.wait_parallel(group, timeout_s=10)
    first = openai_app.worker.get_result(group.results[0].id)  # read without the client's memory of ids
    assert (first.status, first.attempts, first.custom_id, first.index) == (TaskStatus.SUCCESS, 2, "A", 0)


def test_no_client_side_key_reaches_redis(redis_server: RedisServer, unique_case: str) -> None:
    """A kit built in the client with an explicit key (the seed's closure pattern) never ships it."""
    secret = "sk-client-secret-91c2"
    app = Celery(broker=redis_server.url, backend=redis_server.url)
    app.conf.task_default_queue = f"nobody-consumes-{unique_case}"
    client = RactoCeleryWorker(
        app, kit=OpenAIKit("m", api_key=secret), name=f"secretive{unique_case[-6:]}", queue=app.conf.task_default_queue
    )
    client.generate("hello", extra={"seed": 1})
    client.parallel_batch(["a", BatchItem(user_message="b", custom_id="x")])
    redis = redis_server.client()
    for key in redis.scan_iter(count=1000):
        kind = redis.type(key)
        values = {b"string": lambda k: [redis.get(k) or b""], b"list": lambda k: redis.lrange(k, 0, -1)}
        for value in values.get(cast(bytes, kind), lambda k: [])(key):
            assert secret.encode() not in value, key
    assert redis.llen(app.conf.task_default_queue) == 3  # the messages were there to inspect
    redis.delete(app.conf.task_default_queue)
