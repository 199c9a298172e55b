"""The magics, driven through IPython's ``InteractiveShell`` against the session's real worker.

Like jupysql's tests: ``run_line_magic``/``run_cell_magic`` raise, so errors are
asserted directly; ``run_cell`` is used where what the user sees matters.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import racto_nb
from racto_nb.engine.worker import RactoCeleryWorker
from racto_nb.magics.declarations import RactoMagics
from racto_nb.models import TaskResult, TaskStatus
from racto_nb.notebook import display as racto_display
from racto_nb.notebook.runs import BatchRun, TaskRun
from racto_nb.testing import FakeOpenAIServer, RedisServer
from tests.batch_support import sent_messages, settle_threads, worker

__all__ = ["worker"]  # fixture, imported for pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def ip(shell: InteractiveShell, worker: RactoCeleryWorker) -> Iterator[InteractiveShell]:
    racto_nb.connect(worker)
    yield shell
    racto_nb.disconnect()


@pytest.fixture
def shown(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Objects the magics display (e.g. the Markdown of an answer)."""
    objects: list[Any] = []
    monkeypatch.setattr(racto_display, "ipython_display", objects.append)
    return objects


def _frame(case: str) -> pd.DataFrame:
    return pd.DataFrame(
        {"review": [f"good [case:{case}]", f"bad [case:{case}]", None], "author": ["ann", "bob", "cy"]},
        index=[4, 4, 8],
    )


def test_load_ext_registers_the_magics_and_their_config(shell: InteractiveShell) -> None:
    assert shell.magics_manager is not None
    magics = shell.magics_manager.magics
    assert {"racto_batch", "racto_connect"} <= set(magics["line"])
    assert {"racto_batch", "racto_generate"} <= set(magics["cell"])
    config = [c for c in shell.configurables if isinstance(c, RactoMagics)]
    assert len(config) == 1 and config[0].progress == "none"


def test_line_magic_over_a_column_stores_a_frame_indexed_like_it(ip: InteractiveShell, unique_case: str) -> None:
    ip.user_ns["df"] = df = _frame(unique_case)

    returned = ip.run_line_magic("racto_batch", 'df["review"] --out labels')

    labels = ip.user_ns["labels"]
    assert returned is None
    assert labels.index.equals(df.index)
    assert list(labels["status"]) == ["success", "success", "skipped"]
    assert labels["content"].iloc[0] == f"echo: good [case:{unique_case}]"
    assert {"task_id", "error", "error_type", "attempts", "latency_s", "total_tokens"} <= set(labels.columns)


def test_template_and_write_back_reach_the_parent_frame(ip: InteractiveShell, unique_case: str) -> None:
    ip.user_ns["df"] = df = _frame(unique_case)

    frame = ip.run_line_magic(
        "racto_batch", 'df["review"] --template "Classify the sentiment of: {review}" --write-back label'
    )

    assert isinstance(frame, pd.DataFrame)  # no --out: the frame is the cell's value
    assert df["label"].iloc[1] == f"echo: Classify the sentiment of: bad [case:{unique_case}]"
    assert pd.isna(df["label"].iloc[2])


def test_cell_magic_template_names_the_row_columns(ip: InteractiveShell, unique_case: str) -> None:
    index = pd.MultiIndex.from_tuples([("x", 1), ("x", 1), ("y", 2)], names=["shop", "day"])
    ip.user_ns["df"] = _frame(unique_case).set_index(index)

    ip.run_cell_magic(
        "racto_batch",
        "df --out labels --custom-id author --on-missing empty",
        "Classify the sentiment of this review by {author}: {review}\n",
    )

    labels = ip.user_ns["labels"]
    assert labels.index.equals(index)
    assert labels["content"].iloc[0] == f"echo: Classify the sentiment of this review by ann: good [case:{unique_case}]"
    assert labels["content"].iloc[2] == "echo: Classify the sentiment of this review by cy: "
    assert list(labels["custom_id"]) == ["ann", "bob", "cy"]


@pytest.mark.parametrize(
    ("line", "cell", "message"),
    [
        ('df --template "{nope}"', None, r"unknown column\(s\) \['nope'\]"),
        ("df", "{review.__class__}", "not a plain name"),
        ("df", "{review[0]}", "not a plain name"),
        ('empty["review"]', None, "no rows; nothing to send"),
        ('df["review"] --on-missing maybe', None, "invalid choice: 'maybe'"),
        ('df["review"] --temperature -1', None, "temperature must be a number from 0 to 2"),
        ('df["review"] --temperature 2.5', None, "temperature must be a number from 0 to 2"),
        ('df["review"] --temperature nan', None, "temperature must be a number from 0 to 2"),
        ('df["review"] --max-tokens 0', None, "max_tokens must be a whole number > 0"),
        ('df["review"] --progress fancy', None, "invalid choice: 'fancy'"),
        ('nope["x"]', None, "cannot evaluate 'nope\\[\"x\"\\]': NameError"),
        ("", None, "name the rows"),
        ('df["review"] --out 1x', None, "--out needs a variable name"),
        ('df --template "{review}"', "{author}", "give the template once"),
        ("df", "   ", "the cell body is the template and it is empty"),
        ('df["review"] --template "unclosed {"', None, "write literal braces"),
        ('df["review"] --template \'it"s', None, "check the quotes"),
        ('df["review"] --cancel', None, "--cancel goes with --attach"),
        ("df --attach 1234", None, "--attach ID rebuilds a batch that already exists"),
        ("--attach no-such-batch", None, "no batch 'no-such-batch'"),
        ("df", None, "a DataFrame needs a template"),
        ('df["review"] --write-back review', None, "would overwrite the column"),
        ('df["review"] --max-cost 5', None, "max_cost_usd needs a price for model .* set RACTO_PRICE_IN_PER_MTOK"),
        ('df["review"] --max-cost -1', None, "max_cost_usd must be a number of dollars > 0"),
        ('df["review"] --resume', None, "--resume goes with --attach"),
        ("--attach x --resume --cancel", None, "pull opposite ways"),
        ("--attach x --max-cost 3", None, "add --resume"),
        ('df["review"] --estimate --background', None, "--estimate sends nothing"),
    ],
)
def test_bad_input_is_a_one_line_usage_error_and_nothing_is_sent(
    ip: InteractiveShell, redis_server: RedisServer, line: str, cell: str | None, message: str
) -> None:
    ip.user_ns["df"] = _frame("never-sent")
    ip.user_ns["empty"] = _frame("never-sent").iloc[:0]
    client = redis_server.client()
    before = set(client.keys("racto:batch:*"))

    with pytest.raises(UsageError, match=message) as info:
        if cell is None:
            ip.run_line_magic("racto_batch", line)
        else:
            ip.run_cell_magic("racto_batch", line, cell)

    assert "\n" not in str(info.value)
    assert set(client.keys("racto:batch:*")) == before
    client.close()


def test_estimate_sends_nothing_and_says_what_would_be_sent(
    ip: InteractiveShell, fake_openai: FakeOpenAIServer, unique_case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.user_ns["df"] = _frame(unique_case)

    ip.run_line_magic("racto_batch", 'df["review"] --estimate --out guess')

    guess = ip.user_ns["guess"]
    assert (guess.rows, guess.sent) == (3, 2)  # the None row would be skipped
    assert guess.prompt_tokens > 0 and guess.cost_usd_high is None  # the test model has no price
    assert "2 of 3 rows would be sent" in capsys.readouterr().out
    assert fake_openai.count(unique_case) == 0


def test_a_re_run_cell_is_answered_by_the_ledger_unless_no_cache(
    ip: InteractiveShell, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    ip.user_ns["df"] = _frame(unique_case)
    ip.run_line_magic("racto_batch", 'df["review"] --out first')
    ip.run_line_magic("racto_batch", 'df["review"] --out again')
    assert fake_openai.count(unique_case) == 2
    assert list(ip.user_ns["again"]["cached"]) == [True, True, False]  # the skipped row is not an answer

    ip.run_line_magic("racto_batch", 'df["review"] --out fresh --no-cache')

    assert fake_openai.count(unique_case) == 4
    assert not ip.user_ns["fresh"]["cached"].any()
    assert list(ip.user_ns["fresh"]["content"]) == list(ip.user_ns["first"]["content"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('df["review"] --templ "{review}"', "unknown option --templ; did you mean --template?"),
        ('df["review"] -template "{review}"', "-template is not an option: did you mean --template?"),
        ('df["review"] --out labels extra', "unexpected word 'extra'"),
        ('df["review"] --out-of-this-world 1', "unknown option --out-of-this-world"),
    ],
)
def test_options_are_never_guessed(ip: InteractiveShell, line: str, message: str) -> None:
    ip.user_ns["df"] = _frame("never-sent")
    with pytest.raises(UsageError, match=re.escape(message)):
        ip.run_line_magic("racto_batch", line)


@pytest.mark.parametrize("magic", ["racto_batch", "racto_connect", "racto_workers", "racto_status", "racto_batches"])
def test_every_magic_answers_help(ip: InteractiveShell, magic: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert ip.run_line_magic(magic, "--help") is None
    out = capsys.readouterr().out
    assert out.startswith(f"::\n\n  %{magic}") and "--help" not in out.split("\n")[2]
    ip.run_cell_magic("racto_generate", "-h", "never sent")
    assert "%racto_generate" in capsys.readouterr().out


def test_a_real_bug_keeps_its_traceback_and_short_errors_false_keeps_every_one(
    ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.user_ns["df"] = _frame("never-sent")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("a bug deep inside")

    with monkeypatch.context() as patched:
        patched.setattr(racto_nb.api, "run_batch", broken)
        result = ip.run_cell('%racto_batch df["review"]')
    assert isinstance(result.error_in_exec, ValueError)  # not turned into a one-line UsageError
    shown = capsys.readouterr()
    assert "Traceback" in shown.out + shown.err and "a bug deep inside" in shown.out + shown.err

    ip.run_line_magic("config", "RactoMagics.short_errors = False")
    try:
        result = ip.run_cell('%racto_batch df --template "{missing_col}"')
    finally:
        ip.run_line_magic("config", "RactoMagics.short_errors = True")
    assert type(result.error_in_exec).__name__ == "TemplateError"  # the real class, with its traceback


def test_batches_lists_the_newest_first_and_attach_latest_finds_it(
    ip: InteractiveShell, unique_case: str
) -> None:
    ip.user_ns["df"] = _frame(unique_case)
    ip.run_line_magic("racto_batch", 'df["review"] --out first')
    ip.run_line_magic("racto_batch", 'df["review"] --out second --no-cache')
    second = ip.user_ns["second"].attrs["racto_batch_id"]

    listed = ip.run_line_magic("racto_batches", "--limit 2")

    assert listed.index[0] == second
    assert listed.index[1] == ip.user_ns["first"].attrs["racto_batch_id"]
    newest = listed.loc[second]
    assert (newest["rows"], newest["success"], newest["skipped"], newest["unfinished"]) == (3, 2, 1, 0)
    assert newest["title"] == '%racto_batch df["review"] --out second --no-cache'
    ip.run_line_magic("racto_batch", "--attach latest --out again")
    pd.testing.assert_frame_equal(ip.user_ns["again"], ip.user_ns["second"])


def test_usage_errors_show_no_traceback(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.user_ns["df"] = _frame("never-sent")

    result = ip.run_cell('%racto_batch df --template "{missing_col}"')

    assert isinstance(result.error_in_exec, UsageError)
    err = capsys.readouterr().err
    assert "UsageError: template names unknown column(s) ['missing_col']" in err
    assert "Traceback" not in err


def test_generate_fills_names_renders_markdown_and_stores_the_result(
    ip: InteractiveShell, fake_openai: FakeOpenAIServer, unique_case: str, shown: list[Any]
) -> None:
    ip.user_ns["report_text"] = "Q3 revenue rose 4%."
    ip.user_ns["case"] = unique_case

    ip.run_cell_magic(
        "racto_generate",
        '--out summary --temperature 0.2 --system "Be brief." --max-tokens 64',
        'Summarise this report in three bullets: {report_text} as {{"json": true}} [case:{case}]\n',
    )

    summary = ip.user_ns["summary"]
    prompt = 'Summarise this report in three bullets: Q3 revenue rose 4%. as {"json": true} ' + f"[case:{unique_case}]"
    assert isinstance(summary, TaskResult) and summary.status is TaskStatus.SUCCESS
    assert summary.content == f"[system: Be brief.] echo: {prompt}"
    assert sent_messages(fake_openai, unique_case) == [prompt]
    body = fake_openai.requests(unique_case)[0].body
    assert body["temperature"] == 0.2 and body["max_tokens"] == 64
    markdown = [o for o in shown if type(o).__name__ == "Markdown"]
    assert len(markdown) == 1 and markdown[0].data == summary.content


def test_generate_rejects_unknown_names_and_bad_options(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match=r"\{nope\}, \{other\} not defined"):
        ip.run_cell_magic("racto_generate", "", "Use {nope} and {other}")
    with pytest.raises(UsageError, match="not a plain name"):
        ip.run_cell_magic("racto_generate", "", "Leak {ip.user_ns}")
    with pytest.raises(UsageError, match="prompt is empty"):
        ip.run_cell_magic("racto_generate", "", "   \n")
    with pytest.raises(UsageError, match="argument --temperature: invalid float value"):
        ip.run_cell_magic("racto_generate", "--temperature hot", "Hi")


def test_generate_no_wait_fills_the_variable_when_done(
    ip: InteractiveShell, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, [], latency_s=0.4)
    ip.user_ns["case"] = unique_case

    ip.run_cell_magic("racto_generate", "--no-wait --out later", "Later please [case:{case}]")

    handle = ip.user_ns["later"]
    assert isinstance(handle, TaskRun)
    assert handle.done.wait(10)
    deadline = time.monotonic() + 5
    while not isinstance(ip.user_ns["later"], TaskResult) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ip.user_ns["later"].content == f"echo: Later please [case:{unique_case}]"
    assert settle_threads() == []


def test_background_batch_returns_at_once_and_fills_the_variable(
    ip: InteractiveShell, fake_openai: FakeOpenAIServer, unique_case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_openai.script(unique_case, [], latency_s=0.5)
    ip.user_ns["df"] = df = _frame(unique_case)

    started = time.monotonic()
    ip.run_line_magic("racto_batch", 'df["review"] --out labels --background')
    returned_after = time.monotonic() - started

    handle = ip.user_ns["labels"]
    assert returned_after < 0.5 and isinstance(handle, BatchRun)
    assert ip.run_cell("x = 40 + 2").success and ip.user_ns["x"] == 42  # the kernel stays usable
    assert handle.done.wait(20)
    deadline = time.monotonic() + 5
    while not isinstance(ip.user_ns["labels"], pd.DataFrame) and time.monotonic() < deadline:
        time.sleep(0.02)
    labels = ip.user_ns["labels"]
    assert labels.index.equals(df.index) and list(labels["status"]) == ["success", "success", "skipped"]
    assert f"batch {handle.batch_id} runs in the background; labels holds the result frame" in capsys.readouterr().out
    assert settle_threads() == []


def test_attach_rebuilds_the_same_frame_by_id_or_by_variable(ip: InteractiveShell, unique_case: str) -> None:
    ip.user_ns["df"] = _frame(unique_case)
    ip.run_line_magic("racto_batch", 'df["review"] --out labels')
    labels = ip.user_ns["labels"]
    batch_id = labels.attrs["racto_batch_id"]

    ip.run_line_magic("racto_batch", f"--attach {batch_id} --out again")
    ip.run_line_magic("racto_batch", "--attach labels --out again_by_var")

    for name in ("again", "again_by_var"):
        rebuilt = ip.user_ns[name]
        pd.testing.assert_frame_equal(rebuilt, labels)
    with pytest.raises(UsageError, match="holds a int, not a batch id"):
        ip.user_ns["n"] = 3
        ip.run_line_magic("racto_batch", "--attach n")


def test_attach_with_cancel_revokes_a_running_batch(
    ip: InteractiveShell, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, [], latency_s=0.6)
    ip.user_ns["many"] = pd.Series([f"{i} [case:{unique_case}]" for i in range(30)])
    ip.run_line_magic("racto_batch", "many --out run --background")
    run = ip.user_ns["run"]
    assert isinstance(run, BatchRun)
    run.stop_watching()  # as if the kernel had restarted: nothing follows it

    ip.run_line_magic("racto_batch", f"--attach {run.batch_id} --cancel --out cancelled")

    statuses = set(ip.user_ns["cancelled"]["status"])
    assert "revoked" in statuses and statuses <= {"success", "revoked"}


def test_text_progress_shows_the_batch_id(
    ip: InteractiveShell, unique_case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.user_ns["df"] = _frame(unique_case)

    ip.run_line_magic("racto_batch", 'df["review"] --out labels --progress text')

    batch_id = ip.user_ns["labels"].attrs["racto_batch_id"]
    captured = capsys.readouterr()
    assert f"reattach: %racto_batch --attach {batch_id}" in captured.out
    assert "2/2" in captured.err  # the tqdm bar


def test_connect_magic_calls_connect_with_the_url(
    shell: InteractiveShell,
    worker: RactoCeleryWorker,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from racto_nb import api

    calls: list[Any] = []

    def fake_connect(target: Any = None) -> RactoCeleryWorker:
        calls.append(target)
        return worker

    monkeypatch.setattr(api, "connect", fake_connect)

    shell.run_line_magic("racto_connect", "redis://user:secret@127.0.0.1:6379/3")
    shell.run_line_magic("racto_connect", "")

    assert calls == ["redis://user:secret@127.0.0.1:6379/3", None]
    out = capsys.readouterr().out
    assert "racto_nb: connected to redis://" in out and "secret" not in out


def test_unload_removes_the_magics() -> None:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "racto_nb")
    ip.run_line_magic("unload_ext", "racto_nb")
    assert ip.magics_manager is not None
    assert "racto_batch" not in ip.magics_manager.magics["line"]
    assert "racto_generate" not in ip.magics_manager.magics["cell"]
    ip.run_line_magic("load_ext", "racto_nb")  # the module fixture expects them back
    ip.run_line_magic("config", 'RactoMagics.progress = "none"')


# ---------------------------------------------------------------------------- habits


def _reviews(case: str, n: int) -> pd.DataFrame:
    return pd.DataFrame({"review": [f"review {i} [case:{case}]" for i in range(n)], "stars": range(n)})


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # deprecated in pandas 3.1, and still what people type
def test_write_back_follows_labels_when_the_frame_is_sorted_and_cut_during_the_batch(
    ip: InteractiveShell, fake_openai: FakeOpenAIServer, unique_case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_openai.script(unique_case, [], latency_s=0.3)
    ip.user_ns["df"] = df = _reviews(unique_case, 30)
    ip.run_line_magic("racto_batch", 'df["review"] --write-back answer --out run --background')

    df.sort_values("stars", ascending=False, inplace=True)  # what people do while it runs
    df.drop(index=[3, 7], inplace=True)
    df.loc[99] = ["added later", 99]
    run = ip.user_ns["run"]
    assert run.done.wait(60)

    for label in (0, 12, 29):
        assert df.loc[label, "answer"] == f"echo: review {label} [case:{unique_case}]"  # its own answer
    assert pd.isna(df.loc[99, "answer"])
    assert isinstance(ip.user_ns["run"], pd.DataFrame) and len(ip.user_ns["run"]) == 30  # --out filled
    assert "2 answered rows are no longer in the frame" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:The inplace keyword")
def test_write_back_refuses_to_guess_with_duplicate_labels_in_a_changed_frame(
    ip: InteractiveShell, unique_case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.user_ns["df"] = df = _reviews(unique_case, 4).set_axis([1, 1, 2, 2])
    ip.run_line_magic("racto_batch", 'df["review"] --write-back answer --out run --background')
    df.sort_values("stars", ascending=False, inplace=True)
    assert ip.user_ns["run"].done.wait(60)

    assert "answer" not in df.columns
    assert "duplicate labels, so no answer can be placed for sure" in capsys.readouterr().out


def test_a_re_run_background_cell_owns_out_and_the_write_back_column(
    ip: InteractiveShell, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    slow, quick = f"{unique_case}-slow", f"{unique_case}-quick"
    fake_openai.script(slow, [], latency_s=1.5)
    ip.user_ns["df"] = df = pd.DataFrame({"review": [f"a [case:{slow}]", f"b [case:{slow}]"]})
    ip.run_line_magic("racto_batch", 'df["review"] --write-back answer --out labels --background')
    older = ip.user_ns["labels"]
    df["review"] = [f"a [case:{quick}]", f"b [case:{quick}]"]  # the user fixes the prompts and runs the cell again
    ip.run_line_magic("racto_batch", 'df["review"] --write-back answer --out labels --background')
    newer = ip.user_ns["labels"]
    assert newer.done.wait(30) and older.done.wait(30)  # the older one ends last

    assert list(ip.user_ns["labels"]["content"]) == [f"echo: a [case:{quick}]", f"echo: b [case:{quick}]"]
    assert list(df["answer"]) == [f"echo: a [case:{quick}]", f"echo: b [case:{quick}]"]
    assert list(older.result()["content"]) == [f"echo: a [case:{slow}]", f"echo: b [case:{slow}]"]


def test_a_background_batch_that_times_out_ends_with_the_rows_as_they_are(
    ip: InteractiveShell, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, [], latency_s=2.0)
    ip.user_ns["df"] = _reviews(unique_case, 3)
    ip.run_line_magic("racto_batch", 'df["review"] --out labels --background --timeout 0.5')
    run = ip.user_ns["labels"]

    assert run.done.wait(10) and run.timed_out
    assert set(run.result()["status"]) <= {"pending", "started"}
    assert isinstance(ip.user_ns["labels"], pd.DataFrame) and len(ip.user_ns["labels"]) == 3


def test_an_on_done_error_is_reported_the_same_for_a_task_and_a_batch_and_fails_neither(
    worker: RactoCeleryWorker, unique_case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def clumsy(value: object) -> None:
        raise KeyError("the user's own bug")

    batch = racto_nb.api.run_batch(
        [f"x [case:{unique_case}]"], worker=worker, wait=False, progress="none", on_done=clumsy
    )
    task = racto_nb.api.generate(f"y [case:{unique_case}]", worker=worker, wait=False, progress="none", on_done=clumsy)
    assert batch.done.wait(30) and task.done.wait(30)
    settle_threads()

    assert list(batch.result()["status"]) == ["success"] and task.result().status is TaskStatus.SUCCESS
    assert isinstance(batch.callback_error, KeyError) and isinstance(task.callback_error, KeyError)
    out = capsys.readouterr().out
    assert f"batch {batch.batch_id} is complete, but its on_done callback raised KeyError" in out
    assert f"task {task.task_id} is complete, but its on_done callback raised KeyError" in out


def test_the_frame_carries_each_rows_prompt_unless_no_prompt(ip: InteractiveShell, unique_case: str) -> None:
    ip.user_ns["df"] = _frame(unique_case)
    ip.run_line_magic("racto_batch", 'df --template "Rate: {review}" --out labels')
    labels = ip.user_ns["labels"]
    assert labels["prompt"].iloc[0] == f"Rate: good [case:{unique_case}]"
    assert pd.isna(labels["prompt"].iloc[2])  # skipped: nothing was sent

    ip.run_line_magic("racto_batch", 'df --template "Rate: {review}" --out bare --no-prompt')
    assert "prompt" not in ip.user_ns["bare"].columns
