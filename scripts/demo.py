"""The main job on the embedded default: 40 product reviews, one LLM call each.

No broker, no API key: ``racto_nb.connect()`` starts a Celery worker inside this
process and the kit is SmolLM2-135M on the CPU. Set ``RACTO_BROKER_URL`` /
``RACTO_PROVIDER`` (see README) and the same script runs on a fleet.

The prompt ends by naming the two labels and asking for exactly one word, which
is what makes a 135M model answer with a label instead of a sentence ("The
sentiment of this product review is ..."). Whether the label is *right* is
another matter at this size: the summary compares it with the star ratings.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import racto_nb
from racto_nb.api import run_batch

DATA = Path(__file__).resolve().parent.parent / "notebooks" / "data" / "product_reviews.csv"
PROMPT = (
    "Is this product review a complaint (negative) or praise (positive)?\n\n"
    "{review}\n\n"
    "Answer with exactly one word: positive or negative."
)
LABELS = ("positive", "negative")


def main() -> None:
    racto_nb.connect()
    reviews = pd.read_csv(DATA)
    results = run_batch(reviews, PROMPT, custom_id="id", max_tokens=16, timeout_s=600, progress="text")
    answers = results["content"].fillna("").str.strip().str.replace(r"\s+", " ", regex=True)
    table = reviews[["id", "rating"]].join(results[["status", "attempts", "latency_s"]])
    table["review"] = reviews["review"].str.slice(0, 40)
    table["answer"] = answers  # in full: the prompt keeps answers to a word or a short sentence
    # Left-aligned, header included: pandas right-aligns text, which hides where short answers start.
    width = max(int(answers.str.len().max() or 0), len("answer"))
    table = table.rename(columns={"answer": "answer".ljust(width)})
    print(table.to_string(index=False, formatters={"answer".ljust(width): lambda text: text.ljust(width)}))

    label = answers.str.lower().str.extract(r"^\W*(positive|negative)\W*$", expand=False)
    expected = reviews["rating"].map(lambda stars: "positive" if stars >= 4 else "negative" if stars <= 2 else None)
    clear = expected.notna()
    print("\nstatus counts:", results["status"].value_counts().to_dict())
    print(f"answers that are one label ({' or '.join(LABELS)}): {int(label.notna().sum())} of {len(label)}")
    print(
        f"labels that match the stars (4-5 positive, 1-2 negative): "
        f"{int((label[clear] == expected[clear]).sum())} of {int(clear.sum())}; "
        "SmolLM2-135M proves the path; for labels to rely on, set RACTO_PROVIDER=openai and a larger model"
    )
    racto_nb.disconnect()


if __name__ == "__main__":
    main()
