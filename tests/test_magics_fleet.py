"""``%racto_workers`` and ``%racto_status`` through IPython's ``InteractiveShell``.

Real worker processes on a Redis of this module's own (the session's Redis has
the engine tests' worker on it, which ``%racto_status`` would list too), the
kit reaching the fake OpenAI server, configured by ``RACTO_*`` variables as in
tests/test_fleet.py. What the user sees is captured with IPython's
``capture_output``, which records displays as the front-end would get them.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import CapturedIO, capture_output

import racto_nb
from racto_nb import api as fleet
from racto_nb.models import TaskResult, TaskStatus
from racto_nb.testing import FakeOpenAIServer, RedisServer, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def ip(
    shell: InteractiveShell, fake_openai: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[InteractiveShell]:
    """The shell, with the settings a user would export before starting Jupyter; no broker configured."""
    for name in list(os.environ):
        if name.startswith("RACTO_") and name != "RACTO_CHECKPOINT_DIR":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RACTO_PROVIDER", "openai")
    monkeypatch.setenv("RACTO_MODEL", "fake-model")
    monkeypatch.setenv("RACTO_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("RACTO_TIMEOUT_S", "5")
    racto_nb.disconnect()
    yield shell
    fleet.stop_workers()
    racto_nb.disconnect()


def _run(ip: InteractiveShell, name: str, line: str = "") -> CapturedIO:
    captured: CapturedIO
    with capture_output() as captured:
        assert ip.run_line_magic(name, line) is None  # nothing for the cell to echo
    return captured


def _status(ip: InteractiveShell, line: str = "") -> tuple[str, str]:
    """``%racto_status``'s one display: (text, HTML)."""
    captured = _run(ip, "racto_status", line)
    (shown,) = captured.outputs
    return shown.data["text/plain"], shown.data["text/html"]


def test_start_status_generate_stop(ip: InteractiveShell, redis: RedisServer, unique_case: str) -> None:
    ip.run_line_magic("racto_connect", redis.url)

    started = _run(ip, "racto_workers", "start 1 --concurrency 3").stdout

    (process,) = fleet.running_workers()
    nodename = str(process.nodename)
    assert started.strip() == f"{nodename}  pid {process.pid}  log {process.log_path}"
    assert _run(ip, "racto_workers").stdout == started  # no subcommand lists them
    text, html = _status(ip)
    assert re.search(rf"{re.escape(redis.url)}: reachable \(\d", text)
    assert "1 online, 3 slots" in text and f"{nodename}: thread x 3" in text and "racto_nb.default: 0 waiting" in text
    assert "<table" in html and nodename in html

    ip.user_ns["case"] = unique_case
    ip.run_cell_magic("racto_generate", "--out answer", "Hello [case:{case}]")
    answer = ip.user_ns["answer"]
    assert isinstance(answer, TaskResult) and answer.status is TaskStatus.SUCCESS, process.log_tail()
    assert answer.content == f"echo: Hello [case:{unique_case}]"
    assert f"{nodename}: thread x 3, processed 1" in _status(ip)[0]

    assert _run(ip, "racto_workers", "stop").stdout == "stopped 1 worker\n"
    assert not process.is_alive() and fleet.running_workers() == []
    assert "no workers started from this kernel are running" in _run(ip, "racto_workers").stdout
    assert "0 online" in _status(ip)[0]
    assert _run(ip, "racto_workers", "stop").stdout.startswith("stopped 0 workers: none")


def test_status_of_an_unreachable_broker_is_shown_within_5_s(
    ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RACTO_BROKER_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")  # configured, dead

    for line in ("", f"redis://127.0.0.1:{free_port()}/0 --timeout 2"):  # the configured broker, then a URL
        started = time.monotonic()
        text, html = _status(ip, line)
        assert time.monotonic() - started < 5
        assert "UNREACHABLE" in text and "cannot reach the broker" in text and "redis-server" in text
        assert "UNREACHABLE" in html
    assert "hunter2" not in text + html


def test_start_on_an_embedded_kernel_is_a_one_line_usage_error(ip: InteractiveShell) -> None:
    ip.run_line_magic("racto_connect", "")  # no URL: embedded

    with pytest.raises(UsageError, match=r"%racto_connect redis://") as info:
        ip.run_line_magic("racto_workers", "start 1")

    assert "\n" not in str(info.value) and fleet.running_workers() == []


@pytest.mark.parametrize(
    ("name", "line", "message"),
    [
        ("racto_workers", "restart", r"unknown subcommand 'restart': use %racto_workers start .*, %racto_workers stop"),
        ("racto_workers", "start two", "argument N: invalid int value: 'two'"),
        ("racto_workers", "start 0", "N must be at least 1"),
        ("racto_workers", "start 2 --concurrency 0", "--concurrency must be at least 1"),
        ("racto_workers", "stop 2", "N and --concurrency go with start, not stop"),
        ("racto_status", "--timeout 0", "--timeout must be a number of seconds > 0"),
    ],
)
def test_bad_input_is_a_usage_error_and_starts_nothing(
    ip: InteractiveShell, name: str, line: str, message: str
) -> None:
    with pytest.raises(UsageError, match=message) as info:
        ip.run_line_magic(name, line)
    assert "\n" not in str(info.value) and fleet.running_workers() == []


def test_unload_removes_the_fleet_magics() -> None:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "racto_nb")
    ip.run_line_magic("unload_ext", "racto_nb")
    assert ip.magics_manager is not None
    assert not {"racto_workers", "racto_status"} & set(ip.magics_manager.magics["line"])
    ip.run_line_magic("load_ext", "racto_nb")  # the module fixture expects them back
    ip.run_line_magic("config", 'RactoMagics.progress = "none"')
