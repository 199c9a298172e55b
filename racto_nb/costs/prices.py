"""Dollars per row: a dated price table for common models, overridable, and the cost of one call.

The table (``prices.json`` beside this module) lists list prices per million
input and output tokens, with the date they were read. Prices change; the
date is printed wherever a cost is, and two settings replace the table for
your model: ``RACTO_PRICE_IN_PER_MTOK`` and ``RACTO_PRICE_OUT_PER_MTOK`` (or
``price_in_per_mtok`` / ``price_out_per_mtok`` in ``racto_nb.toml``).

A model name matches its entry exactly, else the longest entry it starts with
(``gpt-4o-mini-2024-07-18`` is ``gpt-4o-mini``). A model with no price costs
``None``, not zero: an unknown bill is not a free one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

__all__ = ["Price", "PriceTable", "price_table"]


@dataclass(frozen=True)
class Price:
    """Dollars per million tokens, in and out."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollars for one call's usage."""
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1_000_000


class PriceTable:
    """Model name -> :class:`Price`, with an optional override that wins for every model."""

    def __init__(self, prices: dict[str, Price], *, as_of: str, override: Price | None = None) -> None:
        self.prices = prices
        self.as_of = as_of
        self.override = override
        self._by_length = sorted(prices, key=len, reverse=True)

    def price(self, model: str | None) -> Price | None:
        """The price of ``model`` (the override when one is set), or ``None`` when it is not in the table."""
        if self.override is not None:
            return self.override
        if not model:
            return None
        if model in self.prices:
            return self.prices[model]
        name = model.rsplit("/", 1)[-1]  # "openai/gpt-4o" as LiteLLM-style proxies name it
        for known in self._by_length:
            if name == known or name.startswith(known + "-") or name.startswith(known + "."):
                return self.prices[known]
        return None

    def cost(self, model: str | None, usage: dict[str, Any] | None) -> float | None:
        """Dollars for a call that reported ``usage`` (``prompt_tokens``, ``completion_tokens``)."""
        price = self.price(model)
        if price is None or not usage:
            return None
        return price.cost(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


@lru_cache(maxsize=8)
def _shipped() -> tuple[dict[str, Price], str]:
    data = json.loads(resources.files("racto_nb.costs").joinpath("prices.json").read_text(encoding="utf-8"))
    return {name: Price(float(pair[0]), float(pair[1])) for name, pair in data["models"].items()}, str(data["as_of"])


def price_table(price_in_per_mtok: float | None = None, price_out_per_mtok: float | None = None) -> PriceTable:
    """The shipped table, with both prices replaced when either override is given (the other then 0)."""
    prices, as_of = _shipped()
    override = None
    if price_in_per_mtok is not None or price_out_per_mtok is not None:
        override = Price(float(price_in_per_mtok or 0.0), float(price_out_per_mtok or 0.0))
    return PriceTable(prices, as_of=as_of, override=override)
