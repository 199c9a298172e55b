"""Pure logic of the engine's pacing: the deferred STARTED marks and the shared poll loop."""

from __future__ import annotations

import itertools
import threading
import time
from functools import partial

from racto_nb.engine.polling import poll
from racto_nb.engine.start_marks import StartMarks


def test_a_mark_disarmed_within_the_grace_is_never_written() -> None:
    marks = StartMarks(grace_s=0.2)
    written: list[str] = []
    mark = marks.arm(lambda: written.append("started"))
    marks.disarm(mark)
    time.sleep(0.4)
    assert written == []


def test_a_call_that_outlives_the_grace_is_marked_once() -> None:
    marks = StartMarks(grace_s=0.02)
    written: list[str] = []
    mark = marks.arm(lambda: written.append("started"))
    time.sleep(0.3)
    marks.disarm(mark)
    time.sleep(0.1)
    assert written == ["started"]


def test_disarm_waits_for_a_write_under_way_so_a_result_is_never_overwritten() -> None:
    """The runner writes the row's result after disarm: a STARTED landing later would hide it."""
    marks = StartMarks(grace_s=0.0)
    order: list[str] = []
    writing = threading.Event()

    def slow_write() -> None:
        writing.set()
        time.sleep(0.3)
        order.append("started")

    mark = marks.arm(slow_write)
    assert writing.wait(2)
    marks.disarm(mark)
    order.append("result")
    assert order == ["started", "result"]


def test_marks_fall_due_in_order_across_runners() -> None:
    marks = StartMarks(grace_s=0.05)
    written: list[int] = []
    for n in range(5):
        marks.arm(partial(written.append, n))
        time.sleep(0.01)
    time.sleep(0.3)
    assert written == [0, 1, 2, 3, 4]


def test_a_failing_write_does_not_stop_later_marks() -> None:
    marks = StartMarks(grace_s=0.01)
    written: list[str] = []

    def broken() -> None:
        raise ConnectionError("backend restarting")

    marks.arm(broken)
    marks.arm(lambda: written.append("next"))
    time.sleep(0.2)
    assert written == ["next"]


def test_poll_looks_again_at_once_while_the_last_look_left_work() -> None:
    """A backlog of finished rows is read in short looks that follow each other, not one per max pause."""
    looks: list[float] = []
    backlog = [5]

    def look() -> int:
        looks.append(time.monotonic())
        backlog[0] -= 1
        return backlog[0]

    poll(look, lambda left: left <= 0, first_pause_s=0.001, max_pause_s=0.5, hurry=lambda left: left > 0)
    assert len(looks) == 5
    assert looks[-1] - looks[0] < 0.1  # without hurry the pauses would grow towards 0.5 s


def test_poll_without_hurry_backs_off() -> None:
    looks: list[float] = []

    def look() -> int:
        looks.append(time.monotonic())
        return len(looks)

    poll(look, lambda n: n >= 6, first_pause_s=0.01, max_pause_s=0.5)
    gaps = [b - a for a, b in itertools.pairwise(looks)]
    assert gaps[-1] > gaps[0] * 3
