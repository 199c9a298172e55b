"""How long racto_nb takes to recover from a killed worker and from a restarted Redis, on its defaults.

Two measurements, each with real processes: a private ``redis-server``,
``celery -A racto_nb.app worker --pool threads`` processes configured only
with ``RACTO_BROKER_URL`` / ``RACTO_BASE_URL`` (racto_nb's defaults for the
rest: the 30 s stale bound, the 5 s sweep), and the OpenAI-compatible test
server answering each row after ``--latency`` seconds.

* **worker kill**: a batch runs on one worker; once a third of it is done the
  worker gets SIGKILL and a new one starts. Reported: the time from the kill
  until the dead worker's rows show ``WorkerLost`` in the notebook, until the
  last of them has run again, and until the batch is done; and how many
  rows were paid for twice (only calls in flight at the kill can be).
* **broker restart**: halfway through, ``redis-server`` is stopped and started
  again on its port, without persistence (everything in it is lost) and with
  ``--appendonly yes`` (crash: SIGKILL). Reported: the time from the restart
  until rows finish again, and until the batch is done; rows resent.

Usage::

    python bench/bench_recovery.py                # both (about 3 minutes)
    python bench/bench_recovery.py --only kill --out -

Writes ``bench/results/recovery.md`` (or ``--out``) and prints the same text.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import racto_nb
from racto_nb import api
from racto_nb.fleet.connection import disconnect
from racto_nb.fleet.processes import WorkerProcess
from racto_nb.models import TaskStatus
from racto_nb.notebook.runs import BatchRun
from racto_nb.testing import FakeOpenAIServer, RedisServer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench._machine import machine  # noqa: E402
from bench._support import until  # noqa: E402

RESULTS = REPO / "bench" / "results" / "recovery.md"
KEY = "sk-bench-recovery-0000"


def settings(broker: str, server: FakeOpenAIServer, folder: Path) -> dict[str, str]:
    env = {
        "RACTO_BROKER_URL": broker,
        "RACTO_BASE_URL": server.base_url,
        "RACTO_MODEL": "bench-model",
        "RACTO_CHECKPOINT_DIR": str(folder),
    }
    os.environ.update(env)
    return env


def worker(env: dict[str, str], folder: Path, concurrency: int = 16) -> WorkerProcess:
    return WorkerProcess(
        "racto_nb.app",
        concurrency=concurrency,
        env={**env, "OPENAI_API_KEY": KEY},
        log_path=folder / f"worker-{time.monotonic_ns()}.log",
    )


def prompts(server: FakeOpenAIServer, case: str, rows: int, latency_s: float) -> list[str]:
    for i in range(rows):
        server.script(f"{case}-{i}", [], latency_s=latency_s)
    return [f"row {i} [case:{case}-{i}]" for i in range(rows)]


def done(run: BatchRun) -> int:
    return run.batch.refresh().count(TaskStatus.SUCCESS)


def bench_kill(server: FakeOpenAIServer, rows: int, latency_s: float, folder: Path) -> dict[str, Any]:
    with RedisServer() as redis:
        env = settings(redis.url, server, folder)
        case = f"kill-{time.monotonic_ns()}"
        first = worker(env, folder).start()
        run = api.run_batch(
            prompts(server, case, rows, latency_s), worker=racto_nb.connect(redis.url), wait=False, progress="none"
        )
        until(lambda: done(run) >= rows // 3, 120)
        first.kill()
        killed = time.monotonic()
        with worker(env, folder) as second:
            ready_s = time.monotonic() - killed
            assert second.nodename

            def lost_rows() -> list[int]:
                frame = run.frame()
                lost = frame["status"].eq("retry") & frame["error_type"].fillna("").eq("WorkerLost")
                return [i for i, flag in enumerate(lost.to_numpy(dtype=bool)) if flag]

            until(lambda: bool(lost_rows()), 60)
            shown_s = time.monotonic() - killed
            lost = lost_rows()
            until(lambda: all(s == "success" for s in run.frame()["status"].iloc[lost]), 180)
            again_s = time.monotonic() - killed
            frame = run.wait(timeout_s=300)
            done_s = time.monotonic() - killed
        calls = [server.count(f"{case}-{i}") for i in range(rows)]
        disconnect()
    return {
        "rows": rows,
        "ok": int((frame["status"] == "success").sum()),
        "replacement ready": ready_s,
        "WorkerLost shown": shown_s,
        "lost rows done": again_s,
        "batch done": done_s,
        "paid twice": sum(1 for n in calls if n > 1),
    }


def bench_restart(
    server: FakeOpenAIServer, rows: int, latency_s: float, folder: Path, *, persistence: bool
) -> dict[str, Any]:
    extra = ("--appendonly", "yes", "--appendfsync", "always") if persistence else ()
    first = RedisServer(extra_args=extra).start()
    second: RedisServer | None = None
    try:
        env = settings(first.url, server, folder)
        case = f"restart-{persistence}-{time.monotonic_ns()}"
        with worker(env, folder, concurrency=8):
            run = api.run_batch(
                prompts(server, case, rows, latency_s), worker=racto_nb.connect(first.url), wait=False, progress="none"
            )
            until(lambda: done(run) >= rows // 3, 120)
            before = done(run)
            port, data_dir = first.port, first._tmpdir
            if persistence:
                assert first._proc is not None
                first._proc.send_signal(signal.SIGKILL)
                first._proc.wait()
                first._proc = None
                second = RedisServer(port=port, extra_args=(*extra, "--dir", str(data_dir))).start()
            else:
                first.stop()
                second = RedisServer(port=port).start()
            restarted = time.monotonic()
            until(lambda: done(run) > (before if persistence else 0), 120)
            moving_s = time.monotonic() - restarted
            frame = run.wait(timeout_s=300)
            done_s = time.monotonic() - restarted
        calls = [server.count(f"{case}-{i}") for i in range(rows)]
        disconnect()
    finally:
        if second is not None:
            second.stop()
        first.stop()
    return {
        "rows": rows,
        "ok": int((frame["status"] == "success").sum()),
        "stuck started": int((frame["status"] == "started").sum()),
        "moving again": moving_s,
        "batch done": done_s,
        "paid twice": sum(1 for n in calls if n > 1),
    }


def render(kill: dict[str, Any] | None, restarts: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [
        "# Recovery after a worker kill and a broker restart",
        "",
        f"Machine: {machine()}.",
        "",
        f"Command: `python bench/bench_recovery.py` (rows {args.rows}, model latency {args.latency} s). "
        "Workers are `celery -A racto_nb.app worker --pool threads` with racto_nb's defaults "
        "(stale bound 30 s, sweep every 5 s); only the broker and provider URLs are set.",
        "",
    ]
    if kill:
        lines += [
            "## SIGKILL of the only worker, a third of the way through",
            "",
            "Seconds from the kill (a new worker is started at once):",
            "",
            "| rows | replacement ready | `WorkerLost` shown | dead worker's rows done | batch done | rows ok "
            "| paid twice |",
            "|---|---|---|---|---|---|---|",
            f"| {kill['rows']} | {kill['replacement ready']:.1f} | {kill['WorkerLost shown']:.1f} | "
            f"{kill['lost rows done']:.1f} | {kill['batch done']:.1f} | {kill['ok']} | {kill['paid twice']} |",
            "",
            "Paid twice: only calls in flight at the kill can be (their result was not written); "
            "their `deliveries` column says 2.",
            "",
        ]
    if restarts:
        lines += [
            "## Redis stopped and started again on its port, a third of the way through",
            "",
            "Seconds from the restart:",
            "",
            "| persistence | rows | rows finishing again | batch done | rows ok | stuck `started` | paid twice |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in restarts:
            lines.append(
                f"| {name} | {r['rows']} | {r['moving again']:.1f} | {r['batch done']:.1f} | {r['ok']} | "
                f"{r['stuck started']} | {r['paid twice']} |"
            )
        lines += [
            "",
            "Without persistence Redis forgets every queued message, result and the manifest; the kernel "
            "saves the manifest again and resends what has no result from its checkpoint, so rows that had "
            "finished but whose results were not yet collected are paid again.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per model call")
    parser.add_argument("--only", choices=["kill", "restart"])
    parser.add_argument("--out", default=str(RESULTS), help="file to write, or - for stdout only")
    args = parser.parse_args()
    with FakeOpenAIServer() as server, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        kill = bench_kill(server, args.rows, args.latency, folder) if args.only != "restart" else None
        restarts = []
        if args.only != "kill":
            for name, persistence in (("none (all data lost)", False), ("appendonly yes, SIGKILL", True)):
                restarts.append(
                    (name, bench_restart(server, args.rows, args.latency / 5, folder, persistence=persistence))
                )
    text = render(kill, restarts, args)
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
