"""The rate governor's accuracy and overhead, and the pay-once ledger's lookup cost.

Three measurements, each against real components:

* **accuracy**: ``celery -A racto_nb.app worker`` processes (2 × 16 threads)
  with ``RACTO_RPM`` set, a batch through the OpenAI-compatible test server
  (0 ms replies), and the arrival time of every request at that server: the
  busiest 10 s and 60 s windows against the limit;
* **overhead**: what one ``acquire`` costs a call (the Lua script in Redis,
  and the in-process bucket of the embedded mode), beside a plain Redis GET;
* **ledger**: looking up 100,000 fingerprints (all answered, none answered)
  in the Redis ledger and in the embedded mode's SQLite file, in the chunks of
  1,000 a batch uses, plus computing the fingerprints themselves.

Usage::

    python bench/bench_costs.py                 # everything (about 3 minutes)
    python bench/bench_costs.py --skip-accuracy --out -

Writes ``bench/results/costs.md`` (or ``--out``) and prints the same text.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

import racto_nb
from racto_nb import api
from racto_nb.costs.governor import MemoryGovernor, RateLimits, RedisGovernor
from racto_nb.costs.ledger import RedisLedger, SqliteLedger
from racto_nb.engine.spending import Spending, SpendSettings
from racto_nb.fleet.processes import WorkerPool
from racto_nb.kits import OpenAIKit
from racto_nb.models import ChatConfig
from racto_nb.testing import FakeOpenAIServer, RedisServer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench._machine import machine  # noqa: E402
from bench._support import environment  # noqa: E402

RESULTS = REPO / "bench" / "results" / "costs.md"
LOOKUP_CHUNK = 1_000


def windows(arrivals: Sequence[float], width: float) -> int:
    """The most arrivals in any window of ``width`` seconds starting at an arrival."""
    ordered = sorted(arrivals)
    best, end = 0, 0
    for start, t in enumerate(ordered):
        while end < len(ordered) and ordered[end] < t + width:
            end += 1
        best = max(best, end - start)
    return best


def accuracy(redis: RedisServer, fake: FakeOpenAIServer, rpm: int, rows: int) -> dict[str, float]:
    case = f"bench-rpm-{rpm}-{time.time_ns()}"
    env = {
        "RACTO_BROKER_URL": redis.url,
        "RACTO_PROVIDER": "openai",
        "RACTO_MODEL": "gpt-4o-mini",
        "RACTO_BASE_URL": fake.base_url,
        "RACTO_RPM": str(rpm),
    }
    workers = {**env, "OPENAI_API_KEY": "sk-bench"}
    with environment(**env), WorkerPool.of("racto_nb.app", 2, concurrency=16, env=workers, cwd=REPO):
        racto_nb.connect()
        source = pd.DataFrame({"review": [f"row {i} [case:{case}]" for i in range(rows)]})
        started = time.monotonic()
        frame = api.run_batch(source, "{review}", timeout_s=rows / rpm * 60 * 2 + 60, progress="none", cache=False)
        took = time.monotonic() - started
        racto_nb.disconnect()
    arrivals = [r.arrived_at for r in fake.requests(case)]
    assert len(arrivals) == rows and (frame["status"] == "success").all(), "the batch did not finish cleanly"
    span = max(arrivals) - min(arrivals)
    return {
        "rpm": rpm,
        "rows": rows,
        "took_s": took,
        "ideal_s": rows / rpm * 60,
        "worst_10s": windows(arrivals, 10.0),
        "limit_10s": rpm / 6,
        "worst_60s": windows(arrivals, 60.0) if span >= 60 else float("nan"),
        "mean_rpm": (rows - 1) / span * 60 if span else float("nan"),
    }


def per_call_us(call: Callable[[], object], n: int) -> float:
    for _ in range(min(200, n)):
        call()
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            call()
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


def overhead(redis: RedisServer) -> dict[str, float]:
    client = redis.client()
    unlimited = RateLimits(rpm=1e9, tpm=1e12)
    shared = RedisGovernor(client, "racto:rate:bench", unlimited)
    local = MemoryGovernor(unlimited)
    client.set("bench:plain", b"x")
    figures = {
        "redis_acquire_us": per_call_us(lambda: shared.acquire(500), 2_000),
        "redis_get_us": per_call_us(lambda: client.get("bench:plain"), 2_000),
        "memory_acquire_us": per_call_us(lambda: local.acquire(500), 50_000),
    }
    client.close()
    return figures


def fingerprints(n: int) -> tuple[list[str], float]:
    spending = Spending(OpenAIKit("gpt-4o-mini", base_url="http://127.0.0.1:9/v1"), SpendSettings())
    configs = [ChatConfig(user_message=f"Classify the sentiment of review {i}: it was fine") for i in range(n)]
    started = time.perf_counter()
    out = [spending.fingerprint(c) for c in configs]
    took = time.perf_counter() - started
    return [fp for fp in out if fp is not None], took / n * 1e6


def lookups(ledger: RedisLedger | SqliteLedger, answered: list[str], unknown: list[str]) -> dict[str, float]:
    entry = {
        "output": {"content": "positive", "usage": {"prompt_tokens": 20, "completion_tokens": 1}},
        "cost_usd": 3.6e-6,
    }
    started = time.perf_counter()
    for start in range(0, len(answered), LOOKUP_CHUNK):
        ledger.put_many(dict.fromkeys(answered[start : start + LOOKUP_CHUNK], entry))
    put_us = (time.perf_counter() - started) / len(answered) * 1e6

    def read(keys: list[str]) -> tuple[float, int]:
        started = time.perf_counter()
        found = 0
        for start in range(0, len(keys), LOOKUP_CHUNK):
            found += sum(e is not None for e in ledger.get_many(keys[start : start + LOOKUP_CHUNK]))
        return (time.perf_counter() - started) / len(keys) * 1e6, found

    hit_us, hits = read(answered)
    miss_us, misses = read(unknown)
    assert hits == len(answered) and misses == 0, (hits, misses)
    return {"put_us": put_us, "hit_us": hit_us, "miss_us": miss_us, "entries": ledger.count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="ledger entries and lookups (default 100,000)")
    parser.add_argument("--skip-accuracy", action="store_true", help="leave out the worker-process runs")
    parser.add_argument("--out", default=str(RESULTS), help="results file, or - for stdout only")
    args = parser.parse_args()

    lines = [
        "# Rate governor and pay-once ledger",
        "",
        f"Machine: {machine()}.",
        "",
        "Command: `python bench/bench_costs.py`",
        "",
    ]
    with RedisServer() as redis, FakeOpenAIServer() as fake, tempfile.TemporaryDirectory() as scratch:
        os.environ["RACTO_CHECKPOINT_DIR"] = str(Path(scratch) / "checkpoints")
        if not args.skip_accuracy:
            lines += [
                "## Accuracy: requests per window at the provider",
                "",
                "Two `celery -A racto_nb.app worker --pool threads -c 16` processes, one bucket in Redis; "
                "the test server replies at once and timestamps each arrival.",
                "",
                "| RACTO_RPM | rows | took | ideal | busiest 10 s (limit) | busiest 60 s (limit) | mean rate |",
                "|---|---|---|---|---|---|---|",
            ]
            for rpm, rows in ((600, 300), (1200, 1500)):
                r = accuracy(redis, fake, rpm, rows)
                sixty = "run shorter than 60 s" if r["worst_60s"] != r["worst_60s"] else f"{r['worst_60s']:.0f} ({rpm})"
                lines.append(
                    f"| {rpm} | {rows:,} | {r['took_s']:.1f} s | {r['ideal_s']:.1f} s | "
                    f"{r['worst_10s']:.0f} ({r['limit_10s']:.0f}) | {sixty} | {r['mean_rpm']:.0f}/min |"
                )
                print(lines[-1], flush=True)
            lines.append("")
        o = overhead(redis)
        lines += [
            "## Overhead per call",
            "",
            "| what | per call |",
            "|---|---|",
            f"| `RedisGovernor.acquire` (Lua script, one round trip) | {o['redis_acquire_us']:.0f} µs |",
            f"| a plain Redis `GET`, for scale | {o['redis_get_us']:.0f} µs |",
            f"| `MemoryGovernor.acquire` (embedded mode) | {o['memory_acquire_us']:.1f} µs |",
            "",
        ]
        print("\n".join(lines[-6:]), flush=True)
        answered, fp_us = fingerprints(args.rows)
        unknown = [fp[::-1] for fp in answered]  # same shape, never written
        client = redis.client()
        in_redis = lookups(RedisLedger(client, ttl_s=3600, max_entries=10 * args.rows), answered, unknown)
        in_file = lookups(
            SqliteLedger(Path(scratch) / "ledger.sqlite", ttl_s=3600, max_entries=10 * args.rows), answered, unknown
        )
        client.close()
        lines += [
            f"## Ledger at {args.rows:,} rows",
            "",
            f"Fingerprint of a row (kit identity + request, canonical JSON, SHA-256): {fp_us:.1f} µs.",
            f"Lookups in chunks of {LOOKUP_CHUNK:,} (one MGET / one SELECT per chunk).",
            "",
            "| ledger | write per row | lookup per row, answered | lookup per row, not answered | 100k lookups |",
            "|---|---|---|---|---|",
        ]
        for name, r in (("Redis (fleet)", in_redis), ("SQLite file (embedded)", in_file)):
            lines.append(
                f"| {name} | {r['put_us']:.1f} µs | {r['hit_us']:.1f} µs | {r['miss_us']:.1f} µs | "
                f"{r['hit_us'] * args.rows / 1e6:.2f} s |"
            )
        lines.append("")
        print("\n".join(lines[-4:]), flush=True)
    text = "\n".join(lines)
    if args.out != "-":
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
