"""Pay once, stay within the provider's limits, know the bill.

Pure logic first (prices, the bucket's arithmetic, the headers it reads, the
fingerprint), then real components: our own redis-server, real
``celery -A racto_nb.app worker`` processes configured by environment only,
the fake OpenAI server counting and timestamping every request, and a new
Python process for "after a kernel restart".
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from IPython.core.interactiveshell import InteractiveShell

import racto_nb
from racto_nb import api
from racto_nb.costs.governor import MemoryGovernor, RateLimits, hold_from_headers
from racto_nb.costs.prices import price_table
from racto_nb.engine.spending import Spending, SpendSettings
from racto_nb.errors import InvalidArgument
from racto_nb.fleet.processes import WorkerPool
from racto_nb.kits import OpenAIKit
from racto_nb.models import ChatConfig, TaskStatus
from racto_nb.testing import FakeOpenAIServer, Fault, RedisServer

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- pure


def test_prices_match_exactly_then_by_the_longest_prefix_and_unknown_is_none() -> None:
    table = price_table()
    assert table.price("gpt-4o-mini") == table.price("gpt-4o-mini-2024-07-18") != table.price("gpt-4o")
    assert table.price("openai/gpt-4o-mini") == table.price("gpt-4o-mini")
    assert table.price("no-such-model") is None and table.cost("no-such-model", {"prompt_tokens": 9}) is None
    mini = table.price("gpt-4o-mini")
    assert mini is not None
    assert table.cost("gpt-4o-mini", {"prompt_tokens": 1_000_000, "completion_tokens": 0}) == mini.input_per_mtok
    override = price_table(price_in_per_mtok=2.0, price_out_per_mtok=8.0)
    assert override.cost("anything", {"prompt_tokens": 500_000, "completion_tokens": 250_000}) == 1.0 + 2.0
    assert table.as_of  # the table says how old it is


def test_the_bucket_grants_a_burst_of_half_a_second_then_the_rate() -> None:
    governor = MemoryGovernor(RateLimits(rpm=600))  # 10/s, bursts of 5
    granted = sum(governor.acquire(0) == 0 for _ in range(30))
    assert granted == 5
    wait = governor.acquire(0)
    assert 0 < wait <= 0.11
    governor.hold(5.0)
    assert governor.acquire(0) > 4.5  # a 429's Retry-After holds everyone


def test_tokens_are_reserved_then_settled() -> None:
    governor = MemoryGovernor(RateLimits(tpm=12000))  # 200 tokens/s, bursts of 100
    assert governor.acquire(80) == 0
    assert governor.acquire(80) > 0  # only 20 left
    governor.settle(80, 10)  # the call used 10, not 80
    assert governor.acquire(80) == 0


@pytest.mark.parametrize(
    ("headers", "hold"),
    [
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}, 360.0),
        ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1.5s"}, 1.5),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "120ms"}, 0.12),
        ({"x-ratelimit-remaining-requests": "12", "x-ratelimit-reset-requests": "1s"}, 0.0),
        ({}, 0.0),
    ],
)
def test_rate_limit_headers_hold_the_fleet_only_when_nothing_is_left(headers: dict[str, str], hold: float) -> None:
    assert hold_from_headers(headers) == pytest.approx(hold)


def test_the_fingerprint_changes_with_everything_that_shapes_the_answer() -> None:
    base = Spending(OpenAIKit("m", base_url="http://x/v1"), SpendSettings())
    config = ChatConfig(user_message="hi")
    first = base.fingerprint(config)
    assert first == base.fingerprint(ChatConfig(user_message="hi"))
    others = [
        base.fingerprint(ChatConfig(user_message="hi!")),
        base.fingerprint(ChatConfig(user_message="hi", temperature=0.7)),
        base.fingerprint(ChatConfig(user_message="hi", max_tokens=5)),
        base.fingerprint(ChatConfig(user_message="hi", extra={"seed": 1})),
        base.fingerprint(config, {"type": "choices", "choices": ["a", "b"]}),
        Spending(OpenAIKit("other", base_url="http://x/v1"), SpendSettings()).fingerprint(config),
        Spending(OpenAIKit("m", base_url="http://y/v1"), SpendSettings()).fingerprint(config),
        Spending(OpenAIKit("m", base_url="http://x/v1", system_prompt="Terse."), SpendSettings()).fingerprint(config),
    ]
    assert first not in others and len(set(others)) == len(others)

    class Anonymous:
        def chat(self, config: ChatConfig) -> str:
            return "?"

    assert Spending(Anonymous(), SpendSettings()).fingerprint(config) is None  # unknown kits are never cached


# ---------------------------------------------------------------------------- the fleet


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def fleet_env(
    redis: RedisServer, fake_openai: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    for name in list(os.environ):
        if name.startswith("RACTO_") and name != "RACTO_CHECKPOINT_DIR":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    env = {
        "RACTO_BROKER_URL": redis.url,
        "RACTO_PROVIDER": "openai",
        "RACTO_MODEL": "gpt-4o-mini",
        "RACTO_BASE_URL": fake_openai.base_url,
        "RACTO_TIMEOUT_S": "5",
        "RACTO_INITIAL_DELAY_S": "0.2",
        "RACTO_MAX_DELAY_S": "2",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    redis.client().flushdb()
    yield env
    api.stop_workers()
    racto_nb.disconnect()


def workers(env: dict[str, str], n: int = 1, concurrency: int = 8) -> WorkerPool:
    """``n`` worker processes of racto_nb.app, started by ``with``."""
    return WorkerPool.of(
        "racto_nb.app", n, concurrency=concurrency, env={**env, "OPENAI_API_KEY": "sk-test-worker"}, cwd=REPO
    )


def rows(case: str, *texts: str | None) -> pd.DataFrame:
    return pd.DataFrame({"review": [None if text is None else f"{text} [case:{case}]" for text in texts]})


@pytest.mark.slow
def test_each_request_is_paid_once_across_twins_batches_and_kernels(
    fleet_env: dict[str, str], fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    source = rows(unique_case, "great", "awful", "great", "fine")  # two twins: one request
    with workers(fleet_env):
        racto_nb.connect()
        first = api.run_batch(source, "Rate: {review}", timeout_s=60, progress="none")
        assert list(first["status"]) == ["success"] * 4
        assert list(first["cached"]) == [False, False, True, False]
        assert first["content"].iloc[2] == first["content"].iloc[0]
        assert fake_openai.count(unique_case) == 3

        again = api.run_batch(source, "Rate: {review}", timeout_s=60, progress="none")  # the cell re-run
        assert list(again["cached"]) == [True] * 4 and list(again["content"]) == list(first["content"])
        assert fake_openai.count(unique_case) == 3  # nothing paid twice

        # A restarted kernel is a new process: it reads the same ledger.
        script = (
            "import pandas as pd, racto_nb\n"
            "from racto_nb import api\n"
            "racto_nb.connect()\n"
            f"df = pd.DataFrame({{'review': {list(source['review'])!r}}})\n"
            "out = api.run_batch(df, 'Rate: {review}', timeout_s=60, progress='none')\n"
            "print(int(out['cached'].sum()), out['status'].tolist())\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] == "4" and fake_openai.count(unique_case) == 3

        fresh = api.run_batch(source, "Rate: {review}", timeout_s=60, progress="none", cache=False)
        assert not fresh["cached"].any() and fake_openai.count(unique_case) == 7  # no ledger, no twins

        assert api.clear_cache() >= 3
        api.run_batch(source, "Rate: {review}", timeout_s=60, progress="none")
        assert fake_openai.count(unique_case) == 10


@pytest.mark.slow
def test_retry_failed_does_not_pay_again_for_what_succeeded(
    fleet_env: dict[str, str], fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    bad = f"{unique_case}-bad"
    fake_openai.script(bad, ["401"])
    source = pd.DataFrame({"review": [f"ok [case:{unique_case}]", f"no [case:{bad}]"]})
    with workers(fleet_env):
        racto_nb.connect()
        run = api.run_batch(source, "{review}", wait=False, progress="none", timeout_s=60)
        assert run.done.wait(60)
        assert list(run.result()["status"]) == ["success", "failure"]
        assert run.retry_failed() == 1
        assert run.done.wait(60)
        assert list(run.result()["status"]) == ["success", "success"]
        assert fake_openai.count(unique_case) == 1 and fake_openai.count(bad) == 2


@pytest.mark.slow
def test_one_bucket_for_two_worker_processes_keeps_every_10_s_window_near_the_limit(
    fleet_env: dict[str, str], fake_openai: FakeOpenAIServer, unique_case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 rows at RACTO_RPM=600 on two workers: about 30 s, and the provider sees the limit.

    The bucket grants at most 100 per 10 s plus its half-second burst (105);
    the server counts arrivals, which reach it with some scheduling jitter
    after the grant.
    """
    monkeypatch.setenv("RACTO_RPM", "600")
    env = {**fleet_env, "RACTO_RPM": "600"}
    source = pd.DataFrame({"review": [f"row {i} [case:{unique_case}]" for i in range(300)]})
    with workers(env, n=2, concurrency=16):
        racto_nb.connect()
        started = time.monotonic()
        frame = api.run_batch(source, "{review}", timeout_s=120, progress="none")
        took = time.monotonic() - started
    assert (frame["status"] == "success").all()
    arrivals = sorted(r.arrived_at for r in fake_openai.requests(unique_case))
    assert len(arrivals) == 300
    worst = max(sum(1 for t in arrivals if start <= t < start + 10.0) for start in arrivals)
    assert worst <= 115, worst
    assert took >= 25.0, took  # 600 a minute: 300 rows cannot be faster than about 30 s


@pytest.mark.slow
def test_a_429_with_retry_after_holds_the_whole_fleet(
    fleet_env: dict[str, str], fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    slow = f"{unique_case}-429"
    fake_openai.script(slow, [Fault(429, retry_after="2")])
    env = {**fleet_env, "RACTO_RPM": "6000"}  # the governor is on; its rate is no obstacle here
    source = pd.DataFrame({"review": [f"first [case:{slow}]"] + [f"row {i} [case:{unique_case}]" for i in range(40)]})
    with workers(env, n=2, concurrency=2):
        racto_nb.connect()
        frame = api.run_batch(source, "{review}", timeout_s=60, progress="none")
    assert (frame["status"] == "success").all()
    hold_from = min(r.arrived_at for r in fake_openai.requests(slow))
    others = [r.arrived_at for r in fake_openai.requests(unique_case)]
    during = [t for t in others if hold_from + 0.3 < t < hold_from + 1.7]
    assert len(during) <= 3, during  # only calls already past the governor when the 429 came


@pytest.mark.slow
def test_out_of_quota_pauses_the_batch_and_resume_finishes_it(
    fleet_env: dict[str, str], fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    fake_openai.script(unique_case, [Fault(429, code="insufficient_quota", message="You exceeded your quota")])
    source = pd.DataFrame({"review": [f"row {i} [case:{unique_case}]" for i in range(20)]})
    with workers(fleet_env, concurrency=1):
        racto_nb.connect()
        run = api.run_batch(source, "{review}", wait=False, progress="none", timeout_s=60)
        deadline = time.monotonic() + 30
        progress = run.batch.refresh()
        while not progress.settled and time.monotonic() < deadline:
            time.sleep(0.1)
            progress = run.batch.refresh()
        assert progress.paused and "quota" in (progress.pause_reason or "")
        assert progress.count(TaskStatus.FAILURE) == 0 and progress.count(TaskStatus.PAUSED) > 0
        assert not run.done.is_set()
        run.resume()
        assert run.done.wait(60)
    frame = run.result()
    assert (frame["status"] == "success").all()


@pytest.mark.slow
def test_a_resume_while_workers_are_still_pausing_rows_loses_none_and_pays_once(
    fleet_env: dict[str, str], fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    # A call finds the quota gone; the worker then pauses the queued rows one message at a time.
    # Resuming at the first sight of the pause lands while it is still doing so: a row it pauses after
    # resume() collected the paused ones must be sent again, and no row may be paid for twice.
    quota_gone = Fault(429, code="insufficient_quota", message="You exceeded your quota")
    source = pd.DataFrame({"review": [f"row {i} [case:{unique_case}]" for i in range(600)]})
    pauses = 0
    with workers(fleet_env, concurrency=1):
        racto_nb.connect()
        fake_openai.script(unique_case, [quota_gone])
        run = api.run_batch(source, "{review}", wait=False, progress="none", timeout_s=60)
        deadline = time.monotonic() + 60
        while not run.done.is_set() and time.monotonic() < deadline:
            if run.batch.refresh().paused:
                pauses += 1
                if pauses < 8:
                    fake_openai.script(unique_case, [quota_gone])  # the next call finds it gone again
                run.resume()
            time.sleep(0.005)
        assert run.done.wait(60), run.batch.refresh()
    frame = run.result()
    assert frame["status"].value_counts().to_dict() == {"success": 600}
    assert fake_openai.count(unique_case) == 600 + pauses  # each refused call, then each row once


@pytest.mark.slow
def test_max_cost_pauses_before_the_cap_and_a_higher_cap_resumes(
    fleet_env: dict[str, str], fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    # $1 a token in, $1 out: each row reserves (prompt + max_tokens) dollars and really costs its usage.
    env = {**fleet_env, "RACTO_PRICE_IN_PER_MTOK": "1000000", "RACTO_PRICE_OUT_PER_MTOK": "1000000"}
    source = pd.DataFrame({"review": [f"row {i} [case:{unique_case}]" for i in range(10)]})
    with workers(env, concurrency=1):
        racto_nb.connect()
        run = api.run_batch(
            source, "{review}", wait=False, progress="none", max_tokens=20, max_cost_usd=100.0, timeout_s=60
        )
        deadline = time.monotonic() + 30
        progress = run.batch.refresh()
        while not progress.settled and time.monotonic() < deadline:
            time.sleep(0.1)
            progress = run.batch.refresh()
        assert progress.paused and "max_cost_usd" in (progress.pause_reason or "")
        assert 0 < progress.count(TaskStatus.SUCCESS) < 10 and progress.cost_usd <= 100.0
        with pytest.raises(InvalidArgument, match="already spent"):
            run.resume(max_cost_usd=1.0)
        # A restarted kernel resumes it by id, with the magic.
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "racto_nb")
        shell.run_line_magic(
            "racto_batch", f"--attach {run.batch_id} --resume --max-cost 10000 --out done --progress none"
        )
        frame = shell.user_ns["done"]
        assert run.done.wait(60)
    pd.testing.assert_frame_equal(frame, run.result())
    assert (frame["status"] == "success").all()
    usage = frame["prompt_tokens"] + frame["completion_tokens"]
    assert frame["cost_usd"].tolist() == pytest.approx(usage.astype(float).tolist())  # $1 a token


@pytest.mark.slow
def test_estimate_counts_rows_twins_cached_and_dollars_before_anything_is_sent(
    fleet_env: dict[str, str], fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    source = rows(unique_case, "great", "awful", "great", None, "fine")
    racto_nb.connect()
    guess = api.estimate(source, "Rate: {review}", max_tokens=10)
    assert (guess.rows, guess.sent, guess.duplicates, guess.cached) == (5, 3, 1, 0)
    assert guess.prompt_tokens > 0 and guess.model == "gpt-4o-mini" and guess.prices_as_of
    assert guess.cost_usd_low is not None and guess.cost_usd_high is not None
    assert 0 < guess.cost_usd_low < guess.cost_usd_high
    assert "3 of 5 rows would be sent" in str(guess)
    assert fake_openai.count(unique_case) == 0  # nothing was sent


@pytest.mark.slow
def test_the_embedded_mode_keeps_its_ledger_in_a_file_across_kernels(
    fake_openai: FakeOpenAIServer, tmp_path: Path, unique_case: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACTO_")}
    env.update(
        RACTO_PROVIDER="openai",
        RACTO_MODEL="gpt-4o-mini",
        RACTO_BASE_URL=fake_openai.base_url,
        RACTO_CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
        PYTHONPATH=str(REPO),
    )
    script = (
        "import racto_nb\n"
        "from racto_nb import api\n"
        "racto_nb.connect()\n"
        f"out = api.run_batch(['a [case:{unique_case}]', 'b [case:{unique_case}]'], timeout_s=60, progress='none')\n"
        "print(int(out['cached'].sum()))\n"
        "racto_nb.disconnect()\n"
    )
    outputs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.split()[-1])
    assert outputs == ["0", "2"] and fake_openai.count(unique_case) == 2
    assert (tmp_path / "checkpoints" / "ledger.sqlite").is_file()
