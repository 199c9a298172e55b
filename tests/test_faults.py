"""Nothing lost: every row ends with exactly one result when workers, the broker or the client die.

Every test here runs real processes: a private ``redis-server``, ``celery -A
racto_nb.app worker`` processes configured as a user configures them
(``RACTO_*`` variables), the OpenAI-compatible fake server counting the
requests of each row (each row is its own case), and SIGKILL. Each test
counts every row: how many results, how many calls the provider received.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import racto_nb
from racto_nb import api
from racto_nb.engine.worker import RactoCeleryWorker
from racto_nb.fleet.connection import disconnect
from racto_nb.fleet.processes import WorkerProcess
from racto_nb.models import TaskStatus
from racto_nb.notebook.runs import BatchRun
from racto_nb.testing import FakeOpenAIServer, RedisServer
from tests.batch_support import stored_values

pytestmark = pytest.mark.slow

#: The key only worker processes hold; it must never reach Redis, a log or a frame.
FLEET_KEY = "sk-fleet-secret-93c1d7e2a4"


@pytest.fixture
def broker() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def fleet_env(
    broker: RedisServer, fake_openai: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """What a notebook and its ``racto_nb.app`` workers share: the broker and the provider; racto_nb's defaults else.

    The kernel (this process) gets the same settings, as a user's notebook
    would, but never the key.
    """
    env = {
        "RACTO_BROKER_URL": broker.url,
        "RACTO_BASE_URL": fake_openai.base_url,
        "RACTO_MODEL": "fault-model",
        "RACTO_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    yield env
    disconnect()


def fleet_worker(env: dict[str, str], tmp_path: Path, *, concurrency: int = 16, **extra: str) -> WorkerProcess:
    """A ``celery -A racto_nb.app worker --pool threads`` process holding the key."""
    return WorkerProcess(
        "racto_nb.app",
        concurrency=concurrency,
        env={**env, "OPENAI_API_KEY": FLEET_KEY, **extra},
        log_path=tmp_path / f"worker-{time.monotonic_ns()}.log",
    )


def row_prompts(case: str, rows: int, server: FakeOpenAIServer, *, latency_s: float = 0.0) -> list[str]:
    """One prompt per row, each its own case on the fake server, so calls are counted per row."""
    prompts = []
    for i in range(rows):
        if latency_s:
            server.script(f"{case}-{i}", [], latency_s=latency_s)
        prompts.append(f"row {i} [case:{case}-{i}]")
    return prompts


def calls_per_row(server: FakeOpenAIServer, case: str, rows: int) -> list[int]:
    return [server.count(f"{case}-{i}") for i in range(rows)]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def succeeded(run: BatchRun) -> int:
    return run.batch.refresh().count(TaskStatus.SUCCESS)


def reached(run: BatchRun, rows: int) -> bool:
    """At least ``rows`` rows of ``run`` are successful."""
    return succeeded(run) >= rows


def assert_every_row_once(frame: pd.DataFrame, rows: int, worker: WorkerProcess | None = None) -> None:
    """Exactly one final, successful result per row: none missing, none doubled (with the worker's log if not)."""
    assert len(frame) == rows
    assert frame.index.is_unique
    bad = frame[frame["status"] != "success"]
    log = f"; the worker's log ends:\n{worker.log_tail()}" if worker is not None and not bad.empty else ""
    assert bad.empty, (
        f"{len(bad)} rows not successful, e.g. {bad[['status', 'error_type', 'error']].head(3).to_dict('records')}"
        + log
    )


# ---------------------------------------------------------------------------- worker death


def test_rows_of_a_sigkilled_worker_run_again_within_60_s_on_the_defaults(
    fleet_env: dict[str, str], fake_openai: FakeOpenAIServer, tmp_path: Path, unique_case: str
) -> None:
    """racto_nb.app's own settings (no visibility or stale override): rerun in well under a minute, not an hour.

    While they wait, the dead worker's rows say so (RETRY, ``WorkerLost``)
    instead of a ``started`` that never moves. Rows that had succeeded are
    not paid for again; only calls in flight at the kill run twice, and
    their ``deliveries`` says so.
    """
    rows = 120
    prompts = row_prompts(unique_case, rows, fake_openai, latency_s=1.0)
    doomed = fleet_worker(fleet_env, tmp_path).start()
    client = racto_nb.connect(fleet_env["RACTO_BROKER_URL"])
    run = api.run_batch(prompts, worker=client, wait=False, progress="none")
    try:
        wait_for(lambda: succeeded(run) >= 30, 60, "30 rows to succeed")
        done_before = {i for i, status in enumerate(run.frame()["status"]) if status == "success"}
        doomed.kill()

        with fleet_worker(fleet_env, tmp_path) as replacement:
            ready = time.monotonic()
            assert replacement.nodename

            def lost_rows_say_so() -> bool:
                frame = run.frame()
                waiting = frame[(frame["status"] == "retry") & (frame["error_type"] == "WorkerLost")]
                return not waiting.empty and "runs again" in str(waiting["error"].iloc[0])

            wait_for(lost_rows_say_so, 30, "the dead worker's rows to show WorkerLost")
            frame = run.wait(timeout_s=90)
            rerun_s = time.monotonic() - ready
    finally:
        run.batch.cancel()

    assert_every_row_once(frame, rows)
    assert rerun_s < 60, f"the dead worker's rows took {rerun_s:.1f} s after a live worker was ready"
    calls = calls_per_row(fake_openai, unique_case, rows)
    assert all(calls[i] == 1 for i in done_before), "a row that had already succeeded was paid for again"
    twice = [i for i, n in enumerate(calls) if n > 1]
    assert all(n in (1, 2) for n in calls)
    assert all(frame["deliveries"].iloc[i] >= 2 for i in twice), "a row that ran twice must say so"


def test_eight_kills_in_one_batch_lose_no_row(
    fleet_env: dict[str, str], fake_openai: FakeOpenAIServer, tmp_path: Path, unique_case: str
) -> None:
    """SIGKILL a worker eight times during a 3,000-row batch: 3,000 results; only calls in flight (or answered
    in the last 50 ms, not yet written) at a kill run again, and their ``deliveries`` says so.

    ``RACTO_VISIBILITY_TIMEOUT_S`` alone (no other setting) shortens the
    stale bound so the test takes seconds, and must not stop a worker from
    starting.
    """
    rows, kills = 3000, 8
    prompts = row_prompts(unique_case, rows, fake_openai)
    fast = {"RACTO_VISIBILITY_TIMEOUT_S": "3"}
    fake_openai.set_latency(0.02)
    try:
        client = racto_nb.connect(fleet_env["RACTO_BROKER_URL"])
        run = api.run_batch(prompts, worker=client, wait=False, progress="none")
        for kill in range(kills):
            process = fleet_worker(fleet_env, tmp_path, concurrency=8, **fast).start()
            target = succeeded(run) + 150
            wait_for(partial(reached, run, target), 60, f"progress before kill {kill + 1}", 0.05)
            process.kill()
        assert succeeded(run) < rows, "the batch finished before the last kill: nothing was under test"
        with fleet_worker(fleet_env, tmp_path, concurrency=16, **fast):
            frame = run.wait(timeout_s=180)
    finally:
        fake_openai.set_latency(0.0)

    assert_every_row_once(frame, rows)
    calls = calls_per_row(fake_openai, unique_case, rows)
    assert min(calls) == 1 and max(calls) <= 1 + kills
    deliveries = frame["deliveries"].fillna(1).astype(int).tolist()
    assert all(n <= d for n, d in zip(calls, deliveries, strict=True)), "a row paid twice must say so"
    # What a kill can cost again: per thread the call in flight plus the answers of the last
    # FLUSH_EVERY_S (50 ms) not yet written, about 3 calls at 20 ms each; 8 threads.
    repeated = sum(n - 1 for n in calls)
    assert repeated <= kills * 8 * 4, f"{repeated} repeated calls in {kills} kills"


# ---------------------------------------------------------------------------- broker restart


@pytest.mark.parametrize("persistence", ["none", "appendonly"])
def test_a_waiting_batch_survives_a_redis_restart(
    persistence: str, fake_openai: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unique_case: str
) -> None:
    """Redis killed and started again on its port, halfway through: the client says what it is doing and the
    batch completes, each row with one result, whether Redis kept its data (AOF) or lost it."""
    extra = ("--appendonly", "yes", "--appendfsync", "always") if persistence == "appendonly" else ()
    first = RedisServer(extra_args=extra).start()
    port = first.port
    env = {
        "RACTO_BROKER_URL": first.url,
        "RACTO_BASE_URL": fake_openai.base_url,
        "RACTO_MODEL": "fault-model",
        "RACTO_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "RACTO_VISIBILITY_TIMEOUT_S": "5",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rows = 400
    prompts = row_prompts(unique_case, rows, fake_openai, latency_s=0.05)
    second: RedisServer | None = None
    data_dir = first._tmpdir
    worker = fleet_worker(env, tmp_path, concurrency=8)
    try:
        with worker:
            client = racto_nb.connect(first.url)
            run = api.run_batch(prompts, worker=client, wait=False, progress="none")
            wait_for(lambda: succeeded(run) >= 100, 60, "100 rows before the restart")
            if persistence == "appendonly":
                assert first._proc is not None
                first._proc.send_signal(signal.SIGKILL)  # a crash: what AOF kept is all there is
                first._proc.wait()
                first._proc = None
                second = _restart_on(port, data_dir, extra)
            else:
                first.stop()
                second = RedisServer(port=port).start()
            frame = run.wait(timeout_s=120)
    finally:
        disconnect()
        if second is not None:
            second.stop()
        first.stop()

    assert_every_row_once(frame, rows, worker)  # a failure shows the worker's log: did its consumer reconnect?
    assert not (frame["status"] == "started").any()
    calls = calls_per_row(fake_openai, unique_case, rows)
    assert min(calls) >= 1


def _restart_on(port: int, data_dir: Path | None, extra: tuple[str, ...]) -> RedisServer:
    """A new redis-server on ``port`` reading the old one's append-only file."""
    server = RedisServer(port=port, extra_args=(*extra, "--dir", str(data_dir)))
    return server.start()


# ---------------------------------------------------------------------------- client death


SUBMIT_AND_DIE = textwrap.dedent(
    """
    import os, signal, sys, time
    import racto_nb
    from racto_nb import api

    rows, case = int(sys.argv[1]), sys.argv[2]
    worker = racto_nb.connect(os.environ["RACTO_BROKER_URL"])
    run = api.run_batch([f"row {i} [case:{case}-{i}]" for i in range(rows)], worker=worker, wait=False,
                        progress="none")
    while not run.batch.refresh().submitted:
        time.sleep(0.01)
    print("BATCH", run.batch_id, run.batch.refresh().submitted, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the kernel dies while its publisher thread is still sending
    """
)


def test_a_kernel_killed_while_publishing_is_finished_by_attach(
    fleet_env: dict[str, str], fake_openai: FakeOpenAIServer, tmp_path: Path, unique_case: str
) -> None:
    """The submitting process is SIGKILLed once its first rows are out, most not yet sent (no worker is
    running, so its publisher waits at its window): ``attach`` from another process publishes what was never
    sent, and every row runs once."""
    rows = 6_000
    killed = subprocess.run(
        [sys.executable, "-c", SUBMIT_AND_DIE, str(rows), unique_case],
        env={**os.environ, **fleet_env, "RACTO_PUBLISH_WINDOW": "2000"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    _, batch_id, sent_at_death = killed.stdout.splitlines()[-1].split()
    assert 0 < int(sent_at_death) < rows, "everything was published before the kill: nothing was under test"

    with fleet_worker(fleet_env, tmp_path, concurrency=32):
        client = racto_nb.connect(fleet_env["RACTO_BROKER_URL"])
        frame = api.attach(batch_id, worker=client, wait=True, progress="none", timeout_s=240)

    assert_every_row_once(frame, rows)
    assert calls_per_row(fake_openai, unique_case, rows) == [1] * rows


def test_a_batch_whose_manifest_is_gone_says_exactly_that(
    fleet_env: dict[str, str], broker: RedisServer, tmp_path: Path, unique_case: str
) -> None:
    client = racto_nb.connect(fleet_env["RACTO_BROKER_URL"])
    run = api.run_batch([f"x [case:{unique_case}]"], worker=client, wait=False, progress="none")
    run.batch.join_publisher(10)
    batch_id = run.batch_id
    run.stop_watching()  # this kernel lets go of its copy too
    broker.client().flushall()  # Redis lost everything...
    for path in Path(fleet_env["RACTO_CHECKPOINT_DIR"]).glob(f"*{batch_id}*"):
        _remove(path)  # ...and no kernel holds a copy
    with pytest.raises(LookupError) as info:
        api.attach(batch_id, worker=client, progress="none")
    message = str(info.value)
    assert batch_id in message and "restarted without persistence" in message and "it is gone" in message


def _remove(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    else:
        path.unlink()


# ---------------------------------------------------------------------------- provider storms and fleets


def test_a_transient_fault_storm_costs_each_row_its_faults_plus_one(
    fleet_env: dict[str, str],
    fake_openai: FakeOpenAIServer,
    tmp_path: Path,
    unique_case: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """30% of rows meet 1 or 2 transient faults (500, 503, 429, dropped connection): every row succeeds,
    each with exactly one request more than its faults."""
    rows = 300
    faults_of = {i: (["500"] if i % 10 in (0, 3) else ["503", "drop"] if i % 10 == 6 else []) for i in range(rows)}
    for i, faults in faults_of.items():
        fake_openai.script(f"{unique_case}-{i}", faults)
    retry = {"RACTO_INITIAL_DELAY_S": "0.1", "RACTO_MAX_DELAY_S": "0.5"}
    for name, value in retry.items():
        monkeypatch.setenv(name, value)
    with fleet_worker({**fleet_env, **retry}, tmp_path):
        client = racto_nb.connect(fleet_env["RACTO_BROKER_URL"])
        frame = api.run_batch(
            [f"row {i} [case:{unique_case}-{i}]" for i in range(rows)], worker=client, progress="none", timeout_s=120
        )

    assert_every_row_once(frame, rows)
    assert calls_per_row(fake_openai, unique_case, rows) == [len(faults_of[i]) + 1 for i in range(rows)]
    assert list(frame["attempts"]) == [len(faults_of[i]) + 1 for i in range(rows)]


def test_two_fleets_on_one_broker_never_take_each_others_rows(
    fleet_env: dict[str, str],
    fake_openai: FakeOpenAIServer,
    tmp_path: Path,
    unique_case: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleets = {"red": "You are the red fleet.", "blue": "You are the blue fleet."}
    processes = [
        fleet_worker(fleet_env, tmp_path, concurrency=4, RACTO_WORKER_NAME=name, RACTO_SYSTEM_PROMPT=prompt).start()
        for name, prompt in fleets.items()
    ]
    try:
        frames = {}
        for name, prompt in fleets.items():
            monkeypatch.setenv("RACTO_WORKER_NAME", name)
            monkeypatch.setenv("RACTO_SYSTEM_PROMPT", prompt)
            client = racto_nb.connect(fleet_env["RACTO_BROKER_URL"])
            assert client.name == name
            frames[name] = api.run_batch(
                [f"{name} {i} [case:{unique_case}]" for i in range(40)], worker=client, wait=False, progress="none"
            )
        results = {name: run.wait(timeout_s=60) for name, run in frames.items()}
    finally:
        for process in processes:
            process.stop()

    for name, prompt in fleets.items():
        frame = results[name]
        assert_every_row_once(frame, 40)
        assert frame["content"].str.startswith(f"[system: {prompt[:40]}]").all(), frame["content"].head()


# ---------------------------------------------------------------------------- secrets


def test_a_key_pasted_with_a_trailing_newline_works_and_is_never_stored(
    fleet_env: dict[str, str],
    fake_openai: FakeOpenAIServer,
    broker: RedisServer,
    tmp_path: Path,
    unique_case: str,
) -> None:
    process = fleet_worker(fleet_env, tmp_path, concurrency=2)
    process.env["OPENAI_API_KEY"] = FLEET_KEY + "\n"
    with process:
        client = racto_nb.connect(fleet_env["RACTO_BROKER_URL"])
        frame = api.run_batch(
            [f"x{i} [case:{unique_case}]" for i in range(4)], worker=client, progress="none", timeout_s=30
        )
    assert_every_row_once(frame, 4)
    assert {r.authorization for r in fake_openai.requests(unique_case)} == {f"Bearer {FLEET_KEY}"}
    assert_nowhere(FLEET_KEY, broker, frame, process)


def test_a_key_with_a_space_inside_stops_the_worker_at_once_without_showing_it(
    fleet_env: dict[str, str], tmp_path: Path
) -> None:
    broken = "sk-broken key-5d1e0c"
    process = fleet_worker(fleet_env, tmp_path, concurrency=2)
    process.env["OPENAI_API_KEY"] = broken
    started = time.monotonic()
    with pytest.raises(racto_nb.errors.WorkerStartError) as info:
        process.start()
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert "OPENAI_API_KEY contains whitespace" in message
    assert broken not in message and "broken key" not in message
    assert process.log_path is not None and "broken key" not in process.log_path.read_text()


def test_a_provider_that_echoes_the_key_has_it_blanked_everywhere(
    fleet_env: dict[str, str],
    fake_openai: FakeOpenAIServer,
    broker: RedisServer,
    tmp_path: Path,
    unique_case: str,
) -> None:
    echoed = f"Incorrect API key provided: {FLEET_KEY}. Also seen: sk-proj-Ab12Cd34Ef56Gh78"
    fake_openai.script(unique_case, [{"status": 401, "message": echoed}])
    with fleet_worker(fleet_env, tmp_path, concurrency=2) as process:
        client = racto_nb.connect(fleet_env["RACTO_BROKER_URL"])
        frame = api.run_batch([f"x [case:{unique_case}]"], worker=client, progress="none", timeout_s=30)
    row = frame.iloc[0]
    assert row["status"] == "failure" and row["status_code"] == 401 and row["attempts"] == 1
    assert "Incorrect API key provided: ***" in row["error"]
    assert "sk-proj-Ab12" not in row["error"]
    assert_nowhere(FLEET_KEY, broker, frame, process)


def assert_nowhere(secret: str, broker: RedisServer, frame: pd.DataFrame, process: WorkerProcess) -> None:
    """``secret`` is in no Redis value, no cell of ``frame`` and no line of the worker's log."""
    for key, value in stored_values(broker):
        assert secret.encode() not in value, key
    assert secret not in frame.to_string()
    assert process.log_path is not None and secret not in process.log_path.read_text()


# ---------------------------------------------------------------------------- deadlines


def _silent_broker() -> Iterator[str]:
    """A port that accepts TCP connections (the kernel's backlog) and never answers."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        yield f"redis://127.0.0.1:{silent.getsockname()[1]}/0"


@pytest.fixture
def silent_url() -> Iterator[str]:
    yield from _silent_broker()


def _app_worker(url: str) -> RactoCeleryWorker:
    from racto_nb.config import load_config
    from racto_nb.engine.celery_app import build_celery
    from racto_nb.kits import OpenAIKit

    return RactoCeleryWorker(build_celery(load_config(), broker_url=url), kit=OpenAIKit("m", base_url="http://x/v1"))


@pytest.mark.parametrize("broker_kind", ["silent", "refusing"])
def test_every_broker_call_has_a_deadline(broker_kind: str, silent_url: str) -> None:
    """On an app racto_nb builds: a silent broker fails in 5 s, a refusing one in 2 s, as one-line ConnectionErrors."""
    from racto_nb.testing._net import free_port

    url = silent_url if broker_kind == "silent" else f"redis://127.0.0.1:{free_port()}/0"
    bound = 5.0 if broker_kind == "silent" else 2.0
    worker = _app_worker(url)
    calls: dict[str, Callable[[], Any]] = {
        "generate": lambda: worker.generate("hello"),
        "get_result": lambda: worker.get_result("0b6c5f0e-0000-4000-8000-000000000000"),
        "parallel_batch": lambda: worker.parallel_batch(["a", "b"]),
        "run_batch": lambda: api.run_batch(["a", "b"], worker=worker, progress="none"),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            call()
        took = time.monotonic() - started
        assert took <= bound + 1.0, f"{name} took {took:.1f} s against a {broker_kind} broker"
        message = str(info.value)
        assert "\n" not in message and "127.0.0.1" in message, f"{name}: {message}"


# ---------------------------------------------------------------------------- the seed API on a user's own app


def test_the_seed_api_on_a_plain_celery_app_survives_a_sigkilled_worker(
    broker: RedisServer,
    fake_openai: FakeOpenAIServer,
    repo_root: Path,
    tmp_path: Path,
    unique_case: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``generate`` -> SIGKILL mid-call -> a new worker -> ``wait()`` is SUCCESS within 60 s, on Celery's defaults."""
    import importlib

    env = {
        "RACTO_TEST_BROKER": broker.url,
        "RACTO_TEST_BACKEND": broker.url,
        "RACTO_TEST_OPENAI_URL": fake_openai.base_url,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    module = importlib.reload(importlib.import_module("tests.worker_apps.plain_app"))
    fake_openai.script(unique_case, [], latency_s=3)

    def process() -> WorkerProcess:
        return WorkerProcess(
            "tests.worker_apps.plain_app:app",
            concurrency=4,
            env={**env, "OPENAI_API_KEY": FLEET_KEY},
            cwd=repo_root,
            log_path=tmp_path / f"plain-{time.monotonic_ns()}.log",
        )

    doomed = process().start()
    handle = module.worker.generate(f"hello [case:{unique_case}]")
    wait_for(lambda: fake_openai.count(unique_case) == 1, 30, "the call to reach the provider", 0.01)
    doomed.kill()
    with process():
        ready = time.monotonic()
        result = module.worker.wait(handle.id, timeout_s=90)
        took = time.monotonic() - ready
    module.app.close()

    assert result.status is TaskStatus.SUCCESS, result
    assert took < 60, f"the killed task took {took:.1f} s to run again"
    assert fake_openai.count(unique_case) == 2
