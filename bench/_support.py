"""What every benchmark does around its measurement: wait for a condition, set the environment, read memory."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> float:
    """Seconds until ``condition()`` held; raises ``TimeoutError`` after ``timeout_s``."""
    began = time.perf_counter()
    while not condition():
        if time.perf_counter() - began > timeout_s:
            raise TimeoutError(f"not reached within {timeout_s} s")
        time.sleep(interval_s)
    return time.perf_counter() - began


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` set, restored afterwards (racto_nb reads its settings from there)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process (this one by default), in MB."""
    for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid or os.getpid()}")
