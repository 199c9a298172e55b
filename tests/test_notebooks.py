"""The demo notebooks run top to bottom: on the embedded default, and on Binder's Redis set-up.

A real kernel (``ipykernel``, started by ``nbclient``) executes each notebook
from ``notebooks/`` as a user would open it. The kernel inherits this process's
environment, which is how each test picks the mode: no ``RACTO_*`` at all
(embedded, SmolLM2 in the kernel), or what ``binder/start`` exports (a Redis
broker and a ``celery -A racto_nb.app worker`` process it started).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from racto_nb.testing import free_port

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
DEMOS = ["01_quickstart.ipynb", "02_batch_reviews.ipynb", "03_ingest_documents.ipynb"]
#: The issue's bar for a demo on this machine (2 cores, CPU model).
MAX_SECONDS = 60.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="demos run SmolLM2: racto_nb[local]"),
]


@pytest.fixture
def no_racto_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RACTO_") and name != "RACTO_CHECKPOINT_DIR":
            monkeypatch.delenv(name)


def run_notebook(name: str, kernel: str) -> float:
    """Execute ``notebooks/NAME`` in a fresh kernel (cwd ``notebooks/``); return the seconds it took."""
    path = NOTEBOOKS / name
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        f"{name} is committed with outputs; clear them (Kernel > Restart & Clear Output)"
    )
    started = time.monotonic()
    client = nbclient.NotebookClient(
        notebook, kernel_name=kernel, timeout=180, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    return time.monotonic() - started


@pytest.mark.parametrize("name", DEMOS)
@pytest.mark.usefixtures("no_racto_env")
def test_demo_runs_on_the_embedded_default(name: str, python3_kernel: str) -> None:
    elapsed = run_notebook(name, python3_kernel)
    assert elapsed < MAX_SECONDS, f"{name} took {elapsed:.0f} s"


# --------------------------------------------------------------------------- binder


@pytest.fixture
def binder_services(tmp_path: Path, no_racto_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Run ``binder/start`` as Binder does, on a free port, and export what it exports."""
    run_dir = tmp_path / "binder-run"
    env = {**os.environ, "RACTO_REDIS_PORT": str(free_port()), "RACTO_RUN_DIR": str(run_dir)}
    dump = "import json, os; print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('RACTO_')}))"
    try:
        done = subprocess.run(
            [str(REPO / "binder" / "start"), sys.executable, "-c", dump],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        exported: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
        for key, value in exported.items():
            monkeypatch.setenv(key, value)
        yield exported
    finally:
        _stop_daemons(run_dir)


def _stop_daemons(run_dir: Path) -> None:
    """Stop the worker (warm) and then Redis, both daemonised by binder/start."""
    for name in ("worker.pid", "redis.pid"):
        pidfile = run_dir / name
        if not pidfile.is_file():
            continue
        pid = int(pidfile.read_text().strip())
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_binder_start_then_demos_run_against_its_redis_and_worker(
    binder_services: dict[str, str], python3_kernel: str, tmp_path: Path
) -> None:
    assert binder_services["RACTO_BROKER_URL"] == f"redis://127.0.0.1:{binder_services['RACTO_REDIS_PORT']}/0"
    for name in DEMOS:
        run_notebook(name, python3_kernel)

    # The tasks really went through Redis to the worker process, not an embedded worker.
    log = (tmp_path / "binder-run" / "worker.log").read_text()
    assert "racto-binder@" in log and "ready." in log
    assert log.count("racto_nb.default.rows[") >= 40  # one message per row at this size, ingests included
