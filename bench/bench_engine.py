"""Engine throughput against real processes: Redis, a `celery worker`, an HTTP server.

Reproduces the measurements DESIGN.md lists for the first implementation:

* 200 items at 100 ms model latency with 16 threads (ideal 1.25 s; it took 8.4 s);
* 2,000 calls at 0 ms latency: calls/s and the worker's memory before/after
  (it capped at 40-50 calls/s and grew 59 -> 321 MB).

Run: ``python bench/bench_engine.py`` (writes ``bench/results/engine.md``).
Everything runs on this machine; the fake server runs in its own process so it
does not share a GIL with the client.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._support import rss_mb  # noqa: E402
from racto_nb.fleet.processes import WorkerProcess  # noqa: E402
from racto_nb.testing import FakeOpenAIControl, RedisServer  # noqa: E402
from racto_nb.testing.openai_server import start_in_process  # noqa: E402


def run_batch(worker: object, n: int, case: str) -> float:
    began = time.perf_counter()
    group = worker.parallel_batch([f"item {i} [case:{case}]" for i in range(n)])  # type: ignore[attr-defined]
    results = worker.wait_parallel(group, timeout_s=600)  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - began
    failed = [r for r in results if not r.ok]
    assert not failed, failed[:3]
    return elapsed


def main() -> None:
    server, base_url = start_in_process()
    control = FakeOpenAIControl(base_url)
    rows: list[tuple[str, str]] = []
    try:
        with RedisServer() as redis_server:
            env = {
                "RACTO_TEST_BROKER": redis_server.url,
                "RACTO_TEST_BACKEND": redis_server.url,
                "RACTO_TEST_OPENAI_URL": base_url,
                "RACTO_TEST_TIMEOUT_S": "30",
            }
            os.environ.update(env)
            from tests.worker_apps import openai_app

            worker = openai_app.worker
            process_env = {**env, "OPENAI_API_KEY": "sk-bench"}
            with WorkerProcess(
                "tests.worker_apps.openai_app:app", concurrency=16, env=process_env, cwd=REPO, loglevel="INFO"
            ) as process:
                run_batch(worker, 20, "warmup")
                control.script("slow", [], latency_s=0.1)
                slow = min(run_batch(worker, 200, "slow") for _ in range(3))
                rows.append(("200 items x 100 ms, threads x16 (ideal 1.25 s)", f"{slow:.2f} s"))

                before = rss_mb(process.pid)
                fast = run_batch(worker, 2000, "fast")
                after = rss_mb(process.pid)
                rows.append(("2,000 calls x 0 ms, threads x16", f"{fast:.2f} s = {2000 / fast:.0f} calls/s"))
                rows.append(("worker RSS before -> after those 2,000 calls", f"{before:.0f} -> {after:.0f} MB"))
    finally:
        server.terminate()
        server.wait(10)

    table = "\n".join(f"| {what} | {value} |" for what, value in rows)
    report = (
        f"# Engine benchmark\n\n"
        f"Machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
        f"{platform.system()}; date {datetime.date.today().isoformat()}. One `celery worker --pool threads -c 16`, "
        f"Redis broker and backend, fake OpenAI server in its own process. Shared, noisy machine: compare rows, "
        f"not runs.\n\n| measurement | result |\n|---|---|\n{table}\n\n"
        "First implementation on this machine (DESIGN.md): 200 x 100 ms took 8.4 s with 16 threads; "
        "40-50 calls/s at most; worker memory grew 59 -> 321 MB over 2,000 calls.\n"
    )
    out = REPO / "bench" / "results" / "engine.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
