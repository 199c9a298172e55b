"""The main job on the embedded default: 40 product reviews, one LLM call each.

No broker, no API key: ``racto_nb.connect()`` starts a Celery worker inside this
process and the kit is SmolLM2-135M on the CPU. Set ``RACTO_BROKER_URL`` /
``RACTO_PROVIDER`` (see README) and the same script runs on a fleet.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import racto_nb
from racto_nb.api import run_batch

DATA = Path(__file__).resolve().parent.parent / "notebooks" / "data" / "product_reviews.csv"
PROMPT = "Is the sentiment of this product review positive or negative? Answer with one word.\n\nReview: {review}"


def main() -> None:
    racto_nb.connect()
    reviews = pd.read_csv(DATA)
    results = run_batch(reviews, PROMPT, custom_id="id", max_tokens=16, timeout_s=600, progress="text")
    table = reviews[["id", "rating"]].join(results[["status", "attempts", "latency_s", "content"]])
    table["review"] = reviews["review"].str.slice(0, 40)
    table["content"] = table["content"].str.strip().str.slice(0, 40)
    with pd.option_context("display.width", 160, "display.max_rows", 100):
        print(table.to_string(index=False))
    print("\nstatus counts:", results["status"].value_counts().to_dict())
    racto_nb.disconnect()


if __name__ == "__main__":
    main()
