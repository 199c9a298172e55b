"""Tokens before anything is sent: a real tokenizer where one is available, an honest approximation elsewhere.

For OpenAI models the count is tiktoken's (the encoding for the model). tiktoken
reads its encoding files from the web on first use and caches them
(``TIKTOKEN_CACHE_DIR``); where neither the cache nor the web is there, or for
models tiktoken does not know, the count is characters / 4 and says it is
approximate. Loading is given a few seconds at most: an estimate never hangs
a cell on a network that drops packets.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, Field

__all__ = ["Estimate", "TokenCounter", "token_counter"]

#: Tokens every chat message costs beyond its text (OpenAI's documented overhead, rounded up).
PER_MESSAGE = 4
#: How long loading a tokenizer may take before the approximation is used instead.
LOAD_DEADLINE_S = 3.0


@dataclass(frozen=True)
class TokenCounter:
    """Counts a text's tokens for one model; ``exact`` is ``False`` for the characters / 4 rule."""

    model: str | None
    exact: bool
    encode: Callable[[str], Any] | None = None

    def count(self, text: str) -> int:
        if self.encode is not None:
            return len(self.encode(text))
        return math.ceil(len(text) / 4)

    def chat(self, texts: list[str]) -> int:
        """Tokens of a chat made of ``texts`` (system prompt, history, the message)."""
        return sum(self.count(text) + PER_MESSAGE for text in texts) + 2


@lru_cache(maxsize=32)
def token_counter(model: str | None) -> TokenCounter:
    """The best counter for ``model``: tiktoken's encoding when it loads in time, else the approximation."""
    if not model:
        return TokenCounter(model, exact=False)
    box: dict[str, Any] = {}

    def load() -> None:
        try:
            import tiktoken

            box["encoding"] = tiktoken.encoding_for_model(model.rsplit("/", 1)[-1])
        except Exception as exc:  # unknown model, no network, no cache: approximate instead
            box["error"] = exc

    thread = threading.Thread(target=load, name="racto-tiktoken", daemon=True)
    thread.start()
    thread.join(LOAD_DEADLINE_S)
    encoding = box.get("encoding")
    if encoding is None:
        return TokenCounter(model, exact=False)
    return TokenCounter(model, exact=True, encode=encoding.encode_ordinary)


class Estimate(BaseModel):
    """What a batch would cost, computed before anything is sent."""

    rows: int = Field(description="Rows in the source.")
    sent: int = Field(description="Rows that would be sent: not skipped, not already answered, twins once.")
    cached: int = Field(default=0, description="Rows the ledger already answers (they cost nothing).")
    duplicates: int = Field(default=0, description="Rows that are twins of an earlier row (sent once).")
    prompt_tokens: int = Field(description="Input tokens of the rows that would be sent.")
    approximate: bool = Field(description="True when tokens are counted as characters / 4, not by a tokenizer.")
    max_tokens: int
    model: str | None
    cost_usd_low: float | None = Field(description="If every answer were empty: the input alone.")
    cost_usd_high: float | None = Field(description="If every answer used max_tokens.")
    prices_as_of: str | None = None

    def __str__(self) -> str:
        how = "about" if self.approximate else "exactly"
        cost = (
            "unknown (no price for this model: set RACTO_PRICE_IN_PER_MTOK / RACTO_PRICE_OUT_PER_MTOK)"
            if self.cost_usd_low is None or self.cost_usd_high is None
            else f"${self.cost_usd_low:,.4f} to ${self.cost_usd_high:,.4f} (prices of {self.prices_as_of})"
        )
        return (
            f"{self.sent:,} of {self.rows:,} rows would be sent ({self.cached:,} already answered, "
            f"{self.duplicates:,} twins sent once), {how} {self.prompt_tokens:,} prompt tokens "
            f"for {self.model or 'the kit'}; cost {cost}"
        )
