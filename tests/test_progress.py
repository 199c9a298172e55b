"""Progress views, driven dask-style: hand-built snapshots in, widget values out.

No kernel, browser or Celery: widgets get a recording comm (as ipywidgets' own
tests do), so every state message a view sends can be inspected.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from typing import Any

import comm
import pytest

from racto_nb.models import BatchProgress, TaskResult, TaskStatus
from racto_nb.notebook.status_line import StatusLine, TextStatusLine, WidgetStatusLine
from racto_nb.notebook.views import (
    NullView,
    TextProgressView,
    View,
    WidgetProgressView,
    bar_style,
    fmt_counts,
    fmt_duration,
    fmt_rate,
    fmt_stats,
    make_view,
    shares,
)

S = TaskStatus
BATCH = "1234abcd-5678-90ef-aaaa-bbbbccccdddd"


class RecordingComm:
    """Stands in for the kernel's comm; ``probe`` is read at send time, in the sending thread."""

    comm_id = "a-b-c-d"
    kernel = "Truthy"  # Widget._send only sends when the comm has a kernel
    probe: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.messages: list[tuple[dict[str, Any], Any]] = []

    def open(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_msg(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self, *args: Any, **kwargs: Any) -> None:
        pass

    def send(self, data: dict[str, Any] | None = None, **kwargs: Any) -> None:
        seen = RecordingComm.probe() if RecordingComm.probe is not None else None
        self.messages.append((data or {}, seen))


@pytest.fixture(autouse=True)
def recording_comm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(comm, "create_comm", lambda **kwargs: RecordingComm())
    yield
    RecordingComm.probe = None


def snap(
    *,
    total: int = 40,
    finished: bool = False,
    cancelled: bool = False,
    elapsed_s: float = 41.0,
    rate_per_s: float | None = 12.34,
    eta_s: float | None = 7.0,
    submitted: int | None = None,
    **counts: int,
) -> BatchProgress:
    return BatchProgress(
        batch_id=BATCH,
        total=total,
        counts={S(name): n for name, n in counts.items()},
        elapsed_s=elapsed_s,
        rate_per_s=rate_per_s,
        eta_s=eta_s,
        finished=finished,
        cancelled=cancelled,
        submitted=submitted,
    )


RUNNING = snap(pending=10, started=8, retry=2, success=19, failure=1)
DONE_OK = snap(success=40, finished=True, eta_s=None)
DONE_FAIL = snap(success=37, failure=3, finished=True, eta_s=None)
CANCELLED = snap(success=10, failure=2, revoked=28, finished=True, cancelled=True, eta_s=None)


def widget_view(**kwargs: Any) -> WidgetProgressView:
    kwargs.setdefault("on_cancel", lambda: None)
    kwargs.setdefault("on_retry_failed", lambda: None)
    return WidgetProgressView(**kwargs)


# --- formatting ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00"), (7.4, "0:07"), (62, "1:02"), (3723, "1:02:03"), (-3, "0:00"), (float("inf"), "?")],
)
def test_fmt_duration(seconds: float, text: str) -> None:
    assert fmt_duration(seconds) == text


@pytest.mark.parametrize(("rate", "text"), [(12.34, "12.3/s"), (99.94, "99.9/s"), (250.4, "250/s"), (0.02, "1.2/min")])
def test_fmt_rate(rate: float, text: str) -> None:
    assert fmt_rate(rate) == text


def test_fmt_stats_leaves_out_what_is_unknown() -> None:
    assert fmt_stats(RUNNING) == "12.3/s · 0:41 elapsed · ETA 0:07"
    assert fmt_stats(snap(rate_per_s=None, eta_s=None, submitted=30)) == "0:41 elapsed · submitted 30/40"
    assert fmt_stats(DONE_OK) == "12.3/s · 0:41 elapsed"
    assert fmt_stats(CANCELLED).endswith("· cancelled")


# --- widget view -----------------------------------------------------------------------------------------


def test_widget_running() -> None:
    view = widget_view(title="summaries")
    view.update(RUNNING)
    assert "20/40" in view.bar.value and view.state.value == "<b>Running</b>"
    assert shares(RUNNING)[S.SUCCESS] == 19 / 40 and shares(RUNNING)[S.FAILURE] == 1 / 40
    assert "width:47.500%;background:#2e7d32" in view.bar.value  # success's share, in green
    assert "width:2.500%;background:#c62828" in view.bar.value  # one failure is a sliver of red
    assert [view.counts[s].value for s in (S.PENDING, S.STARTED, S.RETRY, S.SUCCESS, S.FAILURE, S.REVOKED)] == [
        "pending: 10",
        "started: 8",
        "retry: 2",
        "success: 19",
        "failure: 1",
        "revoked: 0",
    ]
    assert view.stats.value == "12.3/s · 0:41 elapsed · ETA 0:07"
    assert "summaries" in view.header.value
    assert "1234abcd…" in view.header.value
    assert f"%racto_batch --attach {BATCH}" in view.header.value
    assert view.cancel_button.disabled is False
    assert view.retry_button.disabled is True


@pytest.mark.parametrize(
    ("progress", "state", "retry_enabled"),
    [
        (DONE_OK, "Finished", False),
        (DONE_FAIL, "Finished — 3 failed", True),
        (CANCELLED, "Cancelled — 28 revoked", True),
    ],
)
def test_widget_end_states(progress: BatchProgress, state: str, retry_enabled: bool) -> None:
    view = widget_view()
    view.update(RUNNING)
    view.update(progress)
    assert state in view.state.value
    assert f"{progress.done}/40" in view.bar.value
    assert view.cancel_button.disabled is True
    assert view.retry_button.disabled is (not retry_enabled)


def test_widget_revoked_without_cancel_is_danger() -> None:
    view = widget_view()
    view.update(snap(success=39, revoked=1, finished=True))
    assert view.last is not None
    assert bar_style(view.last) == "danger" and "#c62828" in view.state.value
    assert view.retry_button.disabled is True  # nothing *failed*, so nothing to retry


def test_widget_empty_batch_does_not_divide_by_zero() -> None:
    view = widget_view()
    view.update(snap(total=0, finished=True, rate_per_s=None, eta_s=None))
    assert "0/0" in view.bar.value and "Finished" in view.state.value


def test_widget_counts_skipped_cached_and_dollars_and_shows_the_note() -> None:
    view = widget_view()
    progress = snap(success=40, finished=True, eta_s=None).model_copy(
        update={"skipped": 2, "cached": 5, "cost_usd": 0.0123, "saved_usd": 0.002, "note": "a worker died"}
    )
    view.update(progress)
    assert view.skipped.value == "skipped: 2"
    assert "$0.0123 spent" in view.stats.value and "5 cached, $0.0020 saved" in view.stats.value
    assert "a worker died" in view.note.value


def test_paused_batch_offers_resume_once() -> None:
    calls: list[str] = []
    view = WidgetProgressView(on_resume=lambda: calls.append("resume"))
    assert view.resume_button.layout.display == "none"
    paused = snap(success=10, paused=30).model_copy(update={"paused": True, "pause_reason": "out of quota"})
    view.update(paused)
    assert "Paused — out of quota" in view.state.value and view.counts[S.PAUSED].value == "paused: 30"
    assert view.resume_button.layout.display is None and view.resume_button.disabled is False
    view.resume_button.click()
    view.resume_button.click()
    assert calls == ["resume"]


def test_widget_repr_html_keeps_the_last_state() -> None:
    view = widget_view(title="t")
    view.update(DONE_FAIL)
    text = view._repr_html_()
    assert "Finished — 3 failed" in text and "40/40" in text and "failure: 3" in text


def test_buttons_call_callbacks_once() -> None:
    calls: list[str] = []
    view = WidgetProgressView(on_cancel=lambda: calls.append("cancel"), on_retry_failed=lambda: calls.append("retry"))
    view.update(RUNNING)
    view.cancel_button.click()
    view.cancel_button.click()
    assert calls == ["cancel"]
    assert view.cancel_button.disabled is True
    view.update(RUNNING)  # an in-flight snapshot must not re-enable a cancel already requested
    assert view.cancel_button.disabled is True
    view.update(DONE_FAIL)
    view.retry_button.click()
    view.retry_button.click()
    assert calls == ["cancel", "retry"]
    assert view.retry_button.disabled is True


def test_buttons_without_callback_are_hidden() -> None:
    view = WidgetProgressView()
    assert view.cancel_button.layout.display == "none"
    assert view.retry_button.layout.display == "none"
    shown = WidgetProgressView(on_cancel=lambda: None)
    assert shown.cancel_button.layout.display is None
    assert shown.retry_button.layout.display == "none"


def test_close_draws_final_and_freezes() -> None:
    view = widget_view()
    view.update(RUNNING)
    view.close(DONE_FAIL)
    view.update(RUNNING)  # a late poll cannot paint over the final state
    assert "40/40" in view.bar.value and "3 failed" in view.state.value
    assert view.retry_button.disabled is False  # still usable after close


def test_update_sends_one_bar_message() -> None:
    view = widget_view()
    bar_comm = view.bar.comm
    bar_comm.messages.clear()
    view.update(RUNNING)
    states = [data["state"] for data, _ in bar_comm.messages if data.get("method") == "update"]
    assert len(states) == 1  # the whole bar is one value: the front-end never sees half of it
    assert "20/40" in states[0]["value"]


def test_background_thread_update_carries_the_cell_parent() -> None:
    """The real ipykernel lookup: what ``BaseComm.publish_msg`` stamps on a comm message."""
    kernelbase: Any = pytest.importorskip("ipykernel.kernelbase")  # dev dependency only
    kernel = kernelbase.Kernel()
    kernel.set_parent(b"", {"header": {"msg_id": "cell-1"}}, channel="shell")
    RecordingComm.probe = lambda: kernel.get_parent().get("header", {}).get("msg_id")
    view = widget_view()
    # A later cell (or a button's comm_msg) moves ipykernel's fallback parent for bare threads.
    kernel.set_parent(b"", {"header": {"msg_id": "cell-2"}}, channel="shell")
    bar_comm = view.bar.comm
    bar_comm.messages.clear()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            view.update(RUNNING)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=10)
    assert not errors
    assert "20/40" in view.bar.value
    assert [seen for _, seen in bar_comm.messages] == ["cell-1"]

    # Without the captured context a bare thread sees the latest parent: the bug being avoided.
    seen: list[str] = []
    bare = threading.Thread(target=lambda: seen.append(RecordingComm.probe()))
    bare.start()
    bare.join(timeout=10)
    assert seen == ["cell-2"]


def test_display_recaptures_the_displaying_context() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("cell", default="none")
    RecordingComm.probe = var.get
    var.set("built")
    view = widget_view()
    view.bar.comm.messages.clear()  # what building the view sent belongs to the building cell
    var.set("shown")
    view._ctx.capture()  # what display() does before display(box), without needing a frontend
    thread = threading.Thread(target=view.update, args=(RUNNING,))
    thread.start()
    thread.join(timeout=10)
    assert {seen for _, seen in view.bar.comm.messages} == {"shown"}


# --- text view and the factory ---------------------------------------------------------------------------


def test_text_view_writes_bar_with_counts_and_closes() -> None:
    out = io.StringIO()
    view = TextProgressView(out, mininterval=0)
    view.display()
    view.update(RUNNING)
    view.close(DONE_FAIL)
    text = out.getvalue()
    assert "20/40" in text and "ok=19 fail=1 retry=2 run=8" in text
    assert "40/40" in text and "ok=37 fail=3 retry=0 run=0" in text
    assert "batch 1234abcd…" in text
    assert "[00:41<" in text  # elapsed from the snapshot, not from when the bar was built
    assert text.endswith("\n")  # tqdm closed with leave=True
    assert view._bar.disable  # tqdm marks a closed bar disabled
    view.update(RUNNING)  # ignored after close
    assert out.getvalue() == text


def test_fmt_counts_mentions_revoked_and_cancel_only_when_they_happen() -> None:
    assert fmt_counts(RUNNING) == "ok=19 fail=1 retry=2 run=8"
    assert fmt_counts(CANCELLED) == "ok=10 fail=2 retry=0 run=0 revoked=28 cancelled"


def test_make_view_outside_a_kernel_is_text() -> None:
    assert isinstance(make_view(), TextProgressView)
    assert isinstance(make_view(prefer="none"), NullView)
    assert isinstance(make_view(prefer="widget"), WidgetProgressView)
    for view in (make_view(), make_view(prefer="none"), widget_view()):
        assert isinstance(view, View)


def test_make_view_in_a_kernel_is_widget(monkeypatch: pytest.MonkeyPatch) -> None:
    from IPython.core import getipython

    class ZMQInteractiveShell:
        pass

    class ColabShell(ZMQInteractiveShell):
        pass

    monkeypatch.setattr(getipython, "get_ipython", lambda: ColabShell())
    assert isinstance(make_view(on_cancel=lambda: None), WidgetProgressView)
    assert isinstance(make_view(prefer="text"), TextProgressView)


# --- single-task status line -----------------------------------------------------------------------------


def result(status: TaskStatus, **fields: Any) -> TaskResult:
    return TaskResult(task_id="t-1", status=status, **fields)


@pytest.mark.parametrize(
    ("task", "text"),
    [
        (result(S.PENDING), "pending"),
        (result(S.STARTED, attempts=1), "started"),
        (result(S.STARTED, attempts=2), "started (attempt 2)"),
        (
            result(S.RETRY, attempts=1, retry_in_s=3.2, error_type="RateLimitError", status_code=429),
            "retry 1 of 3, next try in 4 s (RateLimitError 429)",
        ),
        (result(S.RETRY, attempts=2, max_retries=5), "retry 2 of 5"),
        (result(S.SUCCESS, attempts=1, latency_s=1.23), "success in 1.2 s"),
        (result(S.SUCCESS, attempts=3, latency_s=0.5), "success in 0.5 s (attempt 3)"),
        (
            result(
                S.FAILURE,
                attempts=1,
                error="Incorrect API key\nmore",
                error_type="AuthenticationError",
                status_code=401,
            ),
            "failure: 401 AuthenticationError: Incorrect API key",
        ),
        (
            result(S.FAILURE, attempts=4, error_type="RateLimitError"),
            "failure: RateLimitError (after 4 attempts)",
        ),
        (result(S.REVOKED), "revoked"),
    ],
)
def test_status_line_render(task: TaskResult, text: str) -> None:
    assert StatusLine.render(task, max_retries=3) == text


def test_status_line_without_budget() -> None:
    assert StatusLine.render(result(S.RETRY, attempts=1), max_retries=None) == "retry 1"


def test_widget_status_line_escapes_and_updates_in_place() -> None:
    line = WidgetStatusLine(max_retries=3)
    line.update(result(S.PENDING))
    assert line.html.value == "pending"
    line.close(result(S.FAILURE, error="<boom>", error_type="ValueError"))
    assert line.html.value == "failure: ValueError: &lt;boom&gt;"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_text_status_line_rewrites_on_tty() -> None:
    out = FakeTTY()
    line = TextStatusLine(out, max_retries=3)
    line.update(result(S.STARTED, attempts=2))
    line.close(result(S.SUCCESS, attempts=1, latency_s=1.0))
    assert out.getvalue() == "\rstarted (attempt 2)\rsuccess in 1.0 s   \n"


def test_text_status_line_prints_state_changes_only_off_tty() -> None:
    out = io.StringIO()
    line = TextStatusLine(out, max_retries=3)
    for task in (
        result(S.PENDING),
        result(S.RETRY, attempts=1, retry_in_s=4),
        result(S.RETRY, attempts=1, retry_in_s=2),  # countdown only: no new line
        result(S.RETRY, attempts=2, retry_in_s=8),
        result(S.SUCCESS, attempts=3, latency_s=0.2),
    ):
        line.update(task)
    line.close()
    assert out.getvalue().splitlines() == [
        "pending",
        "retry 1 of 3, next try in 4 s",
        "retry 2 of 3, next try in 8 s",
        "success in 0.2 s (attempt 3)",
    ]
