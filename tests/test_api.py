"""The Python API the magics call, against the session's real worker process."""

from __future__ import annotations

import _thread
import signal
import threading
from typing import Any

import pandas as pd
import pytest

from racto_nb import api
from racto_nb.batch.batch import Batch
from racto_nb.batch.templates import TemplateError
from racto_nb.engine.worker import RactoCeleryWorker
from racto_nb.models import TaskResult, TaskStatus
from racto_nb.notebook.runs import BatchRun, TaskRun
from racto_nb.notebook.status_line import StatusLine
from racto_nb.notebook.views import WidgetProgressView
from racto_nb.testing import FakeOpenAIServer, RedisServer
from tests.batch_support import idle_worker, sent_messages, settle_threads, task_meta_channels, worker

__all__ = ["idle_worker", "worker"]  # fixtures, imported for pytest

pytestmark = pytest.mark.slow


class Recorder:
    """A status view that keeps every line it is asked to draw."""

    interactive = False

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.closed: TaskResult | None = None

    def display(self) -> None:
        pass

    def update(self, result: TaskResult) -> None:
        self.lines.append(StatusLine.render(result, max_retries=3))

    def close(self, final: TaskResult | None = None) -> None:
        self.closed = final

    def announce(self, text: str) -> None:
        self.lines.append(text)


# ---------------------------------------------------------------------------- run_batch


def test_series_runs_as_its_values_and_keeps_the_index(
    worker: RactoCeleryWorker, unique_case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    reviews = pd.Series([f"good [case:{unique_case}]", None, f"bad [case:{unique_case}]"], index=[5, 5, 9])

    result = api.run_batch(reviews, worker=worker, progress="text")

    assert result.index.equals(reviews.index)
    assert list(result["status"]) == ["success", "skipped", "success"]
    assert result["content"].iloc[2] == f"echo: bad [case:{unique_case}]"
    out = capsys.readouterr().out
    assert "2 tasks, 3 rows (1 skipped); reattach: %racto_batch --attach" in out
    assert settle_threads() == []


def test_list_source_and_a_template_over_a_named_series(worker: RactoCeleryWorker, unique_case: str) -> None:
    listed = api.run_batch([f"a [case:{unique_case}]", f"b [case:{unique_case}]"], worker=worker, progress="none")
    named = api.run_batch(
        pd.Series(["x"], name="review"),
        f"Classify: {{review}} [case:{unique_case}]",
        worker=worker,
        progress="none",
    )

    assert list(listed["content"]) == [f"echo: a [case:{unique_case}]", f"echo: b [case:{unique_case}]"]
    assert isinstance(listed.index, pd.RangeIndex)
    assert named["content"].iloc[0] == f"echo: Classify: x [case:{unique_case}]"


def test_write_back_and_custom_ids_from_the_frame(worker: RactoCeleryWorker, unique_case: str) -> None:
    df = pd.DataFrame({"review": ["good", "bad", None], "id": ["r1", "r2", "r3"]}, index=pd.Index([1, 1, 2], name="k"))

    result = api.run_batch(
        df,
        f"{{review}} [case:{unique_case}]",
        worker=worker,
        custom_id="id",
        write_back="label",
        progress="none",
    )
    from_series = api.run_batch(
        df["review"], worker=worker, frame=df, write_back="again", progress="none", custom_id="id"
    )

    assert list(result["custom_id"].iloc[:2]) == ["r1", "r2"] and pd.isna(result["custom_id"].iloc[2])
    assert list(df["label"].iloc[:2]) == [
        f"echo: good [case:{unique_case}]",
        f"echo: bad [case:{unique_case}]",
    ]
    assert pd.isna(df["label"].iloc[2])
    assert list(df["again"].iloc[:2]) == ["echo: good", "echo: bad"]
    assert list(from_series["custom_id"].iloc[:2]) == ["r1", "r2"]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda w, df: api.run_batch(df, worker=w), TemplateError, "a DataFrame needs a template"),
        (lambda w, df: api.run_batch(df["review"], "{author}", worker=w), TemplateError, "only its values"),
        (
            lambda w, df: api.run_batch(df, "{nope}", worker=w),
            TemplateError,
            r"unknown column\(s\) \['nope'\]",
        ),
        (lambda w, df: api.run_batch(df.iloc[:0], "{review}", worker=w), TemplateError, "no rows"),
        (lambda w, df: api.run_batch(df, "{x.y}", worker=w), TemplateError, "not a plain name"),
        (lambda w, df: api.run_batch(df["review"], worker=w, write_back="l"), ValueError, "pass frame=df"),
        (lambda w, df: api.run_batch(df, "{review}", worker=w, write_back="review"), ValueError, "overwrite"),
        (
            lambda w, df: api.run_batch(["a"], worker=w, custom_id="id"),
            ValueError,
            "custom_id names a column",
        ),
        (
            lambda w, df: api.run_batch(df, "{review}", worker=w, custom_id="nope"),
            ValueError,
            "not in the frame",
        ),
        (lambda w, df: api.run_batch(df, "{review}", worker=w, temperature=-1), ValueError, "temperature"),
        (lambda w, df: api.run_batch(df, "{review}", worker=w, max_tokens=0), ValueError, "max_tokens"),
        (
            lambda w, df: api.run_batch(df, "{review}", worker=w, progress="fancy"),  # type: ignore[call-overload]
            ValueError,
            "progress must",
        ),
        (lambda w, df: api.run_batch([1, 2], worker=w), TypeError, "must hold strings"),
        (lambda w, df: api.run_batch({"a": 1}, worker=w), TypeError, "source must be"),
        (
            lambda w, df: api.run_batch(df.assign(review=None), "{review}", worker=w),
            TemplateError,
            "every row",
        ),
    ],
)
def test_bad_input_fails_before_anything_is_sent(
    worker: RactoCeleryWorker, redis_server: RedisServer, call: Any, error: type[Exception], message: str
) -> None:
    df = pd.DataFrame({"review": ["good"], "author": ["a"], "id": ["1"]})
    client = redis_server.client()
    before = set(client.keys("racto:batch:*"))
    with pytest.raises(error, match=message):
        call(worker, df)
    assert set(client.keys("racto:batch:*")) == before
    client.close()


def test_background_run_fills_the_result_and_its_thread_ends(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, redis_server: RedisServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, [], latency_s=0.3)
    done: list[pd.DataFrame] = []
    df = pd.DataFrame({"text": [f"{i} [case:{unique_case}]" for i in range(6)]}, index=list("aabbcc"))

    run = api.run_batch(df, "{text}", worker=worker, wait=False, progress="none", on_done=done.append, write_back="out")

    assert isinstance(run, BatchRun) and run.watching
    with pytest.raises(RuntimeError, match=r"still running: wait with run\.done\.wait"):
        run.result()
    assert run.done.wait(20)
    assert settle_threads() == []
    frame = run.result()
    assert len(done) == 1 and done[0] is frame
    assert frame.index.equals(df.index) and list(frame["status"]) == ["success"] * 6
    assert list(df["out"]) == list(frame["content"])
    assert task_meta_channels(redis_server) == []


def test_stop_watching_ends_the_thread_and_leaves_the_batch_running(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, [], latency_s=0.5)
    run = api.run_batch([f"{i} [case:{unique_case}]" for i in range(3)], worker=worker, wait=False, progress="none")

    run.stop_watching()

    assert not run.watching and not run.done.is_set() and settle_threads() == []
    final = api.attach(run.batch_id, worker=worker, wait=True, progress="none")
    assert list(final["status"]) == ["success"] * 3


def test_widget_buttons_retry_into_the_same_frame(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    bad = f"{unique_case}-bad"
    fake_openai.script(bad, ["401"])  # not retried by the worker: the row fails, Retry-failed fixes it
    calls: list[pd.DataFrame] = []
    df = pd.DataFrame({"text": [f"ok [case:{unique_case}]", f"no [case:{bad}]"]})
    rows = api.prepare_rows(df, "{text}", write_back="out")
    batch = Batch.submit(worker, rows)
    run = BatchRun(batch, progress="widget", on_done=calls.append, write_back=rows.write_back, interval_s=0.05)
    run.show()

    frame = run.wait()

    view = run.view
    assert isinstance(view, WidgetProgressView)
    assert "2/2" in view.bar.value and "Finished — 1 failed" in view.state.value
    assert view.counts[TaskStatus.FAILURE].value == "failure: 1"
    assert view.counts[TaskStatus.FAILURE].style.text_color == "#c62828"
    assert not view.retry_button.disabled and view.cancel_button.disabled
    assert batch.batch_id in view.header.value
    assert list(frame["status"]) == ["success", "failure"] and calls == [frame]

    view.retry_button.click()  # resubmits the failed row and follows it in the background

    assert view.retry_button.disabled and view.retry_button.description == "Retry submitted"
    assert run.done.wait(20)
    assert len(calls) == 2 and calls[1] is frame  # the same DataFrame object, updated in place
    assert list(frame["status"]) == ["success", "success"]
    assert df["out"].iloc[1] == f"echo: no [case:{bad}]"
    assert "2/2" in view.bar.value and view.state.value.endswith(">Finished</b>")
    assert settle_threads() == []


def test_cancel_button_in_background_mode(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, [], latency_s=0.6)
    done: list[pd.DataFrame] = []
    run = api.run_batch(
        [f"{i} [case:{unique_case}]" for i in range(30)],
        worker=worker,
        wait=False,
        progress="widget",
        on_done=done.append,
    )
    assert isinstance(run.view, WidgetProgressView)

    run.view.cancel_button.click()

    assert run.done.wait(20) and settle_threads() == []
    frame = run.result()
    assert done and done[0] is frame
    assert (frame["status"] == "revoked").sum() > 0
    revoked = int((frame["status"] == "revoked").sum())
    assert f"Cancelled — {revoked} revoked" in run.view.state.value and run.view.cancel_button.disabled


def test_keyboard_interrupt_stops_waiting_and_says_how_to_reattach(
    worker: RactoCeleryWorker,
    fake_openai: FakeOpenAIServer,
    unique_case: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_openai.script(unique_case, [], latency_s=1.0)
    # What a kernel's Stop delivers. A test run started in the background (nohup, `cmd &`) inherits
    # SIGINT ignored, and then interrupt_main() does nothing: give the test the handler a kernel has.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.4, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            api.run_batch([f"{i} [case:{unique_case}]" for i in range(4)], worker=worker, progress="text")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)

    out = capsys.readouterr().out
    assert "Interrupted: stopped waiting for batch" in out and "it keeps running on the workers" in out
    batch_id = out.split("reattach: %racto_batch --attach ")[1].split()[0]
    assert f"%racto_batch --attach {batch_id} --cancel" in out
    assert settle_threads(0.5) == []
    final = api.attach(batch_id, worker=worker, wait=True, progress="none")
    assert list(final["status"]) == ["success"] * 4  # the batch went on without the cell


def test_timeout_returns_the_rows_as_they_are(
    worker: RactoCeleryWorker,
    fake_openai: FakeOpenAIServer,
    unique_case: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_openai.script(unique_case, [], latency_s=1.0)

    partial = api.run_batch(
        [f"{i} [case:{unique_case}]" for i in range(2)], worker=worker, timeout_s=0.3, progress="none"
    )

    assert set(partial["status"]) <= {"pending", "started"}
    assert "Timed out after 0.3 s: stopped waiting" in capsys.readouterr().out
    assert settle_threads() == []


def test_attach_returns_a_run_with_rows_so_far(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, [], latency_s=0.5)
    first = api.run_batch([f"{i} [case:{unique_case}]" for i in range(3)], worker=worker, wait=False, progress="none")
    first.stop_watching()

    run = api.attach(first.batch_id, worker=worker, progress="none")

    assert isinstance(run, BatchRun)
    assert len(run.frame()) == 3
    assert run.done.wait(20)
    assert list(run.result()["status"]) == ["success"] * 3
    with pytest.raises(LookupError, match="no batch"):
        api.attach("not-a-batch", worker=worker)


def test_attach_with_cancel(worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    fake_openai.script(unique_case, [], latency_s=0.6)
    first = api.run_batch([f"{i} [case:{unique_case}]" for i in range(30)], worker=worker, wait=False, progress="none")
    first.stop_watching()

    frame = api.attach(first.batch_id, worker=worker, wait=True, cancel=True, progress="none")

    assert (frame["status"] == "revoked").sum() > 0
    assert set(frame["status"]) <= {"success", "revoked"}


# ---------------------------------------------------------------------------- generate


def test_generate_sends_the_system_prompt_as_a_message(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    line = Recorder()

    result = api.generate(
        f"Hello [case:{unique_case}]",
        worker=worker,
        system_prompt="Be terse.",
        temperature=0.2,
        progress=line,
    )

    assert result.status is TaskStatus.SUCCESS
    assert result.content == f"[system: Be terse.] echo: Hello [case:{unique_case}]"
    body = fake_openai.requests(unique_case)[0].body
    assert body["messages"][0] == {"role": "system", "content": "Be terse."} and body["temperature"] == 0.2
    assert line.closed is not None and line.lines[-1].startswith("success")


def test_generate_status_line_shows_the_retry_countdown(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, ["429:1", "ok"])
    line = Recorder()

    result = api.generate(f"Hi [case:{unique_case}]", worker=worker, progress=line)

    assert result.status is TaskStatus.SUCCESS and result.attempts == 2
    assert "retry 1 of 3, next try in 1 s (RateLimitError 429)" in line.lines
    assert line.lines[-1].endswith("(attempt 2)")


def test_generate_timeout_keeps_the_real_status(
    worker: RactoCeleryWorker,
    fake_openai: FakeOpenAIServer,
    unique_case: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_openai.script(unique_case, [], latency_s=1.0)

    result = api.generate(f"slow [case:{unique_case}]", worker=worker, timeout_s=0.3, progress="none")

    assert result.status in (TaskStatus.PENDING, TaskStatus.STARTED)
    assert result.error_type == "WaitTimeout"
    assert f"racto_nb.api.get_result('{result.task_id}')" in capsys.readouterr().out
    assert api.get_result(result.task_id, worker=worker).task_id == result.task_id


def test_generate_in_the_background_calls_back_once(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, [], latency_s=0.3)
    got: list[TaskResult] = []

    run = api.generate(f"bg [case:{unique_case}]", worker=worker, wait=False, progress="none", on_done=got.append)

    assert isinstance(run, TaskRun)
    assert run.done.wait(10) and settle_threads() == []
    assert got == [run.result()] and got[0].content == f"echo: bg [case:{unique_case}]"
    assert sent_messages(fake_openai, unique_case) == [f"bg [case:{unique_case}]"]


def test_generate_rejects_an_empty_prompt(worker: RactoCeleryWorker) -> None:
    with pytest.raises(ValueError, match="the prompt is empty"):
        api.generate("   ", worker=worker)


def test_no_worker_online_is_said_at_once_on_submit_and_on_attach(
    idle_worker: RactoCeleryWorker, capsys: pytest.CaptureFixture[str]
) -> None:
    run = api.run_batch(["a", "b"], worker=idle_worker, wait=False, progress="none")
    assert f"no worker is online for queue {idle_worker.queue!r}" in capsys.readouterr().out
    run.stop_watching()

    api.attach(run.batch_id, worker=idle_worker, progress="none").stop_watching()

    out = capsys.readouterr().out
    assert "no worker is online" in out and "%racto_workers start 2" in out
    run.cancel()


def test_a_retried_row_keeps_its_attempt_history_across_retry_failed(
    worker: RactoCeleryWorker, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    flaky, bad = f"{unique_case}-flaky", f"{unique_case}-bad"
    fake_openai.script(flaky, ["429"])
    fake_openai.script(bad, ["401"])
    run = api.run_batch([f"a [case:{flaky}]", f"b [case:{bad}]"], worker=worker, wait=False, progress="none")
    assert run.done.wait(30)
    first = run.result()
    assert first["status"].tolist() == ["success", "failure"]
    assert len(first["history"].iloc[0]) == 1 and "attempt 1: " in first["history"].iloc[0][0]
    assert "HTTP 429" in first["history"].iloc[0][0]
    assert first["history"].iloc[1] == []  # a 401 is not retried: its one attempt is its error

    assert run.retry_failed() == 1 and run.done.wait(30)
    history = run.result()["history"].iloc[1]
    assert run.result()["status"].iloc[1] == "success"
    assert len(history) == 1 and history[0].startswith("round 0: failure after 1 attempts: ")
    assert "HTTP 401" in history[0]


def test_a_run_handle_renders_its_state_as_static_html(
    worker: RactoCeleryWorker, unique_case: str
) -> None:
    run = api.run_batch([f"{i} [case:{unique_case}]" for i in range(3)], worker=worker, wait=False, progress="none")
    assert run.done.wait(30)
    page = run._repr_html_()
    assert "Finished" in page and "success: 3" in page and f"--attach {run.batch_id}" in page
