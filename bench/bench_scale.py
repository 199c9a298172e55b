"""A million rows from a notebook: submit, refresh and memory by batch size; throughput; default flags.

Every part uses real processes on this machine: a private ``redis-server``,
``celery worker`` processes, and (for the latency parts) the OpenAI-compatible
test server in its own process. The figures go through the public API a
notebook uses: ``run = api.run_batch(prompts, wait=False, progress="none")``,
``run.refresh()``, ``run.result()``.

* **submit** (10k, 100k, 300k, 1M rows of 90-character prompts, no worker
  consuming), each size in a fresh process with a fresh ``redis-server``:
  time until control returns; until the publisher has put its window in Redis;
  one ``run.refresh()`` (median and worst of 30); kernel RSS growth and Redis
  ``used_memory`` growth once the window is out; the biggest single value in
  Redis (a string, or one element of a list).
* **throughput** at a 0 ms model (``bench/apps/instant.py``: racto_nb's worker
  with a kit that answers at once), 100k rows end to end on one worker with
  racto_nb's defaults; against plain Celery no-op tasks (``bench/apps/plain_noop.py``)
  on one worker with Celery's defaults, in the same run. The refreshes a
  notebook makes while the rows finish are timed too.
* **default flags**: ``celery -A racto_nb.app worker`` with no ``--pool`` and
  no ``-c``, 2,000 rows at 1 s model latency: the ideal is 8 s
  (256 threads: 8 rounds of 1 s).
* **seed API**: ``parallel_batch`` of 200 items at 100 ms on ``--pool threads
  -c 16`` against the ideal 1.3 s (13 rounds of 100 ms).
* **frame**: ``run.result()`` of a finished 1M-row batch (0 ms model), read
  from the Parquet checkpoint.

Usage::

    python bench/bench_scale.py                          # everything (about 25 minutes)
    python bench/bench_scale.py --only submit --sizes 10000,100000 --out -
    python bench/bench_scale.py --only throughput,flags,seed

Writes ``bench/results/scale.md`` (or ``--out``) and prints the same text.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import racto_nb  # noqa: E402
from bench._machine import machine  # noqa: E402
from bench._support import environment, rss_mb, until  # noqa: E402
from racto_nb import api  # noqa: E402
from racto_nb.fleet.connection import disconnect  # noqa: E402
from racto_nb.fleet.processes import WorkerProcess  # noqa: E402
from racto_nb.testing import FakeOpenAIControl, RedisServer  # noqa: E402
from racto_nb.testing.openai_server import start_in_process  # noqa: E402

RESULTS = REPO / "bench" / "results" / "scale.md"
KEY = "sk-bench-scale-0000"
SIZES = (10_000, 100_000, 300_000, 1_000_000)
PARTS = ("submit", "throughput", "flags", "seed", "frame")


# ---------------------------------------------------------------------------- measuring


def biggest_value(server: RedisServer) -> tuple[str, int]:
    """``(key, bytes)`` of the largest single value: a string, or one element of a list."""
    client = server.client()
    best = ("", 0)
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            if kind == b"string":
                size = int(client.strlen(key))
            elif kind == b"list":
                size, length = 0, int(client.llen(key))
                for start in range(0, length, 1000):
                    size = max([size, *(len(v) for v in client.lrange(key, start, start + 999))])
            elif kind == b"hash":
                size = max((len(v) for v in client.hvals(key)), default=0)
            else:
                size = 0
            if size > best[1]:
                best = (key.decode(errors="replace"), size)
    finally:
        client.close()
    return best


def used_memory_mb(server: RedisServer) -> float:
    client = server.client()
    try:
        return int(client.info("memory")["used_memory"]) / 2**20
    finally:
        client.close()


def prompts(n: int, tag: str = "") -> pd.Series:
    """``n`` distinct prompts of 90 characters (a short review and a question)."""
    body = "Is this review positive or negative? 'Arrived on time, works as described, would buy again"
    head = [f"{tag}{i:08d} " for i in range(n)]
    return pd.Series([h + body[: 90 - len(h)] for h in head], name="prompt")


def settings(broker: str, folder: Path, base_url: str = "http://127.0.0.1:9/v1") -> dict[str, str]:
    """A fleet's configuration (the default ``base_url`` is never called: the part's own kit answers)."""
    return {
        "RACTO_BROKER_URL": broker,
        "RACTO_CHECKPOINT_DIR": str(folder),
        "RACTO_BASE_URL": base_url,
        "RACTO_MODEL": "bench-model",
    }


# ---------------------------------------------------------------------------- submit, refresh, memory


def submit_one(n: int) -> dict[str, Any]:
    """One size, in this (fresh) process: the figures of the first table."""
    with (
        tempfile.TemporaryDirectory() as folder,
        RedisServer() as redis_server,
        environment(**settings(redis_server.url, Path(folder))),
    ):
        client = racto_nb.connect(redis_server.url)
        source = prompts(n)
        gc.collect()
        rss_before, redis_before = rss_mb(), used_memory_mb(redis_server)
        began = time.perf_counter()
        run = api.run_batch(source, worker=client, wait=False, progress="none")
        control_s = time.perf_counter() - began
        window = min(n, run.batch.window)
        out_s = control_s + until(lambda: (run.refresh().submitted or 0) >= window, 600, 0.05)
        time.sleep(0.5)  # the publisher's last pipeline and the manifest save settle
        refreshes = []
        for _ in range(30):
            t = time.perf_counter()
            progress = run.refresh()
            refreshes.append(time.perf_counter() - t)
            time.sleep(0.02)
        gc.collect()
        figures: dict[str, Any] = {
            "rows": n,
            "control_s": control_s,
            "window": window,
            "window_out_s": out_s,
            "refresh_median_ms": statistics.median(refreshes) * 1000,
            "refresh_max_ms": max(refreshes) * 1000,
            "outstanding": progress.total - progress.done,
            "rss_growth_mb": rss_mb() - rss_before,
            "redis_growth_mb": used_memory_mb(redis_server) - redis_before,
        }
        key, size = biggest_value(redis_server)
        figures["biggest_key"], figures["biggest_value_kb"] = key, size / 1024
        run.cancel()
        run.stop_watching()
        disconnect()
    return figures


def submit_part(sizes: list[int]) -> str:
    rows = []
    for n in sizes:
        child = subprocess.run(
            [sys.executable, __file__, "--submit-child", str(n)], capture_output=True, text=True, cwd=REPO, check=False
        )
        if child.returncode:
            raise RuntimeError(f"submit at {n:,} rows failed:\n{child.stderr[-3000:]}")
        f = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(
            f"| {f['rows']:,} | {f['control_s']:.3f} s | {f['window']:,} in {f['window_out_s']:.1f} s | "
            f"{f['refresh_median_ms']:.1f} ms / {f['refresh_max_ms']:.1f} ms | {f['outstanding']:,} | "
            f"{f['rss_growth_mb']:.0f} MB | {f['redis_growth_mb']:.0f} MB | "
            f"{f['biggest_value_kb']:.0f} kB (`{f['biggest_key'][:40]}`) |"
        )
        print(rows[-1], flush=True)
    return (
        "## Submit, refresh, memory (no worker consuming)\n\n"
        "Each size in a fresh process and a fresh `redis-server`; 90-character prompts; "
        '`run = api.run_batch(prompts, wait=False, progress="none")`. The publisher keeps a window of rows '
        "sent and unfinished in Redis (the rest wait in the local checkpoint), so Redis holds the window, "
        "not the batch.\n\n"
        "| rows | control back | window in Redis | one `run.refresh()` median / worst of 30 | outstanding | "
        "kernel RSS growth | Redis growth | biggest single value |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows) + "\n"
    )


# ---------------------------------------------------------------------------- throughput at 0 ms


def count_results(server: RedisServer, db: int) -> int:
    """Keys in ``db``: with plain Celery's backend alone in db 1, the number of results stored."""
    client = redis.Redis(host="127.0.0.1", port=server.port, db=db)  # the URL's /0 would win over db=
    try:
        return int(client.dbsize())
    finally:
        client.close()


def plain_celery(n: int) -> tuple[float, float]:
    """Plain Celery no-op tasks on one worker with Celery's defaults: (end-to-end tasks/s, worker tasks/s)."""
    with RedisServer() as redis_server:
        root = redis_server.url.rsplit("/", 1)[0]
        env = {**os.environ, "BENCH_REDIS": root}
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.apps.plain_noop:app", "worker", "--loglevel", "WARNING"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with environment(BENCH_REDIS=root):
                sys.modules.pop("bench.apps.plain_noop", None)
                from bench.apps import plain_noop

                plain_noop.noop.delay().get(timeout=60)  # the worker is up and warm
                first_seen: list[float] = []
                began = time.perf_counter()
                with plain_noop.app.producer_or_acquire() as producer:
                    for _ in range(n):
                        plain_noop.noop.apply_async(producer=producer)
                        if not first_seen and count_results(redis_server, 1) > 1:
                            first_seen.append(time.perf_counter())
                until(lambda: count_results(redis_server, 1) >= n + 1, 900, 0.05)
                took = time.perf_counter() - began
                drain = time.perf_counter() - (first_seen[0] if first_seen else began)
                plain_noop.app.close()
        finally:
            worker.terminate()
            worker.wait(30)
    return n / took, n / drain


def racto_end_to_end(n: int, collect_frame: bool = True) -> dict[str, float]:
    """``n`` rows through racto_nb on one worker (racto_nb's defaults) at a 0 ms model."""
    with tempfile.TemporaryDirectory() as folder, RedisServer() as redis_server:
        env = settings(redis_server.url, Path(folder))
        with environment(**env), WorkerProcess("bench.apps.instant:app", env=env, cwd=REPO) as process:
            client = racto_nb.connect(redis_server.url)
            api.run_batch(prompts(50, "warm"), worker=client, progress="none", timeout_s=120)
            source = prompts(n)
            refreshes: list[float] = []
            began = time.perf_counter()
            run = api.run_batch(source, worker=client, wait=False, progress="none")
            while not run.done.is_set():
                t = time.perf_counter()
                run.refresh()
                refreshes.append(time.perf_counter() - t)
                time.sleep(0.1)
            done_s = time.perf_counter() - began
            # The watcher builds the frame before it sets `done`, so `run.result()` is then free; what a
            # user waits for in a new kernel is `attach`: a fresh Batch reading the Parquet checkpoint.
            frame = run.result()
            t = time.perf_counter()
            frame = api.attach(frame.attrs["racto_batch_id"], worker=client, wait=True, progress="none")
            frame_s = time.perf_counter() - t
            ok = int((frame["status"] == "success").sum())
            worker_rss = rss_mb(process.pid)
            disconnect()
    if ok != n:
        raise RuntimeError(f"{n - ok} of {n} rows did not succeed")
    refreshes.sort()
    return {
        "rows_per_s": n / done_s,
        "done_s": done_s,
        "frame_s": frame_s,
        "refresh_median_ms": statistics.median(refreshes) * 1000,
        "refresh_p95_ms": refreshes[int(len(refreshes) * 0.95)] * 1000,
        "refresh_max_ms": refreshes[-1] * 1000,
        "refreshes": len(refreshes),
        "worker_rss_mb": worker_rss,
    }


def throughput_part(rows: int, plain_rows: int) -> str:
    racto = racto_end_to_end(rows)
    print(f"racto_nb {rows:,} rows: {racto}", flush=True)
    plain_e2e, plain_drain = plain_celery(plain_rows)
    print(f"plain Celery {plain_rows:,}: {plain_e2e:.0f}/s end to end, {plain_drain:.0f}/s worker", flush=True)
    return (
        "## Throughput at a 0 ms model, one worker\n\n"
        f"| what | rows | rows/s end to end | |\n|---|---:|---:|---|\n"
        f"| racto_nb: `run_batch(wait=False)` until `done`, worker on racto_nb's defaults (threads x256) "
        f"| {rows:,} | **{racto['rows_per_s']:,.0f}** | {racto['done_s']:.1f} s (frame built); `attach(id, wait=True)` "
        f"from a fresh Batch {racto['frame_s']:.2f} s; worker RSS {racto['worker_rss_mb']:.0f} MB |\n"
        f"| plain Celery no-op tasks, `apply_async` in a loop until every result is stored, worker on Celery's "
        f"defaults (prefork x{os.cpu_count()}) | {plain_rows:,} | {plain_e2e:,.0f} | the worker alone drained "
        f"{plain_drain:,.0f}/s |\n\n"
        f"racto_nb / plain Celery: **{racto['rows_per_s'] / plain_e2e:.1f}x** end to end, "
        f"{racto['rows_per_s'] / plain_drain:.1f}x against the plain worker's own pace. Rows travel "
        "several per message and their results are written per chunk in one pipeline, so the per-message "
        "cost is shared.\n\n"
        f"`run.refresh()` while those rows finished ({racto['refreshes']} refreshes, 100 ms apart, a watcher "
        f"thread refreshing too): median {racto['refresh_median_ms']:.1f} ms, p95 {racto['refresh_p95_ms']:.1f} "
        f"ms, worst {racto['refresh_max_ms']:.1f} ms.\n"
    )


# ---------------------------------------------------------------------------- default flags, seed API


def flags_part(rows: int = 2_000, latency_s: float = 1.0) -> str:
    server, base_url = start_in_process()
    control = FakeOpenAIControl(base_url)
    try:
        with tempfile.TemporaryDirectory() as folder, RedisServer() as redis_server:
            env = settings(redis_server.url, Path(folder), base_url)
            log = Path(folder) / "worker.log"
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "racto_nb.app", "worker", "--loglevel", "INFO"],
                cwd=REPO,
                env={**os.environ, **env, "OPENAI_API_KEY": KEY},
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
            )
            try:
                until(lambda: "ready." in log.read_text(), 60, 0.1)
                banner = next((line.strip() for line in log.read_text().splitlines() if "concurrency" in line), "?")
                with environment(**env):
                    client = racto_nb.connect(redis_server.url)
                    control.script("flags", [], latency_s=latency_s)
                    began = time.perf_counter()
                    frame = api.run_batch(prompts(rows, "[case:flags] "), worker=client, progress="none", timeout_s=600)
                    took = time.perf_counter() - began
                    disconnect()
            finally:
                worker.terminate()
                worker.wait(60)
    finally:
        server.terminate()
        server.wait(10)
    ok = int((frame["status"] == "success").sum())
    print(f"default flags: {ok}/{rows} in {took:.2f} s ({banner})", flush=True)
    ideal = math.ceil(rows / 256) * latency_s
    return (
        "## `celery -A racto_nb.app worker` with no flags\n\n"
        f"The worker's banner: `{banner}`. {rows:,} rows at {latency_s:.0f} s model latency (the test server "
        f"in its own process): **{took:.2f} s** for {ok:,} rows succeeded; ideal {ideal:.0f} s "
        f"({rows:,} / 256 threads, rounded up, x {latency_s:.0f} s); target <= 11.7 s.\n"
    )


def seed_part(items: int = 200, latency_s: float = 0.1, threads: int = 16, repeat: int = 3) -> str:
    server, base_url = start_in_process()
    control = FakeOpenAIControl(base_url)
    try:
        with tempfile.TemporaryDirectory() as folder, RedisServer() as redis_server:
            env = settings(redis_server.url, Path(folder), base_url)
            process_env = {**env, "OPENAI_API_KEY": KEY}
            with environment(**env), WorkerProcess("racto_nb.app", concurrency=threads, env=process_env, cwd=REPO):
                client = racto_nb.connect(redis_server.url)
                client.wait_parallel(client.parallel_batch([f"warm {i}" for i in range(20)]), timeout_s=60)
                control.script("seed", [], latency_s=latency_s)
                times = []
                for r in range(repeat):
                    began = time.perf_counter()
                    group = client.parallel_batch([f"item {r} {i} [case:seed]" for i in range(items)])
                    results = client.wait_parallel(group, timeout_s=120)
                    times.append(time.perf_counter() - began)
                    assert all(result.ok for result in results), [r for r in results if not r.ok][:3]
                disconnect()
    finally:
        server.terminate()
        server.wait(10)
    ideal = math.ceil(items / threads) * latency_s
    best, median = min(times), statistics.median(times)
    print(f"seed API: {times} vs ideal {ideal}", flush=True)
    return (
        "## Seed API: `parallel_batch` + `wait_parallel`\n\n"
        f"{items} items x {latency_s * 1000:.0f} ms on `--pool threads -c {threads}`: best **{best:.2f} s** "
        f"({best / ideal:.2f}x the ideal {ideal:.1f} s = {math.ceil(items / threads)} rounds), median of "
        f"{repeat} {median:.2f} s ({median / ideal:.2f}x). Target: within 1.1x.\n"
    )


def frame_part(rows: int) -> str:
    racto = racto_end_to_end(rows)
    print(f"frame {rows:,}: {racto}", flush=True)
    return (
        f"## A {rows:,}-row result frame\n\n"
        f"{rows:,} rows at a 0 ms model on one worker: done in {racto['done_s']:.0f} s "
        f"({racto['rows_per_s']:,.0f} rows/s); `done` is set once the watcher has built the frame, so "
        f"that time includes it; `api.attach(id, wait=True)` (a fresh Batch, as in a new kernel) rebuilt the "
        f"frame from the Parquet checkpoint in **{racto['frame_s']:.2f} s**. "
        f"`run.refresh()` during the run: median {racto['refresh_median_ms']:.1f} ms, "
        f"p95 {racto['refresh_p95_ms']:.1f} ms, worst {racto['refresh_max_ms']:.1f} ms "
        f"({racto['refreshes']} refreshes).\n"
    )


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="row counts of the submit part")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the throughput part")
    parser.add_argument("--plain-rows", type=int, default=20_000, help="plain Celery tasks of the throughput part")
    parser.add_argument("--frame-rows", type=int, default=1_000_000, help="rows of the frame part")
    parser.add_argument("--out", default=str(RESULTS), help="file to write, or - for stdout only")
    parser.add_argument("--submit-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.submit_child:
        print(json.dumps(submit_one(args.submit_child)))
        return
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    sections = []
    began = time.perf_counter()
    if "submit" in parts:
        sections.append(submit_part([int(s) for s in args.sizes.split(",")]))
    if "throughput" in parts:
        sections.append(throughput_part(args.rows, args.plain_rows))
    if "flags" in parts:
        sections.append(flags_part())
    if "seed" in parts:
        sections.append(seed_part())
    if "frame" in parts:
        sections.append(frame_part(args.frame_rows))
    report = (
        "# Scale: a million rows from a notebook\n\n"
        f"Machine: {machine()}. Redis on the same host; everything (kernel, workers, Redis, test server) "
        f"shares these cores, so compare rows within a run. Command: `python bench/bench_scale.py "
        f"{' '.join(sys.argv[1:])}`; took {time.perf_counter() - began:.0f} s.\n\n" + "\n".join(sections)
    )
    print(report)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
