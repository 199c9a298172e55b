"""Real ``celery worker`` processes, started and stopped by racto_nb.workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from racto_nb.fleet.processes import WorkerPool, WorkerProcess
from racto_nb.testing import RedisServer

PING_APP = "tests.worker_apps.ping_app:app"


@pytest.fixture
def celery_client(redis_server: RedisServer) -> Iterator[Celery]:
    """A bare client: tasks are sent by name, so the test never imports the app module."""
    app = Celery("ping_client", broker=redis_server.url, backend=redis_server.url)
    yield app
    app.close()


def test_redis_server_lifecycle() -> None:
    server = RedisServer().start()
    client = server.client()
    assert client.ping()
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert server.log_path is not None
    tmpdir = server.log_path.parent
    assert tmpdir.is_dir()
    server.stop()
    client.close()
    assert not tmpdir.exists()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.url
    server.stop()  # idempotent


def test_redis_server_missing_binary_says_how_to_install() -> None:
    with pytest.raises(RuntimeError, match="apt-get install redis-server"):
        RedisServer(executable="no-such-redis-server").start()


def test_worker_runs_a_task_and_dies_on_kill(
    worker_env: dict[str, str], repo_root: Path, celery_client: Celery, unique_case: str, tmp_path: Path
) -> None:
    worker = WorkerProcess(
        PING_APP,
        concurrency=2,
        env=worker_env,
        cwd=repo_root,
        queues=[unique_case],
        log_path=tmp_path / "worker.log",
    )
    with worker:
        assert worker.is_alive()
        assert worker.nodename is not None and worker.nodename.startswith("racto-")
        assert "%h" not in worker.nodename
        assert celery_client.send_task("ping_app.add", args=(2, 3), queue=unique_case).get(timeout=10) == 5
        # The threads pool runs tasks in the worker's own process.
        assert celery_client.send_task("ping_app.pid", queue=unique_case).get(timeout=10) == worker.pid

        pid = worker.pid
        assert worker.kill() == -9
        assert not worker.is_alive()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "ready." in worker.log_text()


def test_worker_that_cannot_start_raises_with_log_tail(
    worker_env: dict[str, str], repo_root: Path, tmp_path: Path
) -> None:
    worker = WorkerProcess(
        "tests.worker_apps.does_not_exist:app", env=worker_env, cwd=repo_root, log_path=tmp_path / "w.log"
    )
    with pytest.raises(RuntimeError) as info:
        worker.start(timeout_s=20)
    message = str(info.value)
    assert "exited with code" in message
    assert "tests.worker_apps.does_not_exist" in message  # from the worker's own traceback
    assert not worker.is_alive()


def test_pool_starts_in_parallel_and_stops_warm(
    worker_env: dict[str, str], repo_root: Path, celery_client: Celery, unique_case: str, tmp_path: Path
) -> None:
    pool = WorkerPool.of(
        PING_APP, 2, concurrency=2, env=worker_env, cwd=repo_root, queues=[unique_case], log_dir=tmp_path
    )
    with pool:
        assert len(pool.alive()) == 2
        assert len({w.nodename for w in pool}) == 2
        results = [celery_client.send_task("ping_app.pid", queue=unique_case) for _ in range(8)]
        assert {r.get(timeout=10) for r in results} <= {w.pid for w in pool}
        assert all(w.log_path.parent == tmp_path for w in pool)
    assert pool.alive() == []
    assert [w.returncode for w in pool] == [0, 0]  # SIGTERM: warm shutdown, clean exit


def test_worker_arguments() -> None:
    worker = WorkerProcess(
        "pkg.mod:app", concurrency=4, hostname="w1@%h", queues=["a", "b"], extra_args=["-E"]
    )
    argv = worker.argv
    assert argv[1:6] == ["-m", "celery", "-A", "pkg.mod:app", "worker"]
    assert argv[argv.index("-c") + 1] == "4"
    assert argv[argv.index("-n") + 1] == "w1@%h"
    assert argv[argv.index("-Q") + 1] == "a,b"
    assert {"--without-gossip", "--without-mingle", "--without-heartbeat"} <= set(argv)
    assert argv[-1] == "-E"
    assert WorkerProcess("x").hostname != WorkerProcess("x").hostname
    with pytest.raises(ValueError, match="DEBUG or INFO"):
        WorkerProcess("x", loglevel="WARNING")
    with pytest.raises(ValueError):
        WorkerProcess("x", concurrency=0)
