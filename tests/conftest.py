"""Shared fixtures: real servers, started once per session.

Tests share the servers and stay independent by naming their own cases
(``unique_case``) and queues instead of resetting shared state.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from racto_nb.fleet.processes import WorkerProcess
from racto_nb.testing import FakeOpenAIServer, RedisServer

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """Where worker processes run, so ``-A tests.worker_apps...`` imports."""
    return REPO_ROOT


@pytest.fixture(scope="session", autouse=True)
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Batches checkpoint under a temporary folder, not beside the repository's notebooks."""
    folder = tmp_path_factory.mktemp("checkpoints")
    previous = os.environ.get("RACTO_CHECKPOINT_DIR")
    os.environ["RACTO_CHECKPOINT_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("RACTO_CHECKPOINT_DIR", None)
    else:
        os.environ["RACTO_CHECKPOINT_DIR"] = previous


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture(scope="session")
def worker_env(redis_server: RedisServer, fake_openai: FakeOpenAIServer) -> dict[str, str]:
    """What the apps in ``tests/worker_apps`` read from the environment."""
    return {
        "RACTO_TEST_BROKER": redis_server.url,
        "RACTO_TEST_BACKEND": redis_server.url,
        "RACTO_TEST_OPENAI_URL": fake_openai.base_url,
    }


@pytest.fixture
def unique_case(request: pytest.FixtureRequest) -> str:
    """A case (or queue) name no other test uses, readable in server records."""
    name = re.sub(r"[^\w.-]", "_", request.node.name)[:60]
    return f"{name}-{uuid4().hex[:6]}"


#: Only worker processes get this key; tests assert it never leaves them.
WORKER_API_KEY = "sk-worker-secret-7f3a"


@pytest.fixture(scope="session")
def openai_app(worker_env: dict[str, str]) -> Any:
    """The shared worker-app module, imported the way a client imports it."""
    os.environ.update(worker_env)
    return importlib.import_module("tests.worker_apps.openai_app")


@pytest.fixture(scope="session")
def engine_worker(openai_app: Any, worker_env: dict[str, str], repo_root: Path) -> Iterator[WorkerProcess]:
    """One real `celery worker --pool threads` process serving the shared app."""
    env = {**worker_env, "OPENAI_API_KEY": WORKER_API_KEY}
    with WorkerProcess("tests.worker_apps.openai_app:app", concurrency=8, env=env, cwd=repo_root) as process:
        yield process


@pytest.fixture(scope="module")
def shell() -> Iterator[Any]:
    """An IPython shell with the magics loaded and quiet progress (jupysql's way of testing magics)."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "racto_nb")
    ip.run_line_magic("config", 'RactoMagics.progress = "none"')
    yield ip
    ip.run_line_magic("unload_ext", "racto_nb")


@pytest.fixture(scope="session")
def python3_kernel() -> str:
    """The ``racto-nb-test`` kernelspec (scripts/test.sh registers it); installed for this user if missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "racto-nb-test" not in KernelSpecManager().find_kernel_specs():
        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--user", "--name", "racto-nb-test"],
            check=True,
            capture_output=True,
        )
    return "racto-nb-test"

