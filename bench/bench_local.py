"""LocalKit's model process: what it costs, and how long SmolLM2's answers run.

* **start**: seconds from ``LocalKit.load()`` (spawn the child, import
  llama_cpp there, load the GGUF) until the model is ready; median of 5.
* **per-call overhead**: the same short call (a 10-token prompt, 1 completion
  token, temperature 0) made 40 times through ``LocalKit`` (JSON over pipes to
  the child) and 40 times on a ``llama_cpp.Llama`` in this process, alternating,
  both with ``reset()`` before each call; the difference of the medians is the
  pipe's price.
* **answer lengths**: the 40 demo reviews (``notebooks/data/product_reviews.csv``)
  under 4 prompts, 160 calls at temperature 0 with ``ChatConfig``'s default
  ``max_tokens`` (4096), so only the kit's cap ends a rambling answer:
  *before* = the old settings (cap 512, only the template's end-of-turn stop),
  *after* = today's defaults (cap 256, the ChatML stop strings).

This script imports llama_cpp itself for the in-process baseline; LocalKit never does.
Run: ``python bench/bench_local.py`` (writes ``bench/results/local.md``; about 3 minutes on 2 cores).
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

import pandas as pd  # noqa: E402

from racto_nb.kits.local import LocalKit, find_smollm2_gguf  # noqa: E402
from racto_nb.models import ChatConfig  # noqa: E402

RESULTS = REPO / "bench" / "results" / "local.md"
DATA = REPO / "notebooks" / "data" / "product_reviews.csv"
PROMPTS = {
    "demo (old)": "Is the sentiment of this product review positive or negative? Answer with one word.\n\n"
    "Review: {review}",
    "classify": "Classify the sentiment of: {review}",
    "by author": "Classify the sentiment of this review by {author}: {review}",
    "summary": "Summarise this product review in one sentence: {review}",
}
SHORT = "Say the word yes."
CALLS = 40


def start_times(n: int = 5) -> list[float]:
    out = []
    for _ in range(n):
        kit = LocalKit(n_threads=2)
        kit.load()
        assert kit.load_s is not None
        out.append(kit.load_s)
        kit.close()
    return out


def per_call(kit: LocalKit) -> tuple[list[float], list[float]]:
    """The same short call through ``kit`` and on an in-process ``Llama``, alternating (load hits both alike)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(find_smollm2_gguf()), n_ctx=2048, n_threads=2, seed=0, verbose=False)
    config = ChatConfig(user_message=SHORT, temperature=0.0, max_tokens=1)
    messages: Any = [{"role": "user", "content": SHORT}]
    kwargs = kit.sampling_kwargs(config)

    def in_process() -> None:
        llm.reset()  # type: ignore[no-untyped-call]
        llm.create_chat_completion(messages=messages, **kwargs)

    kit.chat(config)  # warm both
    in_process()
    through_pipe, local = [], []
    for _ in range(CALLS):
        started = time.perf_counter()
        kit.chat(config)
        through_pipe.append(time.perf_counter() - started)
        started = time.perf_counter()
        in_process()
        local.append(time.perf_counter() - started)
    return through_pipe, local


def lengths(kit: LocalKit, reviews: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for prompt, template in PROMPTS.items():
        for review in reviews.itertuples():
            started = time.perf_counter()
            reply = kit.chat(
                ChatConfig(user_message=template.format(review=review.review, author=review.author), temperature=0.0)
            )
            rows.append(
                {
                    "prompt": prompt,
                    "tokens": reply.usage["completion_tokens"],
                    "finish": reply.finish_reason,
                    "seconds": time.perf_counter() - started,
                }
            )
    return pd.DataFrame(rows)


def main() -> None:
    reviews = pd.read_csv(DATA)
    starts = start_times()
    kit = LocalKit(n_threads=2)
    kit.load()
    through_pipe, in_process = per_call(kit)
    info = kit.describe()

    before_kit = LocalKit(n_threads=2, max_tokens_cap=512, stop=())
    before = lengths(before_kit, reviews)
    before_kit.close()
    after = lengths(kit, reviews)
    kit.close()

    pipe_ms, local_ms = statistics.median(through_pipe) * 1e3, statistics.median(in_process) * 1e3
    lines = [
        "# LocalKit: model process start, per-call overhead, answer lengths",
        "",
        f"Measured {datetime.datetime.now():%Y-%m-%d %H:%M} on {platform.node()}, {platform.system()} "
        f"{platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        "`python bench/bench_local.py`, SmolLM2-135M-Instruct Q4_1, n_threads=2.",
        f"llama.cpp: `{info['system_info']}`; extra buffer types {info['extra_bufts_why']}.",
        "",
        "| what | figure |",
        "|---|---|",
        f"| model process start (spawn → model ready), median of 5 | {statistics.median(starts):.3f} s "
        f"(min {min(starts):.3f}, max {max(starts):.3f}) |",
        f"| short call through the child (JSON over pipes), median of {CALLS} | {pipe_ms:.2f} ms |",
        f"| same call on a Llama in this process, median of {CALLS} | {local_ms:.2f} ms |",
        f"| per-call overhead of the child | {pipe_ms - local_ms:+.2f} ms |",
        "",
        "Answer lengths, 40 demo reviews × 4 prompts = 160 calls at temperature 0, `max_tokens` left at 4096 "
        "(token counts are deterministic; the seconds are wall time and move with the machine's load):",
        "",
        "| settings | hit the cap | finish_reason=length | median tokens | p99 tokens | max tokens | total s |",
        "|---|---|---|---|---|---|---|",
    ]
    runs = (("before: cap 512, template stop only", 512, before), ("after: cap 256, ChatML stops", 256, after))
    for name, cap, frame in runs:
        hits, lengths_hit = int((frame.tokens >= cap).sum()), int((frame.finish == "length").sum())
        lines.append(
            f"| {name} | {hits} of {len(frame)} | {lengths_hit} | {frame.tokens.median():.0f} | "
            f"{frame.tokens.quantile(0.99):.0f} | {frame.tokens.max()} | {frame.seconds.sum():.1f} |"
        )
    lines += ["", "Per prompt (after): median / max completion tokens", ""]
    lines += ["| prompt | median | max |", "|---|---|---|"]
    for prompt, group in after.groupby("prompt", sort=False):
        lines.append(f"| {prompt} | {group.tokens.median():.0f} | {group.tokens.max()} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
