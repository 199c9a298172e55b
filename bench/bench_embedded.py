"""Embedded mode overhead: 100 rows at 0 ms model latency, worker inside this process.

The issue's bar: a fresh notebook's batch must not pay kombu's memory-transport
polling (1 s by default). Compared here, all with the same thread-pool worker
(8 threads), in-process result backend and a kit that answers instantly:

* ``memory:// polling 1.0 s``   kombu's memory transport as shipped;
* ``memory:// polling 0.01 s``  the usual tuning (research/celery-for-llm.md);
* ``racto_nb (event-driven)``   what ``racto_nb.connect()`` uses: consumers are
  woken when a message is put or acknowledged; the poll is only a safety net.

Since the model takes 0 ms, the wall time *is* the overhead: publishing,
delivery, running the task body, storing results and the client's polling
reads. Idle CPU is what the worker thread costs a kernel that is doing nothing
(polling fast is cheap on latency and expensive here).

Run: ``python bench/bench_embedded.py`` (writes ``bench/results/embedded.md``).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import celery  # noqa: E402

import racto_nb  # noqa: E402
from racto_nb.config import RactoConfig  # noqa: E402
from racto_nb.embedded.worker import EmbeddedWorker  # noqa: E402
from racto_nb.engine.celery_app import build_celery  # noqa: E402
from racto_nb.engine.worker import RactoCeleryWorker  # noqa: E402
from racto_nb.models import ChatConfig, ChatResponse  # noqa: E402

ROWS = 100
REPEATS = 5
THREADS = 8
IDLE_S = 3.0


class InstantKit:
    """A model that answers in 0 ms: everything measured is racto_nb + Celery."""

    def chat(self, config: ChatConfig) -> ChatResponse:
        return ChatResponse(content=f"ok: {config.user_message}")


def stock_memory_worker(polling_interval: float | None) -> tuple[RactoCeleryWorker, EmbeddedWorker]:
    app = build_celery(RactoConfig(), broker_url="memory://")
    app.conf.broker_transport = "memory"  # kombu's own, polling
    if polling_interval is not None:
        app.conf.broker_transport_options = {"polling_interval": polling_interval}
    worker = RactoCeleryWorker(app, kit=InstantKit())
    return worker, EmbeddedWorker(app, concurrency=THREADS).start()


def measure(worker: RactoCeleryWorker) -> dict[str, Any]:
    walls = []
    for repeat in range(REPEATS + 1):
        started = time.perf_counter()
        group = worker.parallel_batch([f"row {i}" for i in range(ROWS)])
        results = worker.wait_parallel(group, timeout_s=120)
        wall = time.perf_counter() - started
        ok = sum(r.ok for r in results)
        if ok != ROWS:
            raise RuntimeError(f"only {ok}/{ROWS} rows succeeded")
        if repeat:  # the first run warms imports and thread start-up
            walls.append(wall)
    cpu_before = time.process_time()
    time.sleep(IDLE_S)
    idle_cpu = (time.process_time() - cpu_before) / IDLE_S
    return {
        "median_s": statistics.median(walls),
        "max_s": max(walls),
        "per_row_ms": statistics.median(walls) / ROWS * 1000,
        "idle_cpu_pct": idle_cpu * 100,
    }


def measure_run_batch() -> dict[str, Any] | None:
    """What a notebook user sees: ``run_batch`` (batch manifest, state polling, DataFrame) on the current worker."""
    try:
        from racto_nb.api import run_batch
    except ImportError:
        return None
    walls = []
    for repeat in range(REPEATS + 1):
        started = time.perf_counter()
        frame = run_batch([f"row {i}" for i in range(ROWS)], progress="none", timeout_s=120)
        if repeat:
            walls.append(time.perf_counter() - started)
        if int((frame["status"] == "success").sum()) != ROWS:
            raise RuntimeError("run_batch: not every row succeeded")
    return {
        "median_s": statistics.median(walls),
        "max_s": max(walls),
        "per_row_ms": statistics.median(walls) / ROWS * 1000,
        "idle_cpu_pct": float("nan"),
    }


def main() -> int:
    rows: list[tuple[str, dict[str, Any]]] = []
    for label, interval in (("memory:// polling 1.0 s (kombu default)", None), ("memory:// polling 0.01 s", 0.01)):
        worker, runner = stock_memory_worker(interval)
        try:
            rows.append((label, measure(worker)))
        finally:
            runner.stop()
    started = time.perf_counter()
    worker = racto_nb.connect(kit=InstantKit(), concurrency=THREADS)
    connect_s = time.perf_counter() - started
    try:
        rows.append(("racto_nb.connect() (event-driven)", measure(worker)))
        batch_row = measure_run_batch()
        if batch_row is not None:
            rows.append(("same, through api.run_batch (DataFrame out)", batch_row))
    finally:
        started = time.perf_counter()
        racto_nb.disconnect()
        disconnect_s = time.perf_counter() - started

    header = "| transport | 100 rows, median (s) | worst (s) | per row (ms) | idle CPU (% of a core) |"
    lines = [header, "|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(
            f"| {label} | {r['median_s']:.3f} | {r['max_s']:.3f} | {r['per_row_ms']:.2f} | "
            f"{'-' if r['idle_cpu_pct'] != r['idle_cpu_pct'] else format(r['idle_cpu_pct'], '.1f')} |"
        )
    table = "\n".join(lines)
    print(table)
    print(f"\nconnect() {connect_s * 1000:.0f} ms (embedded worker start), disconnect() {disconnect_s * 1000:.0f} ms")

    machine = (
        f"{platform.node()}, {platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, Celery {celery.__version__}"
    )
    report = f"""# Embedded mode: 100 rows at 0 ms model latency

Measured {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")} on {machine}.
`python bench/bench_embedded.py`; {THREADS} worker threads, in-process result backend, a kit that
answers in 0 ms (so wall time = overhead), median of {REPEATS} runs after one warm-up run. Idle CPU
is measured over {IDLE_S:g} s with the worker running and nothing to do.

{table}

`connect()` took {connect_s * 1000:.0f} ms (embedded worker thread up and consuming) and
`disconnect()` {disconnect_s * 1000:.0f} ms (warm shutdown of the thread).

The `run_batch` row is the same worker seen through the notebook API: it also writes the batch
manifest, publishes from a background thread, polls the states on a timer and builds the DataFrame
(`progress="none"`), so its extra time is mostly that polling interval, not the transport.

Why the stock transport is slow: an idle consumer sleeps `polling_interval` between looks at its
queues, and with late acks and a prefetch of one message per thread it sleeps again every time the
pool is full, so 100 rows pay roughly (rows / threads) sleeps. Polling every 10 ms hides most of
that but wakes the kernel 100 times a second forever. racto_nb's transport (`racto_nb/memory.py`)
waits on a condition that publishing, acknowledging and rejecting signal, so a message or a free
slot is seen at once and an idle kernel does no work.
"""
    out = REPO / "bench" / "results" / "embedded.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
