"""The main job on the embedded default: 40 product reviews, one LLM call each, one label per row.

No broker, no API key: ``racto_nb.connect()`` starts a Celery worker inside this
process and the kit is SmolLM2-135M on the CPU. Set ``RACTO_BROKER_URL`` /
``RACTO_PROVIDER`` (see README) and the same script runs on a fleet.

``choices=`` makes the label a fact of decoding, not of the prompt: llama.cpp
generates under a grammar that allows exactly one of the three labels, so every
row gets one (a hosted model gets a strict JSON schema instead). Whether the
label is *right* is the model's business: the summary compares it with the star
ratings, next to what always answering the most common label would score.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

import racto_nb
from racto_nb.api import run_batch

DATA = Path(__file__).resolve().parent.parent / "notebooks" / "data" / "product_reviews.csv"
PROMPT = "Classify the sentiment of this product review as positive, negative or neutral.\n\n{review}"
LABELS = ["positive", "negative", "neutral"]


def expected(stars: int) -> str:
    """What the stars say: 4-5 positive, 3 neutral, 1-2 negative."""
    return "positive" if stars >= 4 else "negative" if stars <= 2 else "neutral"


def main() -> None:
    racto_nb.connect()
    reviews = pd.read_csv(DATA)
    started = time.perf_counter()
    results = run_batch(reviews, PROMPT, choices=LABELS, custom_id="id", max_tokens=8, timeout_s=600, progress="text")
    elapsed = time.perf_counter() - started
    table = reviews[["id", "rating"]].join(results[["status", "attempts", "latency_s", "label"]])
    table["stars say"] = reviews["rating"].map(expected)
    table["review"] = reviews["review"].str.slice(0, 50)
    print(table.to_string(index=False))

    truth = table["stars say"]
    label = table["label"].astype("string")
    agree = int((label == truth).sum())
    majority = truth.value_counts().idxmax()
    print("\nstatus counts:", results["status"].value_counts().to_dict())
    print(f"rows with exactly one of {LABELS}: {int(label.isin(LABELS).sum())} of {len(label)} (constrained decoding)")
    print(f"labels given: {results['label'].value_counts().to_dict()}")
    print(
        f"agreement with the stars: {agree} of {len(truth)} "
        f"(always answering {majority!r} would score {int((truth == majority).sum())})"
    )
    for name in LABELS:
        rows = truth == name
        print(f"  {name:8} reviews labelled {name}: {int((label[rows] == name).sum())} of {int(rows.sum())}")
    cached = int(results["cached"].sum())
    print(
        f"{len(results)} rows in {elapsed:.1f} s"
        + (f" ({cached} answered from the pay-once ledger of an earlier run)" if cached else "")
    )
    print(
        "SmolLM2-135M always answers with a label here, but which label is little better than a guess: "
        "it proves the path (and the grammar) offline. For labels to rely on, set RACTO_PROVIDER=openai "
        "and a larger model; the same choices= then go out as a strict JSON schema."
    )
    racto_nb.disconnect()


if __name__ == "__main__":
    main()
