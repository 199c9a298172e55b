"""Fleet mode: ``celery -A racto_nb.app worker`` processes configured only by environment.

A real Redis (our own, on a free port), real worker processes running the
generic app, the kit reaching the fake OpenAI server over HTTP. The notebook
side never holds the API key; the workers read theirs from their environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import racto_nb
from racto_nb import api as fleet
from racto_nb.fleet.processes import WorkerProcess
from racto_nb.models import TaskStatus
from racto_nb.testing import FakeOpenAIServer, RedisServer, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(autouse=True)
def fleet_env(
    redis: RedisServer, fake_openai: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """RACTO_* settings as a user would export them before starting Jupyter and the workers."""
    for name in list(os.environ):
        if name.startswith("RACTO_") and name != "RACTO_CHECKPOINT_DIR":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RACTO_BROKER_URL", redis.url)
    monkeypatch.setenv("RACTO_PROVIDER", "openai")
    monkeypatch.setenv("RACTO_MODEL", "fake-model")
    monkeypatch.setenv("RACTO_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("RACTO_TIMEOUT_S", "5")
    redis.client().flushdb()
    yield
    fleet.stop_workers()
    racto_nb.disconnect()


def test_status_sees_queue_depth_then_the_worker_and_its_concurrency(
    fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    worker = racto_nb.connect()
    assert worker.app.conf.broker_url == os.environ["RACTO_BROKER_URL"]

    # Nobody consumes yet: the tasks wait in Redis.
    handles = [worker.generate(f"[case:{unique_case}] q{i}") for i in range(3)]
    before = fleet.status(worker)
    assert before.reachable and before.mode == "broker"
    assert before.workers == [] and before.queue_depth == 3

    with WorkerProcess("racto_nb.app", concurrency=4) as process:
        results = worker.wait_many([h.id for h in handles], timeout_s=30)
        assert [r.status for r in results] == [TaskStatus.SUCCESS] * 3, process.log_tail()
        assert results[0].content == f"echo: [case:{unique_case}] q0"

        after = fleet.status()  # the current connection
        assert after.reachable and after.latency_ms is not None
        assert [(w.name, w.concurrency, w.pool) for w in after.workers] == [(process.nodename, 4, "thread")]
        assert after.workers[0].processed >= 3
        assert after.queue_depth == 0
        assert "1 online, 4 slots" in str(after) and "<table" in after._repr_html_()
    assert fake_openai.count(unique_case) == 3


def test_unreachable_broker_is_reported_within_5_s() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    report = fleet.status(url)
    assert time.monotonic() - started < 5
    assert not report.reachable and report.workers == []
    assert report.error is not None and "redis-server" in report.error and "hunter2" not in str(report)

    started = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        racto_nb.connect(url)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "redis://:***@127.0.0.1" in message and "hunter2" not in message and "redis-server" in message


def test_a_broker_that_never_answers_does_not_hang() -> None:
    # Accepts TCP connections (the kernel's backlog) and never says a word.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        started = time.monotonic()
        report = fleet.status(url, timeout_s=2.0)
        assert time.monotonic() - started < 3.5
        assert not report.reachable and "did not answer" in (report.error or "")

        started = time.monotonic()
        with pytest.raises(ConnectionError):
            racto_nb.connect(url, timeout_s=2.0)
        assert time.monotonic() - started < 3.5


def test_start_and_stop_workers_from_the_notebook(redis: RedisServer, unique_case: str) -> None:
    worker = racto_nb.connect(redis.url)
    started = fleet.start_workers(2, concurrency=3)
    assert len(started) == 2 and all(w.is_alive() for w in started)
    assert fleet.running_workers() == started

    report = fleet.status(worker)
    assert sorted(w.name for w in report.workers) == sorted(str(w.nodename) for w in started)
    assert report.total_concurrency == 6

    handles = [worker.generate(f"[case:{unique_case}] s{i}") for i in range(4)]
    assert all(r.ok for r in worker.wait_many([h.id for h in handles], timeout_s=30))

    assert fleet.stop_workers() == 2
    assert not any(w.is_alive() for w in started) and fleet.running_workers() == []


def test_workers_follow_the_broker_the_notebook_connected_to(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch, unique_case: str
) -> None:
    monkeypatch.delenv("RACTO_BROKER_URL")  # connected by URL only, as `%racto_connect redis://...` does
    worker = racto_nb.connect(redis.url)
    (process,) = fleet.start_workers(1, concurrency=2)
    result = worker.wait(worker.generate(f"[case:{unique_case}] via-url").id, timeout_s=30)
    assert result.ok, process.log_tail()


def test_start_workers_refuses_an_embedded_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RACTO_BROKER_URL")
    racto_nb.connect()
    with pytest.raises(RuntimeError, match=r"connect\('redis://"):
        fleet.start_workers(1)


def test_cli_worker_without_a_broker_explains_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RACTO_BROKER_URL")
    process = WorkerProcess("racto_nb.app", concurrency=1)
    with pytest.raises(RuntimeError) as info:
        process.start(timeout_s=30)
    assert "RACTO_BROKER_URL" in str(info.value)


def _rabbitmq_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=0.5).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _rabbitmq_up(), reason="RabbitMQ is not running on 127.0.0.1:5672")
def test_status_over_amqp_with_a_redis_result_backend(redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RACTO_BROKER_URL")
    amqp = "amqp://guest:guest@127.0.0.1:5672//"
    with pytest.raises(Exception, match="RACTO_RESULT_BACKEND"):
        racto_nb.connect(amqp)  # AMQP cannot hold results by itself
    worker = racto_nb.connect(amqp, result_backend=redis.url)
    assert worker.app.conf.result_backend == redis.url
    report = fleet.status(worker)
    # The RabbitMQ service is shared: only what is ours is asserted.
    assert report.reachable and report.broker == "amqp://guest:***@127.0.0.1:5672//"
    assert isinstance(report.queue_depth, int)


def test_workers_started_from_a_kernel_stop_when_it_is_killed(redis: RedisServer) -> None:
    """A hard restart (SIGKILL of the kernel) must not leave its %racto_workers running unseen."""
    script = (
        "import os, sys, time, racto_nb\n"
        "from racto_nb import api\n"
        f"racto_nb.connect({redis.url!r})\n"
        "(w,) = api.start_workers(1, concurrency=2)\n"
        "print(w.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    kernel = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert kernel.stdout is not None
        worker_pid = int(kernel.stdout.readline())
        heartbeat = _wait_for(lambda: fleet.worker_heartbeats(racto_nb.connect(redis.url)), 15)
        assert any(r["pid"] == worker_pid and r["started_by"].endswith(f":{kernel.pid}") for r in heartbeat)
    finally:
        kernel.kill()
        kernel.wait(10)
    gone = _wait_for(lambda: not _pid_alive(worker_pid), 20)
    assert gone, f"worker {worker_pid} outlived the kernel that started it"


def _wait_for(check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    return check()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_connect_notices_changed_settings_instead_of_returning_the_old_worker(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = racto_nb.connect(redis.url)
    assert racto_nb.connect(redis.url) is first  # the same settings: the same worker, as a re-run cell expects
    monkeypatch.setenv("RACTO_MODEL", "another-model")
    second = racto_nb.connect(redis.url)
    assert second is not first
    assert getattr(second.kit, "model", None) == "another-model", second.kit
