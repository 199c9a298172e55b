"""``notebooks/04_magics.ipynb`` top to bottom, in a real kernel, against a real worker process.

The kernel (ipykernel, started by nbclient) gets ``RACTO_*`` settings pointing at
the session's Redis (its own database, so the session's other worker never sees
these tasks) and the fake OpenAI server; ``%racto_connect`` in the notebook reads
them. The worker is the generic app users run: ``celery -A racto_nb.app worker``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from racto_nb.batch.batch import FRAME_COLUMNS
from racto_nb.fleet.processes import WorkerProcess
from racto_nb.testing import FakeOpenAIServer, RedisServer

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "04_magics.ipynb"
#: A database of its own on the session's Redis.
DB = 5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def racto_env(redis_server: RedisServer, fake_openai: FakeOpenAIServer) -> dict[str, str]:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    return {
        "RACTO_BROKER_URL": url,
        "RACTO_RESULT_BACKEND": url,
        "RACTO_PROVIDER": "openai",
        "RACTO_MODEL": "fake-model",
        "RACTO_BASE_URL": fake_openai.base_url,
        "RACTO_TIMEOUT_S": "5",
    }


@pytest.fixture(scope="module")
def app_worker(racto_env: dict[str, str], repo_root: Path) -> Iterator[WorkerProcess]:
    env = {**racto_env, "OPENAI_API_KEY": "sk-notebook-worker"}
    with WorkerProcess("racto_nb.app", concurrency=8, env=env, cwd=repo_root) as process:
        yield process


def _text(cell: Any) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if "text" in output:
            parts.append(output["text"])
        parts.extend(str(v) for k, v in output.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(parts)


def test_magics_notebook_runs_top_to_bottom(
    app_worker: WorkerProcess,
    racto_env: dict[str, str],
    python3_kernel: str,
    fake_openai: FakeOpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), (
        "commit it without outputs"
    )
    for name, value in racto_env.items():
        monkeypatch.setenv(name, value)  # the kernel inherits this environment
    before = fake_openai.count()

    client = nbclient.NotebookClient(
        notebook,
        kernel_name=python3_kernel,
        timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell

    code = [c for c in notebook.cells if c.cell_type == "code"]
    outputs = "\n".join(_text(c) for c in code)
    assert "racto_nb: connected to redis://127.0.0.1" in outputs
    assert "success after 1 attempt(s)" in outputs
    assert "echo: Summarise this report in three bullets: Q3 revenue grew 4%" in outputs
    assert "still free while it runs: 42" in outputs
    assert f"same frame: (6, {len(FRAME_COLUMNS) + 1})" in outputs  # + the prompt column
    widget_views = [
        o
        for c in code
        for o in c.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert len(widget_views) >= 4  # a status line and three batch views, drawn by a real ipykernel
    assert fake_openai.count() - before == 1 + 5 + 5 + 5  # skipped rows never reach the model


def test_background_widget_updates_leave_the_kernel_with_the_cell_that_started_them(
    app_worker: WorkerProcess,
    racto_env: dict[str, str],
    python3_kernel: str,
    fake_openai: FakeOpenAIServer,
    unique_case: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ipykernel 7 (ipywidgets #4001/#4020): a watcher thread's widget updates must reach the front-end.

    Front-ends route ``comm_msg`` by comm id; the parent header is what ties the update to a cell.
    Here the batch ends while *another* cell is the kernel's latest, and the final state update must
    still be sent, parented to the cell that displayed the view.
    """
    from jupyter_client.manager import start_new_kernel

    for name, value in racto_env.items():
        monkeypatch.setenv(name, value)
    fake_openai.script(unique_case, [], latency_s=1.0)  # the batch outlives both cells
    km, kc = start_new_kernel(kernel_name=python3_kernel, startup_timeout=60)
    try:
        first = kc.execute(
            "import pandas as pd\n"
            "%load_ext racto_nb\n"
            "%racto_connect\n"
            f"s = pd.Series([f'bg {{i}} [case:{unique_case}]' for i in range(4)])\n"
            "run = %racto_batch s --background --progress widget\n"
        )
        _reply(kc, first)
        second = kc.execute("x = 1", user_expressions={"done": "run.done.is_set()"})
        still = _reply(kc, second)["content"]["user_expressions"]["done"]["data"]["text/plain"]
        assert still == "False"  # the batch ends after this cell, so the last update is not the cell's own

        final = _await_update(kc, lambda state: "4/4" in str(state.get("value", "")), timeout_s=30)

        assert final["parent_header"]["msg_id"] == first
        assert "title='success: 4'" in final["content"]["data"]["state"]["value"]
        done = kc.execute("", user_expressions={"done": "run.done.is_set()", "watching": "run.watching"})
        reply = _reply(kc, done)
        assert reply["content"]["user_expressions"]["done"]["data"]["text/plain"] == "True"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _reply(kc: Any, msg_id: str) -> dict[str, Any]:
    while True:
        reply: dict[str, Any] = kc.get_shell_msg(timeout=60)
        if reply["parent_header"].get("msg_id") == msg_id:
            assert reply["content"]["status"] == "ok", reply["content"]
            return reply


def _await_update(kc: Any, wanted: Any, *, timeout_s: float) -> dict[str, Any]:
    import queue
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            msg: dict[str, Any] = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        data = msg["content"].get("data", {}) if msg["msg_type"] == "comm_msg" else {}
        if data.get("method") == "update" and wanted(data.get("state", {})):
            return msg
    raise AssertionError("no widget update from the watcher thread reached the kernel's iopub channel")


def test_text_progress_from_a_background_batch_stays_in_its_own_cell(
    app_worker: WorkerProcess,
    racto_env: dict[str, str],
    python3_kernel: str,
    fake_openai: FakeOpenAIServer,
    unique_case: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With text progress (nbconvert, terminals) the bar is written from the watcher thread; under
    ipykernel 7 a write goes to the cell of the writer's context, so it must be the cell that started it."""
    import queue
    import time

    from jupyter_client.manager import start_new_kernel

    for name, value in racto_env.items():
        monkeypatch.setenv(name, value)
    fake_openai.script(unique_case, [], latency_s=0.5)
    km, kc = start_new_kernel(kernel_name=python3_kernel, startup_timeout=60)
    try:
        setup = kc.execute(
            "import pandas as pd, time\n%load_ext racto_nb\n%racto_connect\n"
            '%config RactoMagics.progress = "text"\n'
        )
        _reply(kc, setup)
        started = kc.execute(
            f"s = pd.Series([f'bg {{i}} [case:{unique_case}]' for i in range(6)])\n"
            "run = %racto_batch s --background\n"
        )
        _reply(kc, started)
        later = kc.execute("time.sleep(4)\nprint('later cell')\n")
        _reply(kc, later)
        done = kc.execute("", user_expressions={"done": "run.done.wait(30)"})
        assert _reply(kc, done)["content"]["user_expressions"]["done"]["data"]["text/plain"] == "True"

        streams: dict[str, str] = {}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                break
            if msg["msg_type"] == "stream":
                parent = msg["parent_header"].get("msg_id", "")
                streams[parent] = streams.get(parent, "") + msg["content"]["text"]
        assert "6/6" in streams.get(started, ""), streams  # the bar, in the cell that started the batch
        assert streams.get(later, "").strip() == "later cell", streams  # and nothing of it in the later cell
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
