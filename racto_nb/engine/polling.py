"""The one poll loop: look, and if it is not done yet, pause and look again.

Everything in racto_nb that follows work on the fleet (the seed API's
``wait``/``wait_parallel``, a batch's ``wait``, the notebook's watchers) is
this loop with its own ``look``. The pause is what makes following cheap:

* it starts short, so a fast answer is not held back by the poll, and grows
  by half each time up to ``max_pause_s``;
* it is never shorter than ``cost_factor`` times what the last look took, so
  following 10,000 waiting tasks costs a fixed share of a core (a quarter,
  at the default factor of 3), however slow one look is.

No threads, no pub/sub: the caller decides where the loop runs (the cell's
thread or a watcher thread) and passes ``stop`` to end it from elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar

__all__ = ["PollEnd", "poll"]

T = TypeVar("T")

#: Why a poll ended: ``done`` said so, ``timeout_s`` ran out, or ``stop`` was set.
PollEnd = Literal["done", "timeout", "stopped"]

_GROWTH = 1.5


def poll(
    look: Callable[[], T],
    done: Callable[[T], bool],
    *,
    timeout_s: float | None = None,
    stop: threading.Event | None = None,
    first_pause_s: float = 0.005,
    max_pause_s: float = 0.25,
    cost_factor: float = 3.0,
    hurry: Callable[[T], bool] | None = None,
) -> tuple[T, PollEnd]:
    """Call ``look()`` until ``done(value)``, ``timeout_s`` passes or ``stop`` is set.

    Returns the last value looked at and why the loop ended. The first look
    happens at once, and one last look is always the one returned, so a
    caller never acts on a stale value. ``hurry(value)`` true means the look
    left work for the next one (a backlog of finished rows): the pause starts
    over from ``first_pause_s``.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pause = first_pause_s
    while True:
        started = time.monotonic()
        value = look()
        cost = time.monotonic() - started
        if done(value):
            return value, "done"
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return value, "timeout"
        if hurry is not None and hurry(value):
            pause = first_pause_s
        wait = max(pause, cost_factor * cost)
        if remaining is not None:
            wait = min(wait, remaining)
        if stop is not None:
            if stop.wait(wait):
                return value, "stopped"
        else:
            time.sleep(wait)
        pause = min(pause * _GROWTH, max_pause_s)
